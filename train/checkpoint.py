"""Checkpoints: tensors through torch.distributed.checkpoint (DCP), checksums, verified loads, a lock.

Layout under $NANOCHAT_BASE_DIR/base_checkpoints/{model_tag}/:
  step_{N}/model/, step_{N}/optimizer/  DCP's files of each part: .metadata and each rank's __{rank}_{i}.distcp. The
                                     state is global ("model.<name>", "optimizer.<name>.<key>": whole tensors, or
                                     DTensors of a rank's rows), so any number of ranks, in either mode, loads it:
                                     each reads what it holds (and a reader of the weights only their files)
  step_{N}_meta.json                 config, flags, step, val bpb, dataloader and loop state, and the size and
                                     sha256 of every file above
  .lock                              held (flock) by the run writing here; its host and pid inside
Format 2 (before DCP, still resumed): step_{N}_model.pt (rank 0) and step_{N}_optimizer_rank{r}.pt (each rank's
DistMuonAdamW shard) instead of the folder.
The meta file is written last, once every rank's files are whole: a step counts as saved only once its meta exists,
so a crash mid-save leaves the previous checkpoint as the latest.
"""
import fcntl
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from train import distributed
from train.errors import UserError, first_line
from train.paths import TEMP_MARK, atomic_write

STEP_FILE = re.compile(r"step_(\d{6,})(_model\.pt|_optimizer_rank\d+\.pt|_meta\.json|_suspect\.txt)?")


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (disk full, quota, permissions): the step is not saved."""


def file_digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 8 MiB pieces."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


class _HashingWriter:
    """A file that hashes what goes through it: the digest of a save costs no second read of the file."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path: Path) -> dict:
    """torch.save to path atomically; returns the file's digest (as file_digest gives it). Any failure is a
    CheckpointWriteError."""
    try:
        with atomic_write(path) as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
        raise CheckpointWriteError(f"cannot write {path}: {first_line(e)}") from None
    return {"bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}


def atomic_json_save(obj, path: Path) -> None:
    try:
        with atomic_write(path, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)  # NaN is not JSON
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {path}: {first_line(e)}") from None


def _paths(ckpt_dir: Path, step: int, rank: int):
    return (ckpt_dir / f"step_{step:06d}_model.pt",
            ckpt_dir / f"step_{step:06d}_optimizer_rank{rank}.pt",
            ckpt_dir / f"step_{step:06d}_meta.json")


def step_folder(ckpt_dir: Path, step: int) -> Path:
    """The folder of a step's DCP files."""
    return Path(ckpt_dir) / f"step_{step:06d}"


# what DCP's .metadata may name: its own records, torch's sizes, layouts and dtypes (these are checked apart)
METADATA_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "StorageMeta",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in METADATA_GLOBALS and not dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """DCP's FileSystemReader, with a .metadata that cannot run code: DCP unpickles it unrestricted (its tensors it
    loads weights-only), and would load a record of pickled bytes with weights_only=False: we write tensors only."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata) or not all(
                isinstance(m, TensorStorageMetadata) for m in metadata.state_dict_metadata.values()):
            raise ValueError("its .metadata records something other than tensors")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


# DCP warns that a process without collectives is assumed to be alone (we know), and that it overwrites a folder (a
# killed save's leftovers): set once, as warnings.catch_warnings is not thread-safe (--async-save writes in a thread)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="Detected an existing checkpoint")


def _reason(e: BaseException) -> str:
    """The first line of what went wrong; of a DCP failure, the first failing rank's own exception."""
    if isinstance(e, dcp.api.CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, OSError) else first_line(e)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, meta: dict, rank: int = 0, world: int = 1,
                    gather=lambda obj: [obj], group=None) -> None:
    """state ({"model": ..., "optimizer": ...}: this rank's tensors, global as the module's docstring says; every rank
    the same parts) into the step's folder through DCP, a part at a time, each a collective: a tensor every rank holds
    alike is written once. Then each rank hashes the files it wrote and rank 0 writes the meta, last, with every file's
    digest. gather(obj) -> every rank's obj (torch.distributed's all_gather_object); group: DCP's process group (None:
    the default one); a write that fails on any rank removes the step's folder and raises CheckpointWriteError on
    every rank."""
    folder = step_folder(ckpt_dir, step)
    written, digests, error = {}, {}, None
    try:  # DCP's collectives: a failure on any rank is every rank's, in the same part
        for part, tensors in state.items():
            writer = dcp.FileSystemWriter(folder / part, overwrite=True)
            written[part] = dcp.save({part: tensors}, no_dist=not torch.distributed.is_initialized(),
                                     process_group=group, storage_writer=writer)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        _reraise_interrupt(e)
        error = f"cannot write {folder}: {_reason(e)}"
    try:  # then each rank's own files, its failure gathered with the rest
        for part, metadata in written.items() if error is None else ():
            digests |= {f"{folder.name}/{part}/{name}": file_digest(folder / part / name)
                        for name in _written_by(metadata, rank)}
    except OSError as e:
        error = f"cannot read back {folder}: {first_line(e)}"
    every = gather((digests, error))
    error = next((err for _, err in every if err), None)  # the same on every rank
    if error is None:  # then rank 0 writes the meta and tells every rank how that went
        meta_error = None
        if rank == 0:
            try:
                meta = meta | {"format": META_FORMAT, "files": {k: v for d, _ in every for k, v in d.items()}}
                atomic_json_save(meta | {"meta_sha256": meta_digest(meta)}, _paths(Path(ckpt_dir), step, 0)[2])
            except (CheckpointWriteError, ValueError) as e:
                meta_error = str(e)
        error = gather(meta_error)[0]
    if error is not None:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointWriteError(error)


