"""How we time things, so every number in bench/ is taken the same way.

CUDA: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each run), and on top of that the
inputs rotate among enough copies that together they exceed twice the L2 cache, so no run finds its operands
left in cache by the previous one. CPU: a perf_counter median. Plus peak memory and a record of the machine.
"""
import datetime
import functools
import hashlib
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
H100_L2_BYTES = 50 * 1024 * 1024
MAX_COPIES = 64  # tiny inputs would otherwise ask for thousands of copies


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in obj (a tensor, or a list/tuple/dict of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def l2_bytes(device=None) -> int:
    """The L2 cache size of a CUDA device (50 MB on an H100)."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or H100_L2_BYTES)


def copies_needed(set_bytes: int, l2: int, max_copies: int = MAX_COPIES) -> int:
    """How many input sets to cycle through so that together they exceed 2 x L2 (at least 1)."""
    if set_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.floor(2 * l2 / set_bytes) + 1))


class Rotation:
    """Calls fn(*inputs) on the next of several input sets each time it is called."""

    def __init__(self, fn, input_sets: list):
        self.fn, self.input_sets, self.i = fn, input_sets, 0

    def __call__(self):
        inputs = self.input_sets[self.i % len(self.input_sets)]
        self.i += 1
        return self.fn(*inputs)


def rotation(fn, make_inputs, l2: int) -> Rotation:
    """Build as many input sets as copies_needed says (make_inputs() returns a tuple of args for fn)."""
    first = tuple(make_inputs())
    n = copies_needed(tensor_bytes(first), l2)
    return Rotation(fn, [first] + [tuple(make_inputs()) for _ in range(n - 1)])


def bench_cuda(fn, make_inputs=None, warmup: int = 25, rep: int = 100, quantiles=(0.5, 0.2, 0.8)) -> dict:
    """Time fn on CUDA; returns {"ms": median, "p20": ..., "p80": ..., "copies": input sets rotated}.

    fn() when make_inputs is None, else fn(*make_inputs()) rotating among copies larger than 2 x L2.
    Every input set runs once before timing (compilation, autotuning). warmup and rep are in ms (do_bench).
    """
    from triton.testing import do_bench
    if make_inputs is None:
        call, copies = fn, 1
    else:
        call = rotation(fn, make_inputs, l2_bytes())
        copies = len(call.input_sets)
        for _ in range(copies):
            call()
    torch.cuda.synchronize()
    med, p20, p80 = do_bench(call, warmup=warmup, rep=rep, quantiles=list(quantiles))
    return {"ms": med, "p20": p20, "p80": p80, "copies": copies}


def bench_cpu(fn, make_inputs=None, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
              budget_s: float = 0.3) -> dict:
    """Time fn on the CPU: median of perf_counter runs, at least min_reps, until budget_s or max_reps."""
    inputs = tuple(make_inputs()) if make_inputs is not None else ()
    for _ in range(warmup):
        fn(*inputs)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "p20": q[0], "p80": q[3], "copies": 1}


def bench(fn, make_inputs=None, device: str = "cuda", **kw) -> dict:
    """bench_cuda on a CUDA device, bench_cpu elsewhere."""
    return bench_cuda(fn, make_inputs, **kw) if str(device).startswith("cuda") else bench_cpu(fn, make_inputs, **kw)


def peak_memory(fn, device="cuda") -> int | None:
    """Bytes allocated at the peak of one fn() call, above what was allocated before it (None off CUDA).
    What fn returns is kept until the peak is read, so outputs count too."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


SOURCE_DIRS = ("kernels", "model", "train", "bench", "tests")


@functools.cache  # the tree does not change under a running benchmark
def source_hash(root: Path = REPO) -> str:
    """sha256 (16 hex digits) of the project's own code: every .py and .sh under SOURCE_DIRS and pyproject.toml,
    by relative path. The same on any copy of the same tree, .git or not."""
    h = hashlib.sha256()
    files = [root / "pyproject.toml"] + sorted(p for d in SOURCE_DIRS for ext in ("*.py", "*.sh")
                                                for p in (root / d).rglob(ext) if "__pycache__" not in p.parts)
    for path in files:
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def commit_stamp() -> str | None:
    """'<HEAD hash>[+dirty]:<source hash>' here, for GIT_COMMIT on a machine that gets the tree without .git."""
    sha = git_commit()
    return f"{sha}:{source_hash()}" if sha else None


def git_commit() -> str | None:
    """HEAD's hash, with '+dirty' when tracked files differ from it. Without .git (a copy of the tree sent to a GPU
    machine): $GIT_COMMIT when it is a commit_stamp() of this very tree (its source hash matches), else None, so
    a stale or forced commit never lands in a results file."""
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha:
        return sha + "+dirty" if _run(["git", "status", "--porcelain", "--untracked-files=no"]) else sha
    given, _, tree = os.environ.get("GIT_COMMIT", "").rpartition(":")
    return given if given and tree == source_hash() else None


def device_info(device=None) -> dict:
    """What a result was measured on: device, driver, CUDA, torch, triton, date, git commit."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "source_hash": source_hash(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info.update({
            "device": torch.cuda.get_device_name(device),
            "driver": smi.splitlines()[0].strip() if smi else None,
            "cuda": torch.version.cuda,
            "sm_count": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 1e9, 1),
            "l2_mb": round(l2_bytes(device) / 2**20, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        })
    else:
        info.update({"device": "cpu", "driver": None, "cuda": None})
    return info


if __name__ == "__main__":  # python -m bench.timing [--stamp | --json FILE]: the commit stamp, or this machine's record
    import json
    import sys
    if sys.argv[1:2] == ["--stamp"]:
        print(commit_stamp())
    else:
        doc = json.dumps(device_info(), indent=1)
        print(doc)
        if sys.argv[1:2] == ["--json"]:
            Path(sys.argv[2]).write_text(doc)
