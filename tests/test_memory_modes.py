"""The memory plan per data-parallel mode (issue #27): --dry-run prints one rank's estimate for the replicated and
FSDP2 modes and the fewest GPUs each needs, from the same function the run decides with; --fsdp auto's rule; activation
checkpointing per block: its estimate, its auto rule, and the two rules together."""
import json
import types
from dataclasses import replace

import pytest
import torch

from train import memory, pretrain
from train.errors import UserError
from train.memory import checkpointing_auto, estimate_memory_gib, fsdp_auto, memory_parts
from train.scaling import make_plan

DEPTHS = (20, 26, 32, 40)


def dry_run(capsys, monkeypatch, *flags) -> tuple[str, dict]:
    monkeypatch.setattr(pretrain, "load_tokenizer_or_none", lambda: None)  # the default vocabulary, as make_plan's
    pretrain.main([*flags, "--dry-run"])
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])["memory"]


@pytest.mark.parametrize("depth", DEPTHS)
def test_dry_run_prints_both_modes_from_the_runs_estimate(capsys, monkeypatch, depth):
    out, table = dry_run(capsys, monkeypatch, "--depth", str(depth), "--world-size", "8")
    plan = make_plan(depth, world_size=8)
    assert table["world_size"] == 8 and table["gpu_gib"] == round(memory.DEFAULT_GPU_GIB, 2)
    labels = {"kept": "relu² kept", "recomputed": "relu² recomputed", "checkpointed": "blocks checkpointed"}
    for mode in memory.MODES:
        for how, recompute, checkpoint in memory.SETTINGS:
            gib = estimate_memory_gib(plan, recompute, mode=mode, checkpoint_blocks=checkpoint)
            assert table[mode][how]["gib"] == gib
            assert f"{labels[how]} {gib:6.1f} GiB" in out
            assert table[mode][how]["fewest_gpus"] == memory.fewest_gpus(plan, memory.DEFAULT_GPU_GIB, mode, recompute,
                                                                         checkpoint_blocks=checkpoint)
            assert table["fsdp"][how]["gib"] < table["replicated"][how]["gib"]
        assert table[mode]["checkpointed"]["gib"] < table[mode]["recomputed"]["gib"]
        assert table[mode]["largest_device_batch_checkpointed"] == memory.largest_fitting_batch(
            plan, memory.DEFAULT_GPU_GIB, mode=mode, checkpoint_blocks=True)
    assert "per-rank GPU memory at world size 8" in out and "FSDP2:" in out
    # on an 80 GB H100 d20 fits without, d26 and d32 only with it, d40 only with it and FSDP2
    assert table["activation_checkpointing_auto"] is (depth > 20) and table["fsdp_auto"] is (depth == 40)
    assert f"--activation-checkpointing auto: {'on' if depth > 20 else 'off'}" in out


def test_the_dry_run_reads_the_one_estimate(capsys, monkeypatch):
    """A changed memory_parts changes the printed plan: the dry run has no formula of its own."""
    def fake(plan, mode="replicated", recompute_mlp=True, world_size=None, bytes_per_channel=None,
             checkpoint_blocks=False):
        return {"total": (7.0 if mode == "fsdp" else 9.0) * 8 / (world_size or plan.world_size)
                         / (2 if checkpoint_blocks else 1)}
    monkeypatch.setattr(memory, "memory_parts", fake)
    out, table = dry_run(capsys, monkeypatch, "--depth", "20", "--world-size", "8", "--gpu-memory-gib", "9.5")
    assert table["gpu_gib"] == 9.5
    assert table["replicated"]["kept"] == {"gib": 9.0, "fewest_gpus": 16}  # 9 > 0.9 x 9.5 = 8.55; on 16: 4.5
    assert table["fsdp"]["recomputed"] == {"gib": 7.0, "fewest_gpus": 8}  # on 4: 14
    assert table["replicated"]["checkpointed"] == {"gib": 4.5, "fewest_gpus": 8}
    assert table["fsdp_auto"] is True  # 9 > 0.9 x 9.5 = 8.55 >= 7: FSDP2 before checkpointing
    assert table["activation_checkpointing_auto"] is False


@pytest.mark.parametrize("depth", (20, 32))
def test_estimates_fall_with_more_ranks_and_fsdp_holds_less(depth):
    plan = make_plan(depth, device_batch_size=4)  # small activations: the parts that do shrink show
    for mode in memory.MODES:
        for recompute in (False, True):
            need = [estimate_memory_gib(plan, recompute, mode=mode, world_size=w) for w in (1, 2, 4, 8, 16, 32)]
            assert all(a >= b for a, b in zip(need, need[1:])), (mode, need)
            assert need[0] > need[-1]
    for w in (2, 4, 8, 16):
        parts = {m: memory_parts(plan, m, True, w) for m in memory.MODES}
        assert parts["fsdp"]["total"] < parts["replicated"]["total"]
        assert parts["fsdp"]["activations"] == parts["replicated"]["activations"]  # they do not shrink
        assert parts["fsdp"]["weights"] < parts["replicated"]["weights"] / (w / 2)


