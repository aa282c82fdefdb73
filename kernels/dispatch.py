"""Choosing an implementation per op: the one list of names per op, the one "auto" rule, forcing for A/B.

Precedence: an explicit impl argument > force(op, impl) (what train.pretrain's --kernel flags set)
> the environment variable KERNEL_<OP> (e.g. KERNEL_ATTENTION=sdpa) > "auto".
Implementations register themselves here: ours in their kernel file, other libraries' in kernels/external.py.
"""
import contextlib
import functools
import logging
import os

import torch

# Every implementation name of every op: the flags' choices (with "auto"), the dispatch and the bench read these.
IMPLS = {
    "attention": ("triton", "blocked", "sdpa", "flex", "fa3", "fa2", "torch"),
    "cross_entropy": ("triton", "torch", "compile", "liger", "cce"),
    "newton_schulz": ("triton", "triton_full", "torch", "compile"),
}
OPS = tuple(IMPLS)
OURS = {"attention": "triton", "cross_entropy": "triton", "newton_schulz": "triton_full"}  # auto on CUDA
# auto on CUDA for bf16 attention over the whole causal context: SDPA's flash backend beats our kernel there at every
# d12/d20/d26 shape, fwd and fwd+bwd (H100, bench/results/20261124-113712/ab_attention.json); ours wins windowed.
FULL_CAUSAL_BF16 = "sdpa"
TRITON = {op: tuple(n for n in names if n.startswith("triton")) for op, names in IMPLS.items()}  # ours, in Triton
PORTABLE = {"attention": "blocked", "cross_entropy": "torch", "newton_schulz": "torch"}  # auto elsewhere

log = logging.getLogger("kernels")
_registry: dict[tuple[str, str], object] = {}
_forced: dict[str, str] = {}


class KernelUnavailable(RuntimeError):
    """An implementation that was asked for cannot run here (one line says why)."""


def choices(op: str) -> tuple[str, ...]:
    return ("auto",) + IMPLS[op]


def register(op: str, name: str):
    """Decorator: fn is implementation `name` of `op` (a name in IMPLS[op])."""
    if name not in IMPLS[op]:
        raise ValueError(f"{op}: {name!r} is not in dispatch.IMPLS[{op!r}]")

    def add(fn):
        _registry[(op, name)] = fn
        return fn
    return add


def implementation(op: str, name: str):
    """The function registered as `name` of `op` (every name in IMPLS is registered once kernels is imported)."""
    return _registry[(op, name)]


def force(op: str, impl: str | None) -> None:
    """Force op to impl for the whole process (None or "auto" clears it)."""
    if op not in IMPLS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if impl in (None, "auto"):
        _forced.pop(op, None)
    else:
        _forced[op] = impl


@contextlib.contextmanager
def forced(**impls: str | None):
    """Within the block, each op named runs the implementation given (None: auto); as before it afterwards."""
    saved = {op: _forced.get(op) for op in impls}
    for op, impl in impls.items():
        force(op, impl)
    try:
        yield
    finally:
        for op, impl in saved.items():
            force(op, impl)


def requested(op: str, impl: str = "auto") -> str:
    """The implementation asked for op: explicit argument, then force(), then KERNEL_<OP>, else "auto"."""
    if impl != "auto":
        return impl
    return _forced.get(op) or os.environ.get(f"KERNEL_{op.upper()}", "auto") or "auto"


def choose(op: str, impl: str, x: torch.Tensor, supported: bool, full: bool = False) -> str:
    """The implementation to run for op on input x: the one asked for (checked), or what "auto" picks.
    supported: our kernel takes x (its dtype and shape); full: attention over the whole causal context."""
    impl = requested(op, impl)
    if impl != "auto" and impl not in IMPLS[op]:
        raise KernelUnavailable(f"{op}: unknown impl {impl!r}; choose from {', '.join(choices(op))}")
    if impl == "auto":
        impl = auto(op, x.is_cuda, x.device.index or 0, x.dtype == torch.bfloat16, supported, full)
    return impl


def auto(op: str, on_cuda: bool, device_index: int, bf16: bool, supported: bool, full: bool = False) -> str:
    """The one rule: on CUDA for inputs our kernel takes, ours, except for bf16 attention FlashAttention-3 on
    Hopper when it is installed (said once, in the log), else SDPA's flash on full (not windowed) layers;
    elsewhere the portable torch path."""
    return _auto(op, on_cuda, device_index, bf16, supported, full)


# torch.compile calls auto while it traces and keeps the answer as a constant (no graph break for the probe and
# the log line): what torch.compiler.assume_constant_result(auto) sets, without importing dynamo (1.5 s) here.
auto._dynamo_marked_constant = True


@functools.cache  # once per kind of input
def _auto(op: str, on_cuda: bool, device_index: int, bf16: bool, supported: bool, full: bool) -> str:
    if not (on_cuda and supported):
        return PORTABLE[op]
    if op == "attention" and bf16:
        if _fa3_fits(device_index):
            log.warning("kernels: attention 'auto' runs FlashAttention-3 (fa3) instead of ours: installed, Hopper, "
                        "bf16")
            return "fa3"
        if full:
            return FULL_CAUSAL_BF16
    return OURS[op]


def _fa3_fits(device_index: int) -> bool:
    from kernels.external import fa3_module
    return fa3_module() is not None and torch.cuda.get_device_capability(device_index)[0] == 9


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Our Triton kernels run natively on CUDA tensors, and on CPU tensors under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
