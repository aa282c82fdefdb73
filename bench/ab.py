"""Kernel A/B: every implementation of an op, side by side, on the spec's shapes.

    python -m bench.ab attention                          # every impl, shape and mode of one op
    python -m bench.ab all --json bench/results/ab.json --plot bench/results/
    python -m bench.ab cross_entropy --impl triton,liger --shape 65536x1280x32768
    python -m bench.ab attention --shape 8x2048x6x128:w1024 --mode fwd+bwd
    python -m bench.ab newton_schulz --shape d20-all      # the whole-model orthogonalization at d20

Per case: median ms (do_bench on CUDA, rotating inputs larger than L2), TFLOP/s (useful FLOPs only), % of the
device's bf16 peak and of the H100's (989 TFLOP/s), GB/s (minimal HBM traffic), peak memory above the inputs,
and the relative error against a float64/float32 reference ('!' when above the tolerance: don't trust that
row's speed). On the CPU only the torch paths run, at tiny shapes (the rest is listed as skipped).
Exit status: 0, 1 when a case failed or was wrong, 2 for bad input.
"""
import json
from pathlib import Path

import torch

from bench import ops, timing
from train.errors import Parser, UserError, run_cli


def build_parser() -> Parser:
    p = Parser(prog="bench.ab", description="A/B every implementation of a kernel on the spec's shapes.")
    p.add_argument("op", help=f"one of {', '.join(ops.OPS)}, or all")
    p.add_argument("--impl", default=None, help="comma-separated implementations (default: all of the op's)")
    p.add_argument("--shape", action="append", default=None,
                   help="a shape (repeatable): newton_schulz KxMxN[+KxMxN...] or d20-all; cross_entropy NxHxV; "
                        "attention BxTxHxD[xHkv][:wN|:full]. Default: the spec's shapes (tiny ones on CPU)")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default=None,
                   help="only this pass, for ops that have both (attention)")
    p.add_argument("--small", action="store_true", help="the tiny CPU shapes, even on CUDA (a quick check)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms (CPU: the timing budget)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every case)")
    p.add_argument("--plot", default=None, help="a PNG bar chart per op: PATH.png for one op, else a folder")
    return p


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select(args) -> list[tuple[ops.Op, list]]:
    """The cases asked for, per op; bad op, impl or shape names are UserErrors (found before any run)."""
    op_list = list(ops.OPS.values()) if args.op == "all" else [ops.get_op(args.op)]
    if args.op == "all" and args.shape:
        raise UserError("--shape needs one op (shapes differ per op), not all")
    small = args.small or torch.device(args.device).type != "cuda"
    plan = []
    for op in op_list:
        impls = list(op.impls)
        if args.impl:
            impls = [i.strip() for i in args.impl.split(",") if i.strip()]
            unknown = [i for i in impls if i not in op.impls]
            if args.op != "all" and unknown:
                raise UserError(f"unknown {op.name} impl {', '.join(unknown)}; choose from {', '.join(op.impls)}")
            impls = [i for i in impls if i in op.impls]
        if not impls:
            continue
        shapes = [op.parse_shape(s) for s in args.shape] if args.shape else None
        plan.append((op, ops.cases(op, small, impls, shapes, [args.mode] if args.mode else None)))
    if not plan:
        raise UserError(f"no op has the impls {args.impl!r}")
    return plan


