"""Checkpoints: atomic writes, weights-only loads, per-rank optimizer shards, resume state.

Layout under $NANOCHAT_BASE_DIR/base_checkpoints/{model_tag}/:
  step_{N}_model.pt                  model weights (plain tensors), written by rank 0
  step_{N}_optimizer_rank{r}.pt      rank r's optimizer state (sharded in the distributed optimizer)
  step_{N}_meta.json                 config, flags, step, val bpb, dataloader and loop state
Every file goes to a temporary name first and is renamed into place, and the meta file is written
last: a step counts as saved only once its meta exists, so a crash mid-save leaves the previous
checkpoint as the latest good one.
"""
import json
import re
from pathlib import Path

import torch

from train.errors import UserError
from train.paths import atomic_write


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_json_save(obj, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)


def _paths(ckpt_dir: Path, step: int, rank: int):
    return (ckpt_dir / f"step_{step:06d}_model.pt",
            ckpt_dir / f"step_{step:06d}_optimizer_rank{rank}.pt",
            ckpt_dir / f"step_{step:06d}_meta.json")


def save_checkpoint(ckpt_dir: Path, step: int, model_state: dict, optimizer_state: dict | None,
                    meta: dict, rank: int = 0, barrier=lambda: None) -> None:
    """Every rank writes its optimizer shard; rank 0 writes the model, then (after all ranks) the meta."""
    model_path, optim_path, meta_path = _paths(Path(ckpt_dir), step, rank)
    if optimizer_state is not None:
        atomic_torch_save(optimizer_state, optim_path)
    if rank == 0:
        atomic_torch_save(model_state, model_path)
    barrier()
    if rank == 0:
        atomic_json_save(meta, meta_path)
    barrier()


def prune(ckpt_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (rank 0, after a save); returns the steps deleted.

    Each goes meta file first, so an interrupted deletion leaves an incomplete step that nothing loads.
    Files of steps without a meta (a save that crashed) are left alone: a later save may still complete them."""
    steps = saved_steps(ckpt_dir)
    doomed = steps[:-keep] if keep > 0 else []
    for step in doomed:
        (Path(ckpt_dir) / f"step_{step:06d}_meta.json").unlink(missing_ok=True)
        for f in Path(ckpt_dir).glob(f"step_{step:06d}_*"):
            f.unlink(missing_ok=True)
    return doomed


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps whose checkpoint is complete (its meta file exists), ascending."""
    steps = []
    for p in Path(ckpt_dir).glob("step_*_meta.json"):
        m = re.fullmatch(r"step_(\d+)_meta\.json", p.name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def load_meta(ckpt_dir: Path, step: int) -> dict:
    _, _, meta_path = _paths(Path(ckpt_dir), step, 0)
    if not meta_path.exists():
        have = saved_steps(ckpt_dir)
        raise UserError(f"no checkpoint at step {step} in {ckpt_dir}"
                        + (f" (saved steps: {', '.join(map(str, have))})" if have else " (no checkpoints there)"))
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint meta {meta_path} is unreadable: {e}") from None


def load_model_state(ckpt_dir: Path, step: int, device) -> dict:
    model_path, _, _ = _paths(Path(ckpt_dir), step, 0)
    return _load(model_path, device)


def load_optimizer_state(ckpt_dir: Path, step: int, rank: int, device) -> dict:
    _, optim_path, _ = _paths(Path(ckpt_dir), step, rank)
    return _load(optim_path, device)


def _load(path: Path, device) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        # weights_only: a checkpoint file must not be able to run code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupt or not a torch file
        raise UserError(f"checkpoint file {path} cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
