"""What a run checks before it continues a checkpoint, and what it tells the user about it.

- `latest` is the newest checkpoint whose meta and files verify (the newer ones skipped are named, with why);
- the checkpoint must be of this model, this tokenizer (its fingerprint) and this dataset (its name and shards;
  more training shards before the validation shard are fine, anything else needs --allow-data-change; where the
  checkpoint recorded the shards' digests, the contents of the shards it trained on and of the validation shard
  too);
- flags that shape the optimization (learning rates, betas, weight decay, batch, schedule) may differ from the
  checkpoint's: they take effect from the resumed step, and the run says which changed;
- the world size and the data-parallel mode may differ too: each rank reads its share of the model and optimizer
  state (the batch and schedule stay, the gradient accumulation follows the new world size).
"""
from pathlib import Path

from train import checkpoint, distributed, optim
from train.dataset import dataset_fingerprint
from train.errors import UserError

META_KEYS = ("step", "model_config", "user_config", "world_size", "dataloader", "loop_state")
OPTIMIZATION_FLAGS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "adam_beta1",
                      "adam_beta2", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "total_batch_size",
                      "num_iterations", "target_flops", "target_param_data_ratio")


def last_good(ckpt_dir: Path) -> str:
    """The sentence that tells a user where to resume from, after a run stopped on an error."""
    step, _ = checkpoint.newest_good_step(ckpt_dir)
    if step is None:
        return f"there is no checkpoint to resume from in {ckpt_dir}"
    return f"the last good checkpoint is step {step} in {ckpt_dir} (--resume-from-step {step})"


def pick_step(requested, ckpt_dir: Path, print0, fresh_ok: bool = False, rank: int = 0, world: int = 1) -> int:
    """The step to resume (-1: none). `latest`: the newest good checkpoint (rank of world ranks checks its share of
    the files), said in a line; when the folder holds checkpoints and none is good, refused (unless fresh_ok:
    --set-aside moves them out of the way). A collective."""
    if requested != "latest":
        return requested
    step, skipped = checkpoint.newest_good_step(ckpt_dir, rank, world, distributed.all_gather_objects)
    for bad, why in skipped:
        print0(f"--resume-from-step latest: skipped step {bad}: {why}")
    step = -1 if step is None else step
    if step < 0 and skipped and not fresh_ok:
        raise UserError(f"--resume-from-step latest: none of the checkpoints in {ckpt_dir} can be resumed (steps "
                        f"{', '.join(str(s) for s, _ in skipped)}, said above): mend them, or pass --set-aside to "
                        "move them out of the way and start afresh")
    print0(f"--resume-from-step latest: {f'step {step}' if step >= 0 else 'no checkpoint yet, starting from scratch'}"
           f" in {ckpt_dir}")
    return step


def check_meta(meta: dict, args, plan, tokenizer, shards: list[str], ckpt_dir: Path) -> bool:
    """The checkpoint is of this model, tokenizer and data (one line says what differs); True when the data
    differs and --allow-data-change lets it (the loader's saved position then means nothing)."""
    step = meta.get("step")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"the meta of step {step} in {ckpt_dir} lacks {', '.join(missing)}: it was not written by "
                        "train.pretrain")
    check_tokenizer(meta, tokenizer)
    if meta["model_config"] != plan.config.to_dict():
        raise UserError(f"checkpoint step {step} in {ckpt_dir} is a different model: "
                        f"{meta['model_config']} vs {plan.config.to_dict()}")
    data = meta.get("dataset")
    if data is None:
        return False  # written before the data was recorded
    old, digests = data.get("train_shards", []), data.get("digests") or {}
    if not (isinstance(old, list) and all(isinstance(x, str) for x in old) and isinstance(digests, dict)
            and all(isinstance(x, str) for x in digests.values())):
        raise UserError(f"the meta of step {step} in {ckpt_dir} records its data in a form this version does not "
                        "write: it is damaged")
    if data.get("name") != args.dataset or shards[:len(old)] != old:
        why = (f"dataset {data.get('name')!r} with {len(old)} training shards; now {args.dataset!r} with "
               f"{len(shards)}")
    else:
        changed = changed_shards(data.get("digests"), args.dataset)
        if not changed:
            return False
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        why = f"other documents in {', '.join(changed[:3])}{more}: was the dataset rebuilt?"
    if not args.allow_data_change:
        raise UserError(f"the data differs from checkpoint step {step}'s ({why}): resume with the same shards, or "
                        "pass --allow-data-change")
    return True


