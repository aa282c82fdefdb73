"""nanochat's own scripts/base_train.py and our train.pretrain, side by side on the same data, tokenizer and flags.

    python -m bench.studies.nanochat_parity --nanochat PATH_TO_NANOCHAT_CHECKOUT [--steps 150 --seed 42]

Needs a local nanochat checkout (nothing of it is part of this repository) and the stdlib corpus and its
tokenizer in $NANOCHAT_BASE_DIR: `python -m train.dataset build` and
`python -m train.tokenizer train --dataset pystdlib --vocab-size 4096`.

Each side runs in its own base dir under --work-dir, both reading the same bytes: our shards are hard-linked
(else copied) into nanochat's base_data_climbmix/ (sorted, the last one is validation, as in ours), our tokenizer's
tiktoken encoding is pickled as nanochat's tokenizer.pkl and token_bytes.pt is copied. The flags are the same on
both (FLAGS; nanochat's --warmup-steps 0 is our --warmup-ratio 0). nanochat has no --seed: it always seeds 42.

Per-step train losses. Ours: metrics.jsonl's train/loss_step, the mean of the step's micro-batch losses. nanochat
prints a debiased EMA of the *last* micro-batch's loss only, so its script runs under a small driver (DRIVER, run
with nanochat's checkout as the working directory; nanochat's files are not changed) that wraps the model
base_train.py compiles: every forward with targets is written down (a digest of its batch, and the loss in
training mode). The step's loss is then the mean of its micro-batches', as ours; the EMA rebuilt from the last
micro-batches is checked against nanochat's printed loss (`recorder_check`: print rounding, about 1e-6). The batch
digests are compared with our loader's batches (train and val), so the data order is measured, not assumed.
Prints the val bpb table, the per-step loss table and one JSON line.

Reading it: nanochat torch.compiles its model and optimizer steps on the CPU too, we run eagerly there. At this
tiny batch the run is chaotic (loss spikes from step 6 on; Muon orthogonalizes the near-rank-deficient early
gradients of the zero-initialised projections), so rounding alone grows from 1e-6 to O(1) in the loss within
~8 steps and moves val bpb at step 150 by up to 0.5 (d4, seed 42: 2.030 eager, ours and nanochat alike; 1.866
nanochat compiled; 2.371 ours with --compile). --nanochat-eager runs nanochat's same code without torch.compile:
the like-for-like comparison (the same arithmetic up to op order).
"""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from train.errors import Parser, UserError, require, run_cli
from train.paths import base_dir

REPO = Path(__file__).resolve().parents[2]
TAG = "parity"  # the model tag (checkpoint folder) of both runs, in their own base dirs

# The run both sides make, in nanochat's flag names; ours where they differ in OURS_NAMES.
FLAGS = {"--depth": 4, "--aspect-ratio": 64, "--head-dim": 128, "--max-seq-len": 256, "--device-batch-size": 8,
         "--total-batch-size": 4096, "--window-pattern": "L", "--target-param-data-ratio": 12,
         "--warmup-steps": 0, "--warmdown-ratio": 0.5, "--final-lr-frac": 0.0, "--weight-decay": 0.2,
         "--matrix-lr": 0.02, "--embedding-lr": 0.3, "--unembedding-lr": 0.004, "--scalar-lr": 0.5,
         "--core-metric-every": -1, "--sample-every": -1, "--device-type": "cpu", "--model-tag": TAG}
OURS_NAMES = {"--warmup-steps": "--warmup-ratio"}  # 0 steps = ratio 0 (the only value both accept alike)

# Run in a fresh interpreter in nanochat's checkout: torch.compile is wrapped so that the model base_train.py
# compiles (the only nn.Module it compiles) writes down what it is given; everything else is nanochat's own.
DRIVER = r'''
import hashlib, json, os, runpy, sys
import torch

record = open(os.environ["PARITY_RECORD"], "w", buffering=1)
real_compile, eager = torch.compile, os.environ.get("PARITY_EAGER") == "1"

def digest(x, y):
    h = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

class Recorder:
    """The compiled model, writing down every batch given with targets (and the loss, in training mode)."""
    def __init__(self, model):
        self.__dict__["_model"] = model
    def __call__(self, idx, targets=None, **kwargs):
        out = self._model(idx, targets, **kwargs)
        if targets is not None:
            training = self._model.training
            entry = {"kind": "train" if training else "eval", "batch": digest(idx, targets)}
            if training:
                entry["loss"] = out.item()
            record.write(json.dumps(entry) + "\n")
        return out
    def __getattr__(self, name):
        return getattr(self._model, name)

def compile(model=None, **kwargs):
    if model is None:  # @torch.compile(...) on a function
        return lambda fn: compile(fn, **kwargs)
    compiled = model if eager else real_compile(model, **kwargs)
    return Recorder(compiled) if isinstance(model, torch.nn.Module) else compiled

torch.compile = compile
sys.argv = ["scripts/base_train.py", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
'''


