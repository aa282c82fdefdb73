"""Muon's orthogonalization: the Polar Express iteration (a tuned Newton-Schulz), batched over a stack.

For a stack G of shape (K, m, n) (or one (m, n) matrix), in the wide orientation (m <= n, transposed when
m > n), X = G / (||G||_F * NORM_MARGIN + NORM_EPS) per matrix, then 5 iterations of
    A = X Xᵀ;   B = b·A + c·A·A;   X = a·X + B·X
with the (a, b, c) below. The result has every singular value pushed into roughly [0.7, 1.2].

Kernels: A = X Xᵀ and B = b·A + c·A·A are symmetric, so their kernels launch one program per tile on or
below the diagonal and store each tile twice (at (i, j) and, transposed, at (j, i)): half the work of a
dense product. The third product a·X + B·X is not symmetric: cuBLAS (torch.baddbmm) by default,
or our plain tiled kernel with impl="triton_full".

dtype: the iteration runs in G's dtype and returns it. The optimizer passes bf16 stacks on GPU (what
nanochat's polar_express does with G.bfloat16()) and fp32 on CPU. Dots always accumulate in fp32.
"""
import torch
import triton
import triton.language as tl

from kernels import tuned
from kernels.dispatch import KernelUnavailable, choose, implementation, interpreting, register, triton_runs_on

# Polar Express coefficients (a, b, c), one triple per iteration (Amsel et al. 2025, as in nanochat).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORM_MARGIN, NORM_EPS = 1.01, 1e-6  # X = G / (||G||_F * NORM_MARGIN + NORM_EPS): every singular value below 1


def flops_dense(m: int, n: int, steps: int = 5) -> int:
    """FLOPs of the iteration with three dense matmuls, per matrix: 4·s²·l + 2·s³ per step (s = min dim)."""
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s ** 3)


def flops_symmetric(m: int, n: int, steps: int = 5) -> int:
    """FLOPs when X·Xᵀ and A·A compute only their lower triangle: 3·s²·l + s³ per step."""
    s, l = min(m, n), max(m, n)
    return steps * (3 * s * s * l + s ** 3)


# ----------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _lower_tile(t):
    """Program t -> tile (i, j) with i >= j, walking the lower triangle row by row: t = i(i+1)/2 + j."""
    i = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)  # fix the float sqrt's rounding, either way
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    return i, t - i * (i + 1) // 2


@triton.jit
def _store_symmetric(out_ptr, acc, i, j, m, s_ob, s_or, s_oc, BLOCK: tl.constexpr):
    """Store the (i, j) tile of a symmetric m x m matrix, and its transpose at (j, i) when off the diagonal."""
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    out_ptr += tl.program_id(1).to(tl.int64) * s_ob
    acc = acc.to(out_ptr.dtype.element_ty)
    mask = (rows[:, None] < m) & (cols[None, :] < m)
    tl.store(out_ptr + rows[:, None] * s_or + cols[None, :] * s_oc, acc, mask=mask)
    if i != j:  # the mirror, written row-major too (tl.trans, not a strided scatter) so stores stay coalesced
        mask_t = (cols[:, None] < m) & (rows[None, :] < m)
        tl.store(out_ptr + cols[:, None] * s_or + rows[None, :] * s_oc, tl.trans(acc), mask=mask_t)


@triton.jit
def _tile_product(acc, a_ptr, s_ar, s_ak, rows, b_ptr, s_bk, s_bc, cols, M, K, N,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rows, :] · B[:, cols] for A (M, K) and B (K, N), each read through its own strides."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * s_ar + k[None, :] * s_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * s_bk + cols[None, :] * s_bc,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _symmetric_kernel(x_ptr, out_ptr, m, n, coef_b, coef_c, s_xb, s_xr, s_xc, s_yk, s_yc, s_ob, s_or, s_oc,
                      POLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """A product known to be symmetric, X (K, m, n) times Y (K, n, m), one program per lower tile (i, j) and
    batch element, Y read through its own strides (s_yk, s_yc) from the same memory as X:
      POLY=False: A = X Xᵀ (Y = Xᵀ: X's strides swapped);
      POLY=True:  B = b·A + c·A·A for symmetric A (Y = A itself, n = m), A's (i, j) tile added in the epilogue.
    """
    i, j = _lower_tile(tl.program_id(0))
    x_ptr += tl.program_id(1).to(tl.int64) * s_xb
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc = _tile_product(acc, x_ptr, s_xr, s_xc, rows, x_ptr, s_yk, s_yc, cols, m, n, m, PRECISION, UPCAST, BLOCK_K)
    if POLY:
        a_ij = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xc,
                       mask=(rows[:, None] < m) & (cols[None, :] < m), other=0.0)
        acc = coef_c * acc + coef_b * a_ij.to(tl.float32)
    _store_symmetric(out_ptr, acc, i, j, m, s_ob, s_or, s_oc, BLOCK)


