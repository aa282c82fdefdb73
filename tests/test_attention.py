"""Sliding-window causal attention: Triton kernels (interpreter on CPU), the CPU block path and the peers,
all against the explicit-mask reference in fp64. Shapes are small and odd (the interpreter is slow) but
windows still cross block boundaries: the interpreter's blocks are 16-32 rows."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import attention as attn
from kernels.attention import attention, blocked, flops, reference
from kernels import dispatch
from kernels.dispatch import KernelUnavailable, force

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def make(B, T, Hq, Hkv, D, dtype, device=DEV, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, device=device).to(dtype) for H in (Hq, Hkv, Hkv))
    dout = torch.randn(B, T, Hq, D, generator=g, device=device).to(dtype)
    return q, k, v, dout


def run(fn, q, k, v, dout, window):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, window)
    return (out, *torch.autograd.grad(out, leaves, dout))


def ref_run(q, k, v, dout, window):
    return run(reference, q.double(), k.double(), v.double(), dout.double(), window)


def check(outs, refs, tol, window):
    """Output and dv by relative error; dq and dk too, except with window 0 where the reference's are zero
    (softmax over a single key has no gradient): then they must be zero up to rounding."""
    names = ("out", "dq", "dk", "dv")
    for name, o, r in zip(names, outs, refs):
        assert not torch.isnan(o).any(), f"{name} has NaN (unwritten or bad math)"
        if window == 0 and name in ("dq", "dk"):
            assert o.double().norm() < tol * refs[3].norm(), f"{name} should be ~0 for window 0"
        else:
            assert rel(o, r) < tol, f"{name}: rel error {rel(o, r):.2e}"


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten fails the comparison."""
    monkeypatch.setattr(attn, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))


def triton_attention(q, k, v, window):
    return attention(q, k, v, window=window, impl="triton")


# (B, T, Hq, Hkv, D, window, dtype)
CASES = [
    (1, 150, 2, 2, 64, 0, torch.float32),       # a token sees only itself
    (2, 111, 2, 2, 64, 1, torch.float32),       # batch 2, odd T
    (1, 300, 2, 2, 64, 128, torch.float32),     # window spans several blocks, tails everywhere
    (1, 130, 2, 2, 128, -1, torch.float32),     # full causal, D 128
    (1, 97, 4, 2, 64, 40, torch.float16),       # GQA 2:1, fp16
    (2, 75, 4, 1, 128, 200, torch.float16),     # window >= T, GQA 4:1, D 128
    (1, 200, 3, 1, 64, 17, torch.float32),      # GQA 3:1, window not a multiple of anything
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,window,dtype", CASES)
def test_triton_matches_reference(poison, B, T, Hq, Hkv, D, window, dtype):
    q, k, v, dout = make(B, T, Hq, Hkv, D, dtype)
    outs = run(triton_attention, q, k, v, dout, window)
    check(outs, ref_run(q, k, v, dout, window), 1e-4 if dtype == torch.float32 else 1e-2, window)


@pytest.mark.parametrize("blocks", [((16, 16), (16, 16), (16, 16)), ((64, 16), (16, 64), (64, 32))])
@pytest.mark.parametrize("window", [5, 33])
def test_triton_other_block_shapes(poison, monkeypatch, blocks, window):
    """The block-range arithmetic with square blocks and with 4:1 blocks (several masked steps per diagonal)."""
    monkeypatch.setattr(attn, "SMALL_BLOCKS", dict(zip((attn.FWD, attn.DKDV, attn.DQ), blocks)))
    q, k, v, dout = make(1, 147, 2, 1, 32, torch.float32)
    check(run(triton_attention, q, k, v, dout, window), ref_run(q, k, v, dout, window), 1e-4, window)


def test_triton_strided_inputs(poison):
    """q, k, v as views of one fused projection (non-contiguous in T and H), dout a transposed view."""
    B, T, H, D = 1, 90, 2, 32
    qkv = torch.randn(B, T, 3 * H, D, device=DEV)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]
    dout = torch.randn(B, H, T, D, device=DEV).transpose(1, 2)
    check(run(triton_attention, q, k, v, dout, 20), ref_run(q, k, v, dout, 20), 1e-4, 20)


