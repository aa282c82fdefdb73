"""Resharding the optimizer state onto another world size (issue #27): the full form of W ranks' state is a single
process's, full -> shards -> full is exact, training continues equal across a world-size change, and the CLI
resumes a 2-rank checkpoint on 1 process and a 1-process one on 2 ranks."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from helpers import SHORT, ckpt, cli_env, metrics, run, save_format2, saved_and_loaded, step_losses, torchrun
from train import checkpoint
from train.errors import UserError
from train.optim import Schedule, full_state, make_optimizer, shard_state

# Shapes that shard unevenly on 2 and 3 ranks: Muon stacks of 5 (tall), 4 (wide) and 3 (square) matrices (on 3
# ranks the stack of 4 leaves rank 2 none); AdamW tensors of >= 1024 elements with dim 0 of 66 (sharded on 1, 2
# and 3 ranks), 65 (on none but 1) and 64 (on 2, not 3); small ones, whole on every rank.
SHAPES = {"matrices": [(24, 16)] * 5 + [(16, 24)] * 4 + [(16, 16)] * 3, "lm_head": [(66, 16)], "wte": [(65, 16)],
          "value_embeds": [(64, 16)], "resid_lambdas": [(5,)], "x0_lambdas": [(5,)], "smear_backout": [(1,), (2,)]}
STEPS = 3  # before the checkpoint, and again after it


def make_params(seed=0) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {f"{group}.{i}": nn.Parameter(torch.randn(*shape, generator=g))
            for group, shapes in SHAPES.items() for i, shape in enumerate(shapes)}


def params_like(weights: dict, seed: int) -> dict[str, nn.Parameter]:
    """New parameters holding a copy of weights (another seed: nothing shared but the values)."""
    params = make_params(seed)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    return params


def make_opt(params, distributed=False):
    groups = {group: [params[f"{group}.{i}"] for i in range(len(shapes))] for group, shapes in SHAPES.items()}
    return make_optimizer(groups, weight_decay=0.2, distributed=distributed)


def names(params) -> dict:
    return {p: name for name, p in params.items()}


def train(params, opt, steps):
    """The same gradients on every rank and in every run: seeded by step, and pulling each weight toward 0 (so
    that a run whose weights went elsewhere gets other gradients)."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for p in params.values():
            p.grad = 0.1 * p.detach() + torch.randn(p.shape, generator=g)
        Schedule(100).apply(opt, step)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_full(a: dict, b: dict, tol: float = 0.0, groups: bool = True):
    """Two full states hold the same tensors (to tol; 0: exactly) and the same other values (the groups'
    hyperparameters too, unless groups is False: a loaded optimizer keeps its run's own)."""
    assert not groups or a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for name, state in a["state"].items():
        assert state.keys() == b["state"][name].keys(), name
        for k, v in state.items():
            if not torch.is_tensor(v):
                assert v == b["state"][name][k], (name, k)
            elif tol:
                torch.testing.assert_close(v, b["state"][name][k], rtol=tol, atol=tol, msg=f"{name} {k}")
            else:
                assert torch.equal(v, b["state"][name][k]), (name, k)


def max_error(params, ref) -> float:
    return max(((p - ref[n]).abs().max() / ref[n].abs().max()).item() for n, p in params.items())

# -----------------------------------------------------------------------------
# in one process


