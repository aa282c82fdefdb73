"""The kernel cases, one registry shared by `python -m bench.ab` and `pytest bench`, so the two never drift.

Per op: its implementations, the shapes of the spec (kernels.md) and tiny CPU versions, how to make inputs,
how to run one implementation (forward, or forward + backward through torch.autograd.grad), the useful
FLOPs and the minimal bytes moved, and the kernel module's own plain-torch reference, in high precision, for the
error column (float64 on the CPU, float32 without TF32 on CUDA), so a fast but wrong kernel shows up as wrong.
"""
import functools
import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import timing
from kernels import attention as attention_kernel
from kernels import cross_entropy as cross_entropy_kernel
from kernels import dispatch
from kernels import newton_schulz as newton_schulz_kernel
from kernels.dispatch import KernelUnavailable
from model.config import config_from_depth
from model.gpt import GPT
from train.errors import UserError, first_line
from train.metrics import H100_PEAK_BF16, peak_bf16_flops

H100_HBM_BYTES_PER_S = 3.35e12
COMPILED_IMPLS = ("compile", "flex")  # compiled per shape: dynamo is reset first, so no stale or dynamic graph
_TRITON_ON_CPU = "Triton kernels need CUDA here (the CPU interpreter checks correctness; it is no benchmark)"
NOT_ON_CPU = {  # why an implementation (a name of dispatch.IMPLS) is not timed on a CPU
    **{name: _TRITON_ON_CPU for names in dispatch.TRITON.values() for name in names},
    "compile": "torch.compile on the CPU takes minutes to build; benchmarked on CUDA only",
    "flex": "FlexAttention is compiled; benchmarked on CUDA only",
    "fa2": "FlashAttention-2 needs CUDA", "fa3": "FlashAttention-3 needs a Hopper GPU",
    "liger": "Liger-Kernel needs CUDA", "cce": "cut-cross-entropy needs CUDA",
}


@dataclass(frozen=True)
class Shape:
    id: str      # canonical text; Op.parse_shape(id) gives this shape back
    label: str   # what tables and charts show
    dims: tuple  # op-specific numbers


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (it never passes)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    err = ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    return err if math.isfinite(err) else float("inf")


