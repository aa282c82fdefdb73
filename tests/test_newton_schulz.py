"""Muon's Polar Express orthogonalization: the Triton kernels against the plain-torch reference.

On CPU the kernels run under the interpreter (conftest sets TRITON_INTERPRET=1) with 32x32 tiles, so the
shapes below cross tile edges (tails), have 1 to 3 lower-triangle tiles, and come tall, wide, square,
batched and unbatched. Every buffer the kernels write starts as NaN. bf16 runs natively only on a GPU:
the interpreter's tl.dot is wrong on bf16 and its fp32 -> bf16 cast truncates instead of rounding.
"""
import pytest
import torch
import triton
import triton.language as tl

import kernels.newton_schulz as ns
from kernels.dispatch import KernelUnavailable
from kernels.newton_schulz import (POLAR_EXPRESS_COEFFS, flops_dense, flops_symmetric, orthogonalize,
                                   orthogonalize_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
SHAPES = [(1, 37, 53), (2, 53, 37), (45, 45), (2, 100, 70)]  # wide b=1, tall, square 2-D, 3 tiles batched


def rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def randn(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEV, dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """Every workspace the Triton path allocates (A, B, both X buffers) starts full of NaN."""
    monkeypatch.setattr(ns, "_buffer", lambda shape, like: torch.full(shape, float("nan"), device=like.device,
                                                                       dtype=like.dtype))


# ---------------------------------------------------------------------------------------------------
# each kernel alone, against its product

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K, m, n", [(1, 37, 53), (2, 70, 45), (1, 16, 16)])
def test_gram_kernel(dtype, K, m, n):
    X = randn((K, m, n), dtype)
    A = torch.full((K, m, m), float("nan"), device=DEV, dtype=dtype)
    ns._gram(X, A, "ieee", False)
    assert rel(A, X.double() @ X.double().mT) < TOL[dtype]


def test_gram_kernel_strided_input():
    """A transposed view (how a tall matrix reaches the kernel) is read through its strides, no copy."""
    X = randn((2, 70, 45), torch.float32).mT
    A = torch.full((2, 45, 45), float("nan"), device=DEV)
    ns._gram(X, A, "ieee", False)
    assert rel(A, X.double() @ X.double().mT) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K, m", [(1, 37), (2, 70)])
def test_poly_kernel(dtype, K, m):
    X = randn((K, m, m + 5), torch.float32) / m
    A = (X @ X.mT).to(dtype)  # symmetric, as the kernel assumes
    B = torch.full_like(A, float("nan"))
    b, c = POLAR_EXPRESS_COEFFS[0][1:]
    ns._poly(A, B, b, c, "ieee", False)
    A64 = A.double()
    assert rel(B, b * A64 + c * A64 @ A64) < TOL[dtype]


@pytest.mark.parametrize("ours", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_kernel(dtype, ours):
    K, m, n = 2, 37, 70
    Bm = randn((K, m, m), torch.float32, seed=1)
    B = ((Bm + Bm.mT) / m).to(dtype)
    X = randn((K, m, n), dtype, seed=2)
    out = torch.full_like(X, float("nan"))
    a = POLAR_EXPRESS_COEFFS[1][0]
    ns._update(B, X, out, a, "ieee", False, ours)
    assert rel(out, a * X.double() + B.double() @ X.double()) < TOL[dtype]


@triton.jit
def _lower_tile_probe(i_ptr, j_ptr, N: tl.constexpr):
    t = tl.arange(0, N)
    i, j = ns._lower_tile(t)
    tl.store(i_ptr + t, i)
    tl.store(j_ptr + t, j)


def test_lower_tile_mapping_covers_the_triangle_once():
    """Program t -> (i, j): every tile with i >= j exactly once, for up to 180 tile rows (m = 23040 at 128)."""
    N = 16384
    i = torch.empty(N, dtype=torch.int32, device=DEV)
    j = torch.empty(N, dtype=torch.int32, device=DEV)
    _lower_tile_probe[(1,)](i, j, N=N)
    rows = torch.arange(200)
    expect_i = torch.repeat_interleave(rows, rows + 1)[:N]
    expect_j = torch.cat([torch.arange(r + 1) for r in rows])[:N]
    assert torch.equal(i.cpu().long(), expect_i) and torch.equal(j.cpu().long(), expect_j)


# ---------------------------------------------------------------------------------------------------
# the whole iteration

# triton and triton_full share the symmetric kernels and differ in the update (cuBLAS, on a CPU torch's, or ours)
@pytest.mark.parametrize("impl, dtype", [("triton", torch.float32), ("triton", torch.float16),
                                         ("triton_full", torch.float32), ("triton_full", torch.float16)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(poisoned, shape, dtype, impl):
    G = randn(shape, dtype)
    out = orthogonalize(G, impl=impl)
    ref = orthogonalize_reference(G)
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    assert rel(out, ref) < TOL[dtype]
    if dtype == torch.float16:  # and no less accurate than the fp16 reference, both against fp64
        exact = orthogonalize_reference(G.double())
        assert rel(out, exact) < 1.5 * rel(ref, exact)


@pytest.mark.parametrize("impl", ["triton", "triton_full"])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_fewer_steps(poisoned, steps, impl):
    G = randn((2, 40, 72), torch.float32)
    assert rel(orthogonalize(G, steps=steps, impl=impl), orthogonalize_reference(G, steps=steps)) < 1e-4


@pytest.mark.parametrize("impl", ["triton", "triton_full"])
def test_non_contiguous_input(poisoned, impl):
    G = randn((3, 60, 90), torch.float32)[::2, 5:50, ::2]  # batch, row and column strides all odd
    assert rel(orthogonalize(G, impl=impl), orthogonalize_reference(G.contiguous())) < 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton_full"])
@pytest.mark.parametrize("shape", [(4, 37, 53), (3, 70, 45), (2, 33, 80)], ids=str)
def test_singular_values_in_polar_express_band(impl, shape):
    """Rectangular random matrices: every singular value lands in roughly [0.7, 1.2].

    (Random square matrices have singular values near 0 that no 5-step polynomial can lift; the
    band is only promised down to Polar Express's design floor, which rectangular ones clear.)
    """
    G = randn(shape, torch.float32, seed=3)
    sv = torch.linalg.svdvals(orthogonalize(G, impl=impl).double().cpu())
    assert sv.min() > 0.7 and sv.max() < 1.2, (sv.min().item(), sv.max().item())


def test_largest_singular_value_bounded_on_square():
    sv = torch.linalg.svdvals(orthogonalize(randn((2, 45, 45), torch.float32), impl="triton").double().cpu())
    assert sv.max() < 1.2 and sv.median() > 0.7


# ---------------------------------------------------------------------------------------------------
# dispatch, inputs, FLOP counts, torch.compile

def test_auto_is_torch_on_cpu():
    if DEV == "cuda":
        pytest.skip("on CUDA 'auto' picks triton (covered by the cuda tests)")
    G = randn((2, 37, 53), torch.float32)
    assert torch.equal(orthogonalize(G), orthogonalize_reference(G))


def test_unknown_or_unrunnable_impl(monkeypatch):
    G = randn((37, 53), torch.float32)
    with pytest.raises(KernelUnavailable, match="unknown impl"):
        orthogonalize(G, impl="cutlass")
    monkeypatch.setenv("KERNEL_NEWTON_SCHULZ", "bogus")
    with pytest.raises(KernelUnavailable, match="unknown impl"):
        orthogonalize(G)
    monkeypatch.delenv("KERNEL_NEWTON_SCHULZ")
    with pytest.raises(KernelUnavailable, match="fp32/fp16/bf16"):
        orthogonalize(G.double(), impl="triton")
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(KernelUnavailable, match="needs a CUDA tensor"):
            orthogonalize(G, impl="triton")


def test_bad_shapes_and_steps():
    with pytest.raises(ValueError, match="expected a"):
        orthogonalize(torch.randn(5), impl="torch")
    with pytest.raises(ValueError, match="steps must be"):
        orthogonalize(torch.randn(4, 4), steps=6, impl="triton")


def test_flop_counts_match_the_spec():
    assert flops_dense(768, 3072) == 5 * (4 * 768 ** 2 * 3072 + 2 * 768 ** 3)
    assert flops_symmetric(3072, 768) == 5 * (3 * 768 ** 2 * 3072 + 768 ** 3)  # m is the smaller dim
    assert flops_dense(768, 768) / flops_symmetric(768, 768) == 1.5
    assert round(flops_dense(768, 3072) / flops_symmetric(768, 3072), 3) == 1.385


def test_compiles_without_graph_break():
    """The custom op traces under fullgraph=True with its fake impl (aot_eager: no inductor compile on CPU)."""
    G = randn((2, 53, 37), torch.float32)
    f = torch.compile(lambda g: orthogonalize(g, impl="triton") * 2, backend="aot_eager", fullgraph=True)
    assert rel(f(G), 2 * orthogonalize_reference(G)) < 1e-4


# ---------------------------------------------------------------------------------------------------
# GPU only: bf16 natively, on a model-like stack

@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "triton_full"])
@pytest.mark.parametrize("shape", [(4, 768, 3072), (4, 3072, 768), (6, 768, 768), (3, 300, 517)], ids=str)
def test_bf16_cuda(poisoned, shape, impl):
    """bf16 through 5 iterations drifts ~4e-2 from exact (coefficients up to 22 amplify rounding), for the
    reference too; so ours is held to the reference's own error against fp32, not to 1e-2 against it."""
    G = randn(shape, torch.bfloat16)
    out = orthogonalize(G, impl=impl)
    ref = orthogonalize_reference(G)
    exact = orthogonalize_reference(G.float())
    assert out.dtype == torch.bfloat16 and out.shape == G.shape
    assert rel(out, exact) < 1.25 * rel(ref, exact) + 1e-3
    assert rel(out, ref) < 0.1
    assert orthogonalize(G).dtype == torch.bfloat16  # auto picks triton on CUDA