def build_parser() -> Parser:
    p = Parser(prog="bench.studies.nanochat_parity", description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", type=Path, required=True, help="a local checkout of karpathy/nanochat")
    p.add_argument("--steps", type=int, default=150, help="--num-iterations of both runs")
    p.add_argument("--seed", type=int, default=42, help="our --seed (nanochat always seeds 42)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--first", type=int, default=20, help="steps shown in the per-step loss table")
    p.add_argument("--dataset", default="pystdlib", help="our dataset under $NANOCHAT_BASE_DIR/data/")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="the two runs' base dirs (default $NANOCHAT_BASE_DIR/nanochat_parity; emptied first)")
    p.add_argument("--nanochat-eager", action="store_true",
                   help="run nanochat without torch.compile, as ours runs on the CPU (same arithmetic, up to op order)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--json", type=Path, default=None, help="also write the results there")
    return p


def validate(args) -> None:
    root = args.nanochat
    require(root.is_dir(), f"--nanochat {root}: no such folder (give a local checkout of karpathy/nanochat)")
    for name in ("scripts/base_train.py", "nanochat/gpt.py", "nanochat/dataloader.py", "nanochat/tokenizer.py"):
        require((root / name).is_file(), f"--nanochat {root}: not a nanochat checkout ({name} is missing)")
    for name in ("steps", "eval_every", "first"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rows = FLAGS["--device-batch-size"] * FLAGS["--max-seq-len"]  # nanochat evaluates eval_tokens // rows batches
    require(args.eval_tokens >= rows, f"--eval-tokens must be at least one batch ({rows}), got {args.eval_tokens}")
    require(0 <= args.seed < 2**63, f"--seed must be an integer in [0, 2^63), got {args.seed}")
    require(args.timeout > 0, f"--timeout must be positive, got {args.timeout}")


# -----------------------------------------------------------------------------
# The inputs: one dataset and tokenizer, laid out for each side


def source_files(dataset: str) -> tuple[list[Path], Path]:
    """(our dataset's shards, our tokenizer folder), or one line saying how to make them."""
    from train.dataset import list_shards
    shards = list_shards(dataset)
    require(len(shards) >= 2, f"dataset {dataset!r} has {len(shards)} shard(s) in {base_dir() / 'data' / dataset}: "
                              "build it with `python -m train.dataset build`")
    tok = base_dir() / "tokenizer"
    how = f"python -m train.tokenizer train --dataset {dataset} --vocab-size 4096"
    require((tok / "tokenizer.json").is_file(), f"no tokenizer in {tok}: train one with `{how}`")
    return shards, tok


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


def prepare(work: Path, dataset: str) -> tuple[Path, Path]:
    """Fresh base dirs work/ours and work/nanochat holding the same shards and tokenizer; returns them."""
    from train.tokenizer import load_tokenizer
    shards, tok_dir = source_files(dataset)
    tokenizer = load_tokenizer(tok_dir)
    ours, theirs = work / "ours", work / "nanochat"
    for d in (ours, theirs):
        shutil.rmtree(d, ignore_errors=True)
    for shard in shards:
        link_or_copy(shard, ours / "data" / dataset / shard.name)
        link_or_copy(shard, theirs / "base_data_climbmix" / shard.name)  # where nanochat's dataset.py looks
    for name in ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.pt"):
        link_or_copy(tok_dir / name, ours / "tokenizer" / name)
    link_or_copy(tok_dir / "token_bytes.pt", theirs / "tokenizer" / "token_bytes.pt")
    (theirs / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(tokenizer.enc))  # what nanochat unpickles
    return ours, theirs


# -----------------------------------------------------------------------------
# The two runs


def common_flags(args) -> dict:
    return FLAGS | {"--num-iterations": args.steps, "--eval-every": args.eval_every,
                    "--eval-tokens": args.eval_tokens}


def as_argv(flags: dict) -> list[str]:
    return [str(x) for k, v in flags.items() for x in (k, v)]


def ours_command(args) -> list[str]:
    flags = {OURS_NAMES.get(k, k): v for k, v in common_flags(args).items()}
    return [sys.executable, "-m", "train.pretrain", "--dataset", args.dataset, "--seed", str(args.seed),
            *as_argv(flags)]


def nanochat_command(args) -> list[str]:
    return [sys.executable, "-c", DRIVER, *as_argv(common_flags(args))]


def run_logged(name: str, cmd: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> tuple[str, float]:
    """Run cmd with its output in log; (its output, seconds). A failure is one line naming the log."""
    print(f"=== {name}: running {Path(cmd[0]).name} {' '.join(a if len(a) < 60 else '<driver>' for a in cmd[1:])}",
          flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"{name} ran past --timeout {timeout:.0f}s: see {log}") from None
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"{name} failed (exit {proc.returncode}): {last[0][:300]} (whole log: {log})")
    seconds = time.time() - t0
    print(f"=== {name}: done in {seconds:.0f}s", flush=True)
    return text, seconds


def run_ours(args, base: Path) -> tuple[dict, float]:
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    _, seconds = run_logged("ours", ours_command(args), env, REPO, base / "run.log", args.timeout)
    metrics = base / "base_checkpoints" / TAG / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return read_ours(records), seconds


def run_nanochat(args, base: Path) -> tuple[dict, float]:
    record = base / "record.jsonl"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PARITY_RECORD=str(record),
               PARITY_EAGER="1" if args.nanochat_eager else "0",
               PYTHONPATH=os.pathsep.join([str(args.nanochat.resolve()), os.environ.get("PYTHONPATH", "")]))
    stdout, seconds = run_logged("nanochat", nanochat_command(args), env, args.nanochat.resolve(),
                                 base / "run.log", args.timeout)
    grad_accum = FLAGS["--total-batch-size"] // (FLAGS["--device-batch-size"] * FLAGS["--max-seq-len"])
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    return read_nanochat(entries, stdout, grad_accum), seconds


