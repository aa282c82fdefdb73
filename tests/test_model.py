"""The GPT on tiny configs (CPU, fp32): shapes, groups, init, meta build, learning, FLOPs, KV-cache sampling."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import GPT, rotary_tables

# vocab 300 pads to 320; 4 query heads share 2 kv heads (GQA); head_dim 16
TINY = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def build(config=TINY, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    return model


def test_shapes():
    model = build()
    idx = torch.randint(0, 300, (2, 40))
    assert model(idx).shape == (2, 40, 300)  # real vocab only, padding cropped
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0  # soft-capped
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (2, 40)
    assert per_token.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_loss_matches_logits_and_ignores_minus_one():
    model = build()
    with torch.no_grad():  # make the logits non-trivial
        model.lm_head.weight.normal_(0, 0.5)
    idx = torch.randint(0, 300, (2, 24))
    targets = torch.randint(0, 300, (2, 24))
    targets[0, :5] = -1
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 300), targets.view(-1), ignore_index=-1,
                                                 reduction="none").view(2, 24)
    got = model(idx, targets, loss_reduction="none")
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert (got[0, :5] == 0).all()
    assert model(idx, targets).item() == pytest.approx(expected[targets >= 0].mean().item(), rel=1e-4)


def test_param_groups_cover_every_parameter_once():
    model = build()
    groups = model.param_groups()
    assert set(groups) == {"matrices", "lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas",
                           "smear_backout"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for p in groups["matrices"])
    gates = {id(b.attn.ve_gate.weight) for b in model.transformer.h if b.attn.ve_gate is not None}
    assert gates and gates <= {id(p) for p in groups["matrices"]}
    # 3 layers x (q 64x64, k/v 64x32 each, proj 64x64, fc 256x64, proj 64x256) + 2 gates 12 -> 2
    counts = model.num_scaling_params()
    matrices = 3 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 256 * 64) + 2 * 12 * 2
    assert counts["transformer_matrices"] == matrices
    assert counts["lm_head"] == counts["wte"] == 320 * 64
    assert counts["value_embeds"] == 2 * 320 * 32
    assert counts["scalars"] == 6 + 24 + 2  # resid and x0 lambdas, the smear gate (24 -> 1), smear and backout
    assert {id(p) for p in groups["smear_backout"]} == {id(model.smear_gate.weight), id(model.smear_lambda),
                                                        id(model.backout_lambda)}
    assert counts["scaling_params"] == matrices + 320 * 64
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n_layer,expected", [(1, [0]), (3, [0, 2]), (4, [1, 3]), (5, [0, 2, 4])])
def test_value_embedding_layers(n_layer, expected):
    cfg = GPTConfig(sequence_len=32, vocab_size=100, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sorted(int(k) for k in model.value_embeds) == expected
    assert [i for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == expected
    assert model.value_embeds[str(expected[0])].weight.shape == (128, 32)  # padded vocab x kv_dim


def test_init_statistics():
    cfg = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    model = build(cfg)
    s = math.sqrt(3 / 256)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    for b in model.transformer.h:
        for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight):
            assert w.abs().max().item() <= s and w.std().item() == pytest.approx(s / math.sqrt(3), rel=0.03)
        assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
        fc = b.mlp.c_fc.weight
        assert fc.abs().max().item() <= 0.4 * s and fc.std().item() == pytest.approx(0.4 * s / math.sqrt(3), rel=0.03)
        if b.attn.ve_gate is not None:
            g = b.attn.ve_gate.weight
            assert g.min().item() >= 0 and g.max().item() <= 0.02 and g.std().item() > 0
    for ve in model.value_embeds.values():
        assert ve.weight.abs().max().item() <= s and ve.weight.std().item() == pytest.approx(s / math.sqrt(3), rel=0.03)
    g = model.smear_gate.weight
    assert g.shape == (1, 24) and g.min().item() >= 0 and g.max().item() <= 0.02 and g.std().item() > 0
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    frac = torch.arange(4) / 3
    assert torch.allclose(model.resid_lambdas, 1.15 - 0.10 * frac)
    assert torch.allclose(model.x0_lambdas, 0.20 - 0.15 * frac)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    one = build(GPTConfig(sequence_len=32, vocab_size=100, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    assert one.resid_lambdas.item() == pytest.approx(1.15) and one.x0_lambdas.item() == pytest.approx(0.20)


def test_meta_build_matches_direct_build():
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = GPT(TINY)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.init_weights()
    direct = GPT(TINY)  # built on the CPU: its default init draws random numbers, init_weights overwrites all
    torch.manual_seed(1)
    direct.init_weights()
    for (name, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    cos, sin = rotary_tables(10 * TINY.sequence_len, TINY.head_dim)
    assert torch.equal(meta.cos, cos) and torch.equal(meta.sin, sin)
    assert "cos" not in meta.state_dict()  # non-persistent: not in checkpoints


def repetitive_batch(vocab=300, B=4, T=48, period=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (period,), generator=g).repeat(T // period + 1)[: T + 1] for _ in range(B)]
    data = torch.stack(rows)
    return data[:, :-1], data[:, 1:]


def test_loss_starts_at_ln_vocab_and_falls():
    model = build()
    x, y = repetitive_batch()
    loss0 = model(x, y).item()
    assert loss0 == pytest.approx(math.log(300), abs=0.05)  # lm_head ~ 0: uniform prediction
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0)
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert loss.item() < 0.5 * loss0


def test_flops_hand_count_with_windows():
    # T = 300: S = ceil(150 / 128) x 128 = 256; "SL" over 3 layers -> 256, full, full (last)
    cfg = GPTConfig(sequence_len=300, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.window_sizes == [256, -1, -1]
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 256 + 256 * 64
    matmuls = 3 * per_layer + 2 * (12 * 2) + 320 * 64  # blocks, 2 ve gates, lm_head (padded rows)
    attn = 12 * 4 * 16 * (256 + 300 + 300)
    assert model.estimate_flops() == 6 * matmuls + attn


def perturbed(seed=0) -> GPT:
    """A model whose every weight matters (at init the zero c_proj makes blocks the identity)."""
    model = build(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_kv_cache_generation_equals_full_forward():
    model = perturbed()
    model.window_sizes = [3, 6, -1]  # small windows so that they bite within a short sample
    prompt = torch.randint(0, 300, (9,)).tolist()
    new = model.generate(prompt, 20)
    ids = list(prompt)
    for _ in range(20):  # no cache: rerun the whole sequence through the training path
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt):]
    assert len(set(new)) > 1


def test_cached_logits_equal_full_forward_logits():
    from model.gpt import KVCache
    model = perturbed(seed=3)
    assert model.smear_lambda.abs().item() > 0.01  # smear on: the cache must carry the previous embedding
    model.window_sizes = [2, 5, -1]
    idx = torch.randint(0, 300, (2, 16))
    full = model(idx)
    cache = KVCache(TINY.n_layer)
    parts = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 16)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def reference_forward(model, idx):
    """The top of the model from the formulas, around the model's own blocks: smear, x0, the layers, backout,
    norm, soft-capped logits."""
    from model.gpt import norm
    e = norm(model.transformer.wte(idx))
    x = e.clone()
    for t in range(1, e.size(1)):  # x[t] += smear_lambda * sigmoid(smear_gate(e[t, :24])) * e[t-1]
        x[:, t] = e[:, t] + model.smear_lambda * torch.sigmoid(e[:, t, :24] @ model.smear_gate.weight.T) * e[:, t - 1]
    x0, T = x, idx.size(1)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        ve = model.value_embeds[str(i)](idx) if str(i) in model.value_embeds else None
        x = block(x, ve, cos, sin, model.window_sizes[i])
        if i == model.config.n_layer // 2:
            kept = x
    x = norm(x - model.backout_lambda * kept)
    logits = model.lm_head(x)[..., :model.config.vocab_size].float()  # fp32 logits, as the model's
    return 15 * torch.tanh(logits / 15)


def test_smear_and_backout_match_their_formulas_with_gradients():
    model = perturbed(seed=4).double()  # float64: the two computations differ by rounding only
    idx = torch.randint(0, 300, (2, 20))
    params = [model.smear_gate.weight, model.smear_lambda, model.backout_lambda, model.transformer.wte.weight]
    ours = model(idx)
    ref = reference_forward(model, idx)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_attention_is_sharpened_by_1_2_on_q_and_k():
    from kernels.attention import reference
    from model.gpt import apply_rotary, norm
    model = perturbed(seed=5)
    attn = model.transformer.h[1].attn  # a layer without a value embedding
    assert attn.ve_gate is None
    x = torch.randn(2, 12, 64)
    cos, sin = model.cos[:, :12], model.sin[:, :12]
    q = attn.c_q(x).view(2, 12, 4, 16)
    k, v = attn.c_k(x).view(2, 12, 2, 16), attn.c_v(x).view(2, 12, 2, 16)
    q, k = norm(apply_rotary(q, cos, sin)) * 1.2, norm(apply_rotary(k, cos, sin)) * 1.2
    expected = attn.c_proj(reference(q, k, v, 5).reshape(2, 12, 64))  # the default scale 1/sqrt(16)
    torch.testing.assert_close(attn(x, None, cos, sin, 5), expected, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_of_the_earlier_architecture_is_refused_in_one_line():
    from train.builder import load_weights
    from train.errors import UserError
    old = {k: v for k, v in build().state_dict().items() if k not in ("smear_gate.weight", "smear_lambda",
                                                                      "backout_lambda")}
    with pytest.raises(UserError, match="earlier architecture .*cannot continue or evaluate it") as e:
        load_weights(build(), old)
    assert "\n" not in str(e.value)


def test_windows_change_the_output():
    model = perturbed()
    idx = torch.randint(0, 300, (1, 32))
    full = model(idx)
    model.window_sizes = [1, 1, -1]
    windowed = model(idx)
    assert torch.allclose(full[:, :2], windowed[:, :2], atol=1e-5)  # the first 2 positions see everything anyway
    assert not torch.allclose(full[:, 8:], windowed[:, 8:], atol=1e-3)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    model = perturbed()
    x, y = repetitive_batch(T=32)
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(model(x, y).item(), rel=1e-5)


def test_recompute_mlp_gives_the_same_loss_and_grads():
    """The memory it saves is in the compiled graph (tests/test_activations.py); here: same numbers."""
    x, y = repetitive_batch(T=32)
    results = []
    for recompute in (False, True):
        model = perturbed()
        model.recompute_mlp = recompute
        assert model.recompute_mlp is recompute
        loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads0, grads1))


def grads_of(model: GPT, x, y, compile: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    run = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager") if compile else model
    loss = run(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_checkpoint_blocks_gives_the_same_loss_and_grads(compile):
    """Each layer run again in the backward (torch.utils.checkpoint, within torch.compile too): the same numbers in
    fp32, relu² kept or recomputed inside it, and the parameter names (checkpoints, optimizer state) unchanged."""
    x, y = repetitive_batch(T=32)
    loss0, grads0 = grads_of(perturbed(), x, y)
    for recompute in (False, True):
        model = perturbed()
        model.checkpoint_blocks, model.recompute_mlp = True, recompute
        loss, grads = grads_of(model, x, y, compile)
        assert loss.item() == pytest.approx(loss0.item(), abs=1e-6)
        assert grads.keys() == grads0.keys()
        assert all((grads[n] - g).abs().max() <= 1e-6 for n, g in grads0.items())
        assert all(g.abs().max() > 0 for g in grads0.values())  # every parameter's gradient compared


def test_checkpoint_blocks_recomputes_each_layer_in_the_backward(monkeypatch):
    """Where it applies: a training forward runs each layer once more in the backward; no_grad runs it once."""
    model = perturbed()
    model.checkpoint_blocks = True
    calls = []
    layer = GPT.layer
    monkeypatch.setattr(GPT, "layer", lambda self, i, *a, **k: calls.append(i) or layer(self, i, *a, **k))
    x, y = repetitive_batch(T=32)
    with torch.no_grad():
        model(x, y)
    assert calls == [0, 1, 2]
    calls.clear()
    model(x, y).backward()
    assert calls == [0, 1, 2, 2, 1, 0]


def cuda_model(n_layer: int) -> GPT:
    """A small GPT built the way train.pretrain builds it: on the meta device, then on the GPU."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=1000, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=256)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cuda")
    model.init_weights()
    return model


