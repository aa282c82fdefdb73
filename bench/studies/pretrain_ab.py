"""Pretraining A/B: the same short train.pretrain run under several settings, side by side.

    python -m bench.studies.pretrain_ab --depth 20 --steps 300                       # bf16 vs FP8 tensorwise vs rowwise
    python -m bench.studies.pretrain_ab --depth 20 --steps 200 --variant torch-ns:"--kernel-newton-schulz torch" \\
        --variant ours:"" -- --dataset pystdlib --total-batch-size 65536
    python -m bench.studies.pretrain_ab --depth 20 --json bench/results/fp8.json

Each variant is a real run (`python -m train.pretrain`, compiled on CUDA, same seed, same data): tok/s is the
median over the steps after the first 10 (compilation), val bpb is measured at the last step on the same
validation tokens, and peak memory comes from the run's last line. The first variant is the baseline of the
speed-up and bpb-difference columns. Flags after `--` go to every variant.
"""
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.timing import device_info
from train.errors import Parser, UserError, run_cli
from train.paths import base_dir

DEFAULT_VARIANTS = ["bf16:", "fp8-tensorwise:--fp8 --fp8-recipe tensorwise", "fp8-rowwise:--fp8 --fp8-recipe rowwise"]
WARMUP_STEPS = 10  # steps whose time includes compilation and autotuning


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--variant takes NAME:FLAGS (NAME of letters, digits, '.', '_', '-'), got {text!r}")
    return name, shlex.split(flags)


def summarize(records: list[dict], stdout: str) -> dict:
    """tok/s (median after the warm-up steps), the last val bpb and the peak memory of one run."""
    speeds = [r["train/tok_per_sec"] for r in records if "train/tok_per_sec" in r and r["step"] > WARMUP_STEPS]
    bpbs = [(r["step"], r["val/bpb"]) for r in records if "val/bpb" in r]
    peak = re.search(r"peak memory ([\d.]+) GiB", stdout)
    mfus = [r["train/mfu"] for r in records if r.get("train/mfu") is not None and r["step"] > WARMUP_STEPS]
    return {"tok_per_sec": statistics.median(speeds) if speeds else None,
            "mfu": statistics.median(mfus) if mfus else None,
            "steps_timed": len(speeds),
            "val_bpb": bpbs[-1][1] if bpbs else None, "val_bpb_step": bpbs[-1][0] if bpbs else None,
            "peak_memory_gib": float(peak.group(1)) if peak else None}


def run_variant(name: str, flags: list[str], common: list[str], tag: str, base: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "train.pretrain", *common, *flags, "--model-tag", tag]
    print(f"=== {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"variant": name, "flags": flags, "status": "timed out", "seconds": time.time() - t0,
                "log_tail": out[-2000:]}
    row = {"variant": name, "flags": flags, "seconds": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        return row | {"status": f"failed (exit {proc.returncode})", "log_tail": (proc.stdout + proc.stderr)[-2000:]}
    metrics = base / "base_checkpoints" / tag / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return row | {"status": "ok"} | summarize(records, proc.stdout)


def table(rows: list[dict]) -> str:
    base = rows[0] if rows and rows[0].get("status") == "ok" else None
    lines = ["| variant | tok/s | vs first | MFU | val bpb (step) | bpb vs first | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        speed = f"{r['tok_per_sec']:,.0f}" if ok and r["tok_per_sec"] else "-"
        ratio = (f"{r['tok_per_sec'] / base['tok_per_sec']:.3f}x"
                 if ok and base and r["tok_per_sec"] and base["tok_per_sec"] else "-")
        mfu = f"{r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "-"
        bpb = f"{r['val_bpb']:.4f} ({r['val_bpb_step']})" if ok and r["val_bpb"] is not None else "-"
        diff = (f"{100 * (r['val_bpb'] / base['val_bpb'] - 1):+.2f}%"
                if ok and base and r["val_bpb"] is not None and base["val_bpb"] else "-")
        peak = f"{r['peak_memory_gib']:.1f}" if ok and r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {speed} | {ratio} | {mfu} | {bpb} | {diff} | {peak} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    common_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(prog="bench.studies.pretrain_ab", description="The same short pretraining run under several settings.")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (val bpb at the last)")
    p.add_argument("--variant", action="append", default=None,
                   help='NAME:FLAGS, repeatable (default: bf16, fp8-tensorwise, fp8-rowwise)')
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", default=None, help="write the rows and the device info here (after every run)")
    args = p.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        raise UserError(f"--steps must be more than the {WARMUP_STEPS} warm-up steps, got {args.steps}")
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    if len({name for name, _ in variants}) != len(variants):
        raise UserError("variant names must differ")
    base = base_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["--depth", str(args.depth), "--num-iterations", str(args.steps), "--eval-every", str(args.steps),
              "--sample-every", "-1", "--core-metric-every", "-1", *common_extra]
    rows = []
    for name, flags in variants:
        rows.append(run_variant(name, flags, common, f"ab-{stamp}-{name}", base, args.timeout))
        print(table(rows), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"kind": "pretrain_ab", "device": device_info(), "depth": args.depth,
                                                   "steps": args.steps, "common_flags": common, "rows": rows},
                                                  indent=1))
    if any(r["status"] != "ok" for r in rows):
        for r in rows:
            if r["status"] != "ok":
                print(f"--- {r['variant']} {r['status']}:\n{r.get('log_tail', '')}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