def fmt(x, spec: str = ".3g", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def num(x) -> str:
    """A throughput: whole numbers when large, three significant digits when small (CPU)."""
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def table(op: ops.Op, rows: list[dict]) -> str:
    """One op's results as aligned text, a line per case that ran; the skipped ones grouped below."""
    keys = list(op.flop_keys)
    head = ["shape", "mode", "impl", "ms"] + [f"TFLOP/s {k}" if len(keys) > 1 else "TFLOP/s" for k in keys]
    head += ["%peak", "%H100", "GB/s", "mem MB", "rel err", "note"]
    lines = [head]
    skipped: dict[tuple, list] = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["impl"], r["reason"]), []).append(r)
            continue
        if r["status"] == "error":
            lines.append([r["label"], r["mode"], r["impl"]] + ["-"] * (len(head) - 4) + [f"error: {r['reason']}"])
            continue
        tf = r.get("tflops") or {}
        err = fmt(r.get("rel_error"), ".1e") + ("" if r.get("ok") else " !")
        lines.append([r["label"], r["mode"], r["impl"], fmt(r["ms"], ".4g")] + [num(tf.get(k)) for k in keys] +
                     [fmt(r.get("pct_device_peak"), ".1f"), fmt(r.get("pct_h100_peak"), ".1f"),
                      num(r.get("gbps")), fmt(r.get("peak_mem_mb"), ".0f"), err,
                      "" if r.get("ok") else f"error above {r['tol']:.0e}: wrong"])
    out = []
    if len(lines) > 1:
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        for n, line in enumerate(lines):
            cells = [str(c).ljust(w) if i < 3 or i == len(head) - 1 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))]
            out.append("  ".join(cells).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
    for (impl, reason), rs in skipped.items():
        out.append(f"skipped {impl} ({len(rs)} case{'s' * (len(rs) > 1)}): {reason}")
    return "\n".join(out)


def progress(row: dict) -> str:
    """One line per finished case, so a run cut short still shows what it measured."""
    head = f"  {row['op']} {row['label']} {row['mode']} {row['impl']}:"
    if row["status"] != "ok":
        return f"{head} {row['status']} ({row['reason']})"
    timing_part = f" {row['ms']:.4g} ms, {num(next(iter(row['tflops'].values())))} TFLOP/s," if row["ms"] else ""
    return f"{head}{timing_part} rel err {row['rel_error']:.1e}" + ("" if row["ok"] else " WRONG")


def write_json(path, info: dict, args, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "ab", "device": info, "args": {k: v for k, v in vars(args).items()}, "results": rows}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def plot_op(op: str, rows: list[dict], info: dict, path) -> bool:
    """A PNG of grouped bars per mode: x = shapes, one bar per impl, height = TFLOP/s (the op's first FLOP count);
    a wrong result's bar hatched and marked. False when no row has a time."""
    ok = [r for r in rows if r["op"] == op and r["status"] == "ok" and r.get("tflops")]
    if not ok:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in ok if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["label"] for r in mine))
        impls = list(dict.fromkeys(r["impl"] for r in mine))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            by_shape = {r["label"]: r for r in mine if r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, s in enumerate(shapes) if s in by_shape]
            cases = [by_shape[s] for s in shapes if s in by_shape]
            bars = ax.bar(xs, [next(iter(r["tflops"].values())) for r in cases], width, label=impl)
            for bar, r in zip(bars, cases):
                if not r.get("ok", True):  # above the error tolerance: its speed means nothing
                    bar.set_hatch("//")
                    ax.annotate("wrong", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", color="red", fontsize=8, fontweight="bold")
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"TFLOP/s ({next(iter(mine[0]['tflops']))})")
        ax.set_title(f"{op} {mode}, {mine[0].get('dtype', '')} on {info.get('device', '?')}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    if args.warmup < 0 or args.rep < 1:
        raise UserError("--warmup must be >= 0 and --rep >= 1 (milliseconds)")
    plan = select(args)
    dtype = DTYPES[args.dtype] if args.dtype else ops.default_dtype(args.device)
    info = timing.device_info(args.device)
    print(f"bench.ab on {info['device']} | torch {info['torch']} | triton {info['triton']} | "
          f"{str(dtype).removeprefix('torch.')} | commit {info['git_commit']}")
    rows, bad = [], 0
    for op, op_cases in plan:
        op_rows = []
        for shape, mode, impl in op_cases:
            row = ops.measure(op, shape, mode, impl, args.device, dtype, warmup=args.warmup, rep=args.rep)
            op_rows.append(row)
            rows.append(row)
            bad += row["status"] == "error" or (row["status"] == "ok" and not row["ok"])
            print(progress(row), flush=True)
            if args.json:
                write_json(args.json, info, args, rows)
        print(f"\n{op.name}")
        print(table(op, op_rows))
        if args.plot:
            target = Path(args.plot)
            if not (len(plan) == 1 and target.suffix == ".png"):
                target = target / f"ab_{op.name}.png"
            if plot_op(op.name, op_rows, info, target):
                print(f"chart: {target}")
    if args.json:
        print(f"\nresults: {args.json}")
    if bad:
        print(f"{bad} case(s) failed or gave results above the error tolerance (marked !)")
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
