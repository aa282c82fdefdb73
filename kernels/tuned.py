"""Launch configs tuned once per GPU, so a run does not spend its first minutes autotuning known shapes.

kernels/tuned/<device>.json (written on that GPU by `python -m bench.tune`, or by `bench/gpu_check.sh`) maps each
autotuned kernel's key (its autotune key values and the inputs' dtype) to the config the autotuner chose there.
A launch whose key is in the table runs that config directly; any other key, or a GPU without a table, autotunes
as before. A table that does not parse is warned about once and ignored (a speed table never stops a run).
"""
import functools
import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

TABLE_DIR = Path(__file__).resolve().parent / "tuned"
AUTOTUNED: dict[str, object] = {}  # kernel name -> its triton.autotune object (what bench.tune reads)
_use_table = True


def register(name: str, autotuned):
    """Name an autotuned kernel (the table's key); returns it, so the definition reads `x = register(...)`."""
    AUTOTUNED[name] = autotuned
    return autotuned


def device_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def table_path(device_name: str, folder=None) -> Path:
    """Where the table of that GPU lives in folder (default: TABLE_DIR, kernels/tuned/)."""
    return Path(TABLE_DIR if folder is None else folder) / f"{device_slug(device_name)}.json"


def key_text(key: dict) -> str:
    """The table's key for one launch: 'T=2048,window=1024,HEAD_DIM=128,dtype=bfloat16'."""
    return ",".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in key.items())


def table(device_name: str) -> dict:
    """{kernel: {key text: {"kwargs": {...}, "num_warps": w, "num_stages": s}}} for this GPU ({} without a table)."""
    return _read(table_path(device_name))


@functools.cache
def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        kernels = json.loads(path.read_text())["kernels"]
        for configs in kernels.values():
            for cfg in configs.values():
                cfg["kwargs"], cfg["num_warps"], cfg["num_stages"]  # noqa: B018 - every field there
        return kernels
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring the tuned-config table {path} ({type(e).__name__}: {e}); autotuning instead",
                      stacklevel=2)
        return {}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def lookup(name: str, key: dict, device: torch.device) -> dict | None:
    """The tuned config of kernel `name` for this key on this device, or None (autotune)."""
    if not _use_table or device.type != "cuda":
        return None
    return table(_device_name(device)).get(name, {}).get(key_text(key))


def launch(name: str, kernel, grid, args: tuple, kwargs: dict, key: dict, device: torch.device) -> None:
    """kernel (the jit function) with the table's config for key, else its autotuned version (AUTOTUNED[name]).
    grid(meta) gives the launch grid from the block sizes."""
    cfg = lookup(name, key, device)
    if cfg is None:
        AUTOTUNED[name][grid](*args, **kwargs)
    else:
        kernel[grid(cfg["kwargs"])](*args, **kwargs, **cfg["kwargs"], num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"])


@contextmanager
def autotuning_only():
    """Ignore the tables within the block (bench.tune measures what autotuning chooses and costs)."""
    global _use_table
    saved, _use_table = _use_table, False
    try:
        yield
    finally:
        _use_table = saved