@contextmanager
def exact_fp32():
    """float32 matmuls without TF32 (for the references)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def reference_dtype(device) -> torch.dtype:
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _generator(device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Op:
    name: str  # one of dispatch.OPS; its implementations are dispatch.IMPLS[name]
    cpu_impls: tuple
    modes: tuple  # "fwd" and/or "fwd+bwd"
    flop_keys: tuple  # the first is the one % of peak refers to

    def gpu_shapes(self) -> list[Shape]: ...
    def cpu_shapes(self) -> list[Shape]: ...
    def parse_shape(self, text: str) -> Shape: ...
    def make_inputs(self, shape: Shape, dtype, device, backward: bool, seed: int = 0) -> tuple: ...
    def run(self, impl: str, inputs: tuple, backward: bool) -> tuple: ...
    def reference(self, inputs: tuple, backward: bool) -> tuple: ...
    def flops(self, shape: Shape, backward: bool) -> dict: ...
    def bytes(self, shape: Shape, backward: bool, dtype) -> int: ...

    def compare(self, outs: tuple, refs: tuple) -> float:
        """The worst relative error over the outputs (and gradients)."""
        return max(rel_error(o, r) for o, r in zip(outs, refs))

    @property
    def impls(self) -> tuple:
        return dispatch.IMPLS[self.name]

    def skip_reason(self, impl: str, shape: Shape, device) -> str | None:
        if torch.device(device).type != "cuda" and impl not in self.cpu_impls:
            return NOT_ON_CPU.get(impl, f"{impl} needs CUDA")
        return None

    def tolerance(self, dtype) -> float:
        return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def _ints(text: str, what: str) -> list[int]:
    parts = text.lower().split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"bad {what} shape {text!r}")
    return [int(p) for p in parts]


# ----------------------------------------------------------------------------------------------
# 1. Muon orthogonalization (Polar Express): a shape is one or more stacks (K, m, n)

SPEC_DEPTHS = (12, 20, 26)  # the model sizes whose shapes the spec benchmarks (kernels.md)


def muon_stacks(depth: int) -> tuple:
    """(K, rows, cols) of every stack Muon orthogonalizes at that depth (one per matrix shape, the value-embedding
    gates' too), from the model itself (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(config_from_depth(depth))
    shapes = Counter(tuple(p.shape) for p in model.param_groups()["matrices"])
    return tuple((k, m, n) for (m, n), k in sorted(shapes.items()))


NS_MODELS = {depth: muon_stacks(depth) for depth in SPEC_DEPTHS}


class NewtonSchulz(Op):
    name = "newton_schulz"
    cpu_impls = ("torch",)
    modes = ("fwd",)
    flop_keys = ("dense", "symmetric")

    @staticmethod
    def _shape(stacks, label=None) -> Shape:
        sid = "+".join(f"{k}x{m}x{n}" for k, m, n in stacks)
        return Shape(sid, label or sid, tuple(stacks))

    def gpu_shapes(self):
        out = []
        for depth, stacks in NS_MODELS.items():  # alone: the block matrices (the spec's), not the tiny gates
            out += [self._shape([s], f"d{depth} {s[1]}x{s[2]} x{s[0]}") for s in stacks if min(s[1:]) >= 128]
        return out + [self._shape(NS_MODELS[20], "d20 whole model")]

    def cpu_shapes(self):
        return [self._shape([(4, 32, 32)], "tiny 32x32 x4"),
                self._shape([(4, 32, 32), (2, 32, 96), (2, 96, 32)], "tiny whole model")]

    def parse_shape(self, text):
        m = re.fullmatch(r"d(\d+)-all", text.strip().lower())
        if m:
            if int(m.group(1)) not in NS_MODELS:
                raise UserError(f"no whole-model stacks for {text!r}; known: "
                                f"{', '.join(f'd{d}-all' for d in NS_MODELS)}")
            return self._shape(NS_MODELS[int(m.group(1))], f"d{m.group(1)} whole model")
        stacks = []
        for part in text.split("+"):
            dims = _ints(part, "newton_schulz")
            if len(dims) != 3:
                raise UserError(f"bad newton_schulz shape {text!r}: want KxMxN (a stack of K m x n matrices), "
                                "several joined by '+', or d12-all / d20-all / d26-all")
            stacks.append(tuple(dims))
        return self._shape(stacks)

    def make_inputs(self, shape, dtype, device, backward, seed=0):
        g = _generator(device, seed)
        return tuple(torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shape.dims)

    def run(self, impl, inputs, backward):
        return tuple(newton_schulz_kernel.orthogonalize(G, impl=impl) for G in inputs)

    def reference(self, inputs, backward):
        with exact_fp32():
            return tuple(newton_schulz_kernel.orthogonalize_reference(G.to(reference_dtype(G.device)))
                         for G in inputs)

    def tolerance(self, dtype):
        # bf16 Polar Express itself lands a few 1e-2 from the float64 iteration on random inputs: the error
        # column is against float64/float32, so half precision gets a wider bar.
        return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-1

    def flops(self, shape, backward):
        return {"dense": sum(k * newton_schulz_kernel.flops_dense(m, n) for k, m, n in shape.dims),
                "symmetric": sum(k * newton_schulz_kernel.flops_symmetric(m, n) for k, m, n in shape.dims)}

    def bytes(self, shape, backward, dtype):
        elt = torch.empty((), dtype=dtype).element_size()
        return sum(2 * k * m * n * elt for k, m, n in shape.dims)  # read G, write X


# ----------------------------------------------------------------------------------------------
# 2. Fused linear cross-entropy with soft-cap: shape (N, H, V), always forward + backward

IGNORED_FRACTION = 0.05


def ce_reference(h, w, targets, dtype, chunk_bytes: int = 2 ** 30):
    """(loss, dh, dw) of CE(cap·tanh(h wᵀ/cap), targets) with 'mean' over non-ignored targets, in dtype.
    Chunked over rows so the N x V logits never exist at once (the big shapes have 2^31 of them)."""
    N, V = h.size(0), w.size(0)
    n_valid = (targets != -1).sum().clamp(min=1)
    wr = w.detach().to(dtype).requires_grad_(True)
    rows = max(1, chunk_bytes // (V * torch.empty((), dtype=dtype).element_size() * 4))
    loss, dh = torch.zeros((), dtype=dtype, device=h.device), []
    for i in range(0, N, rows):
        hc = h[i:i + rows].detach().to(dtype).requires_grad_(True)
        z = hc @ wr.t()
        z = cross_entropy_kernel.SOFTCAP * torch.tanh(z / cross_entropy_kernel.SOFTCAP)
        part = F.cross_entropy(z, targets[i:i + rows], ignore_index=-1, reduction="sum") / n_valid
        part.backward()
        loss += part.detach()
        dh.append(hc.grad)
    return loss, torch.cat(dh), wr.grad


class CrossEntropy(Op):
    name = "cross_entropy"
    cpu_impls = ("torch",)
    modes = ("fwd+bwd",)
    flop_keys = ("matmul",)

    @staticmethod
    def _shape(N, H, V) -> Shape:
        return Shape(f"{N}x{H}x{V}", f"N{N} H{H} V{V}", (N, H, V))

    def gpu_shapes(self):
        return [self._shape(N, H, 32768) for N in (8192, 65536) for H in (768, 1280, 1664)]

    def cpu_shapes(self):
        return [self._shape(200, 48, 1000), self._shape(1024, 64, 4096)]

    def parse_shape(self, text):
        dims = _ints(text, "cross_entropy")
        if len(dims) != 3:
            raise UserError(f"bad cross_entropy shape {text!r}: want NxHxV (rows x hidden x vocabulary)")
        return self._shape(*dims)

    def make_inputs(self, shape, dtype, device, backward, seed=0):
        N, H, V = shape.dims
        g = _generator(device, seed)
        h = torch.randn(N, H, generator=g, device=device)
        # logits with a std of about 4, so the soft-cap at 15 bends some of them
        w = torch.randn(V, H, generator=g, device=device) * (4 / math.sqrt(H))
        targets = torch.randint(0, V, (N,), generator=g, device=device)
        targets[torch.rand(N, generator=g, device=device) < IGNORED_FRACTION] = -1
        return h.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True), targets

    def run(self, impl, inputs, backward):
        h, w, targets = inputs
        loss = cross_entropy_kernel.linear_cross_entropy(h, w, targets, softcap=cross_entropy_kernel.SOFTCAP,
                                                         ignore_index=-1, reduction="mean", impl=impl)
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss, dh, dw

    def reference(self, inputs, backward):
        h, w, targets = inputs
        with exact_fp32():
            return ce_reference(h, w, targets, reference_dtype(h.device))

    def flops(self, shape, backward):
        return {"matmul": sum(cross_entropy_kernel.flops(*shape.dims))}  # forward + backward (always both here)

    def bytes(self, shape, backward, dtype):
        N, H, V = shape.dims
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * (N * H + V * H) * elt + 8 * N  # read h, W, targets; write dh, dW


# ----------------------------------------------------------------------------------------------
# 3. Sliding-window causal attention: shape (B, T, Hq, Hkv, D, window), window -1 = full

TORCH_ATTENTION_MAX_SCORE_BYTES = 2 ** 30  # the fp32 dense-mask reference is O(T²): beyond this, skipped
REFERENCE_SEQUENCES = 2  # the error column checks the first sequences of the batch (rows are independent)


class Attention(Op):
    name = "attention"
    cpu_impls = ("torch", "blocked", "sdpa")
    modes = ("fwd", "fwd+bwd")
    flop_keys = ("causal",)

    @staticmethod
    def _shape(B, T, Hq, D, window, Hkv=None) -> Shape:
        Hkv = Hkv or Hq
        heads = f"{Hq}" if Hkv == Hq else f"{Hq}/{Hkv}"
        w = "full" if window < 0 else f"w{window}"
        sid = f"{B}x{T}x{Hq}x{D}" + ("" if Hkv == Hq else f"x{Hkv}") + f":{w}"
        return Shape(sid, f"B{B} T{T} H{heads} D{D} {w}", (B, T, Hq, Hkv, D, window))

    def gpu_shapes(self):
        heads = [config_from_depth(depth).n_head for depth in SPEC_DEPTHS]  # 6, 10, 13 at head dim 128
        return [self._shape(B, 2048, H, 128, w) for H in heads for B in (8, 32) for w in (1024, -1)]

    def cpu_shapes(self):
        return [self._shape(2, 128, 2, 32, 32), self._shape(1, 128, 2, 32, -1), self._shape(1, 96, 4, 32, 48, Hkv=2)]

    def parse_shape(self, text):
        body, _, window = text.strip().lower().partition(":")
        dims = _ints(body, "attention")
        if len(dims) not in (4, 5) or (len(dims) == 5 and dims[2] % dims[4]):
            raise UserError(f"bad attention shape {text!r}: want BxTxHxD[xHkv][:wN|:full] "
                            "(kv heads dividing the query heads), e.g. 8x2048x6x128:w1024")
        if window in ("", "full"):
            w = -1
        elif re.fullmatch(r"w\d+", window):
            w = int(window[1:])
        else:
            raise UserError(f"bad attention window {window!r} in {text!r}: want wN (e.g. w1024) or full")
        B, T, Hq, D = dims[:4]
        return self._shape(B, T, Hq, D, w, Hkv=dims[4] if len(dims) == 5 else None)

    def skip_reason(self, impl, shape, device):
        B, T, Hq, _, _, _ = shape.dims
        if impl == "torch" and B * Hq * T * T * 4 > TORCH_ATTENTION_MAX_SCORE_BYTES:
            return (f"the fp32 dense-mask reference would hold {B * Hq * T * T * 4 / 2**30:.1f} GiB of scores "
                    f"per call (O(T²)); run only at small shapes")
        return super().skip_reason(impl, shape, device)

    def make_inputs(self, shape, dtype, device, backward, seed=0):
        B, T, Hq, Hkv, D, _ = shape.dims
        g = _generator(device, seed)
        make = lambda H: torch.randn(B, T, H, D, generator=g, device=device).to(dtype)  # noqa: E731
        q, k, v = make(Hq), make(Hkv), make(Hkv)
        if not backward:
            return q, k, v, shape.dims[5]
        return q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), shape.dims[5], make(Hq)

    def run(self, impl, inputs, backward):
        q, k, v, window = inputs[:4]
        out = attention_kernel.attention(q, k, v, window=window, impl=impl)
        if not backward:
            return (out,)
        return (out, *torch.autograd.grad(out, (q, k, v), inputs[4]))

    def reference(self, inputs, backward):
        # Sequences are independent (and dout is per sequence): the first ones check outputs and gradients.
        q, k, v, window = inputs[:4]
        n = min(REFERENCE_SEQUENCES, q.size(0))
        rdt = reference_dtype(q.device)
        leaves = [t[:n].detach().to(rdt).requires_grad_(backward) for t in (q, k, v)]
        with exact_fp32(), torch.enable_grad():
            ref = attention_kernel.reference(*leaves, window)
            if not backward:
                return (ref.detach(),)
            return (ref.detach(), *torch.autograd.grad(ref, leaves, inputs[4][:n].to(rdt)))

    def compare(self, outs, refs):
        n = refs[0].size(0)
        return max(rel_error(o[:n], r) for o, r in zip(outs, refs))

    def flops(self, shape, backward):
        B, T, Hq, _, D, window = shape.dims
        fwd = attention_kernel.flops(B, T, Hq, D, window)
        return {"causal": fwd + attention_kernel.flops(B, T, Hq, D, window, backward=True) if backward else fwd}

    def bytes(self, shape, backward, dtype):
        B, T, Hq, Hkv, D, _ = shape.dims
        elt = torch.empty((), dtype=dtype).element_size()
        q, kv = B * T * Hq * D * elt, B * T * Hkv * D * elt
        fwd = 2 * q + 2 * kv  # read q, k, v; write o
        return fwd + (3 * q + 4 * kv if backward else 0)  # bwd: read q, k, v, o, do; write dq, dk, dv


