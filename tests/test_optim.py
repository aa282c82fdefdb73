"""MuonAdamW / DistMuonAdamW: schedules, group lrs, the Muon update's properties, checkpoints,
and one-process vs two-process (gloo) equivalence."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from helpers import saved_and_loaded
from kernels.newton_schulz import orthogonalize
from train.errors import UserError
from train.optim import (DistMuonAdamW, MuonAdamW, Schedule, lr_multiplier, make_optimizer, muon_momentum,
                         weight_decay_at)

VOCAB, DIM, LAYERS = 64, 16, 3


class StandIn(nn.Module):
    """A tiny GPT-shaped model with every kind of parameter the optimizer treats: per layer a square
    (16x16), a tall (32x16) and a wide (16x32) matrix (3 of each: odd stacks), an embedding, a small
    value embedding, an untied lm_head and the per-layer lambdas."""

    def __init__(self, wte_dtype=torch.float32):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM, dtype=wte_dtype)           # 1024 elements: sharded
        self.value_embed = nn.Embedding(VOCAB // 2, DIM)               # 512 elements: all-reduced
        self.attn = nn.ModuleList(nn.Linear(DIM, DIM, bias=False) for _ in range(LAYERS))
        self.fc = nn.ModuleList(nn.Linear(DIM, 2 * DIM, bias=False) for _ in range(LAYERS))
        self.proj = nn.ModuleList(nn.Linear(2 * DIM, DIM, bias=False) for _ in range(LAYERS))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.resid_lambdas = nn.Parameter(torch.linspace(1.15, 1.05, LAYERS))
        self.x0_lambdas = nn.Parameter(torch.linspace(0.2, 0.05, LAYERS))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))

    def param_groups(self):
        blocks = [*self.attn.parameters(), *self.fc.parameters(), *self.proj.parameters()]
        return {"matrices": blocks, "lm_head": [self.lm_head.weight], "wte": [self.wte.weight],
                "value_embeds": [self.value_embed.weight], "resid_lambdas": [self.resid_lambdas],
                "x0_lambdas": [self.x0_lambdas], "smear_backout": [self.backout_lambda]}

    def forward(self, idx, targets):
        x = F.rms_norm(self.wte(idx).float(), (DIM,))
        x0 = x
        for i in range(LAYERS):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = x + self.attn[i](F.rms_norm(x, (DIM,))) + self.value_embed(idx % (VOCAB // 2))
            x = x + self.proj[i](F.relu(self.fc[i](F.rms_norm(x, (DIM,)))).square())
        logits = self.lm_head(F.rms_norm(x - self.backout_lambda * x0, (DIM,)))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def make_model(seed=0, wte_dtype=torch.float32):
    torch.manual_seed(seed)
    model = StandIn(wte_dtype)
    with torch.no_grad():  # no zero-initialised matrices: every update is non-trivial
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def batch(seed, rows=4, T=8):
    g = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.randint(0, VOCAB, (rows, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, opt, x, y, step):
    model(x, y).backward()
    Schedule(100).apply(opt, step)
    opt.step()
    opt.zero_grad(set_to_none=True)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

# -----------------------------------------------------------------------------
# schedules


def test_lr_multiplier_boundaries():
    N = 100
    # no warmup, warmdown over the last 50 steps to 0
    assert lr_multiplier(0, N, 0.0, 0.5, 0.0) == 1.0
    assert lr_multiplier(50, N, 0.0, 0.5, 0.0) == 1.0
    assert lr_multiplier(51, N, 0.0, 0.5, 0.0) == pytest.approx(49 / 50)
    assert lr_multiplier(99, N, 0.0, 0.5, 0.0) == pytest.approx(1 / 50)
    assert lr_multiplier(100, N, 0.0, 0.5, 0.0) == 0.0
    # final_lr_frac: the end of warmdown lands on it
    assert lr_multiplier(100, N, 0.0, 0.5, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(75, N, 0.0, 0.5, 0.1) == pytest.approx(0.5 + 0.5 * 0.1)
    # warmup: (t+1)/warmup while t < warmup
    assert lr_multiplier(0, N, 0.1, 0.5, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(9, N, 0.1, 0.5, 0.0) == 1.0
    assert lr_multiplier(10, N, 0.1, 0.5, 0.0) == 1.0
    # no warmdown at all: flat to the end
    assert lr_multiplier(100, N, 0.0, 0.0, 0.0) == 1.0


def test_muon_momentum_at_its_break_points():
    """0.85 -> 0.97 over the first 400 steps, 0.97 until the warmdown starts, then linearly to 0.90 at step N."""
    N, warmdown = 2000, 0.5  # the warmdown starts at step 1000
    assert muon_momentum(0, N, warmdown) == pytest.approx(0.85)
    assert muon_momentum(200, N, warmdown) == pytest.approx(0.91)
    assert muon_momentum(400, N, warmdown) == pytest.approx(0.97)
    assert muon_momentum(1000, N, warmdown) == pytest.approx(0.97)
    assert muon_momentum(1500, N, warmdown) == pytest.approx(0.935)
    assert muon_momentum(2000, N, warmdown) == pytest.approx(0.90)
    assert muon_momentum(1500, N, 0.0) == pytest.approx(0.97)  # no warmdown: flat to the end
    # within the first 400 steps the ramp alone, whatever the LR does (nanochat's rule); then 0.97 -> 0.90
    assert muon_momentum(399, 500, 0.5) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert muon_momentum(450, 500, 0.5) == pytest.approx(0.97 - 0.07 * 200 / 250)
    assert muon_momentum(100, 200, 0.5) == pytest.approx(0.88)
    assert muon_momentum(200, 200, 0.5) == pytest.approx(0.91)


def test_weight_decay_cosine():
    assert weight_decay_at(0, 100, 0.2) == pytest.approx(0.2)
    assert weight_decay_at(50, 100, 0.2) == pytest.approx(0.1)
    assert weight_decay_at(25, 100, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_at(100, 100, 0.2) == pytest.approx(0.0, abs=1e-12)

def test_schedule_sets_every_group_for_its_step():
    """Schedule.apply: every group's lr is its initial_lr times the LR multiplier; the Muon groups' momentum and
    weight decay follow their schedules; AdamW's decay stays constant."""
    opt = make_optimizer(make_model().param_groups(), weight_decay=0.2)
    schedule = Schedule(100, warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1)
    for step in (0, 5, 50, 75, 99):
        lrm = schedule.apply(opt, step)
        assert lrm == lr_multiplier(step, 100, 0.1, 0.5, 0.1)
        for g in opt.param_groups:
            assert g["lr"] == g["initial_lr"] * lrm
            if g["kind"] == "muon":
                assert g["momentum"] == muon_momentum(step, 100, 0.5)
                assert g["weight_decay"] == weight_decay_at(step, 100, 0.2)
            else:
                assert g["weight_decay"] == dict(lm_head=0.01, wte=0.001, value_embeds=0.01, resid_lambdas=0.05,
                                                 x0_lambdas=0.0, smear_backout=0.0)[g["name"]]

