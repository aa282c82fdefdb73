"""Choosing an implementation per op, shared by every kernel.

Precedence: an explicit impl argument > force(op, impl) (what train.pretrain's --kernel flags set)
> the environment variable KERNEL_<OP> (e.g. KERNEL_ATTENTION=torch) > "auto".
"auto" is resolved by the op itself (ours on CUDA, the torch reference elsewhere).
"""
import os

import torch

OPS = ("attention", "cross_entropy", "newton_schulz")
_forced: dict[str, str] = {}


class KernelUnavailable(RuntimeError):
    """An implementation that was asked for cannot run here (one line says why)."""


def force(op: str, impl: str | None) -> None:
    """Force op to impl for the whole process (None or "auto" clears it)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if impl in (None, "auto"):
        _forced.pop(op, None)
    else:
        _forced[op] = impl


def requested(op: str, impl: str = "auto") -> str:
    """The implementation asked for op: explicit argument, then force(), then KERNEL_<OP>, else "auto"."""
    if impl != "auto":
        return impl
    return _forced.get(op) or os.environ.get(f"KERNEL_{op.upper()}", "auto") or "auto"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Our Triton kernels run natively on CUDA tensors, and on CPU tensors under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def check_choice(op: str, impl: str, choices: tuple[str, ...]) -> None:
    if impl not in choices:
        raise KernelUnavailable(f"{op}: unknown impl {impl!r}; choose from {', '.join(choices)}")
