"""The one-off studies in bench/studies/: whole runs side by side (pretrain_ab), what the packing crops (crop).
Their end-to-end runs are left out of the default run (marked long; .ci/run runs them)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, TINY, run
from train.errors import run_cli


@pytest.mark.slow
@pytest.mark.long
def test_pretrain_ab_compares_runs_side_by_side(tiny_base, tmp_path):
    """Real runs per variant, tok/s after the warm-up, the last val bpb, a table and JSON."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install -e .[fp8])")
    out = tmp_path / "ab.json"
    args = ["--depth", "2", "--steps", "14", "--json", out, "--variant", "bf16:",
            "--variant", "fp8:--fp8 --fp8-emulate", "--", *TINY, "--aspect-ratio", "64", "--head-dim", "64"]
    proc = run(args, tiny_base, module="bench.studies.pretrain_ab")
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["bf16", "fp8"] and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert r["steps_timed"] == 4 and r["tok_per_sec"] > 0 and r["val_bpb_step"] == 14 and 0 < r["val_bpb"] < 20
    assert rows[0]["val_bpb"] != rows[1]["val_bpb"]  # the FP8 run really ran differently
    assert "| fp8 |" in proc.stdout and "1.000x" in proc.stdout


def test_pretrain_ab_bad_variant_is_one_line(capsys):
    from bench.studies import pretrain_ab
    with pytest.raises(SystemExit) as e:
        run_cli(pretrain_ab.main, ["--variant", "no colon here"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "NAME:FLAGS" in err[0], err


@pytest.mark.slow
@pytest.mark.long
def test_crop_report_on_the_tiny_corpus(tiny_base):
    """How much document text the packing crops, as one JSON line."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tiny_base), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.studies.crop", "--dataset", "tiny", "--batches", "3",
                           "--batch-size", "2", "--seq-len", "64"], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["used_tokens"] == 3 * 2 * 65 and out["document_tokens"] >= out["used_tokens"]
    assert 0 <= out["cropped_fraction"] < 1 and out["documents"] > 0