def test_one_rank_replicated_estimate_is_todays():
    """At world size 1 the replicated estimate is the one the issue quotes (and docs/gpu.md compares)."""
    assert [round(estimate_memory_gib(make_plan(d), False), 1) for d in DEPTHS] == [65.4, 112.2, 173.0, 277.4]


@pytest.mark.parametrize("replicated, fsdp, gpu, world, on", [
    (80.0, 40.0, 80.0, 8, True),     # replicated over 90% of 80, FSDP2 within: on
    (70.0, 40.0, 80.0, 8, False),    # replicated fits (72 is 90%): stays replicated
    (72.0, 40.0, 80.0, 8, False),    # exactly at the line still fits
    (80.0, 75.0, 80.0, 8, False),    # neither fits: no switch (the advice names a batch)
    (80.0, 40.0, 80.0, 1, False),    # one rank: FSDP2 shards nothing
    (80.0, 40.0, None, 8, False),    # a CPU: no device memory to exceed
])
def test_fsdp_auto_rule(replicated, fsdp, gpu, world, on):
    chosen, why = fsdp_auto(replicated, fsdp, gpu, world)
    assert chosen is on
    assert (why is not None) is on
    if on:
        assert "--fsdp auto: FSDP2" in why and "\n" not in why and f"{replicated:.1f} GiB" in why


def fake_gpu(monkeypatch, gib: float) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=gib * 2**30))
    return torch.device("cuda", 0)


def test_choose_fsdp_on_a_gpu_the_replicated_plan_overflows(monkeypatch):
    plan = make_plan(32, device_batch_size=16, world_size=8)
    rep, sharded = (estimate_memory_gib(plan, True, mode=m) for m in memory.MODES)
    gpu = (rep + sharded) / 2 / memory.HEADROOM  # between the two
    on, why = memory.choose_fsdp("auto", None, plan, fake_gpu(monkeypatch, gpu))
    assert on and why.startswith("--fsdp auto: FSDP2")
    assert memory.choose_fsdp("off", None, plan, torch.device("cuda", 0)) == (False, None)
    assert memory.choose_fsdp("auto", None, plan, torch.device("cpu")) == (False, None)
    assert memory.choose_fsdp("auto", None, make_plan(32, device_batch_size=16), torch.device("cuda", 0))[0] is False
    # the replicated run that ran out is pointed at FSDP2 where only it fits a larger device batch
    advice = memory.memory_advice(plan, torch.device("cuda", 0), True)
    assert "--fsdp on with --device-batch-size 16" in advice


@pytest.mark.parametrize("flag", (["--world-size", "2"], ["--gpu-memory-gib", "40"]))
def test_dry_run_flags_are_refused_in_a_run(flag):
    with pytest.raises(UserError) as e:
        pretrain.main(["--depth", "4", *flag])
    assert "for --dry-run only" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mode", memory.MODES)
@pytest.mark.parametrize("recompute", (False, True))
def test_checkpointing_keeps_each_layers_input_and_one_layers_activations(mode, recompute):
    """Only the activations change: from L layers' (table) to L fp32 inputs (4 bytes per channel) and one layer's."""
    plan = make_plan(20, device_batch_size=32, world_size=8)
    plain, checkpointed = (memory_parts(plan, mode, recompute, checkpoint_blocks=on) for on in (False, True))
    per_layer = memory.ACTIVATION_BYTES_PER_CHANNEL[recompute]
    tokens_channels = 32 * 2048 * plan.config.n_embd
    saved = tokens_channels * (20 * per_layer - (20 * 4.0 + per_layer)) / 2**30
    assert plain["activations"] - checkpointed["activations"] == pytest.approx(saved, rel=1e-12)
    assert {k: v for k, v in plain.items() if k not in ("activations", "total")} == \
        {k: v for k, v in checkpointed.items() if k not in ("activations", "total")}
    assert plain["total"] - checkpointed["total"] == pytest.approx(saved, rel=1e-12)  # the activations are the peak
    assert saved > 28  # 30.9 GiB (relu² recomputed) at d20, 32 x 2048


@pytest.mark.parametrize("plain, checkpointed, gpu, on", [
    (80.0, 30.0, 80.0, True),    # over 90% of 80 without, within with: on
    (80.0, 75.0, 80.0, True),    # over without, still over with: on, it fits better
    (72.0, 30.0, 80.0, False),   # 90% of 80 exactly: fits without, off
    (80.0, 80.5, 80.0, False),   # more with it (one layer: its recompute is the whole model): off
    (80.0, 30.0, None, False),   # a CPU: no device memory to exceed
])
def test_checkpointing_auto_rule(plain, checkpointed, gpu, on):
    assert checkpointing_auto(plain, checkpointed, gpu) is on