# -----------------------------------------------------------------------------
# groups and AdamW


def test_group_lrs_and_scaling():
    model = make_model()
    opt = make_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004,
                         scalar_lr=0.5, adam_betas=(0.7, 0.9), weight_decay=0.2, lr_scale=2.0,
                         adam_width_scale=0.5)
    assert isinstance(opt, MuonAdamW) and not isinstance(opt, DistMuonAdamW)
    by_name = {g["name"]: g for g in opt.param_groups}
    # (lr, betas, decoupled weight decay) as the spec gives them: LRs x batch scale (2), embeddings x width (0.5)
    # (nanochat's betas: beta2 0.96 for lm_head and 0.995 for the embeddings; --adam-beta1/2 for the rest)
    expect = {"lm_head": (0.004 * 2 * 0.5, (0.7, 0.96), 0.01), "wte": (0.3 * 2 * 0.5, (0.7, 0.995), 0.001),
              "value_embeds": (0.3 * 0.5 * 2 * 0.5, (0.7, 0.995), 0.01),
              "resid_lambdas": (0.5 * 0.01 * 2, (0.7, 0.9), 0.05), "x0_lambdas": (0.5 * 2, (0.96, 0.9), 0.0),
              "smear_backout": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expect.items():
        g = by_name[name]
        assert g["kind"] == "adamw"
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == pytest.approx(lr)
        assert g["betas"] == betas and g["eps"] == 1e-10 and g["weight_decay"] == wd, name
        assert "initial_weight_decay" not in g
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert {g["name"] for g in muon} == {"matrices 16x16", "matrices 32x16", "matrices 16x32"}
    for g in muon:  # one stack per shape, the lr before the per-shape factor
        assert len(g["params"]) == LAYERS and len({p.shape for p in g["params"]}) == 1
        assert g["initial_lr"] == pytest.approx(0.04)
        assert g["initial_weight_decay"] == 0.2 and g["beta2"] == 0.9 and g["ns_steps"] == 5
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_adamw_first_step_moves_lr_times_sign():
    """With bias correction, the first AdamW step is lr * g / (|g| + eps) = lr * sign(g)."""
    model = make_model()
    opt = make_optimizer(model.param_groups())
    before = snapshot(model)
    model(*batch(0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups if g["kind"] == "adamw"
                for p in g["params"]}
    checked = 0
    for n, p in model.named_parameters():
        if id(p) not in settings:
            continue
        g, (lr, wd) = grads[n], settings[id(p)]
        expected = before[n] * (1 - lr * wd) - lr * g / (g.abs() + 1e-10)  # decoupled decay, then the step
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), before[n])
        checked += 1
    assert checked == 6