@triton.jit
def _update_kernel(b_ptr, x_ptr, out_ptr, m, n, coef_a, s_bb, s_br, s_bc, s_xb, s_xr, s_xc, s_ob, s_or, s_oc,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = a·X + B·X for B (K, m, m), X (K, m, n): a plain tiled matmul with the a·X epilogue."""
    tiles_n = tl.cdiv(n, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // tiles_n, tl.program_id(0) % tiles_n
    batch = tl.program_id(1).to(tl.int64)
    b_ptr += batch * s_bb
    x_ptr += batch * s_xb
    out_ptr += batch * s_ob
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _tile_product(acc, b_ptr, s_br, s_bc, rows, x_ptr, s_xr, s_xc, cols, m, m, n, PRECISION, UPCAST, BLOCK_K)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    x_ij = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xc, mask=mask, other=0.0)
    acc += coef_a * x_ij.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * s_or + cols[None, :] * s_oc, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Block sizes, chosen when a kernel is launched. On a GPU an autotune set: 128x128 tiles with BLOCK_K 64 feed
# Hopper's wgmma, 64x64 can win on small stacks (more programs per SM); configs over the shared memory of the
# device (fp32 inputs at 4 stages) are skipped by the autotuner. The symmetric kernels use square BLOCK x BLOCK
# tiles (a tile and its mirror have the same shape). Under the interpreter one small config: autotuning there
# is slow, and small tiles exercise the tails.
SYMMETRIC = tuned.autotune("newton_schulz.symmetric", _symmetric_kernel, ["m", "n", "POLY"], [
    triton.Config({"BLOCK": b, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for b, bk, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4)]])
UPDATE = tuned.autotune("newton_schulz.update", _update_kernel, ["m", "n"], [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4)]])
INTERPRETER_BLOCKS = {SYMMETRIC: {"BLOCK": 32, "BLOCK_K": 16}, UPDATE: {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}}


def _launch_per_tile(kernel: tuned.Autotuned, grid, args, kwargs, key: dict, like: torch.Tensor) -> None:
    """kernel over grid(block sizes): the tuned table's config or autotuned on a GPU (kernels/tuned.py), the one
    small config under the interpreter."""
    fixed = tuned.config(INTERPRETER_BLOCKS[kernel]) if interpreting() else None
    tuned.launch(kernel, grid, args, kwargs, key | {"dtype": like.dtype}, like.device, fixed)


# ----------------------------------------------------------------------------------------------------
# plain-PyTorch reference

@register("newton_schulz", "torch")
def orthogonalize_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The Polar Express iteration with plain matmuls, in G's dtype (the reference for the kernels)."""
    _check_input(G, steps)
    X = G
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NORM_MARGIN + NORM_EPS)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.contiguous()


def _check_input(G: torch.Tensor, steps: int) -> None:
    if G.dim() not in (2, 3):
        raise ValueError(f"newton_schulz: expected a (m, n) or (K, m, n) tensor, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"newton_schulz: expected a floating-point tensor, got {G.dtype}")
    if not 0 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"newton_schulz: steps must be in 0..{len(POLAR_EXPRESS_COEFFS)}, got {steps}")


# ----------------------------------------------------------------------------------------------------
# custom op around the Triton iteration (no autograd: only the optimizer calls it)

def _n_lower_tiles(m: int, block: int) -> int:
    t = triton.cdiv(m, block)
    return t * (t + 1) // 2


def _gram(X: torch.Tensor, A: torch.Tensor, precision: str, upcast: bool) -> None:
    """A = X Xᵀ."""
    K, m, n = X.shape
    _launch_per_tile(SYMMETRIC, lambda meta: (_n_lower_tiles(m, meta["BLOCK"]), K),
            (X, A, m, n, 0.0, 0.0, *X.stride(), X.stride(2), X.stride(1), *A.stride()),
            dict(POLY=False, PRECISION=precision, UPCAST=upcast), dict(m=m, n=n, POLY=False), X)


