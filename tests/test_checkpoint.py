"""Checkpoints: atomic writes, weights-only loads, and a crash mid-save never costs the last good one."""
import datetime
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import data_file, save_format2
from train import checkpoint, paths
from train.errors import UserError


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return paths.checkpoint_dir("d2")


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}


def _optim(seed):
    return {"a.weight.step": torch.tensor(seed), "a.weight.exp_avg": _state(seed)["b"]}


def test_save_then_load_round_trip(ckpt_dir):
    model, optim = _state(0), _optim(1)
    checkpoint.save_checkpoint(ckpt_dir, 5, {"model": model, "optimizer": optim}, {"step": 5, "loop_state": {"x": 1}})
    assert checkpoint.saved_steps(ckpt_dir) == [5]
    assert checkpoint.is_dcp(ckpt_dir, 5) and checkpoint.damage(ckpt_dir, 5) is None
    loaded = checkpoint.load_model_state(ckpt_dir, 5, "cpu")
    assert loaded.keys() == model.keys() and all(torch.equal(loaded[k], model[k]) for k in model)
    into = {k: torch.full_like(v, -1) for k, v in optim.items()}  # poisoned: loaded in place
    checkpoint.load_state(ckpt_dir, 5, {"optimizer": into})
    assert all(torch.equal(into[k], optim[k]) for k in optim)
    assert set(checkpoint.saved_tensors(ckpt_dir, 5, "optimizer")) == {f"optimizer.{k}" for k in optim}
    assert set(checkpoint.load_tensors(ckpt_dir, 5, "model")) == set(model)
    assert checkpoint.load_meta(ckpt_dir, 5)["loop_state"] == {"x": 1}
    assert set(checkpoint.load_meta(ckpt_dir, 5)["files"]) == {
        p.relative_to(ckpt_dir).as_posix() for p in (ckpt_dir / "step_000005").rglob("*") if p.is_file()}
    assert not [p for p in ckpt_dir.rglob("*") if ".tmp" in p.name]


def test_a_damaged_dcp_file_is_found_before_it_is_read(ckpt_dir):
    checkpoint.save_checkpoint(ckpt_dir, 5, {"model": _state(0)}, {"step": 5})
    data = data_file(ckpt_dir, 5)
    data.write_bytes(data.read_bytes()[:-1] + b"!")
    assert "is damaged" in checkpoint.damage(ckpt_dir, 5)
    # on 2 ranks (`latest`) each checks its share of the files: one of them finds it
    assert [bool(checkpoint.damage(ckpt_dir, 5, rank, 2)) for rank in (0, 1)].count(True) == 1
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.load_model_state(ckpt_dir, 5, "cpu")
    checkpoint.verify_files(ckpt_dir, 5, rank=0, world=2, part="model")  # .metadata only: its share of 2


def test_format_2_checkpoints_still_load_and_keep_their_format_when_their_meta_is_rewritten(ckpt_dir):
    save_format2(ckpt_dir, 4, _state(2), [{"state": {}, "param_groups": []}], {"step": 4})
    for _ in range(2):
        assert not checkpoint.is_dcp(ckpt_dir, 4) and checkpoint.damage(ckpt_dir, 4) is None
        assert torch.equal(checkpoint.load_model_state(ckpt_dir, 4, "cpu")["w"], _state(2)["w"])
        assert checkpoint.load_optimizer_state(ckpt_dir, 4, 0, "cpu") == {"state": {}, "param_groups": []}
        checkpoint.rewrite_meta(ckpt_dir, 4, {"step": 4, "val_bpb": 1.5})  # a resume at its last step
    assert checkpoint.load_meta(ckpt_dir, 4)["val_bpb"] == 1.5
    meta = ckpt_dir / "step_000004_meta.json"
    meta.write_text(meta.read_text().replace("1.5", "2.5"))  # format 2's metas carry their digest: checked
    with pytest.raises(UserError, match="damaged"):
        checkpoint.load_meta(ckpt_dir, 4)


def test_missing_step_is_one_clear_error(ckpt_dir):
    checkpoint.save_checkpoint(ckpt_dir, 3, {"model": _state(1)}, {"step": 3})
    with pytest.raises(UserError, match="no checkpoint at step 7.*saved steps: 3"):
        checkpoint.load_meta(ckpt_dir, 7)