class BackgroundSaves:
    """--async-save: checkpoints written by a thread while training goes on, one at a time. start() copies this rank's
    state to the CPU (DCP's stager: the GPU's memory is free to change at once) and returns; the thread writes it as
    save_checkpoint does, with its collectives on a gloo process group of its own, then calls saved(step). wait()
    returns once the save in flight has ended, and raises its CheckpointWriteError."""

    def __init__(self, world: int):
        from concurrent.futures import ThreadPoolExecutor
        self.world, self.pending, self.step = world, None, None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.group = torch.distributed.new_group(backend="gloo") if torch.distributed.is_initialized() else None

    def start(self, ckpt_dir: Path, step: int, state: dict, meta: dict, rank: int, saved) -> None:
        self.wait()
        from torch.distributed.checkpoint.staging import BlockingAsyncStager
        staged = {part: BlockingAsyncStager().stage(tensors) for part, tensors in state.items()}
        self.pending, self.step = self.thread.submit(self._save, ckpt_dir, step, staged, meta, rank, saved), step

    def _save(self, ckpt_dir: Path, step: int, staged: dict, meta: dict, rank: int, saved) -> None:
        gather = functools.partial(distributed.all_gather_objects, group=self.group)
        save_checkpoint(ckpt_dir, step, staged, meta, rank, self.world, gather, self.group)
        saved(step)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        try:
            if pending is not None:
                pending.result()
        except Exception as e:  # a CheckpointWriteError; or the thread's collectives, --keep-last's deletions
            error = e if isinstance(e, CheckpointWriteError) else CheckpointWriteError(
                f"{type(e).__name__}: {first_line(e)}")
            error.step = self.step  # the step it was for: the run is further on
            raise error from None

    def close(self) -> str | None:
        """The end of the run, however it ends: wait for the save in flight; its failure as a line, or None."""
        try:
            self.wait()
            return None
        except CheckpointWriteError as e:
            return f"the checkpoint of step {e.step} written in the background failed: {e}"
        finally:
            self.thread.shutdown()


def _written_by(written, rank: int) -> list[str]:
    """The files of a DCP save (its Metadata) that rank wrote: DCP names them __{rank}_{i}.distcp; .metadata (and
    anything else) is rank 0's."""
    names = {".metadata"} | {info.relative_path for info in written.storage_data.values()}
    return sorted(n for n in names if (m := re.match(r"__(\d+)_", n)) and int(m.group(1)) == rank
                  or not m and rank == 0)