def _poly(A: torch.Tensor, B: torch.Tensor, b: float, c: float, precision: str, upcast: bool) -> None:
    """B = b·A + c·A·A."""
    K, m, _ = A.shape
    _launch_per_tile(SYMMETRIC, lambda meta: (_n_lower_tiles(m, meta["BLOCK"]), K),
            (A, B, m, m, b, c, *A.stride(), A.stride(1), A.stride(2), *B.stride()),
            dict(POLY=True, PRECISION=precision, UPCAST=upcast), dict(m=m, n=m, POLY=True), A)


def _update(B: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float, precision: str, upcast: bool,
            ours: bool) -> None:
    """out = a·X + B·X."""
    if not ours:  # cuBLAS (on CPU: the torch kernel), fp32 epilogue, one rounding
        torch.baddbmm(X, B, X, beta=a, out=out)
        return
    K, m, n = X.shape
    _launch_per_tile(UPDATE, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), K),
            (B, X, out, m, n, a, *B.stride(), *X.stride(), *out.stride()),
            dict(PRECISION=precision, UPCAST=upcast), dict(m=m, n=n), B)


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype)  # tests swap in a NaN-filled one


@torch.library.custom_op("nanochat::polar_express", mutates_args=())
def _polar_express_op(G: torch.Tensor, steps: int, ours_update: bool) -> torch.Tensor:
    """The Polar Express iteration on a (K, m, n) stack with our symmetric kernels; returns G's dtype.
    ours_update: a·X + B·X with our kernel too (impl "triton_full"), else cuBLAS ("triton")."""
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # the kernels take strides: a view, no copy
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NORM_MARGIN + NORM_EPS)
    K, m, n = X.shape
    # fp32 dots follow torch's own matmul setting (tf32 under "high", like cuBLAS); the interpreter is exact
    ieee = interpreting() or torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if (G.dtype == torch.float32 and ieee) else "tf32"  # ignored for 16-bit inputs
    upcast = interpreting() and G.dtype == torch.bfloat16
    A, B = _buffer((K, m, m), G), _buffer((K, m, m), G)
    buffers = [_buffer((K, m, n), G) for _ in range(min(steps, 2))]  # X ping-pongs between two
    for step, (a, b, c) in enumerate(POLAR_EXPRESS_COEFFS[:steps]):
        _gram(X, A, precision, upcast)
        _poly(A, B, b, c, precision, upcast)
        out = buffers[step % 2]
        _update(B, X, out, a, precision, upcast, ours_update)
        X = out
    return (X.mT if tall else X).contiguous()


@_polar_express_op.register_fake
def _(G, steps, ours_update):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------
# public function

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run_triton(G: torch.Tensor, steps: int, name: str, ours_update: bool) -> torch.Tensor:
    if not triton_runs_on(G):
        raise KernelUnavailable(f"newton_schulz: impl {name!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if G.dtype not in _TRITON_DTYPES:
        raise KernelUnavailable(f"newton_schulz: impl {name!r} takes fp32/fp16/bf16, got {G.dtype}")
    if G.numel() == 0:
        return orthogonalize_reference(G, steps)
    X = _polar_express_op(G if G.dim() == 3 else G.unsqueeze(0), steps, ours_update)
    return X if G.dim() == 3 else X.squeeze(0)


@register("newton_schulz", "triton")
def _triton(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Our symmetric kernels for X·Xᵀ and b·A + c·A·A, cuBLAS for a·X + B·X."""
    return _run_triton(G, steps, "triton", ours_update=False)


@register("newton_schulz", "triton_full")
def _triton_full(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Our kernels for all three products."""
    return _run_triton(G, steps, "triton_full", ours_update=True)


def orthogonalize(G: torch.Tensor, steps: int = 5, impl: str = "auto") -> torch.Tensor:
    """Polar Express orthogonalization of G ((m, n) or (K, m, n)); returns G's shape and dtype.

    impl: one of dispatch.IMPLS["newton_schulz"] or "auto" ("triton_full" on CUDA, "torch" elsewhere);
    also set by kernels.dispatch.force / KERNEL_NEWTON_SCHULZ.
    """
    _check_input(G, steps)
    impl = choose("newton_schulz", impl, G, G.dtype in _TRITON_DTYPES)
    return implementation("newton_schulz", impl)(G, steps)
