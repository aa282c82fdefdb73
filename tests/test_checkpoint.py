"""Checkpoints: atomic writes, weights-only loads, and a crash mid-save never costs the last good one."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from train import checkpoint, paths
from train.errors import UserError


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return paths.checkpoint_dir("d2")


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}


def test_save_then_load_round_trip(ckpt_dir):
    model, optim = _state(0), {"state": {0: {"m": torch.randn(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    checkpoint.save_checkpoint(ckpt_dir, 5, model, optim, {"step": 5, "loop_state": {"x": 1}})
    assert checkpoint.saved_steps(ckpt_dir) == [5]
    loaded = checkpoint.load_model_state(ckpt_dir, 5, "cpu")
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    opt = checkpoint.load_optimizer_state(ckpt_dir, 5, 0, "cpu")
    assert torch.equal(opt["state"][0]["m"], optim["state"][0]["m"])
    assert checkpoint.load_meta(ckpt_dir, 5)["loop_state"] == {"x": 1}
    assert not [p for p in ckpt_dir.iterdir() if ".tmp" in p.name]


def test_missing_step_is_one_clear_error(ckpt_dir):
    checkpoint.save_checkpoint(ckpt_dir, 3, _state(1), None, {"step": 3})
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


def test_corrupt_file_is_one_clear_error(ckpt_dir):
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "step_000002_model.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load_model_state(ckpt_dir, 2, "cpu")


@pytest.mark.slow
def test_killed_mid_save_leaves_previous_checkpoint_loadable(ckpt_dir, tmp_path):
    """A process that dies halfway through writing step 2 leaves step 1 intact and step 2 absent."""
    script = textwrap.dedent("""
        import os, torch
        from train import checkpoint, paths
        d = paths.checkpoint_dir("d2")
        checkpoint.save_checkpoint(d, 1, {"w": torch.ones(64, 64)}, {"m": torch.ones(4)}, {"step": 1})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"partial bytes of a checkpoint")
            f.flush()
            os._exit(9)  # killed mid-write: no cleanup, no exception handlers
        torch.save = dying_save
        checkpoint.save_checkpoint(d, 2, {"w": torch.zeros(64, 64)}, {"m": torch.zeros(4)}, {"step": 2})
    """)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert checkpoint.saved_steps(ckpt_dir) == [1]
    assert torch.equal(checkpoint.load_model_state(ckpt_dir, 1, "cpu")["w"], torch.ones(64, 64))
    assert torch.equal(checkpoint.load_optimizer_state(ckpt_dir, 1, 0, "cpu")["m"], torch.ones(4))
    assert not (ckpt_dir / "step_000002_optimizer_rank0.pt").exists()
    assert not (ckpt_dir / "step_000002_model.pt").exists()


def test_prune_keeps_the_newest_complete_checkpoints(ckpt_dir):
    for step in (1, 2, 3, 4, 5):
        checkpoint.save_checkpoint(ckpt_dir, step, _state(step), {"state": {}, "param_groups": []}, {"step": step})
    (ckpt_dir / "step_000000_model.pt").write_bytes(b"a save that crashed before its meta")
    assert checkpoint.prune(ckpt_dir, 2) == [1, 2, 3]
    assert checkpoint.saved_steps(ckpt_dir) == [4, 5]
    assert not list(ckpt_dir.glob("step_00000[123]_*"))
    assert (ckpt_dir / "step_000000_model.pt").exists()  # not a complete checkpoint: not ours to judge
    assert checkpoint.prune(ckpt_dir, 2) == [] and checkpoint.prune(ckpt_dir, -1) == []