OPS = {op.name: op for op in (NewtonSchulz(), CrossEntropy(), Attention())}


def get_op(name: str) -> Op:
    if name not in OPS:
        raise UserError(f"unknown op {name!r}; choose from {', '.join(OPS)} or all")
    return OPS[name]


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def cases(op: Op, small: bool, impls=None, shapes=None, modes=None):
    """(shape, mode, impl) of op: every shape x mode x impl unless narrowed. Impls innermost, so a run cut
    short by a time limit still has complete side-by-sides, and one reference serves every impl."""
    shapes = shapes if shapes is not None else (op.cpu_shapes() if small else op.gpu_shapes())
    modes = [m for m in op.modes if modes is None or m in modes] or list(op.modes)
    return [(s, m, i) for s in shapes for m in modes for i in (impls or op.impls)]


_last_compiled = None
_reference_cache: dict = {}  # one entry: the reference of the last (op, shape, mode, dtype, device)


def cached_reference(op: Op, shape: Shape, mode: str, inputs: tuple, dtype, device) -> tuple:
    """The reference for the seed-0 inputs of a case, computed once for all its impls."""
    key = (op.name, shape.id, mode, dtype, str(device))
    if key not in _reference_cache:
        _reference_cache.clear()
        _reference_cache[key] = op.reference(inputs, mode == "fwd+bwd")
    return _reference_cache[key]