# (mode, blocks checkpointed) -> a made-up estimate in GiB; the GPU: 100 GiB, 90 fit
@pytest.mark.parametrize("need, mode, checkpoint", [
    ({("replicated", False): 90, ("fsdp", False): 80, ("replicated", True): 50, ("fsdp", True): 40},
     "replicated", False),  # replicated fits as it is
    ({("replicated", False): 95, ("fsdp", False): 85, ("replicated", True): 50, ("fsdp", True): 40},
     "fsdp", False),  # FSDP2 communicates more, checkpointing runs every block twice: FSDP2 first
    ({("replicated", False): 99, ("fsdp", False): 95, ("replicated", True): 60, ("fsdp", True): 50},
     "replicated", True),  # only with checkpointing: replicated fits then
    ({("replicated", False): 199, ("fsdp", False): 150, ("replicated", True): 95, ("fsdp", True): 70},
     "fsdp", True),  # only FSDP2 with checkpointing fits
    ({("replicated", False): 299, ("fsdp", False): 250, ("replicated", True): 195, ("fsdp", True): 170},
     "replicated", True),  # nothing fits: no switch of mode, checkpointing on (less to exceed by; the advice names
                          # a device batch)
])
def test_fsdp_and_checkpointing_auto_pick_the_cheapest_that_fits(monkeypatch, need, mode, checkpoint):
    def fake(plan, mode="replicated", recompute_mlp=True, world_size=None, bytes_per_channel=None,
             checkpoint_blocks=False):
        return {"total": need[mode, checkpoint_blocks] + (0 if recompute_mlp else 1000)}
    monkeypatch.setattr(memory, "memory_parts", fake)
    plan = make_plan(20, world_size=8)
    on, why = memory.fsdp_for(plan, 100.0)
    assert on is (mode == "fsdp")
    assert memory.memory_choices(plan, 100.0, mode) == (True, checkpoint)
    assert memory.plan_memory(plan, 100.0)["activation_checkpointing_auto"] is checkpoint
    if on:
        assert ("each with blocks checkpointed" in why) is checkpoint
    # a flag holds whatever the rule would pick: checkpointing off leaves the mode to the estimates without it
    assert memory.fsdp_for(plan, 100.0, checkpoint_flag="off")[0] is (need["replicated", False] > 90
                                                                       and need["fsdp", False] <= 90)


def test_choose_checkpointing_on_a_gpu_only_where_the_plan_overflows(monkeypatch):
    cuda, cpu = fake_gpu(monkeypatch, 85.0e9 / 2**30), torch.device("cpu")
    d20, d26 = make_plan(20, world_size=8), make_plan(26, world_size=8)
    assert memory.choose_checkpointing("auto", d26, cuda, "replicated", True) is True  # 83.0 GiB without
    assert memory.choose_checkpointing("auto", d20, cuda, "replicated", True) is False  # 48.3 GiB
    assert memory.choose_checkpointing("auto", d26, cpu, "replicated", True) is False
    assert memory.choose_checkpointing("on", d20, cpu, "replicated", False) is True
    assert memory.choose_checkpointing("off", d26, cuda, "replicated", True) is False
    note = memory.checkpointing_note(d26, cuda, "replicated", True)  # why, and the faster way that fits
    assert "about 83.0 GiB per GPU without it" in note and "--device-batch-size 16 should fit" in note, note


def test_out_of_memory_advice_names_checkpointing_where_no_batch_fits_without():
    """A GPU on which d32 (one rank, a context of 16384) fits no device batch without checkpointing, and 4 sequences
    with it (at 2048 the optimizer step's scratch, not the activations, would be the peak at one sequence)."""
    plan = make_plan(32, device_batch_size=4, max_seq_len=16384)
    one = estimate_memory_gib(replace(plan, device_batch_size=1), True)
    four = estimate_memory_gib(plan, True, checkpoint_blocks=True)
    assert four < one
    gpu = types.SimpleNamespace(total_memory=(one + four) / 2 / memory.HEADROOM * 2**30)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
        advice = memory.memory_advice(plan, torch.device("cuda", 0), True)
        assert "--activation-checkpointing on with --device-batch-size 4 should fit" in advice, advice
        # already checkpointed: the advice is a smaller batch
        half = memory.memory_advice(plan, torch.device("cuda", 0), True, ran_out=True, checkpoint_blocks=True)
        assert "; --device-batch-size 2 should fit" in half, half


def test_on_several_nodes_fsdp2_is_estimated_sharded_over_a_node(monkeypatch):
    """HSDP (torchrun's LOCAL_WORLD_SIZE below the world size): a copy of the model per node, its memory that of
    FSDP2 over a node's ranks."""
    from train.fsdp import ranks_per_copy
    plan = make_plan(26, world_size=16)
    one_node = estimate_memory_gib(make_plan(26, world_size=8), True, mode="fsdp")
    all_ranks = estimate_memory_gib(plan, True, mode="fsdp")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert ranks_per_copy(16) == 8 and ranks_per_copy(8) == 8 and ranks_per_copy(12) == 12  # 12: nodes of unequal size
    assert estimate_memory_gib(plan, True, mode="fsdp") == pytest.approx(one_node) and one_node > all_ranks
