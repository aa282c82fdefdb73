"""Fused linear cross-entropy with soft-cap against the fp32 reference: loss, dh and dW.

On CPU the Triton kernel runs under the interpreter (conftest sets TRITON_INTERPRET=1), fp32 and fp16;
bf16 runs only on a GPU. CHUNK_ELEMENTS is shrunk so every case crosses several row chunks with a tail,
and vocabularies are not multiples of the kernel's block (128 under the interpreter).
"""
import importlib.util

import pytest
import torch

import kernels.cross_entropy as ce
from kernels.cross_entropy import flops, linear_cross_entropy, reference
from kernels.dispatch import KernelUnavailable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def make(shape, H, V, dtype, ignore_frac=0.2, real_vocab=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 4  # logits of a few units: the cap matters
    y = torch.randint(0, real_vocab or V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -1
    return h.to(DEV, dtype), w.to(DEV, dtype), y.to(DEV)


def check(h, w, y, softcap, reduction, tol, seed=1):
    """Loss and both gradients (for a random upstream gradient) of the triton path vs the fp32 reference."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    out = linear_cross_entropy(h, w, y, softcap=softcap, reduction=reduction, impl="triton")
    ref = reference(h32, w32, y, softcap, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(DEV)
    dh, dw = torch.autograd.grad(out, (h, w), up)
    rdh, rdw = torch.autograd.grad(ref, (h32, w32), up)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert rel(out, ref) < tol
    assert rel(dh, rdh) < tol
    assert rel(dw, rdw) < tol
    return out, dh, dw


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 16 * 300)  # 16 rows per chunk at V = 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap", [15.0, None, 0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(small_chunks, dtype, softcap, reduction):
    h, w, y = make((37,), 24, 300, dtype)
    check(h, w, y, softcap, reduction, TOL[dtype])


def test_leading_dims_and_batch_one(small_chunks):
    check(*make((2, 19), 16, 300, torch.float32), 15.0, "none", 1e-4)
    check(*make((1,), 16, 300, torch.float32, ignore_frac=0.0), 15.0, "mean", 1e-4)


def test_padded_vocab(small_chunks):
    """The weight has the model's padded rows (up to a multiple of 64): they are in the softmax, never targets."""
    V = 250
    padded = -(-V // 64) * 64
    h, w, y = make((41,), 32, padded, torch.float32, real_vocab=V)
    out, _, dw = check(h, w, y, 15.0, "mean", 1e-4)
    assert dw[V:].abs().sum() > 0  # padding rows do get softmax gradient, as in the unfused model


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_is_zero_not_nan(small_chunks, impl, reduction):
    h, w, _ = make((20,), 16, 300, torch.float32)
    y = torch.full((20,), -1, device=DEV)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(h, w, y, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_ignored_rows_get_zero_gradient(small_chunks):
    h, w, y = make((30,), 16, 300, torch.float32, ignore_frac=0.5)
    _, dh, _ = check(h, w, y, 15.0, "mean", 1e-4)
    assert (y == -1).any() and (dh[y == -1] == 0).all() and (dh[y != -1] != 0).any()


def test_chunk_driver_writes_every_output(small_chunks):
    """Poison the driver's outputs with NaN: every row's loss, lse and dh must be written."""
    h, w, y = make((37,), 24, 300, torch.float32)
    N = h.shape[0]
    nats, lse = torch.full((N,), float("nan")), torch.full((N,), float("nan"))
    dh, dw = torch.full_like(h, float("nan")), torch.zeros_like(w)
    ce._chunked(h, w, y, 15.0, -1, nats, lse, False, dh, dw)
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference(h32, w32, y, 15.0, reduction="none")
    ref.sum().backward()
    logits = 15.0 * torch.tanh(h @ w.t() / 15.0)
    assert rel(nats, ref) < 1e-4
    assert rel(lse, torch.logsumexp(logits, dim=1)) < 1e-4
    assert rel(dh, h32.grad) < 1e-4 and rel(dw, w32.grad) < 1e-4


def test_no_grad_eval_path():
    """Under no_grad (bpb evaluation) no gradient is made; the per-token nats still match."""
    h, w, y = make((2, 23), 16, 200, torch.float32)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, y, reduction="none", impl="triton")
    assert rel(out, reference(h, w, y, 15.0, reduction="none")) < 1e-4


def test_only_weight_requires_grad():
    h, w, y = make((13,), 16, 200, torch.float32)
    w.requires_grad_()
    linear_cross_entropy(h, w, y, impl="triton").backward()
    w32 = w.detach().clone().requires_grad_()
    reference(h, w32, y).backward()
    assert h.grad is None and rel(w.grad, w32.grad) < 1e-4


def test_mean_backward_without_precomputed_grads(small_chunks):
    """The op's fallback: 'mean' whose forward made no gradients recomputes them in the backward."""
    h, w, y = make((37,), 24, 300, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = ce._forward_op(h, w, y, 15.0, -1, "mean", False)[0]
    dh, dw = torch.autograd.grad(3 * loss, (h, w))
    h32, w32 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rdh, rdw = torch.autograd.grad(3 * reference(h32, w32, y), (h32, w32))
    assert rel(dh, rdh) < 1e-4 and rel(dw, rdw) < 1e-4


def test_custom_ops_registration():
    """Schema, fake (meta) implementation and autograd registration of both ops, as torch.compile sees them."""
    h, w, y = make((9,), 16, 70, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    for reduction in ("mean", "none"):
        for with_grad in (True, False):
            torch.library.opcheck(ce._forward_op, (h, w, y, 15.0, -1, reduction, with_grad))
    lse, grad = torch.randn(9, device=DEV), torch.randn(9, device=DEV)
    torch.library.opcheck(ce._backward_op, (h.detach(), w.detach(), y, lse, grad, 15.0, -1))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compile_fullgraph(impl):
    h, w, y = make((9,), 16, 70, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    torch._dynamo.reset()
    # aot_eager: one graph with its backward, traced as inductor would take it, without inductor's C++ build
    f = torch.compile(lambda h, w, y: 2 * linear_cross_entropy(h, w, y, impl=impl), backend="aot_eager",
                      fullgraph=True)
    loss = f(h, w, y)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h32, w32 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = 2 * reference(h32, w32, y)
    rdh, rdw = torch.autograd.grad(ref, (h32, w32))
    assert rel(loss, ref) < 1e-4 and rel(dh, rdh) < 1e-4 and rel(dw, rdw) < 1e-4


def test_auto_on_cpu_is_the_reference():
    if DEV == "cuda":
        pytest.skip("on CUDA 'auto' picks triton (covered by the cuda tests)")
    h, w, y = make((9,), 16, 70, torch.float32)
    assert torch.equal(linear_cross_entropy(h, w, y), reference(h, w, y))


@pytest.mark.parametrize("impl,module", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_missing_peer_says_so_in_one_line(impl, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    h, w, y = make((9,), 16, 70, torch.float32)
    with pytest.raises(KernelUnavailable) as err:
        linear_cross_entropy(h, w, y, impl=impl)
    assert "\n" not in str(err.value) and impl in str(err.value)


def test_bad_choices():
    h, w, y = make((9,), 16, 70, torch.float32)
    with pytest.raises(KernelUnavailable):
        linear_cross_entropy(h, w, y, impl="nope")
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, y, reduction="sum")


def test_flops():
    assert flops(2, 3, 5) == (60, 120)


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.cuda
@pytest.mark.parametrize("softcap", [15.0, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_cuda(monkeypatch, softcap, reduction):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 1000 * 8256)  # 896 rows a chunk (multiple of 128), 5 chunks
    h, w, y = make((4099,), 256, 8256, torch.bfloat16, real_vocab=8200)
    check(h, w, y, softcap, reduction, 1e-2)


@pytest.mark.cuda
def test_bf16_cuda_model_shape_auto():
    """d12-like head (H 768, V 32768) with the default chunking, through impl='auto'."""
    h, w, y = make((2, 2048), 768, 32768, torch.bfloat16)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = reference(h32, w32, y)
    ref.backward()
    assert rel(loss, ref) < 1e-2 and rel(h.grad, h32.grad) < 1e-2 and rel(w.grad, w32.grad) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("impl,module", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_peers_cuda(impl, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    h, w, y = make((1024,), 256, 4096, torch.bfloat16)
    out = linear_cross_entropy(h, w, y, impl=impl)
    assert rel(out, reference(h.float(), w.float(), y)) < 1e-2