def measure(op: Op, shape: Shape, mode: str, impl: str, device, dtype=None, timed: bool = True,
            warmup: int = 25, rep: int = 100) -> dict:
    """One case: checked against the reference, peak memory, and (timed) the median time and throughputs.
    Returns a row: status 'ok', 'skipped' (reason says why) or 'error' (reason has the one-line error)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    backward = mode == "fwd+bwd"
    row = {"op": op.name, "shape": shape.id, "label": shape.label, "mode": mode, "impl": impl,
           "dtype": str(dtype).removeprefix("torch."), "status": "ok", "reason": None, "ms": None,
           "flops": op.flops(shape, backward), "bytes": op.bytes(shape, backward, dtype),
           "tol": op.tolerance(dtype)}
    reason = op.skip_reason(impl, shape, device)
    if reason:
        return row | {"status": "skipped", "reason": reason}
    try:
        _run_case(row, op, shape, mode, impl, device, dtype, timed, warmup, rep)
    except KernelUnavailable as e:  # an implementation that cannot run here says so: the case is skipped
        row |= {"status": "skipped", "reason": first_line(e)}
    except torch.OutOfMemoryError:
        row |= {"status": "error", "reason": "out of memory"}
    except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
        row |= {"status": "error", "reason": f"{type(e).__name__}: {first_line(e)}"}
    if device.type == "cuda":  # here, once the failed case's frame (and its tensors) is gone
        torch.cuda.empty_cache()
    return row


def _run_case(row, op, shape, mode, impl, device, dtype, timed, warmup, rep) -> None:
    global _last_compiled
    backward = mode == "fwd+bwd"
    if impl in COMPILED_IMPLS and _last_compiled != (op.name, impl, shape.id):
        torch._dynamo.reset()  # a fresh static-shape graph per shape, never a recompile-limit fallback
        _last_compiled = (op.name, impl, shape.id)
    inputs = op.make_inputs(shape, dtype, device, backward, seed=0)
    t0 = time.perf_counter()
    outs = op.run(impl, inputs, backward)  # the first call also compiles and autotunes
    timing.synchronize(device)
    row["first_call_s"] = time.perf_counter() - t0
    row["rel_error"] = op.compare(outs, cached_reference(op, shape, mode, inputs, dtype, device))
    row["ok"] = row["rel_error"] <= row["tol"]
    del outs
    row["peak_mem_mb"] = _mb(timing.peak_memory(functools.partial(op.run, impl, inputs, backward), device))
    del inputs
    if timed:
        seeds = iter(range(1, 10 ** 6))
        kw = {"warmup": warmup, "rep": rep} if device.type == "cuda" else {"budget_s": rep / 1e3}
        row.update(timing.bench(lambda *a: op.run(impl, a, backward),
                                lambda: op.make_inputs(shape, dtype, device, backward, seed=next(seeds)), device, **kw))
        row.update(throughput(row, device))


def throughput(row: dict, device) -> dict:
    """TFLOP/s per FLOP count, GB/s, and % of the device's bf16 peak and of the H100's, from row['ms']."""
    ms = row["ms"]
    out = {"tflops": {k: f / ms / 1e9 for k, f in row["flops"].items()}, "gbps": row["bytes"] / ms / 1e6}
    main = next(iter(row["flops"].values())) / (ms / 1e3)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    peak = peak_bf16_flops(name)
    out["pct_device_peak"] = 100 * main / peak if peak else None
    out["pct_h100_peak"] = 100 * main / H100_PEAK_BF16
    out["pct_h100_hbm"] = 100 * row["bytes"] / (ms / 1e3) / H100_HBM_BYTES_PER_S
    return out


def _mb(b):
    return None if b is None else b / 2 ** 20


