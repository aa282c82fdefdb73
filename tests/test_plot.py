"""train.plot: the curves of metrics.jsonl files in one PNG, and its CLI's bad input."""
import json

import pytest

from train import plot
from train.errors import UserError, run_cli


def write_run(folder, steps=6, flops_per_step=10.0, resumed_at=None, mfu=30.0):
    """mfu=None: a CPU run, which logs "train/mfu": null (no known peak)."""
    folder.mkdir(parents=True)
    lines = [{"step": 0, "val/bpb": 3.0}]
    for s in range(1, steps + 1):
        lines.append({"step": s, "train/loss": 5.0 - s / 2, "train/mfu": mfu, "train/tok_per_sec": 1000.0,
                      "total_flops": flops_per_step * s})
        if resumed_at == s:  # a killed run's last step, logged again by the resumed run
            lines.append({"step": s, "train/loss": 99.0, "total_flops": flops_per_step * s})
    lines.append({"step": steps, "val/bpb": 2.0})
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 7, "train/lo'  # a line cut by a crash
    (folder / "metrics.jsonl").write_text(text)


def test_read_metrics_keeps_the_last_record_of_a_step_and_skips_a_cut_line(tmp_path):
    write_run(tmp_path / "a", resumed_at=3)
    series = plot.read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert series["train/loss"][3] == 99.0 and series["train/loss"][2] == 4.0
    assert series["val/bpb"] == {0: 3.0, 6: 2.0}
    assert series["flops"][0] == 0.0 and series["flops"][6] == 60.0
    assert 7 not in series["train/loss"]


def test_several_runs_on_one_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e .[plot])")
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", steps=4, flops_per_step=20.0)
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 10_000 and "both.png" in capsys.readouterr().out


def drawn_figure(monkeypatch, run_dirs, out):
    """The figure plot_runs draws (kept from plt.close), as [(title, number of lines)] per axes."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is not installed (pip install -e .[plot])")
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    plot.plot_runs(run_dirs, out)
    return [(ax.get_title(), len(ax.get_lines())) for ax in closed[0].axes]


def test_panels_only_for_what_was_measured(tmp_path, monkeypatch):
    write_run(tmp_path / "cpu", mfu=None)
    write_run(tmp_path / "gpu")
    cpu = drawn_figure(monkeypatch, [tmp_path / "cpu"], tmp_path / "cpu.png")
    assert [title for title, _ in cpu] == ["train loss", "val bpb", "tok/s", "train loss", "val bpb"]
    assert all(n == 1 for _, n in cpu)  # no empty axes
    gpu = drawn_figure(monkeypatch, [tmp_path / "gpu"], tmp_path / "gpu.png")
    assert [title for title, _ in gpu] == ["train loss", "val bpb", "tok/s", "train loss", "val bpb", "MFU %"]
    both = drawn_figure(monkeypatch, [tmp_path / "cpu", tmp_path / "gpu"], tmp_path / "both.png")
    assert both[-1] == ("MFU %", 1) and all(n == 2 for _, n in both[:-1])  # a panel any run has is kept
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 0, "train/mfu": null}\n')
    with pytest.raises(UserError, match="nothing to plot"):
        plot.plot_runs([tmp_path / "empty"], tmp_path / "empty.png")


def test_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(plot.main, [str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err
    with pytest.raises(UserError, match="cannot read"):
        plot.read_metrics(tmp_path / "missing.jsonl")
