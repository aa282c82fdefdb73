"""From the JSON results of bench.ab and bench.mfu to a markdown report and PNG charts (for the README).

    python -m bench.report                                   # the newest folder under bench/results/
    python -m bench.report bench/results/20260101-120000     # a folder, or JSON files
    python -m bench.report ab.json mfu_d20.json --out /tmp/report

Writes report.md (printed too), ab_<op>.png per op and mfu.png next to the JSON (or into --out).
"""
import json
from collections import defaultdict
from pathlib import Path

from train.errors import Parser, UserError, run_cli

RESULTS = Path(__file__).resolve().parent / "results"
PRIMARY_FLOPS = {"newton_schulz": "dense", "cross_entropy": "matmul", "attention": "causal"}


def num(x) -> str:
    """A throughput: whole numbers when large, three significant digits when small (CPU runs)."""
    return "–" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def pct(x) -> str:
    return "–" if x is None else f"{x:.1f}%"


def _primary(row: dict) -> float | None:
    tf = row.get("tflops") or {}
    return next(iter(tf.values()), None)


def _device_line(info: dict) -> str:
    parts = [info.get("device") or "?"]
    if info.get("driver"):
        parts.append(f"driver {info['driver']}")
    if info.get("cuda"):
        parts.append(f"CUDA {info['cuda']}")
    parts += [f"torch {info.get('torch')}", f"triton {info.get('triton')}", info.get("date") or "?"]
    parts.append(f"commit {(info.get('git_commit') or '?')[:12]}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# charts

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_op(op: str, rows: list[dict], info: dict, path) -> bool:
    """Grouped bars per mode: x = shapes, one bar per impl, height = TFLOP/s (the op's main FLOP count)."""
    ok = [r for r in rows if r["op"] == op and r["status"] == "ok" and _primary(r) is not None]
    if not ok:
        return False
    plt = _pyplot()
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
            ys = [_primary(by_shape[s]) for s in shapes if s in by_shape]
            bars = ax.bar(xs, ys, width, label=impl)
            for bar, s in zip(bars, [s for s in shapes if s in by_shape]):
                if not by_shape[s].get("ok", True):  # above the error tolerance: its speed means nothing
                    bar.set_hatch("//")
                    ax.annotate("wrong", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", color="red", fontsize=8, fontweight="bold")
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        key = PRIMARY_FLOPS.get(op, "")
        ax.set_ylabel(f"TFLOP/s ({key})" if key else "TFLOP/s")
        ax.set_title(f"{op} {mode}, {mine[0].get('dtype', '')} on {info.get('device', '?')}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)
    return True


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mfu(docs: list[dict], path) -> bool:
    """MFU against the H100 bf16 peak, per depth (x) and kernel choice (bars)."""
    runs = [(d["depth"], r) for d in docs for r in d["results"] if r.get("status") == "ok" and r.get("mfu_h100")]
    if not runs:
        return False
    plt = _pyplot()
    depths = sorted({d for d, _ in runs})
    variants = list(dict.fromkeys(r["variant"] for _, r in runs))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for j, v in enumerate(variants):
        pts = [(i, r["mfu_h100"]) for i, d in enumerate(depths) for dd, r in runs if dd == d and r["variant"] == v]
        if pts:
            ax.bar([i + (j - (len(variants) - 1) / 2) * width for i, _ in pts], [m for _, m in pts], width, label=v)
    ax.set_xticks(range(len(depths)), [f"d{d}" for d in depths])
    ax.set_ylabel("MFU vs H100 bf16 peak (%)")
    ax.set_title(f"training step MFU on {docs[0]['device'].get('device', '?')}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# markdown

def _md_table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def ab_markdown(op: str, rows: list[dict]) -> str:
    """Shapes x impls: median ms and TFLOP/s; the fastest correct impl of each row in bold."""
    rows = [r for r in rows if r["op"] == op]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["label"], r["mode"]) for r in rows))
    lines = []
    for label, mode in keys:
        cells = {r["impl"]: r for r in rows if r["label"] == label and r["mode"] == mode}
        good = [r["ms"] for r in cells.values() if r["status"] == "ok" and r.get("ok") and r.get("ms")]
        best = min(good) if good else None
        line = [label, mode]
        for impl in impls:
            r = cells.get(impl)
            if r is None or r["status"] == "skipped":
                line.append("–")
            elif r["status"] == "error":
                line.append("error")
            elif r.get("ms") is None:
                line.append(f"err {r['rel_error']:.0e}")
            else:
                text = f"{r['ms']:.3g} ms ({num(_primary(r))})"
                if not r.get("ok"):
                    text += " ! wrong"
                line.append(f"**{text}**" if r["ms"] == best else text)
        lines.append(line)
    notes = {}
    for r in rows:
        if r["status"] in ("skipped", "error"):
            notes.setdefault((r["impl"], r["status"], r["reason"]), 0)
            notes[(r["impl"], r["status"], r["reason"])] += 1
    text = _md_table(["shape", "pass"] + impls, lines)
    if notes:
        text += "\n\n" + "\n".join(f"- {impl} {status} ({n} case{'s' * (n > 1)}): {reason}"
                                   for (impl, status, reason), n in notes.items())
    return text


def _run_note(args: dict) -> str:
    parts = [f"batch {args.get('device_batch_size')}x{args.get('seq_len')}"]
    if args.get("grad_accum", 1) != 1:
        parts.append(f"accum {args['grad_accum']}")
    parts.append("compiled" if args.get("compile") else "eager")
    if args.get("fp8"):
        parts.append(f"fp8 {args.get('fp8_recipe')}")
    else:
        parts.append("bf16 autocast" if args.get("device") == "cuda" else "fp32")
    return ", ".join(parts)


def mfu_markdown(docs: list[dict]) -> str:
    lines = []
    for d in sorted(docs, key=lambda d: d["depth"]):
        base = next((r for r in d["results"] if not r.get("forced") and r.get("status") == "ok"), None)
        for r in d["results"]:
            if r.get("status") != "ok":
                lines.append([f"d{d['depth']}", r["variant"], "–", "–", "–", "–", "–", r.get("reason") or "error"])
                continue
            vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "–"
            lines.append([f"d{d['depth']}", r["variant"], f"{r['tokens_per_s']:,.0f}", num(r.get("tflops")),
                          pct(r.get("mfu_h100")), pct(r.get("mfu_device")), vs, _run_note(d["args"])])
    head = ["model", "kernels", "tok/s", "TFLOP/s", "MFU (H100 989T)", "MFU (device)", "tok/s vs default", "note"]
    return _md_table(head, lines)


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(ab documents, mfu documents) from JSON files and folders of them."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    ab, mfu = [], []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{f} is not a readable JSON result ({e})") from None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind == "ab":
            ab.append(doc)
        elif kind == "mfu":
            mfu.append(doc)
    if not ab and not mfu:
        raise UserError(f"no bench.ab or bench.mfu results in {', '.join(map(str, paths))}")
    return ab, mfu