def test_full_state_is_per_parameter_and_round_trips_through_any_world_size():
    params = make_params()
    opt = make_opt(params)
    train(params, opt, range(STEPS))
    saved = saved_and_loaded(opt.state_dict())
    full = full_state(opt, names(params), [saved])
    # one entry per parameter, each tensor of its matrix or tensor alone (Muon: its own row / column moments)
    assert full["state"].keys() == params.keys()
    for name, state in full["state"].items():
        p = params[name]
        if name.startswith("matrices"):
            assert state["momentum_buffer"].shape == p.shape
            assert state["second_moment"].shape == ((p.shape[0], 1) if p.shape[0] >= p.shape[1] else (1, p.shape[1]))
        else:
            assert state["step"] == STEPS and state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
    assert [g["params"][0] for g in full["param_groups"]][-3:] == ["matrices.9", "matrices.5", "matrices.0"]
    # on 1 rank the shard is the single process's state_dict itself
    one = shard_state(opt, names(params), full, 0, 1)
    assert one["param_groups"] == saved["param_groups"] and one["state"].keys() == saved["state"].keys()
    assert all(torch.equal(v, saved["state"][i][k]) if torch.is_tensor(v) else v == saved["state"][i][k]
               for i, state in one["state"].items() for k, v in state.items())
    for world in (1, 2, 3):
        shards = [saved_and_loaded(shard_state(opt, names(params), full, rank, world)) for rank in range(world)]
        assert all(s["world_size"] == world for s in shards)
        assert_same_full(full_state(opt, names(params), shards), full)
    # the shards as the distributed optimizer lays them out (a stack's state in that of its first matrix): on 2
    # ranks the stack of 5 is 3 + (2 and a zero slot); on 3 ranks rank 2 owns no matrix of the stack of 4
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    tall = shard_state(opt, names(params), full, 1, 2)["state"][index["matrices.0"]]["momentum_buffer"]
    assert tall.shape == (3, 24, 16) and not tall[2].any()
    assert torch.equal(tall[:2], torch.stack([full["state"][f"matrices.{i}"]["momentum_buffer"] for i in (3, 4)]))
    assert index["matrices.5"] not in shard_state(opt, names(params), full, 2, 3)["state"]
    assert shard_state(opt, names(params), full, 1, 3)["state"][index["matrices.5"]]["second_moment"].shape == (
        2, 1, 24)

