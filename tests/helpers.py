"""What the end-to-end CLI tests share: the tiny run's flags, running a CLI, reading a run's metrics."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "tiny", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "256", "--eval-tokens", "1024",
        "--sample-every", "-1", "--core-metric-every", "-1", "--device-type", "cpu"]


SHORT = [*TINY, "--eval-every", "-1"]


def cli_env(base, **extra) -> dict:
    """The environment of a CLI run: base dir, this checkout on the path, no GPU."""
    return dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", **extra)


def run(args, base, check=True, module="train.pretrain"):
    env = cli_env(base)
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    if check:
        assert proc.returncode == 0, f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(base, tag):
    lines = (Path(base) / "base_checkpoints" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def step_losses(records):
    return {r["step"]: r["train/loss_step"] for r in records if "train/loss_step" in r}


def make_tiny_base(base: Path) -> Path:
    """A base dir with a tiny dataset (the stdlib's json, email and logging packages) and a 512-token tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = base / "src"
    for pkg in ("json", "email", "logging"):
        shutil.copytree(stdlib / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    run(["build", "--from", src, "--name", "tiny", "--docs-per-row-group", "8"], base, module="train.dataset")
    run(["train", "--dataset", "tiny", "--vocab-size", "512"], base, module="train.tokenizer")
    return base


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the running job proc has written n lines to its metrics file (its first steps are done); fails the
    test, with the job's output, when the job ends or the time runs out first."""
    import time
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{path} never reached {n} lines (job exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.05)


def torchrun(args, base, nproc=2, check=True):
    """train.pretrain under torchrun on the CPU: nproc gloo processes on this machine."""
    env = cli_env(base, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "train.pretrain", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check:
        assert proc.returncode == 0, f"torchrun {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(base, tag):
    return base / "base_checkpoints" / tag


def one_line_error(proc, pattern: str) -> str:
    """The run ended with exit 2 and one line on stderr that says pattern (a regular expression)."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    assert re.search(pattern, err[0]), err[0]
    return err[0]


def run_patched(patch: str, args, base):
    """train.pretrain's CLI in a fresh process, after the Python lines `patch` (to reach a failure that no
    flag can cause: a full disk, a NaN that the weights never show)."""
    code = f"import sys\n{patch}\nfrom train import pretrain\nfrom train.errors import run_cli\n" \
           f"run_cli(pretrain.main, sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=cli_env(base), capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def saved_and_loaded(obj):
    """What a checkpoint does to obj: torch.save, then a weights-only load (a deep copy)."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def data_file(folder: Path, step: int) -> Path:
    """The first of the DCP data files of a checkpoint's model (a single process's: the whole model in it)."""
    return sorted((Path(folder) / f"step_{step:06d}" / "model").glob("*.distcp"))[0]


def save_format2(folder: Path, step: int, model_state: dict, optimizer_states: list, meta: dict) -> None:
    """A checkpoint as this project wrote it before DCP (format 2): the model file, each rank's optimizer file, the
    meta with their digests, written last."""
    import torch

    from train import checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"step_{step:06d}_model.pt": model_state}
    files |= {f"step_{step:06d}_optimizer_rank{r}.pt": state for r, state in enumerate(optimizer_states)}
    for name, obj in files.items():
        torch.save(obj, folder / name)
    meta = meta | {"format": 2, "files": {name: checkpoint.file_digest(folder / name) for name in files}}
    (folder / f"step_{step:06d}_meta.json").write_text(json.dumps(meta | {"meta_sha256": checkpoint.meta_digest(meta)}))
