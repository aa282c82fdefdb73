"""Launch configs tuned once per GPU, so a run does not spend its first minutes autotuning known shapes.

kernels/tuned/<device>.json (written on that GPU by `python -m bench.tune`, or by `bench/gpu_check.sh`) maps each
autotuned kernel's key (its autotune key values and the inputs' dtype) to the config the autotuner chose there.
A launch whose key is in the table runs that config directly; any other key, or a GPU without a table, autotunes
as before. A table that does not parse is warned about once and ignored (a speed table never stops a run).
"""
import functools
import json
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

TABLE_DIR = Path(__file__).resolve().parent / "tuned"


@dataclass(frozen=True, eq=False)
class Autotuned:
    """One autotuned kernel: its name in the tables, its @triton.jit function and that under triton.autotune."""
    name: str
    kernel: object
    autotuner: object


AUTOTUNED: dict[str, Autotuned] = {}  # by name: what bench.tune reads the choices of
# set within autotuning_only(): process-wide on purpose, so a backward on autograd's own thread sees it too
_tables_ignored = threading.Event()


def autotune(name: str, kernel, key: list[str], configs: list, **kwargs) -> Autotuned:
    """kernel autotuned over configs on key (triton.autotune; kwargs such as reset_to_zero go there), named
    `name` in the tables."""
    tuned = Autotuned(name, kernel, triton.autotune(configs, key=key, **kwargs)(kernel))
    AUTOTUNED[name] = tuned
    return tuned


def config(block_sizes: dict, num_warps: int = 4, num_stages: int = 1) -> dict:
    """A launch config in the tables' format: {"kwargs": block sizes, "num_warps": w, "num_stages": s}."""
    return {"kwargs": dict(block_sizes), "num_warps": num_warps, "num_stages": num_stages}


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
    if _tables_ignored.is_set() or device.type != "cuda":
        return None
    return table(_device_name(device)).get(name, {}).get(key_text(key))


def launch(tuned: Autotuned, grid, args: tuple, kwargs: dict, key: dict, device: torch.device,
           fixed: dict | None = None) -> None:
    """tuned's kernel with `fixed` (a config(); the interpreter's small blocks), else with the table's config for
    key on this GPU, else autotuned. grid(block sizes) gives the launch grid."""
    cfg = fixed or lookup(tuned.name, key, device)
    if cfg is None:
        tuned.autotuner[grid](*args, **kwargs)
    else:
        tuned.kernel[grid(cfg["kwargs"])](*args, **kwargs, **cfg["kwargs"], num_warps=cfg["num_warps"],
                                          num_stages=cfg["num_stages"])


@contextmanager
def autotuning_only():
    """Ignore the tables within the block (bench.tune measures what autotuning chooses and costs)."""
    was_ignored = _tables_ignored.is_set()
    _tables_ignored.set()
    try:
        yield
    finally:
        if not was_ignored:
            _tables_ignored.clear()