def check_tokenizer(meta: dict, tokenizer) -> None:
    """The tokenizer is the one the checkpoint's run trained with: its vocabulary size and merges (fingerprint;
    None in a meta from before the fingerprint)."""
    saved = meta["model_config"].get("vocab_size")
    if saved != tokenizer.vocab_size:
        raise UserError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) does not match the checkpoint's "
                        f"({saved})")
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise UserError(f"the tokenizer differs from the one checkpoint step {meta.get('step')} was trained with "
                        "(the same vocabulary size, other merges): use that tokenizer, or start a new run")


def changed_shards(recorded, dataset: str) -> list[str]:
    """The shards whose contents differ from the digests a checkpoint recorded (dataset_fingerprint at its save):
    those it trained on, and the validation shard (which may be another one now, the old one become training
    data). [] when the checkpoint recorded none (written before the digests were)."""
    if not isinstance(recorded, dict) or not recorded:
        return []
    now = dataset_fingerprint(dataset)
    changed = [name for name in sorted(recorded)[:-1] if now.get(name) != recorded[name]]
    val = max(now, default=None)
    if val is None or now[val] != recorded[max(recorded)]:
        changed.append(f"the validation shard {val}")
    return changed


def changed_flags(meta: dict, args) -> list[str]:
    """'--flag old -> new' for each optimization flag this run sets otherwise than the checkpoint's run."""
    before = meta.get("user_config", {})
    return [f"--{k.replace('_', '-')} {before[k]} -> {getattr(args, k)}" for k in OPTIMIZATION_FLAGS
            if k in before and before[k] != getattr(args, k)]


def verify(ckpt_dir: Path, step: int, rank: int, world: int) -> None:
    """The files of a DCP checkpoint match their digests, each rank checking its share; every rank raises the same
    line (a collective: before any other rank-specific step, so that no rank waits in another collective)."""
    if checkpoint.is_dcp(ckpt_dir, step):  # format 2: each file is checked as it is read
        distributed.on_every_rank(checkpoint.verify_files, ckpt_dir, step, rank, world)


def model_state(ckpt_dir: Path, step: int, device, fsdp: bool) -> dict | None:
    """The checkpoint's whole model state dict for a replicated model (its files verified); None for an FSDP2 model
    of a DCP checkpoint, which load_state fills with its rows only."""
    dcp = checkpoint.is_dcp(ckpt_dir, step)
    return None if fsdp and dcp else checkpoint.load_model_state(ckpt_dir, step, device, verified=dcp)


def load_state(model, optimizer: optim.MuonAdamW, ckpt_dir: Path, step: int, saved_world: int, world: int, device,
               print0, weights: bool) -> None:
    """The optimizer state of checkpoint step (and, weights, the model's, in place: an FSDP2 model's rows), written
    by saved_world ranks in either mode, into this rank's share. DCP: each rank reads what it keeps. Format 2: as many
    ranks as now load their own file; otherwise every rank reads all of them (onto the CPU), puts the state together
    and takes its own share."""
    names = {p: name for name, p in model.named_parameters()}
    if checkpoint.is_dcp(ckpt_dir, step):
        saved = {k.removeprefix("optimizer.") for k in checkpoint.saved_tensors(ckpt_dir, step, "optimizer")}
        extra = {"model": model.state_dict()} if weights else {}
        optim.load_named_state(optimizer, names, saved, lambda named: checkpoint.load_state(
            ckpt_dir, step, extra | {"optimizer": named}))
    elif saved_world == optimizer.world_size:  # HSDP: the rank in its replica
        optimizer.load_state_dict(checkpoint.load_optimizer_state(ckpt_dir, step, optimizer.rank, device))
    else:
        full = optim.full_state(optimizer, names, checkpoint.load_optimizer_states(ckpt_dir, step, saved_world, "cpu"))
        optimizer.load_state_dict(optim.shard_state(optimizer, names, full, optimizer.rank, optimizer.world_size))
    if saved_world != world:
        print0(f"optimizer state of {saved_world} rank{'s' * (saved_world > 1)} resharded onto {world}")