def test_loads_refuse_code(ckpt_dir):
    """A pickled object that would run code on load is refused (weights_only=True)."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    ckpt_dir.mkdir(parents=True)
    torch.save({"x": Evil()}, ckpt_dir / "step_000001_model.pt")
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load_model_state(ckpt_dir, 1, "cpu")


def test_a_dcp_metadata_that_would_run_code_is_refused(ckpt_dir, tmp_path):
    """DCP unpickles its .metadata unrestricted: ours names only DCP's records and torch's sizes and dtypes."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    checkpoint.save_checkpoint(ckpt_dir, 1, {"model": _state(0)}, {"step": 1})
    (ckpt_dir / "step_000001" / "model" / ".metadata").write_bytes(pickle.dumps(Evil()))
    for read in (lambda: checkpoint.saved_tensors(ckpt_dir, 1, "model"),
                 lambda: checkpoint.load_state(ckpt_dir, 1, {"model": _state(1)})):
        with pytest.raises(UserError, match="system is not allowed in a checkpoint"):
            read()
    assert not (tmp_path / "pwned").exists()


def test_corrupt_file_is_one_clear_error(ckpt_dir):
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "step_000002_model.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load_model_state(ckpt_dir, 2, "cpu")


@pytest.mark.slow
def test_killed_mid_save_leaves_previous_checkpoint_loadable(ckpt_dir, tmp_path):
    """A process that dies halfway through writing step 2's DCP files leaves step 1 intact and step 2 absent; the
    next run holding the folder removes what it left."""
    script = textwrap.dedent("""
        import os, torch
        from train import checkpoint, paths
        d = paths.checkpoint_dir("d2")
        checkpoint.save_checkpoint(d, 1, {"model": {"w": torch.ones(64, 64)}, "optimizer": {"m": torch.ones(4)}},
                                   {"step": 1})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"partial bytes of a checkpoint")
            f.flush()
            os._exit(9)  # killed mid-write: no cleanup, no exception handlers
        torch.save = dying_save
        checkpoint.save_checkpoint(d, 2, {"model": {"w": torch.zeros(64, 64)}, "optimizer": {"m": torch.zeros(4)}},
                                   {"step": 2})
    """)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert (ckpt_dir / "step_000002").is_dir()  # it died writing there
    assert checkpoint.saved_steps(ckpt_dir) == [1] and checkpoint.newest_good_step(ckpt_dir) == (1, [])
    assert torch.equal(checkpoint.load_model_state(ckpt_dir, 1, "cpu")["w"], torch.ones(64, 64))
    into = {"m": torch.zeros(4)}
    checkpoint.load_state(ckpt_dir, 1, {"optimizer": into})
    assert torch.equal(into["m"], torch.ones(4))
    assert checkpoint.remove_leftovers(ckpt_dir) == ["step_000002"]
    assert not (ckpt_dir / "step_000002").exists() and checkpoint.damage(ckpt_dir, 1) is None


def test_prune_keeps_the_newest_complete_checkpoints(ckpt_dir):
    for step in (1, 2, 3, 4, 5):
        checkpoint.save_checkpoint(ckpt_dir, step, {"model": _state(step)}, {"step": step})
    (ckpt_dir / "step_000000_model.pt").write_bytes(b"a save that crashed before its meta")
    assert checkpoint.prune(ckpt_dir, 2) == [1, 2, 3]
    assert checkpoint.saved_steps(ckpt_dir) == [4, 5]
    assert not list(ckpt_dir.glob("step_00000[123]*"))
    assert (ckpt_dir / "step_000000_model.pt").exists()  # not a complete checkpoint: not ours to judge
    assert checkpoint.prune(ckpt_dir, 2) == [] and checkpoint.prune(ckpt_dir, -1) == []


def _failing_hash_worker(rank: int, folder: str, store: str) -> None:
    import torch.distributed as dist

    from train import distributed
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # collectives out of step: fail, do not hang
    try:
        real = checkpoint.file_digest
        if rank == 1:  # rank 1 cannot read back its model file: after the model part, before the optimizer's
            checkpoint.file_digest = lambda path: (_ for _ in ()).throw(OSError(5, "Input/output error")) \
                if "/model/" in str(path) else real(path)
        state = {"model": {f"w{rank}": torch.full((4, 4), float(rank))}, "optimizer": {f"m{rank}": torch.ones(3)}}
        with pytest.raises(checkpoint.CheckpointWriteError, match="Input/output error"):
            checkpoint.save_checkpoint(folder, 1, state, {"step": 1}, rank, 2, distributed.all_gather_objects)
        dist.barrier()
        assert checkpoint.saved_steps(folder) == []  # no meta: the step is not a checkpoint
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_that_cannot_hash_its_files_fails_the_save_on_every_rank(tmp_path):
    """Each rank hashes its own files after every part is written: one that fails is every rank's failure, with no
    meta (and the ranks' collectives stay in step)."""
    import torch.multiprocessing as mp
    mp.spawn(_failing_hash_worker, args=(str(tmp_path / "ckpt"), str(tmp_path / "store")), nprocs=2, join=True)
