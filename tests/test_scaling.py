"""The scaling laws against numbers worked out by hand from the layer shapes and the formulas in the spec."""
import math

import pytest

from train.errors import UserError
from train.memory import estimate_memory_gib
from train.scaling import make_plan

VOCAB, T = 32768, 2048


def hand_counts(model_dim: int, n_layer: int, n_head: int):
    """Parameter counts and FLOPs/token from the layer shapes, written out independently of the model code."""
    attn = 4 * model_dim * model_dim                  # c_q, c_k, c_v, c_proj (n_kv_head = n_head)
    mlp = 2 * 4 * model_dim * model_dim               # c_fc, c_proj
    ve_layers = [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]
    ve_gate = 12 * n_head                             # one 12 -> n_kv_head gate per value-embedding layer
    matrices = n_layer * (attn + mlp) + len(ve_layers) * ve_gate
    lm_head = VOCAB * model_dim
    scaling = matrices + lm_head
    scalars = 2 * n_layer + 24 + 2                    # resid and x0 lambdas; smear gate (24 -> 1), smear, backout
    total = scaling + VOCAB * model_dim + len(ve_layers) * VOCAB * model_dim + scalars
    # SSSL tiled, last layer L; S = 1024 at T = 2048
    windows = [T if (i % 4 == 3 or i == n_layer - 1) else 1024 for i in range(n_layer)]
    flops = 6 * scaling + sum(12 * n_head * 128 * w for w in windows)
    return scaling, total, flops


D12_SCALING, _, _ = hand_counts(768, 12, 6)
D_REF = 10.5 * D12_SCALING


def test_d12_by_hand():
    scaling, total, flops = hand_counts(768, 12, 6)
    assert scaling == 12 * 12 * 768 ** 2 + 6 * 72 + 32768 * 768 == 110_100_912
    plan = make_plan(12)
    assert (plan.model_dim, plan.n_head, plan.config.n_layer) == (768, 6, 12)
    assert plan.scaling_params == scaling
    assert plan.total_params == total
    assert plan.target_tokens == 1_156_059_576  # 10.5 x 110,100,912
    assert plan.total_batch_size == 2 ** 19     # d12 is the anchor: B = B_ref
    assert plan.num_iterations == 1_156_059_576 // 524_288 == 2205
    assert plan.lr_scale == pytest.approx(1.0)
    assert plan.adam_width_scale == pytest.approx(1.0)
    assert plan.weight_decay == pytest.approx(0.2)
    assert plan.flops_per_token == flops == 6 * 110_100_912 + 9216 * (3 * 2048 + 9 * 1024)
    assert plan.grad_accum_steps == 2 ** 19 // (32 * 2048) == 8


def test_d20_by_hand():
    scaling, total, flops = hand_counts(1280, 20, 10)
    assert scaling == 20 * 12 * 1280 ** 2 + 10 * 120 + 32768 * 1280 == 435_160_240
    plan = make_plan(20)
    assert (plan.model_dim, plan.n_head) == (1280, 10)
    assert plan.scaling_params == scaling and plan.total_params == total
    D = 10.5 * scaling
    assert plan.target_tokens == int(D) == 4_569_182_520
    # B_ref x (D/D_ref)^0.383 = 524288 x 3.952^0.383 ~ 887,600 -> log2 ~ 19.76 -> 2^20
    B = 2 ** round(math.log2(2 ** 19 * (D / D_REF) ** 0.383))
    assert plan.total_batch_size == B == 2 ** 20
    assert plan.num_iterations == 4_569_182_520 // 2 ** 20 == 4357
    assert plan.lr_scale == pytest.approx(math.sqrt(2))
    assert plan.adam_width_scale == pytest.approx((1280 / 768) ** -0.5)
    assert plan.weight_decay == pytest.approx(0.2 * math.sqrt(2) * D_REF / D)
    assert plan.weight_decay == pytest.approx(0.07156, rel=1e-3)
    # 15 S layers (1024) and 5 L layers (2048): 12 x 10 x 128 x 25,600
    assert plan.flops_per_token == flops == 6 * 435_160_240 + 15360 * 25600
    assert plan.grad_accum_steps == 2 ** 20 // (32 * 2048) == 16


def test_depth_to_width():
    assert (make_plan(26).model_dim, make_plan(26).n_head) == (1664, 13)
    plan = make_plan(3, aspect_ratio=50)  # 150 rounds UP to 256
    assert (plan.model_dim, plan.n_head) == (256, 2)


def test_step_precedence():
    fpt = make_plan(12).flops_per_token
    assert make_plan(12, num_iterations=7, target_flops=1e18).num_iterations == 7
    assert make_plan(12, target_flops=1e18).num_iterations == round(1e18 / (fpt * 2 ** 19))
    assert make_plan(12, target_param_data_ratio=20).num_iterations == int(20 * D12_SCALING) // 2 ** 19


def test_explicit_batch_and_world_size():
    plan = make_plan(12, total_batch_size=2 ** 18, world_size=2, device_batch_size=16)
    assert plan.total_batch_size == 2 ** 18
    assert plan.grad_accum_steps == 2 ** 18 // (16 * 2048 * 2) == 4
    assert plan.lr_scale == pytest.approx(math.sqrt(0.5))
    assert plan.weight_decay == pytest.approx(0.2 * math.sqrt(0.5))


def test_to_json_keys():
    keys = set(make_plan(12).to_json())
    assert keys == {"model_dim", "n_head", "scaling_params", "total_params", "target_tokens", "total_batch_size",
                    "num_iterations", "lr_scale", "weight_decay", "flops_per_token", "grad_accum_steps"}


@pytest.mark.parametrize("kwargs", [
    dict(depth=0), dict(depth=-3), dict(depth=12, window_pattern="SXL"), dict(depth=12, window_pattern=""),
    dict(depth=12, total_batch_size=1000),  # not a multiple of 32 x 2048
    dict(depth=12, device_batch_size=3),    # 2^19 / (3 x 2048) is not an integer
    dict(depth=12, target_flops=1.0),       # rounds to 0 steps
])
def test_bad_inputs_raise_user_error(kwargs):
    with pytest.raises(UserError) as e:
        make_plan(**kwargs)
    assert "\n" not in str(e.value)


def test_memory_estimate_grows_with_depth_and_batch():
    d12, d20 = estimate_memory_gib(make_plan(12)), estimate_memory_gib(make_plan(20))
    assert 5 < d12 < d20 < 120
    assert estimate_memory_gib(make_plan(20, device_batch_size=16)) < d20