def _reraise_interrupt(e: BaseException) -> None:
    """A Ctrl-C that DCP caught in its work is the user's, not a failed write."""
    if isinstance(e, dcp.api.CheckpointException) and any(
            isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
        raise KeyboardInterrupt


def rewrite_meta(ckpt_dir: Path, step: int, meta: dict) -> None:
    """A new meta for a saved step whose files are unchanged (a run resumed at its last step only evaluated): the
    files keep their digests, and nothing but the meta is written (never a second copy of the weights to lose).
    The world size stays that of the ranks that wrote the optimizer files (the run may have another)."""
    old = load_meta(ckpt_dir, step)
    meta = meta | {"format": old.get("format", 1), "files": old.get("files", {})}  # the files' format, kept
    if "world_size" in old:
        meta["world_size"] = old["world_size"]
    atomic_json_save(meta | {"meta_sha256": meta_digest(meta)}, _paths(Path(ckpt_dir), step, 0)[2])


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps whose checkpoint is complete (its meta file exists), ascending."""
    steps = []
    for p in Path(ckpt_dir).glob("step_*_meta.json"):
        m = re.fullmatch(r"step_(\d+)_meta\.json", p.name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def meta_digest(meta: dict) -> str:
    """sha256 of a meta's content (its own digest left out), as JSON with sorted keys: written into the meta."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


META_FORMAT = 3  # 3: DCP's files; 2: the meta carries its own digest (meta_sha256); before, only the files' digests
# the type of each key a meta may hold (train.resume says which a run's meta must hold)
NONE = type(None)
META_TYPES = {"format": int, "step": int, "model_config": dict, "user_config": dict, "plan": dict,
              "val_bpb": (int, float, NONE), "world_size": int, "dataloader": (list, NONE), "loop_state": dict,
              "tokenizer": (str, NONE), "dataset": (dict, NONE), "files": dict, "meta_sha256": str}


def load_meta(ckpt_dir: Path, step: int) -> dict:
    """The meta of step, checked: JSON, of that step, its digest (written with it) and its keys' types."""
    _, _, meta_path = _paths(Path(ckpt_dir), step, 0)
    if not meta_path.exists():
        have = saved_steps(ckpt_dir)
        raise UserError(f"no checkpoint at step {step} in {ckpt_dir}"
                        + (f" (saved steps: {', '.join(map(str, have))})" if have else " (no checkpoints there)"))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"checkpoint meta {meta_path} is unreadable: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("step") != step:
        raise UserError(f"checkpoint meta {meta_path} is not the meta of step {step}")
    wrong = [k for k, types in META_TYPES.items() if k in meta and (not isinstance(meta[k], types)
                                                                     or isinstance(meta[k], bool))]
    if wrong:
        raise UserError(f"checkpoint meta {meta_path} has values of the wrong type for {', '.join(wrong)}")
    # a meta written with its digest says so twice (its format and the digest): one flipped bit cannot hide both
    if (meta.get("format", 1) >= 2 or "meta_sha256" in meta) and meta.get("meta_sha256") != meta_digest(meta):
        raise UserError(f"checkpoint meta {meta_path} is damaged: its content differs from the digest written with "
                        "it")
    return meta


def suspect_marker(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}_suspect.txt"


def mark_suspect(ckpt_dir: Path, step: int, why: str) -> None:
    """Mark the checkpoint of step as one a run diverged from at once: `latest` passes over it (damage says why)."""
    try:
        with atomic_write(suspect_marker(ckpt_dir, step), "w") as f:
            f.write(why + "\n")
    except OSError:
        pass  # the message that follows names the checkpoint anyway


def meta_damage(ckpt_dir: Path, step: int) -> str | None:
    """Why the checkpoint of step can't be trusted, as far as its marker and meta tell (no file is read), or None."""
    marker = suspect_marker(ckpt_dir, step)
    if marker.exists():
        try:
            why = marker.read_text(errors="replace").strip()
        except OSError as e:
            why = e.strerror or str(e)
        return f"marked suspect ({why}; delete {marker.name} to use it again)"
    try:
        load_meta(ckpt_dir, step)
    except UserError as e:
        return str(e)
    return None


def damage(ckpt_dir: Path, step: int, rank: int = 0, world: int = 1) -> str | None:
    """Why the checkpoint of step can't be trusted (marked suspect; its meta, or a file it lists missing, of another
    size, with another sha256, or unreadable), or None; rank of world checks its share of the files (every world-th)."""
    why = meta_damage(ckpt_dir, step)
    if why is not None:
        return why
    return files_damage(ckpt_dir, step, rank, world)


def files_damage(ckpt_dir: Path, step: int, rank: int = 0, world: int = 1, part: str | None = None) -> str | None:
    """Why a file the step's meta lists (of one part, or all) differs from its digest, or None; rank of world checks
    its share (every world-th). A meta from before the checksums lists none."""
    files = load_meta(ckpt_dir, step).get("files")
    if not isinstance(files, dict):
        return None
    inside = f"{step_folder(ckpt_dir, step).name}/{part}/" if part else ""
    mine = sorted(n for n in files if n.startswith(inside))[rank::world]
    return next((why for name in mine if (why := _file_damage(Path(ckpt_dir), name, files[name]))), None)


def _file_damage(ckpt_dir: Path, name: str, digest: dict) -> str | None:
    """Why a checkpoint file differs from its digest ({"bytes", "sha256"}), or None."""
    path = ckpt_dir / name
    if not path.is_file():
        return f"{path} is missing"
    try:
        found = file_digest(path)
    except OSError as e:
        return f"{path} is unreadable: {e.strerror or e}"
    if found["bytes"] != digest.get("bytes"):
        return f"{path} has {found['bytes']} bytes, the checkpoint wrote {digest.get('bytes')}"
    if found["sha256"] != digest.get("sha256"):
        return f"{path} is damaged (its sha256 differs from the one written with it)"
    return None


def newest_good_step(ckpt_dir: Path, rank: int = 0, world: int = 1,
                     gather=lambda obj: [obj]) -> tuple[int | None, list[tuple[int, str]]]:
    """(the newest step whose checkpoint verifies, or None; the newer ones skipped, with why). With world ranks (gather:
    every rank's obj), each checks its share of each step's files, the steps as rank 0 lists them."""
    skipped = []
    for step in reversed(gather(saved_steps(ckpt_dir))[0]):
        why = next((why for why in gather(damage(ckpt_dir, step, rank, world)) if why), None)
        if why is None:
            return step, skipped
        skipped.append((step, why))
    return None, skipped


def is_dcp(ckpt_dir: Path, step: int) -> bool:
    """Whether the checkpoint of step is in DCP's files (format 3), not format 2's (or a file without a meta)."""
    return _paths(Path(ckpt_dir), step, 0)[2].exists() and load_meta(ckpt_dir, step).get("format", 1) >= 3


def saved_tensors(ckpt_dir: Path, step: int, part: str) -> dict:
    """DCP's record of a part's tensors: {key ("<part>.<name>"): its TensorStorageMetadata (size, dtype)}; one line if
    unreadable."""
    folder = step_folder(ckpt_dir, step) / part
    try:
        return dict(_Reader(folder).read_metadata().state_dict_metadata)
    except Exception as e:  # missing, damaged or not DCP's
        raise UserError(f"checkpoint {folder} cannot be read: {type(e).__name__}: {first_line(e)}") from None


def verify_files(ckpt_dir: Path, step: int, rank: int = 0, world: int = 1, part: str | None = None) -> None:
    """files_damage as one line (each rank hashes only its share; the caller gathers the errors)."""
    why = files_damage(ckpt_dir, step, rank, world, part)
    if why:
        raise UserError(f"checkpoint step {step}: {why}")


def load_state(ckpt_dir: Path, step: int, state: dict) -> None:
    """Fill state's tensors ({part: {name: tensor}}) in place from the step's DCP files (a DTensor gets its rows):
    each process reads what it asks for, without collectives. Check the files first (verify_files)."""
    for part, tensors in state.items():
        folder = step_folder(ckpt_dir, step) / part
        try:
            dcp.load({part: tensors}, no_dist=True, storage_reader=_Reader(folder))
        except (Exception, dcp.api.CheckpointException) as e:  # damaged, or not this model's
            _reraise_interrupt(e)
            raise UserError(f"checkpoint {folder} cannot be loaded: {_reason(e)}") from None


def load_model_state(ckpt_dir: Path, step: int, device, verified: bool = False) -> dict:
    """The whole model's state dict of a checkpoint (either format), its files verified first unless the caller has."""
    if not is_dcp(ckpt_dir, step):
        model_path, _, _ = _paths(Path(ckpt_dir), step, 0)
        return _load(ckpt_dir, step, model_path, device)
    if not verified:
        verify_files(ckpt_dir, step, part="model")
    return load_tensors(ckpt_dir, step, "model", device)


def load_tensors(ckpt_dir: Path, step: int, part: str, device="cpu") -> dict:
    """Every tensor of a part of a DCP checkpoint, whole, keyed by name."""
    tensors = {k.removeprefix(f"{part}."): torch.empty(m.size, dtype=m.properties.dtype, device=device)
               for k, m in saved_tensors(ckpt_dir, step, part).items()}
    load_state(ckpt_dir, step, {part: tensors})
    return tensors


def load_optimizer_state(ckpt_dir: Path, step: int, rank: int, device) -> dict:
    _, optim_path, _ = _paths(Path(ckpt_dir), step, rank)
    return _load(ckpt_dir, step, optim_path, device)


def load_optimizer_states(ckpt_dir: Path, step: int, world_size: int, device) -> list[dict]:
    """Every rank's optimizer state of a checkpoint written by world_size ranks (to reshard it), each verified."""
    return [load_optimizer_state(ckpt_dir, step, rank, device) for rank in range(world_size)]


def _load(ckpt_dir: Path, step: int, path: Path, device) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing")
    meta_path = _paths(Path(ckpt_dir), step, 0)[2]
    if meta_path.exists():
        files = load_meta(ckpt_dir, step).get("files")
        try:
            digest = file_digest(path) if isinstance(files, dict) and path.name in files else None
        except OSError as e:  # unreadable, a folder
            raise UserError(f"checkpoint file {path} is unreadable: {e.strerror or e}") from None
        if digest is not None and digest != files[path.name]:
            raise UserError(f"checkpoint file {path} is damaged: its size or sha256 differs from the one written "
                            "with it")
    try:
        # weights_only: a checkpoint file must not be able to run code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupt or not a torch file
        raise UserError(f"checkpoint file {path} cannot be loaded: {type(e).__name__}: {first_line(e)}") from None


def _step_files(ckpt_dir: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {}
    for p in Path(ckpt_dir).glob("step_*"):
        m = STEP_FILE.fullmatch(p.name)
        if m and (m.group(2) or p.is_dir()):  # step_N alone: a DCP folder
            out.setdefault(int(m.group(1)), []).append(p)
    return out


def prune(ckpt_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (rank 0, after a save); returns the steps deleted.
    Each goes meta file first, so an interrupted deletion leaves an incomplete step that nothing loads."""
    steps = saved_steps(ckpt_dir)
    doomed = steps[:-keep] if keep > 0 else []
    files = _step_files(ckpt_dir)
    for step in doomed:
        (Path(ckpt_dir) / f"step_{step:06d}_meta.json").unlink(missing_ok=True)
        for f in files.get(step, []):
            _remove(f)
    return doomed


def _remove(path: Path) -> None:
    """A step's file, or its DCP folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def set_aside(ckpt_dir: Path, steps: list[int]) -> Path:
    """Move the files of these steps into ckpt_dir/set-aside-<UTC time>/ (each step's meta last, so a step cut
    short by a crash is never complete in either folder); returns that folder."""
    import time
    stamp = time.strftime("set-aside-%Y%m%d-%H%M%S", time.gmtime())
    aside = next(p for i in range(1000) if not (p := Path(ckpt_dir) / (stamp + (f"-{i}" if i else ""))).exists())
    try:
        aside.mkdir()
        files = _step_files(ckpt_dir)
        for step in steps:
            for f in sorted(files.get(step, []), key=lambda p: p.name.endswith("_meta.json")):
                os.replace(f, aside / f.name)
    except OSError as e:
        raise UserError(f"cannot set the checkpoints of steps {steps} aside in {aside}: {e.strerror or e}") from None
    return aside


def remove_leftovers(ckpt_dir: Path) -> list[str]:
    """Delete what killed saves leave behind: temporary files, and the files of steps that never got a meta.
    For a run holding the folder's lock (no other run writes here); returns the names removed."""
    removed = []
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return removed
    complete = set(saved_steps(folder))
    leftovers = list(folder.glob(f".step_*{TEMP_MARK}*"))
    leftovers += [p for step, paths in sorted(_step_files(folder).items()) if step not in complete for p in paths]
    for p in leftovers:
        # a step's DCP folder is ours; any other folder in the way is the user's: a save there fails and says so
        if p.is_file() or (p.is_dir() and STEP_FILE.fullmatch(p.name).group(2) is None):
            _remove(p)
            removed.append(p.name)
    return removed


class FolderLock:
    """An exclusive flock on the folder's .lock file, held until release() or the end of the process (the kernel
    releases a killed process's lock). The file names its holder while held; a name found there by the next
    run is a holder that ended without releasing it (killed): `previous`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read()
            os.close(self.fd)
            raise UserError(f"{folder} is in use by another run ({holder or 'its holder is not named'}): wait "
                            "for it to end, or give this run another --model-tag") from None
        self.previous = self._read()
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        except OSError as e:  # a full disk
            os.close(self.fd)
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None

    def _read(self) -> str:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.read(self.fd, 200).decode(errors="replace").strip()

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the last descriptor releases the flock
