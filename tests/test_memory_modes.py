"""The memory plan per data-parallel mode (issue #27): --dry-run prints one rank's estimate for the replicated and
FSDP2 modes and the fewest GPUs each needs, from the same function the run decides with; --fsdp auto's rule."""
import json
import types

import pytest
import torch

from train import memory, pretrain
from train.errors import UserError
from train.memory import estimate_memory_gib, fsdp_auto, memory_parts
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
    for mode in memory.MODES:
        for how, recompute in (("kept", False), ("recomputed", True)):
            gib = estimate_memory_gib(plan, recompute, mode=mode)
            assert table[mode][how]["gib"] == gib
            assert f"relu² {how} {gib:6.1f} GiB" in out
            assert table[mode][how]["fewest_gpus"] == memory.fewest_gpus(plan, memory.DEFAULT_GPU_GIB, mode, recompute)
        assert table["fsdp"][how]["gib"] < table["replicated"][how]["gib"]
    assert "per-rank GPU memory at world size 8" in out and "FSDP2:" in out


def test_the_dry_run_reads_the_one_estimate(capsys, monkeypatch):
    """A changed memory_parts changes the printed plan: the dry run has no formula of its own."""
    def fake(plan, mode="replicated", recompute_mlp=True, world_size=None, bytes_per_channel=None):
        return {"total": (7.0 if mode == "fsdp" else 9.0) * 8 / (world_size or plan.world_size)}
    monkeypatch.setattr(memory, "memory_parts", fake)
    out, table = dry_run(capsys, monkeypatch, "--depth", "20", "--world-size", "8", "--gpu-memory-gib", "9.5")
    assert table["gpu_gib"] == 9.5
    assert table["replicated"]["kept"] == {"gib": 9.0, "fewest_gpus": 16}  # 9 > 0.9 x 9.5 = 8.55; on 16: 4.5
    assert table["fsdp"]["recomputed"] == {"gib": 7.0, "fewest_gpus": 8}  # on 4: 14
    assert table["fsdp_auto"] is True  # 9 > 0.9 x 9.5 = 8.55 >= 7


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