@pytest.mark.cuda
def test_cuda_bf16_autocast_and_compile():
    model = cuda_model(n_layer=4)
    x, y = repetitive_batch(vocab=1000, B=4, T=256, period=32)
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)
        assert loss.item() == pytest.approx(math.log(1000), abs=0.05)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        compiled = torch.compile(model, dynamic=False)
        assert compiled(x, y).item() == pytest.approx(loss.item(), rel=1e-2)
        assert len(model.generate(x[0, :10].tolist(), 8)) == 8


@pytest.mark.cuda
def test_cuda_compiled_recompute_mlp_matches_eager():
    model = cuda_model(n_layer=2)
    with torch.no_grad():
        for block in model.transformer.h:  # non-zero projections, so the MLP's backward matters
            block.mlp.c_proj.weight.normal_(0, 0.02)
    x, y = (t.cuda() for t in repetitive_batch(vocab=1000, B=4, T=256, period=32))
    grads = []
    for recompute, compiled in ((False, False), (True, True)):
        model.zero_grad(set_to_none=True)
        model.recompute_mlp = recompute
        run = torch.compile(model, dynamic=False, fullgraph=True) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            run(x, y).backward()
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad.clone())
    assert grads[0].norm() > 0
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 2e-2  # bf16: eager vs inductor


