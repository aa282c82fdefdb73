"""A picture of one or more runs without wandb: the curves of their metrics.jsonl in one PNG.

    python -m train.plot ~/.cache/nanochat/base_checkpoints/d12                      # -> that folder/metrics.png
    python -m train.plot RUN_DIR OTHER_RUN_DIR --out compare.png                     # several runs on one figure

Panels: train loss and val bpb against step and against training FLOPs, tok/s and MFU against step; a panel no run
has data for is left out (MFU on the CPU, val bpb with --eval-every -1). train.pretrain writes metrics.png next to
its checkpoints at the end of a run.
"""
import json
from pathlib import Path

from train.errors import Parser, UserError, run_cli

PANELS = (  # (metric key, x axis, title), row by row; MFU last, as it is the one most often missing
    ("train/loss", "step", "train loss"), ("val/bpb", "step", "val bpb"), ("train/tok_per_sec", "step", "tok/s"),
    ("train/loss", "flops", "train loss"), ("val/bpb", "flops", "val bpb"), ("train/mfu", "step", "MFU %"),
)


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of a metrics.jsonl (the last record of a step wins: a resumed run repeats some),
    with "flops": {step: training FLOPs so far}."""
    series: dict[str, dict[int, float]] = {"flops": {0: 0.0}}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault("flops" if key == "total_flops" else key, {})[step] = float(value)
    return series


def panels(runs: dict[str, dict]) -> list[tuple[str, str, dict[str, list]]]:
    """(title, x axis, {run: [(x, y), ...]}) of the PANELS that some run has points for: a metric never logged
    (MFU on a device without a known peak is logged as null) gets no panel rather than an empty one."""
    out = []
    for key, x_axis, title in PANELS:
        lines = {}
        for name, series in runs.items():
            points = sorted(series.get(key, {}).items())
            if x_axis == "flops":
                flops = series["flops"]
                points = [(flops[s], v) for s, v in points if s in flops]
            if points:
                lines[name] = points
        if lines:
            out.append((title, x_axis, lines))
    return out


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """One figure of every run's curves (a line per run, named by its folder), written to out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    runs = {Path(d).name: read_metrics(Path(d) / "metrics.jsonl") for d in run_dirs}
    drawn = panels(runs)
    if not drawn:
        raise UserError(f"nothing to plot: no run has any of {sorted({key for key, _, _ in PANELS})} logged yet")
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig = plt.figure(figsize=(5 * cols, 4 * rows))
    for i, (title, x_axis, lines) in enumerate(drawn):
        ax = fig.add_subplot(rows, cols, i + 1)  # only the panels drawn get axes: none is left blank
        for name, points in lines.items():
            ax.plot(*zip(*points), label=name, marker="o" if title == "val bpb" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training FLOPs" if x_axis == "flops" else "step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = Parser(prog="train.plot", description="Plot the metrics.jsonl of one or more runs into one PNG.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each holding a metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="the PNG (default: metrics.png in the first run folder)")
    args = p.parse_args(argv)
    for d in args.runs:
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{d} has no metrics.jsonl (is it a run folder under base_checkpoints/?)")
    print(f"wrote {plot_runs(args.runs, args.out or args.runs[0] / 'metrics.png')}")


if __name__ == "__main__":
    run_cli(main)