def test_triton_bf16_on_the_interpreter_runs_in_fp32():
    """The interpreter's bf16 tl.dot is wrong; bf16 inputs there go through the kernels as fp32 copies."""
    if DEV == "cuda":
        pytest.skip("native bf16 is covered by test_triton_cuda")
    q, k, v, dout = make(1, 80, 2, 2, 32, torch.bfloat16)
    outs = run(triton_attention, q, k, v, dout, 30)
    assert all(t.dtype == torch.bfloat16 for t in outs)
    check(outs, ref_run(q, k, v, dout, 30), 1e-2, 30)


def test_reference_matches_per_query_loop():
    """The reference's mask against the definition, one query at a time: key j visible iff j <= i, i - j <= w."""
    q, k, v, _ = make(1, 40, 4, 2, 16, torch.float64, device="cpu")
    for window in (0, 3, -1):
        out = reference(q, k, v, window)
        for i in range(40):
            lo = 0 if window < 0 else max(0, i - window)
            for h in range(4):
                kk, vv = k[0, lo:i + 1, h // 2], v[0, lo:i + 1, h // 2]
                p = torch.softmax(kk @ q[0, i, h] / math.sqrt(16), dim=0)
                assert torch.allclose(out[0, i, h], p @ vv, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1, 37, 64, 149, -1])
def test_blocked_matches_reference(window):
    q, k, v, dout = make(2, 150, 4, 2, 32, torch.float32, device="cpu")
    outs = run(lambda *a: blocked(*a, block=32), q, k, v, dout, window)
    check(outs, ref_run(q, k, v, dout, window), 1e-4, window)


def test_blocked_never_builds_a_dense_mask(monkeypatch):
    """Windowed layers: every SDPA call gets at most block x (block + window) scores, never T x T."""
    T, block, window = 300, 64, 20
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.size(-2), k.size(-2), None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, dout = make(1, T, 2, 2, 16, torch.float32, device="cpu")
    out = blocked(q, k, v, window, block=block)
    assert len(shapes) == math.ceil(T / block)
    assert all(qt <= block and kt <= block + window and m == (qt, kt) for qt, kt, m in shapes)
    assert rel(out, reference(q.double(), k.double(), v.double(), window)) < 1e-4


def test_auto_on_cpu_is_the_block_path(monkeypatch):
    q, k, v, _ = make(1, 300, 2, 1, 32, torch.float32, device="cpu")
    monkeypatch.delenv("KERNEL_ATTENTION", raising=False)
    assert torch.equal(attention(q, k, v, window=50), blocked(q, k, v, 50))


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
@pytest.mark.parametrize("window", [0, 9, -1])
def test_torch_peers_match_reference(impl, window):
    q, k, v, dout = make(1, 70, 4, 2, 32, torch.float32, device="cpu")
    outs = run(lambda *a: attention(*a, impl=impl), q, k, v, dout, window)
    check(outs, ref_run(q, k, v, dout, window), 1e-4, window)


def test_forced_impl_is_used(monkeypatch):
    q, k, v, _ = make(1, 50, 2, 2, 16, torch.float32, device="cpu")
    calls = []
    monkeypatch.setitem(dispatch._registry, ("attention", "torch"), lambda *a: calls.append(a) or blocked(*a))
    force("attention", "torch")
    try:
        attention(q, k, v, window=3)
    finally:
        force("attention", None)
    monkeypatch.setenv("KERNEL_ATTENTION", "torch")
    attention(q, k, v, window=3)
    assert len(calls) == 2