def test_pre_norm_matches_rms_norm_and_its_gradient():
    """The output-saving norm: the same values and gradients as F.rms_norm (gradcheck in fp64), in autocast's
    dtype under autocast, plain rms_norm without grad."""
    from model.gpt import _NormKeepingOutput, norm, pre_norm
    x64 = (torch.randn(3, 5, 64, dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _NormKeepingOutput.apply(x, torch.float64), (x64,))
    x = (torch.randn(4, 7, 96) * 2 + 0.5).requires_grad_(True)
    dy = torch.randn(4, 7, 96)
    ours = pre_norm(x)
    (dx_ours,) = torch.autograd.grad(ours, x, dy)
    ref = norm(x)
    (dx_ref,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_ours, dx_ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pre_norm(x)
    assert low.dtype == torch.bfloat16
    (dx_low,) = torch.autograd.grad(low, x, dy.bfloat16())
    assert dx_low.dtype == torch.float32
    assert ((dx_low - dx_ref).norm() / dx_ref.norm()).item() < 2e-2
    with torch.no_grad():
        assert torch.equal(pre_norm(x), norm(x))


def test_pre_norm_of_bf16_uses_fp32_math_and_eps():
    """q and k reach the QK norm in bf16: normalised in fp32 with fp32's eps, as CUDA autocast runs rms_norm
    (bf16's eps, 0.0078, would visibly shrink small inputs like these)."""
    from model.gpt import pre_norm
    x = (torch.randn(6, 64) * 0.05).bfloat16().requires_grad_(True)
    expected = F.rms_norm(x.detach().float(), (64,)).bfloat16()
    torch.testing.assert_close(pre_norm(x), expected, rtol=1e-2, atol=1e-2)


# Per-tensor sums of the initial weights at seed 42, d4 (vocab 4096, context 256), as nanochat 92d63d4's
# GPT.init_weights draws them: nanochat's own model, built and seeded as its base_train does, gave these same
# tensors bit for bit (bench/studies/nanochat_parity.py compares the two).
NANOCHAT_INIT_SUMS = {
    "transformer.wte.weight": -409.627179, "lm_head.weight": -0.082162, "smear_gate.weight": 0.276489,
    "value_embeds.1.weight": -27.075448, "value_embeds.3.weight": -69.556883,
    "transformer.h.1.attn.ve_gate.weight": 0.222321, "transformer.h.3.attn.ve_gate.weight": 0.202940,
    "transformer.h.0.attn.c_q.weight": -1.765068, "transformer.h.0.attn.c_k.weight": -36.217357,
    "transformer.h.0.attn.c_v.weight": 10.057549, "transformer.h.0.mlp.c_fc.weight": -8.399585,
    "transformer.h.3.attn.c_q.weight": -54.501407, "transformer.h.3.attn.c_k.weight": -27.530563,
    "transformer.h.3.attn.c_v.weight": 2.993852, "transformer.h.3.mlp.c_fc.weight": -9.343720,
    "resid_lambdas": 4.4, "x0_lambdas": 0.5, "backout_lambda": 0.2,
}


def test_one_seed_gives_nanochats_initial_weights():
    from model.config import config_from_depth
    from train.builder import build_model
    model = build_model(config_from_depth(4, max_seq_len=256, vocab_size=4096, window_pattern="L"), "cpu", seed=42)
    state = model.state_dict()
    for name, total in NANOCHAT_INIT_SUMS.items():
        assert state[name].double().sum().item() == pytest.approx(total, abs=1e-5), name