def test_adamw_bf16_param_keeps_fp32_state():
    model = make_model(wte_dtype=torch.bfloat16)
    opt = make_optimizer(model.param_groups())
    train_step(model, opt, *batch(0), 0)
    state = opt.state[model.wte.weight]
    assert model.wte.weight.dtype == torch.bfloat16
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    loaded = make_optimizer(model.param_groups())
    loaded.load_state_dict(saved_and_loaded(opt.state_dict()))
    assert loaded.state[model.wte.weight]["exp_avg"].dtype == torch.float32

# -----------------------------------------------------------------------------
# Muon


def _muon_only(shape, k, lr=0.01, wd=0.0, seed=0, cond=1e3):
    """k matrices of one shape with ill-conditioned gradients (singular values from 1 down to 1/cond)."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*shape, generator=g)) for _ in range(k)]
    s = min(shape)
    for p in params:
        u, _ = torch.linalg.qr(torch.randn(shape[0], s, generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], s, generator=g))
        p.grad = u @ torch.diag(torch.logspace(0, -math.log10(cond), s)) @ v.T
    groups = {"matrices": params, "lm_head": [], "wte": [], "value_embeds": [], "resid_lambdas": [],
              "x0_lambdas": [], "smear_backout": []}
    return params, make_optimizer(groups, matrix_lr=lr, weight_decay=wd)


def muon_eq_ref(X):
    """From the formula, one row at a time: row *= (||X||_F / sqrt(rows)) / max(||row||, 1e-6)."""
    out = X.clone()
    for k in range(X.size(0)):
        mean_norm = X[k].norm() / X.size(1) ** 0.5
        for r in range(X.size(1)):
            out[k, r] = X[k, r] * mean_norm / max(X[k, r].norm(), 1e-6)
    return out


def muon_plus_ref(X):
    """From the formula: each matrix to Frobenius norm sqrt(min(rows, cols))."""
    return torch.stack([x * min(x.shape) ** 0.5 / x.norm() for x in X])


def muon_direction(G):
    """What Muon does to a (k, m, n) stack before NorMuon: MuonEq, Polar Express, Muon+."""
    return muon_plus_ref(orthogonalize(muon_eq_ref(G)))


@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (16, 16)])
def test_muon_update_is_orthogonalized_and_normuon_scaled(shape):
    k, lr = 3, 0.01
    params, opt = _muon_only(shape, k, lr=lr)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.step()
    rows, cols = shape
    lr_eff = lr * max(1.0, rows / cols) ** 0.5  # the per-shape lr factor
    tall = rows >= cols
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (k, rows, cols)  # one stacked buffer for the shape
    assert state["second_moment"].shape == ((k, rows, 1) if tall else (k, 1, cols))
    for p, p0, g in zip(params, before, grads):
        delta = (p0 - p.detach()) / lr_eff
        # the direction is the equilibrated, orthogonalized, renormed gradient (Nesterov on a zero buffer only
        # scales g) ...
        sv = torch.linalg.svdvals(delta)
        assert torch.linalg.svdvals(g)[0] / torch.linalg.svdvals(g)[-1] > 500
        assert sv.max() / sv.min() < 3.0, sv
        o = muon_direction(g.unsqueeze(0)).squeeze(0)
        # ... rescaled per row (tall) / per column (wide) only: each row/column stays parallel ...
        dim = 1 if tall else 0
        cos = F.cosine_similarity(delta, o, dim=dim)
        assert torch.all(cos > 1 - 1e-5), cos
        # ... to equal row/column norms on the first step (NorMuon), with the Frobenius norm kept.
        norms = delta.norm(dim=dim)
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-4, atol=0)
        torch.testing.assert_close(delta.norm(), torch.tensor(min(shape) ** 0.5), rtol=1e-4, atol=0)  # Muon+
    # the factored second moment after one step: (1 - beta2) x the mean square per row / column
    o = muon_direction(torch.stack(grads))
    expected_v = (1 - 0.9) * o.square().mean(dim=-1 if tall else -2, keepdim=True)
    torch.testing.assert_close(state["second_moment"], expected_v, rtol=1e-4, atol=0)


def test_muon_lr_scales_with_sqrt_aspect():
    """Same orthogonalized-update norm per unit lr: the tall stack moves sqrt(rows/cols) farther."""
    moved = {}
    for shape in [(48, 12), (12, 48)]:
        params, opt = _muon_only(shape, 1, lr=0.01)
        p0 = params[0].detach().clone()
        o = muon_direction(params[0].grad.unsqueeze(0)).squeeze(0)
        opt.step()
        moved[shape] = ((p0 - params[0].detach()).norm() / o.norm()).item()
    assert moved[(48, 12)] == pytest.approx(0.01 * 2.0, rel=1e-4)
    assert moved[(12, 48)] == pytest.approx(0.01, rel=1e-4)


def test_cautious_weight_decay_only_where_signs_agree():
    shape, lr, wd = (20, 12), 0.01, 0.3
    p_plain, opt_plain = _muon_only(shape, 3, lr=lr, wd=0.0)
    p_decay, opt_decay = _muon_only(shape, 3, lr=lr, wd=wd)
    before = [p.detach().clone() for p in p_plain]
    opt_plain.step()
    opt_decay.step()
    lr_eff = lr * (20 / 12) ** 0.5
    agree_total = disagree_total = 0
    for p0, a, b in zip(before, p_plain, p_decay):
        update = p0 - a.detach()            # lr_eff * u
        decay = a.detach() - b.detach()     # lr_eff * wd * p0 where sign(u) == sign(p0), else 0
        agree = update * p0 > 0
        torch.testing.assert_close(decay[agree], lr_eff * wd * p0[agree], rtol=1e-4, atol=1e-7)
        assert torch.equal(decay[~agree], torch.zeros_like(decay[~agree]))
        agree_total += int(agree.sum())
        disagree_total += int((~agree).sum())
    assert agree_total > 100 and disagree_total > 100


def test_muon_second_step_uses_nesterov_momentum():
    params, opt = _muon_only((16, 8), 2, lr=0.01)
    g1 = torch.stack([p.grad.clone() for p in params])
    opt.step()
    state = opt.state[params[0]]
    m = opt.param_groups[0]["momentum"]
    torch.testing.assert_close(state["momentum_buffer"], (1 - m) * g1)
    assert torch.all(state["second_moment"] > 0)
    v1 = state["second_moment"].clone()
    # a fresh gradient: the update direction is orth((1 - m) g2 + m buf2), buf2 = m buf1 + (1 - m) g2
    g2 = torch.randn(g1.shape, generator=torch.Generator().manual_seed(5))
    for p, g in zip(params, g2):
        p.grad = g.clone()
    buf2 = m * state["momentum_buffer"] + (1 - m) * g2
    expected = muon_direction((1 - m) * g2 + m * buf2)
    stale = muon_direction(buf2)
    before = torch.stack([p.detach().clone() for p in params])
    opt.step()
    delta = before - torch.stack([p.detach() for p in params])
    assert torch.all(F.cosine_similarity(delta, expected, dim=-1) > 1 - 1e-5)  # per row (tall)
    assert not torch.all(F.cosine_similarity(delta, stale, dim=-1) > 1 - 1e-3)
    torch.testing.assert_close(state["momentum_buffer"], buf2)
    assert not torch.equal(state["second_moment"], v1)

def test_muon_eq_and_muon_plus_against_their_formulas():
    from train.optim import muon_eq, muon_plus
    g = torch.Generator().manual_seed(3)
    for shape in [(3, 20, 12), (2, 12, 20), (1, 9, 9)]:
        X = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, shape[1],
                                                                                  dtype=torch.float64)[:, None]
        eq = muon_eq(X)
        torch.testing.assert_close(eq, muon_eq_ref(X))
        torch.testing.assert_close(eq.norm(dim=-1), (X.norm(dim=(-2, -1)) / shape[1] ** 0.5)[:, None].expand(
            shape[0], shape[1]))  # every row at the mean row norm
        torch.testing.assert_close(muon_plus(X), muon_plus_ref(X))
    # a rank-1 update: Polar Express leaves one singular value near 1; Muon+ brings the norm to sqrt(min(m, n))
    u, v = torch.randn(2, 24, 1, generator=g), torch.randn(2, 1, 16, generator=g)
    o = orthogonalize(muon_eq(u @ v))
    assert torch.all(o.norm(dim=(-2, -1)) < 1.3)
    torch.testing.assert_close(muon_plus(o).norm(dim=(-2, -1)), torch.full((2,), 4.0))


def test_muon_closes_a_rank_one_gap_where_plain_muon_is_slow(monkeypatch):
    """A matrix pulled toward a fixed target by a rank-1 difference: with Muon+ the step has the norm of a full
    orthogonal matrix (4 here), without it that of one singular direction (about 1)."""
    import train.optim as optim_module

    def distance_after(steps):
        g = torch.Generator().manual_seed(7)
        target = torch.randn(32, 16, generator=g)
        gap = 4.0 * F.normalize(torch.randn(32, 1, generator=g), dim=0) @ F.normalize(
            torch.randn(1, 16, generator=g), dim=1)
        w = nn.Parameter(target + gap)
        groups = {"matrices": [w], "lm_head": [], "wte": [], "value_embeds": [], "resid_lambdas": [],
                  "x0_lambdas": [], "smear_backout": []}
        opt = make_optimizer(groups, matrix_lr=0.02)
        for step in range(steps):
            w.grad = 2 * (w.detach() - target)
            Schedule(1000).apply(opt, step)
            opt.step()
        return (w.detach() - target).norm().item(), gap.norm().item()
    ours, start = distance_after(50)
    assert ours < start / 2, (ours, start)
    monkeypatch.setattr(optim_module, "muon_plus", lambda X: X)
    monkeypatch.setattr(optim_module, "muon_eq", lambda X: X)
    plain, _ = distance_after(50)
    assert plain > start / 2, (plain, start)

# -----------------------------------------------------------------------------
# checkpoints


def test_state_dict_round_trip_single():
    model = make_model(wte_dtype=torch.bfloat16)
    opt = make_optimizer(model.param_groups(), weight_decay=0.1)
    for step in range(2):
        train_step(model, opt, *batch(step), step)
    saved_params, saved_opt = snapshot(model), saved_and_loaded(opt.state_dict())
    train_step(model, opt, *batch(2), 2)
    train_step(model, opt, *batch(3), 3)
    expected = snapshot(model)

    fresh = make_model(seed=123, wte_dtype=torch.bfloat16)
    fresh.load_state_dict(saved_params)
    fresh_opt = make_optimizer(fresh.param_groups(), weight_decay=0.1)
    fresh_opt.load_state_dict(saved_opt)
    train_step(fresh, fresh_opt, *batch(2), 2)
    train_step(fresh, fresh_opt, *batch(3), 3)
    for name, value in snapshot(fresh).items():
        assert torch.equal(value, expected[name]), name


def test_load_state_dict_rejects_a_mismatch():
    model = make_model()
    opt = make_optimizer(model.param_groups())
    train_step(model, opt, *batch(0), 0)
    sd = saved_and_loaded(opt.state_dict())
    sd["world_size"] = 2  # one rank's shard of another world size: resharding is for full_state / shard_state
    with pytest.raises(ValueError, match="2 rank.*reshard"):
        make_optimizer(model.param_groups()).load_state_dict(sd)
    other = StandIn()
    groups = other.param_groups()
    groups["matrices"] = groups["matrices"][:-1]
    with pytest.raises(UserError, match="does not match"):
        make_optimizer(groups).load_state_dict(saved_and_loaded(opt.state_dict()))

# -----------------------------------------------------------------------------
# distributed (2 gloo processes on the CPU)

WORLD = 2


def _dist_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check_distributed(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Passed. Skip interpreter teardown: gloo's threads outlive destroy_process_group here (once
    # torch._dynamo is imported), and one that frees a finished collective's tensors during
    # teardown aborts the process ("terminate called without an active exception").
    os._exit(0)


def _check_averaging(rank, world):
    """The gradient reductions average (gloo has no AVG op: it sums and the optimizer divides).
    The optimizer's output is blind to a uniform gradient scale, so this is checked directly."""
    opt = make_optimizer(make_model().param_groups(), distributed=True)
    t = torch.arange(8.0).reshape(4, 2) * (rank + 1)
    opt._all_reduce_avg(t).wait()
    torch.testing.assert_close(t, torch.arange(8.0).reshape(4, 2) * (world + 1) / 2)
    t = torch.arange(8.0).reshape(4, 2) * (rank + 1)
    out = torch.empty(4 // world, 2)
    opt._reduce_scatter_avg(out, t).wait()
    torch.testing.assert_close(out, t.chunk(world)[rank] / (rank + 1) * (world + 1) / 2)


def _check_distributed(rank, world):
    torch.set_num_threads(1)
    _check_averaging(rank, world)
    kwargs = dict(weight_decay=0.2)
    # one process, the full batch
    ref = make_model()
    ref_opt = make_optimizer(ref.param_groups(), **kwargs)
    # this rank, its half of the batch
    model = make_model()
    opt = make_optimizer(model.param_groups(), distributed=True, **kwargs)
    assert isinstance(opt, DistMuonAdamW)
    init = snapshot(model)
    half = 4 // world
    for step in range(2):
        x, y = batch(step)
        train_step(ref, ref_opt, x, y, step)
        train_step(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], step)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert not torch.equal(p.detach(), init[name]), name
        err = (p - q).abs().max() / q.abs().max()
        assert err < 1e-5, f"rank {rank} {name}: rel. max error {err:.2e}"
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p.detach())
        assert all(torch.equal(t, p.detach()) for t in gathered), f"{name} differs between ranks"

    # sharded state: Muon stacks of 3 split 2 + (1 + padding); wte sharded; the small ones whole
    muon_state = opt.state[model.fc[0].weight]
    assert muon_state["momentum_buffer"].shape == (2, 2 * DIM, DIM)
    assert opt.state[model.wte.weight]["exp_avg"].shape == (VOCAB // world, DIM)
    assert opt.state[model.lm_head.weight]["exp_avg"].shape == (VOCAB // world, DIM)
    assert opt.state[model.value_embed.weight]["exp_avg"].shape == (VOCAB // 2, DIM)
    assert opt.state[model.x0_lambdas]["exp_avg"].shape == (LAYERS,)

    # checkpoint round trip of this rank's shard
    saved_params, saved_opt = snapshot(model), saved_and_loaded(opt.state_dict())
    assert saved_opt["world_size"] == world
    for step in (2, 3):
        x, y = batch(step)
        train_step(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], step)
    expected = snapshot(model)
    fresh = make_model(seed=7)
    fresh.load_state_dict(saved_params)
    fresh_opt = make_optimizer(fresh.param_groups(), distributed=True, **kwargs)
    fresh_opt.load_state_dict(saved_opt)
    for step in (2, 3):
        x, y = batch(step)
        train_step(fresh, fresh_opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], step)
    for name, value in snapshot(fresh).items():
        assert torch.equal(value, expected[name]), f"rank {rank} {name} differs after resume"


@pytest.mark.slow
def test_distributed_matches_single_and_round_trips():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_dist_worker, args=(WORLD, init_file), nprocs=WORLD, join=True)


def test_distributed_needs_an_initialised_process_group():
    model = make_model()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        make_optimizer(model.param_groups(), distributed=True)