def write_report(paths: list[Path], out: Path) -> str:
    """report.md and the charts into out; returns the markdown."""
    ab, mfu = load(paths)
    info = (ab or mfu)[0]["device"]
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Benchmark results\n\nMeasured on {_device_line(info)}.\n"]
    if mfu:
        md.append("## End to end (`python -m bench.mfu`)\n\nOptimizer steps on random tokens; "
                  "MFU = FLOPs per token x tok/s / peak. 'torch ...' rows force that op "
                  "(or all of them) to its torch version (attention: SDPA).\n")
        md.append(mfu_markdown(mfu))
        if plot_mfu(mfu, out / "mfu.png"):
            md.append("\n![MFU](mfu.png)")
    if ab:
        rows_by_op = defaultdict(list)
        for doc in ab:
            for r in doc["results"]:
                rows_by_op[r["op"]].append(r)
        md.append("\n## Kernels (`python -m bench.ab all`)\n\nMedian time (do_bench, inputs rotated past L2) and "
                  "TFLOP/s of useful work in parentheses; bold = fastest correct; '! wrong' = error against the "
                  "reference above tolerance.")
        for op, rows in rows_by_op.items():
            md.append(f"\n### {op}\n")
            md.append(ab_markdown(op, rows))
            if plot_op(op, rows, ab[0]["device"], out / f"ab_{op}.png"):
                md.append(f"\n![{op}](ab_{op}.png)")
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


def latest_results() -> Path:
    dirs = sorted(d for d in RESULTS.glob("*") if d.is_dir() and any(d.glob("*.json")))
    if dirs:
        return dirs[-1]
    if any(RESULTS.glob("*.json")):
        return RESULTS
    raise UserError(f"no results under {RESULTS}: run bench/run_gpu.sh (or bench.ab/bench.mfu --json) first")


def main(argv=None) -> None:
    p = Parser(prog="bench.report", description="Markdown table and charts from bench JSON results.")
    p.add_argument("paths", nargs="*", help="JSON files or folders (default: the newest folder in bench/results)")
    p.add_argument("--out", default=None, help="folder for report.md and the PNGs (default: next to the results)")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or [latest_results()]
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent)
    print(write_report(paths, out))
    print(f"(written to {out / 'report.md'})")


if __name__ == "__main__":
    run_cli(main)
