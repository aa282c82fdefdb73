"""bench.activations: what the compiled training step keeps for the backward, read from the partitioner.

These tie train.memory's estimate (and the --recompute-mlp claim) to the real compiled graph: a model
change that keeps more per token fails here rather than as an out-of-memory on a GPU.
"""
import json

import pytest

from bench import activations
from train.memory import (ACTIVATION_BYTES_PER_CHANNEL, ACTIVATION_BYTES_PER_CHANNEL_ONCE,
                          CHECKPOINTED_BYTES_PER_CHANNEL, estimate_memory_gib)
from train.scaling import make_plan


@pytest.fixture(scope="module")
def traced():
    return {recompute: activations.per_layer(depth=2, seq_len=64, recompute_mlp=recompute)
            for recompute in (True, False)}


def test_recompute_keeps_one_hidden_tensor_less_per_layer(traced):
    kept, recomputed = traced[False], traced[True]
    # relu(h) and relu(h)² (bf16, 4 x n_embd each) were both kept; with the recompute only h is
    assert kept["bytes_per_channel_per_layer"] - recomputed["bytes_per_channel_per_layer"] == pytest.approx(8.0)
    hidden = [r for r in recomputed["rows_4_layers"] if r[1][-1] == 4 * recomputed["n_embd"]]
    assert len(hidden) == 4, hidden  # one per layer


def test_estimate_constants_match_the_partitioner(traced):
    for recompute, r in traced.items():
        # d2 (width 128, one head) has the same per-channel tensors as d20 up to the gate's per-head scalars
        assert r["bytes_per_channel_per_layer"] == pytest.approx(ACTIVATION_BYTES_PER_CHANNEL[recompute], abs=0.3)
        assert r["bytes_per_token_once"] / r["n_embd"] == pytest.approx(ACTIVATION_BYTES_PER_CHANNEL_ONCE, abs=0.3)


def test_a_checkpointed_layer_keeps_only_its_fp32_input():
    """With GPT.checkpoint_blocks the compiled step keeps per layer only the residual stream that enters it (the
    backward runs the layer again): train.memory's constant for a checkpointed layer."""
    r = activations.per_layer(depth=2, seq_len=64, recompute_mlp=True, checkpoint_blocks=True)
    assert r["bytes_per_channel_per_layer"] == pytest.approx(CHECKPOINTED_BYTES_PER_CHANNEL, abs=0.3)


def test_cli_json_line(capsys):
    activations.main(["--depth", "2", "--seq-len", "64", "--device-batch-size", "4", "--max-seq-len", "64", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["recompute_mlp"] is True and out["predicted_activation_gib"] > 0


# Peaks measured on one H100 80GB (bench/results/20261124-113712/, commit 3fa1957), relu² kept, with the model of
# then: bench.activations read 45.1 bytes per channel per layer for it. The estimate built on that count must stay
# within 5% of those peaks, and must say that d20 at device batch 32 did not fit.
BYTES_PER_CHANNEL_AT_3FA1957 = 45.1
H100_TOTAL_GIB = 85.0e9 / 2**30  # the device info recorded with those results: memory_gb 85.0


@pytest.mark.parametrize("depth, batch, measured_gib", [(12, 32, 29.3), (20, 16, 48.9)])
def test_estimate_matches_measured_h100_peaks(depth, batch, measured_gib):
    plan = make_plan(depth, device_batch_size=batch)
    estimate = estimate_memory_gib(plan, bytes_per_channel=BYTES_PER_CHANNEL_AT_3FA1957)
    assert estimate == pytest.approx(measured_gib, rel=0.05)


def test_d20_at_32_fits_80gb_by_the_traced_bytes(traced):
    """With what the partitioner keeps per channel today (traced at d2: the same per-channel tensors as d20), the
    estimate puts d20 at device batch 32 under 80% of an 80 GB H100, where the model of the first H100 run
    (45.1 bytes) did not fit at all."""
    plan = make_plan(20, device_batch_size=32)
    assert estimate_memory_gib(plan, bytes_per_channel=BYTES_PER_CHANNEL_AT_3FA1957) > H100_TOTAL_GIB  # it ran out then
    now = traced[True]["bytes_per_channel_per_layer"]
    assert estimate_memory_gib(plan, bytes_per_channel=now) < 0.8 * H100_TOTAL_GIB


def test_pretrain_turns_the_recompute_on_only_where_it_is_needed(monkeypatch):
    import types

    import torch

    from train.memory import choose_recompute_mlp as recompute_mlp
    memory = {"total": 40.0e9}  # an A100 40GB
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=memory["total"]))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert recompute_mlp(None, make_plan(20, device_batch_size=32), cuda) is True
    assert recompute_mlp(None, make_plan(20, device_batch_size=16), cuda) is True
    assert recompute_mlp(None, make_plan(12, device_batch_size=32), cuda) is False
    memory["total"] = 85.0e9  # an H100 80GB
    assert recompute_mlp(None, make_plan(20, device_batch_size=16), cuda) is False
    assert recompute_mlp(None, make_plan(20, device_batch_size=32), cpu) is False
    assert recompute_mlp(False, make_plan(20, device_batch_size=32), cuda) is False
    assert recompute_mlp(True, make_plan(12, device_batch_size=32), cpu) is True


def test_largest_fitting_batch_halves_until_it_fits_and_divides():
    from train.memory import largest_fitting_batch
    plan = make_plan(26, device_batch_size=32, world_size=8)  # ~93 GiB with the recompute: too much for 80 GB
    assert largest_fitting_batch(plan, H100_TOTAL_GIB) == 16
    assert largest_fitting_batch(make_plan(20, device_batch_size=32), H100_TOTAL_GIB) == 32
    assert largest_fitting_batch(plan, 8.0) is None  # the weights and optimizer state alone do not fit


def test_out_of_memory_is_one_line_with_a_batch_that_fits(monkeypatch, tmp_path):
    import types

    import torch

    from train import pretrain
    from train.errors import UserError
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no tokenizer: the plan's vocabulary is 32768
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=85.0e9))
    from train import distributed
    monkeypatch.setattr(distributed, "setup",
                        lambda device_type, group=False: distributed.DistInfo(0, 0, 1, torch.device("cuda", 0)))
    monkeypatch.setattr(distributed, "cleanup", lambda: None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(pretrain, "train", out_of_memory)
    with pytest.raises(UserError) as e:
        pretrain.main(["--depth", "20", "--device-batch-size", "32"])
    message = str(e.value)
    assert "\n" not in message and "--device-batch-size 16 should fit" in message, message


def test_output_saving_norms_keep_the_residual_stream_out(monkeypatch, traced):
    """With plain rms_norm (which keeps its input) in front of the blocks' matmuls and as the QK norm, a layer
    keeps more: the fp32 residual twice and q and k before their norm (12 bytes per channel). The per-layer count
    (6-layer minus 4-layer trace) shows 8 since backout: the partitioner then rematerialises one fp32 residual
    per layer of the plain variant from the residual backout keeps (the model's own counts did not change)."""
    import model.gpt
    monkeypatch.setattr(model.gpt, "pre_norm", model.gpt.norm)
    plain = activations.per_layer(depth=2, seq_len=64, recompute_mlp=True)
    # give or take the small per-token tensors (1/rms and the like): 0.1 byte at this width
    saved = plain["bytes_per_channel_per_layer"] - traced[True]["bytes_per_channel_per_layer"]
    assert saved == pytest.approx(8.0, abs=0.2)