# -----------------------------------------------------------------------------
# What each run gives: per-step losses (step i = the i-th optimizer step, from 0) and val bpb by step


def read_ours(records: list[dict]) -> dict:
    """From our metrics.jsonl records: a record of train/loss_step carries the step count after it."""
    losses = {r["step"] - 1: r["train/loss_step"] for r in records if "train/loss_step" in r}
    bpb = {r["step"]: r["val/bpb"] for r in records if "val/bpb" in r}
    return {"losses": [losses[i] for i in sorted(losses)], "val_bpb": bpb}


STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?\| loss: ([-\d.naif]+) \|", re.M)
BPB_LINE = re.compile(r"^Step (\d+) \| Validation bpb: ([-\d.naif]+)", re.M)


def read_nanochat(entries: list[dict], stdout: str, grad_accum: int) -> dict:
    """From the driver's record and nanochat's output: each step's mean micro-batch loss, val bpb by step, the
    batches' digests, and how far the EMA rebuilt from the recorded losses is from the printed one."""
    train = [e for e in entries if e["kind"] == "train"]
    micro = [e["loss"] for e in train]
    steps = len(micro) // grad_accum
    losses = [sum(micro[i * grad_accum:(i + 1) * grad_accum]) / grad_accum for i in range(steps)]
    printed = {int(s): float(v) for s, v in STEP_LINE.findall(stdout)}
    rebuilt = debiased_ema([micro[(i + 1) * grad_accum - 1] for i in range(steps)])
    check = max((abs(rebuilt[i] - printed[i]) for i in printed if i < steps), default=None)
    return {"losses": losses, "val_bpb": {int(s): float(v) for s, v in BPB_LINE.findall(stdout)},
            "train_batches": [e["batch"] for e in train], "val_batches": [e["batch"] for e in entries
                                                                          if e["kind"] == "eval"],
            "recorder_check": check}


def debiased_ema(values: list[float], beta: float = 0.9) -> list[float]:
    """nanochat's logged loss: the EMA of the values, divided by 1 - beta^(i+1)."""
    out, ema = [], 0.0
    for i, v in enumerate(values):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta ** (i + 1)))
    return out


def batch_digest(x, y) -> str:
    """The DRIVER's digest of a batch (int64 inputs, then targets)."""
    h = hashlib.sha256(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def our_batches(args, base: Path, train_count: int, val_count: int) -> tuple[list[str], list[str]]:
    """Digests of the first batches our loader gives a run of these flags (train from the start, one val pass)."""
    from train.dataloader import DataLoader
    from train.tokenizer import load_tokenizer
    tok = load_tokenizer(base / "tokenizer")
    B, T = FLAGS["--device-batch-size"], FLAGS["--max-seq-len"]
    out = []
    with base_dir_at(base):
        for split, count in (("train", train_count), ("val", val_count)):
            loader = DataLoader(tok, B, T, split=split, dataset=args.dataset)
            out.append([batch_digest(*next(loader)) for _ in range(count)])
    return out[0], out[1]


@contextmanager
def base_dir_at(path: Path):
    """$NANOCHAT_BASE_DIR set to path within the block (where our loader finds the dataset)."""
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def git_commit(root: Path) -> str | None:
    """The checkout's commit (short), if it is a git checkout and git is there."""
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def compare_batches(ours: list[str], theirs: list[str]) -> dict:
    """How many of the batches agree, in order, and the first that does not."""
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), None)
    return {"compared": n, "identical": sum(a == b for a, b in zip(ours, theirs)), "first_difference": first}