# -----------------------------------------------------------------------------
# on W gloo ranks (torch.multiprocessing)


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _check_resharding(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_optim.py's workers: no interpreter teardown with gloo's threads alive


def _check_resharding(rank, world):
    # the reference: one process, 2 x STEPS steps uninterrupted; its state at the checkpoint kept
    ref = make_params()
    ref_opt = make_opt(ref)
    train(ref, ref_opt, range(STEPS))
    ref_weights, ref_saved = saved_and_loaded(dict(ref)), saved_and_loaded(ref_opt.state_dict())
    train(ref, ref_opt, range(STEPS, 2 * STEPS))
    expected = {n: p.detach() for n, p in ref.items()}

    # (1) W ranks take the same steps: their states put together are the single process's
    params = make_params()
    opt = make_opt(params, distributed=True)
    train(params, opt, range(STEPS))
    states = [None] * world
    dist.all_gather_object(states, saved_and_loaded(opt.state_dict()))
    full = full_state(opt, names(params), states)
    assert_same_full(full, full_state(ref_opt, names(ref), [ref_saved]), tol=1e-6)

    # (3a) W ranks -> 1 process: the replicated weights and the resharded state continue as the reference
    one = make_params(seed=1)
    with torch.no_grad():
        for n, p in one.items():
            p.copy_(params[n])
    one_opt = make_opt(one)
    one_opt.load_state_dict(saved_and_loaded(shard_state(one_opt, names(one), full, 0, 1)))
    train(one, one_opt, range(STEPS, 2 * STEPS))
    assert max_error(one, expected) < 1e-5, f"{world} ranks -> 1: {max_error(one, expected):.2e}"

    # (3b) 1 process -> W ranks, from the reference's checkpoint
    back = params_like(ref_weights, seed=2)
    back_opt = make_opt(back, distributed=True)
    ref_full = full_state(back_opt, names(back), [ref_saved])
    back_opt.load_state_dict(saved_and_loaded(shard_state(back_opt, names(back), ref_full, rank, world)))
    train(back, back_opt, range(STEPS, 2 * STEPS))
    assert max_error(back, expected) < 1e-5, f"1 -> {world} ranks: {max_error(back, expected):.2e}"

    # (5) the control: the same continuation with a fresh optimizer ends visibly elsewhere
    fresh = params_like(ref_weights, seed=3)
    train(fresh, make_opt(fresh, distributed=True), range(STEPS, 2 * STEPS))
    assert max_error(fresh, expected) > 1e-2, max_error(fresh, expected)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_resharded_state_is_the_single_process_one_and_training_continues_equal(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store")), nprocs=world, join=True)

# -----------------------------------------------------------------------------
# the CLI: 2 ranks -> 1 process -> 2 ranks in FSDP2 -> 1 process replicated


# train.pretrain with the checkpoint's load patched: each rank saves what it holds after loading (model and optimizer,
# its share put together: DTensors whole) to $DUMP/rank{r}.pt; with $FRESH_OPTIMIZER (replicated: the weights are
# loaded before) it loads no optimizer state (the negative control)
LOAD_AND_DUMP = """
import os, sys, torch
from train import optim, pretrain, resume
from train.errors import run_cli
from torch.distributed.tensor import DTensor
load = resume.load_state
def load_and_dump(model, optimizer, *args, **kwargs):
    if os.environ.get("FRESH_OPTIMIZER"):
        return
    load(model, optimizer, *args, **kwargs)
    whole = lambda v: v.full_tensor() if isinstance(v, DTensor) else v
    names = {p: n for n, p in model.named_parameters()}
    held = {f"optimizer.{k}": whole(v) for k, v in optim.named_state(optimizer, names).items()}
    held |= {f"model.{k}": whole(v) for k, v in model.state_dict().items()}
    torch.save(held, os.path.join(os.environ["DUMP"], f"rank{os.environ.get('RANK', 0)}.pt"))
resume.load_state = load_and_dump
run_cli(pretrain.main, sys.argv[1:])
"""


def _launch(script, args, base, nproc, **env):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], capture_output=True, text=True,
                          env=cli_env(base, OMP_NUM_THREADS="1", **env), timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _assert_loaded(dumps, folder, step):
    """What the ranks hold after loading (each its share, keyed by name) is, put together, the checkpoint's model and
    optimizer state, exactly."""
    saved = {f"{what}.{k}": v for what in ("model", "optimizer")
             for k, v in checkpoint.load_tensors(folder, step, what).items()}
    loaded = {}
    for path in dumps:
        loaded |= torch.load(path, weights_only=True)
    assert loaded.keys() == saved.keys() and len(saved) > 40
    assert [k for k in saved if not torch.equal(loaded[k], saved[k])] == []


@pytest.mark.slow
def test_cli_resumes_on_any_world_size_and_in_either_mode(tiny_base, tmp_path):
    base, script = tiny_base, tmp_path / "load_and_dump.py"
    script.write_text(LOAD_AND_DUMP)
    # 10 x the LRs: the tiny batch scales them down (x 0.022) to where a fresh optimizer barely shows in the losses
    args = [*SHORT, "--device-batch-size", "2", "--save-every", "2", "--matrix-lr", "0.2", "--embedding-lr", "3",
            "--unembedding-lr", "0.04", "--scalar-lr", "5", "--model-tag", "moves"]
    torchrun([*args, "--num-iterations", "4"], base)
    folder = ckpt(base, "moves")
    shutil.copytree(folder, ckpt(base, "fresh"))

    # 2 ranks -> 1 process (grad accumulation 2 makes up the batch): what it loaded is the checkpoint's state
    (tmp_path / "one").mkdir()
    proc = _launch(script, [*args, "--num-iterations", "7", "--resume-from-step", "latest"], base, 1,
                   DUMP=tmp_path / "one")
    assert "optimizer state of 2 ranks resharded onto 1" in proc.stdout, proc.stdout[-2000:]
    assert "| grad accum 2" in proc.stdout  # the same 256-token batch, on 1 process
    _assert_loaded([tmp_path / "one" / "rank0.pt"], folder, 4)
    # the control: the same resume with a fresh optimizer; the first step's loss (weights as saved) is the same,
    # the next ones visibly not
    fresh_args = [*args[:-1], "fresh", "--num-iterations", "7", "--resume-from-step", "latest"]
    _launch(script, fresh_args, base, 1, FRESH_OPTIMIZER="1")
    resumed, fresh = step_losses(metrics(base, "moves")), step_losses(metrics(base, "fresh"))
    assert sorted(resumed) == list(range(1, 8)) and sorted(fresh) == list(range(1, 8))
    assert fresh[5] == pytest.approx(resumed[5], rel=1e-6)
    assert all(abs(fresh[s] - resumed[s]) > 1e-3 for s in (6, 7)), (resumed, fresh)

    # 1 process -> 2 ranks in FSDP2, from the checkpoint the 1-process run saved at its end
    (tmp_path / "two").mkdir()
    proc = _launch(script, [*args, "--num-iterations", "9", "--resume-from-step", "latest", "--fsdp", "on"], base, 2,
                   DUMP=tmp_path / "two")
    assert "optimizer state of 1 rank resharded onto 2" in proc.stdout, proc.stdout[-2000:]
    assert "| grad accum 1" in proc.stdout and "data parallel: FSDP2" in proc.stdout
    _assert_loaded([tmp_path / "two" / f"rank{r}.pt" for r in range(2)], folder, 7)

    # FSDP2's 2 ranks -> 1 process, replicated
    (tmp_path / "back").mkdir()
    proc = _launch(script, [*args, "--num-iterations", "10", "--resume-from-step", "latest"], base, 1,
                   DUMP=tmp_path / "back")
    assert "optimizer state of 2 ranks resharded onto 1" in proc.stdout and "data parallel: replicated" in proc.stdout
    _assert_loaded([tmp_path / "back" / "rank0.pt"], folder, 9)
    assert sorted(step_losses(metrics(base, "moves"))) == list(range(1, 11))


def test_a_meta_rewritten_by_another_world_size_keeps_the_one_of_its_files(tmp_path, monkeypatch):
    """A run that resumed the last step on 1 process and only evaluated rewrites the meta of the 2 ranks' files."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "d2"
    checkpoint.save_checkpoint(folder, 3, {"model": {"w": torch.ones(2)}}, {"step": 3, "world_size": 2})
    checkpoint.rewrite_meta(folder, 3, {"step": 3, "world_size": 1})
    assert checkpoint.load_meta(folder, 3)["world_size"] == 2


def test_a_missing_or_damaged_rank_file_is_one_line(tmp_path, monkeypatch):
    """Resharding format 2 reads every old rank's file, each verified as a rank's own is."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "d2"
    save_format2(folder, 3, {"w": torch.ones(2)}, [{"state": {}}], {"step": 3, "world_size": 2})
    with pytest.raises(UserError, match=r"step_000003_optimizer_rank1\.pt is missing"):
        checkpoint.load_optimizer_states(folder, 3, 2, "cpu")
    rank0 = folder / "step_000003_optimizer_rank0.pt"
    rank0.write_bytes(rank0.read_bytes()[:-1] + b"!")
    with pytest.raises(UserError, match=r"step_000003_optimizer_rank0\.pt is damaged"):
        checkpoint.load_optimizer_states(folder, 3, 1, "cpu")


@pytest.mark.slow
def test_a_format_2_checkpoint_resumes_in_fsdp2_on_two_ranks_as_its_dcp_twin(tiny_base):
    """A checkpoint of before DCP (model file, one optimizer file per rank) still resumes, here on 2 ranks in FSDP2
    (its state resharded through full_state / shard_state): the same losses as the same state saved through DCP."""
    from model.config import GPTConfig
    from train.builder import build_model
    from train.optim import load_named_state
    args = [*SHORT, "--device-batch-size", "2", "--matrix-lr", "0.2", "--embedding-lr", "3"]
    run([*args, "--num-iterations", "4", "--model-tag", "legacy"], tiny_base)
    folder, twin = ckpt(tiny_base, "legacy"), ckpt(tiny_base, "legacy-dcp")
    shutil.copytree(folder, twin)
    meta = checkpoint.load_meta(folder, 4)
    model = build_model(GPTConfig(**meta["model_config"]), "cpu")
    model.load_state_dict(checkpoint.load_tensors(folder, 4, "model"))
    opt = make_optimizer(model.param_groups())
    saved = {k.removeprefix("optimizer.") for k in checkpoint.saved_tensors(folder, 4, "optimizer")}
    load_named_state(opt, {p: n for n, p in model.named_parameters()}, saved,
                     lambda named: checkpoint.load_state(folder, 4, {"optimizer": named}))
    shutil.rmtree(folder / "step_000004")
    (folder / "step_000004_meta.json").unlink()
    save_format2(folder, 4, model.state_dict(), [opt.state_dict()],
                 {k: v for k, v in meta.items() if k not in ("format", "files", "meta_sha256")})
    for tag in ("legacy", "legacy-dcp"):
        proc = torchrun([*args, "--num-iterations", "6", "--model-tag", tag, "--resume-from-step", "4", "--fsdp", "on"],
                        tiny_base)
        assert "optimizer state of 1 rank resharded onto 2" in proc.stdout
    legacy, dcp = step_losses(metrics(tiny_base, "legacy")), step_losses(metrics(tiny_base, "legacy-dcp"))
    assert sorted(legacy) == list(range(1, 7)) and all(legacy[s] == pytest.approx(dcp[s], rel=1e-6) for s in (5, 6))