def test_unavailable_impls_say_so_in_one_line(monkeypatch):
    q, k, v, _ = make(1, 16, 2, 2, 16, torch.float32, device="cpu")
    cases = [("nope", "unknown impl"), ("fa3", "fa3"), ("fa2", "fa2")]
    for impl, words in cases:
        if impl == "fa2" and DEV == "cuda":
            continue
        with pytest.raises(KernelUnavailable, match=words) as e:
            attention(q, k, v, impl=impl)
        assert "\n" not in str(e.value)
    if DEV == "cpu":
        with pytest.raises(KernelUnavailable, match="no backward on CPU"):
            attention(q.requires_grad_(), k, v, impl="flex")
    with pytest.raises(KernelUnavailable, match="head dim"):
        attention(*make(1, 16, 2, 2, 48, torch.float32)[:3], impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEV == "cpu":
        with pytest.raises(KernelUnavailable, match="CUDA"):
            attention(q, k, v, impl="triton")


def test_bad_shapes_and_windows():
    q, k, v, _ = make(1, 16, 4, 2, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        attention(q, k[:, :, :1].expand(1, 16, 3, 16), v[:, :, :1].expand(1, 16, 3, 16))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=-2)


def test_compiled_fullgraph_matches_eager(poison):
    """The custom op (fake + autograd) lets a compiled function call the kernel without a graph break."""
    q, k, v, dout = make(1, 70, 2, 1, 32, torch.float32)
    fn = torch.compile(triton_attention, fullgraph=True, backend="aot_eager")
    eager = run(triton_attention, q, k, v, dout, 9)
    compiled = run(fn, q, k, v, dout, 9)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_compiled_cpu_path_fullgraph():
    q, k, v, dout = make(1, 100, 2, 2, 16, torch.float32, device="cpu")
    fn = torch.compile(lambda *a: blocked(*a, block=32), fullgraph=True, backend="aot_eager")
    check(run(fn, q, k, v, dout, 10), ref_run(q, k, v, dout, 10), 1e-4, 10)


@pytest.mark.parametrize("T,window", [(1, -1), (7, 0), (50, 3), (50, 49), (50, 100), (64, 63)])
def test_flops_count_visible_pairs(T, window):
    i = torch.arange(T)
    lag = i[:, None] - i[None, :]
    pairs = int(((lag >= 0) & ((lag <= window) if window >= 0 else True)).sum())
    assert flops(2, T, 3, 64, window) == 4 * 64 * pairs * 2 * 3
    assert flops(2, T, 3, 64, window, backward=True) == int(2.5 * 4 * 64 * pairs * 2 * 3)


# ----------------------------------------------------------------------------------------------
# on a GPU: bf16 natively, realistic sizes, the peers

# bf16 only: fp16 runs natively too, through the CASES above (each new dtype, head dim and window makes
# the autotuner compile and time every config of the three kernels again)
@pytest.mark.cuda
@pytest.mark.parametrize("window", [0, 1, 128, 700, -1])
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 4), (128, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_triton_cuda(poison, window, D, Hq, Hkv, dtype):
    q, k, v, dout = make(2, 1000, Hq, Hkv, D, dtype)
    check(run(triton_attention, q, k, v, dout, window), ref_run(q, k, v, dout, window), 1e-2, window)


@pytest.mark.cuda
def test_triton_cuda_fp32_exact_dots(poison):
    q, k, v, dout = make(1, 513, 2, 1, 128, torch.float32)
    check(run(triton_attention, q, k, v, dout, 100), ref_run(q, k, v, dout, 100), 1e-4, 100)


@pytest.mark.cuda
def test_triton_cuda_batch_one_single_kv_head(poison):
    """Hkv = 1 (group = Hq) and B * Hkv = 1 reach the kernels as ints triton specialises (a value of 1 becomes a
    compile-time constant)."""
    q, k, v, dout = make(1, 777, 4, 1, 128, torch.bfloat16)
    check(run(triton_attention, q, k, v, dout, 300), ref_run(q, k, v, dout, 300), 1e-2, 300)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["auto", "sdpa", "flex", "torch"])
@pytest.mark.parametrize("window", [128, -1])
def test_cuda_impls_match_reference(impl, window):
    q, k, v, dout = make(2, 1024, 4, 2, 128, torch.bfloat16)
    check(run(lambda *a: attention(*a, impl=impl), q, k, v, dout, window), ref_run(q, k, v, dout, window),
          1e-2, window)


@pytest.mark.cuda
def test_compiled_model_style_call_on_cuda():
    q, k, v, dout = make(2, 512, 4, 4, 128, torch.bfloat16)
    fn = torch.compile(triton_attention, fullgraph=True)
    check(run(fn, q, k, v, dout, 100), ref_run(q, k, v, dout, 100), 1e-2, 100)


def test_triton_launches_our_kernels(monkeypatch):
    """Guard for the Triton tests above: impl="triton" runs our Triton kernels (on a CPU, on the interpreter),
    forward and backward, in launch order, and not some other path that also matches the reference."""
    launched = []
    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        kernel = getattr(attn, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _name=name, **kw: launched.append(_name)
                            or _run(*a, **kw))
    q, k, v, dout = make(1, 40, 2, 2, 16, torch.float32)
    check(run(triton_attention, q, k, v, dout, 7), ref_run(q, k, v, dout, 7), 1e-4, 7)
    assert launched == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"], launched
