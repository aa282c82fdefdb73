"""Where our files live, and the one way we write them (a temporary name, then a rename).

    $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
      data/NAME/              parquet shards of a dataset
      tokenizer/              the BPE tokenizer
      base_checkpoints/TAG/   checkpoints and metrics of a run
      eval_bundle/            the CORE tasks
"""
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

from train.errors import UserError

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder name: no separators, nothing hidden, no '..'
TEMP_MARK = ".tmp"  # in the name of every file atomic_write has not renamed into place yet


def base_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def plain_name(name: str, what: str) -> str:
    """name if it names one folder (letters, digits, '.', '_', '-'; no path), else a one-line UserError."""
    if not PLAIN_NAME.fullmatch(name or ""):
        raise UserError(f"bad {what} {name!r}: use letters, digits, '.', '_' or '-' (a name, not a path)")
    return name


def data_dir(name: str) -> Path:
    return base_dir() / "data" / plain_name(name, "dataset name")


def tokenizer_dir() -> Path:
    return base_dir() / "tokenizer"


def checkpoint_dir(model_tag: str) -> Path:
    return base_dir() / "base_checkpoints" / model_tag


def eval_bundle_dir() -> Path:
    return base_dir() / "eval_bundle"


def temp_name(path: Path) -> Path:
    """A hidden name next to path, unique to this process and thread."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file open at a temporary name next to path; on a clean exit it is flushed to disk and renamed
    to path, so path holds either its old content or the whole new one. On an error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