# -----------------------------------------------------------------------------
# The report


def compare(ours: dict, theirs: dict, first: int) -> dict:
    """The numbers of the report: val bpb by step, per-step loss differences (first steps and all)."""
    n = min(len(ours["losses"]), len(theirs["losses"]))
    diffs = [ours["losses"][i] - theirs["losses"][i] for i in range(n)]
    steps = sorted(set(ours["val_bpb"]) | set(theirs["val_bpb"]))
    return {"val_bpb": [{"step": s, "ours": ours["val_bpb"].get(s), "nanochat": theirs["val_bpb"].get(s)}
                        for s in steps],
            "loss_steps": n, "first": min(first, n),
            "max_abs_loss_diff_first": max(map(abs, diffs[:first]), default=None),
            "max_abs_loss_diff_all": max(map(abs, diffs), default=None),
            "first_step_over_1e-4": next((i for i, d in enumerate(diffs) if abs(d) > 1e-4), None),
            "losses": {"ours": ours["losses"][:n], "nanochat": theirs["losses"][:n]}}


def fmt(x, digits: int = 6) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def bpb_table(result: dict) -> str:
    lines = ["| step | ours val bpb | nanochat val bpb | ours - nanochat |", "|---|---|---|---|"]
    for r in result["val_bpb"]:
        diff = r["ours"] - r["nanochat"] if r["ours"] is not None and r["nanochat"] is not None else None
        lines.append(f"| {r['step']} | {fmt(r['ours'], 4)} | {fmt(r['nanochat'], 4)} | "
                     f"{'-' if diff is None else f'{diff:+.4f}'} |")
    return "\n".join(lines)


def loss_table(result: dict) -> str:
    ours, theirs = result["losses"]["ours"], result["losses"]["nanochat"]
    lines = ["| step | ours loss | nanochat loss | ours - nanochat |", "|---|---|---|---|"]
    for i in range(result["first"]):
        lines.append(f"| {i} | {fmt(ours[i])} | {fmt(theirs[i])} | {ours[i] - theirs[i]:+.2e} |")
    lines.append(f"max |ours - nanochat| over the first {result['first']} steps: "
                 f"{fmt(result['max_abs_loss_diff_first'], 8)}; over all {result['loss_steps']}: "
                 f"{fmt(result['max_abs_loss_diff_all'], 8)}; first step past 1e-4: "
                 f"{result['first_step_over_1e-4']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.seed != 42:
        print(f"note: nanochat always seeds 42, ours {args.seed}: the two start from different weights")
    work = args.work_dir or base_dir() / "nanochat_parity"
    ours_base, theirs_base = prepare(work, args.dataset)
    theirs, seconds_theirs = run_nanochat(args, theirs_base)
    ours, seconds_ours = run_ours(args, ours_base)
    eval_steps = args.eval_tokens // (FLAGS["--device-batch-size"] * FLAGS["--max-seq-len"])
    train_digests, val_digests = our_batches(args, ours_base, len(theirs["train_batches"]), eval_steps)
    result = compare(ours, theirs, args.first)
    result |= {"steps": args.steps, "seed": args.seed, "nanochat_seed": 42, "nanochat": str(args.nanochat),
               "nanochat_commit": git_commit(args.nanochat),
               "nanochat_compiled": not args.nanochat_eager, "flags": common_flags(args),
               "seconds": {"ours": round(seconds_ours, 1), "nanochat": round(seconds_theirs, 1)},
               "recorder_check": theirs["recorder_check"],
               "train_batches": compare_batches(train_digests, theirs["train_batches"]),
               "val_batches": compare_batches(val_digests, theirs["val_batches"][:eval_steps]),
               "val_passes_alike": len(set(tuple(theirs["val_batches"][i:i + eval_steps]) for i in
                                           range(0, len(theirs["val_batches"]), eval_steps))) == 1}
    print(bpb_table(result))
    print(loss_table(result))
    tb, vb = result["train_batches"], result["val_batches"]
    print(f"batches: train {tb['identical']}/{tb['compared']} identical in order, val {vb['identical']}/"
          f"{vb['compared']}; nanochat's printed loss vs the recorded one (EMA rebuilt): "
          f"{fmt(result['recorder_check'], 8)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
