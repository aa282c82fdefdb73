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


# -- nanochat_parity: everything but the two runs (those need a nanochat checkout; no test depends on one) --------

def fake_nanochat(root, script="pass\n"):
    """A folder that looks like a nanochat checkout, whose scripts/base_train.py is `script`."""
    for name in ("nanochat/gpt.py", "nanochat/dataloader.py", "nanochat/tokenizer.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "base_train.py").write_text(script)
    return root


@pytest.mark.parametrize("argv, says", [
    ([], "required: --nanochat"),
    (["--nanochat", "{tmp}/nowhere"], "no such folder"),
    (["--nanochat", "{tmp}"], r"not a nanochat checkout \(scripts/base_train.py is missing\)"),
    (["--nanochat", "{fake}", "--steps", "0"], "--steps must be at least 1"),
    (["--nanochat", "{fake}", "--seed", "-1"], "--seed must be"),
    (["--nanochat", "{fake}", "--eval-tokens", "2047"], r"--eval-tokens must be at least one batch \(2048\)"),
    (["--nanochat", "{fake}", "--work-dir", "{tmp}/work"], r"dataset 'pystdlib' has 0 shard\(s\).*train.dataset build"),
])
def test_nanochat_parity_bad_input_is_one_line(argv, says, tmp_path, capsys, monkeypatch):
    import re
    from bench.studies import nanochat_parity
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty_base"))
    fake = fake_nanochat(tmp_path / "fake")
    argv = [a.format(tmp=tmp_path, fake=fake) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_cli(nanochat_parity.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and re.search(says, err[0]), err


def test_nanochat_parity_flags_are_the_same_on_both_sides():
    """Our argv parses with train.pretrain's parser and gives every shared flag nanochat's value."""
    from bench.studies import nanochat_parity as np_
    from train.pretrain import build_parser
    args = np_.build_parser().parse_args(["--nanochat", ".", "--steps", "7", "--seed", "3"])
    ours = build_parser().parse_args(np_.ours_command(args)[3:])
    theirs = np_.nanochat_command(args)[3:]
    assert np_.nanochat_command(args)[1:3] == ["-c", np_.DRIVER]
    values = dict(zip(theirs[::2], theirs[1::2]))
    assert values["--num-iterations"] == "7" and values["--warmup-steps"] == "0" and ours.seed == 3
    for flag, value in values.items():
        got = getattr(ours, np_.OURS_NAMES.get(flag, flag)[2:].replace("-", "_"))
        assert got == type(got)(value), (flag, got, value)
    assert ours.warmup_ratio == 0 and ours.dataset == "pystdlib"


def test_nanochat_parity_reads_and_reports_both_runs():
    """Per-step losses (ours: the step count after the step; nanochat: the mean of the recorded micro-batches),
    val bpb by step, the printed-EMA check, and the two tables."""
    from bench.studies import nanochat_parity as np_
    ours = np_.read_ours([{"step": 0, "val/bpb": 3.0}, {"step": 1, "train/loss_step": 8.0, "train/loss": 8.0},
                          {"step": 2, "train/loss_step": 7.5}, {"step": 3, "train/loss_step": 7.0},
                          {"step": 3, "val/bpb": 2.5}])
    assert ours == {"losses": [8.0, 7.5, 7.0], "val_bpb": {0: 3.0, 3: 2.5}}
    micro = [8.2, 7.8, 7.6, 7.4, 7.2, 6.9]
    entries = [{"kind": "eval", "batch": "v0"}] + [{"kind": "train", "batch": f"t{i}", "loss": v}
                                                  for i, v in enumerate(micro)] + [{"kind": "eval", "batch": "v0"}]
    printed = np_.debiased_ema([7.8, 7.4, 6.9])  # nanochat prints the EMA of the last micro-batch's loss
    assert printed[0] == pytest.approx(7.8) and printed[1] == pytest.approx((0.9 * 0.78 + 0.74) / 0.19)
    stdout = "\n".join(["Step 00000 | Validation bpb: 3.000100"]
                       + [f"step {i:05d}/00003 (0.00%) | loss: {v:.6f} | lrm: 1.00 | dt: 1.0ms" for i, v in
                          enumerate(printed)] + ["Step 00003 | Validation bpb: 2.499000"])
    theirs = np_.read_nanochat(entries, stdout, grad_accum=2)
    assert theirs["losses"] == pytest.approx([8.0, 7.5, 7.05]) and theirs["val_bpb"] == {0: 3.0001, 3: 2.499}
    assert theirs["train_batches"] == [f"t{i}" for i in range(6)] and theirs["val_batches"] == ["v0", "v0"]
    assert theirs["recorder_check"] < 1e-6
    result = np_.compare(ours, theirs, first=2)
    assert result["max_abs_loss_diff_first"] == 0 and result["max_abs_loss_diff_all"] == pytest.approx(0.05)
    assert result["first_step_over_1e-4"] == 2 and result["loss_steps"] == 3
    bpb = np_.bpb_table(result).splitlines()
    assert bpb[2] == "| 0 | 3.0000 | 3.0001 | -0.0001 |" and bpb[3] == "| 3 | 2.5000 | 2.4990 | +0.0010 |"
    losses = np_.loss_table(result).splitlines()
    assert losses[2] == "| 0 | 8.000000 | 8.000000 | +0.00e+00 |" and len(losses) == 5
    assert losses[-1].startswith("max |ours - nanochat| over the first 2 steps: 0.00000000; over all 3: 0.05")
    assert np_.compare_batches(["a", "b", "c"], ["a", "x", "c", "d"]) == {"compared": 3, "identical": 2,
                                                                          "first_difference": 1}
    json.dumps(result)


def test_nanochat_parity_driver_records_what_the_model_sees(tmp_path):
    """The driver runs a checkout's scripts/base_train.py as __main__ (argv passed on) with the compiled module
    wrapped: each batch given with targets is written down (our digest of it), with the loss in training mode."""
    from bench.studies import nanochat_parity as np_
    import torch
    script = ("import sys, torch\n"
              "class M(torch.nn.Module):\n"
              "    def forward(self, idx, targets=None, loss_reduction='mean'):\n"
              "        return idx.float() if targets is None else (idx.float() - targets.float()).square().mean()\n"
              "m = torch.compile(M(), dynamic=False)\n"
              "x = torch.arange(6).view(2, 3)\n"
              "print('loss', m(x, x + 1).item(), sys.argv[1:], m.training)\n"
              "m.eval()\n"
              "m(x, x, loss_reduction='none')\n"
              "m(x)\n")
    root = fake_nanochat(tmp_path / "fake", script)
    record = tmp_path / "record.jsonl"
    env = dict(os.environ, PARITY_RECORD=str(record), PARITY_EAGER="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", np_.DRIVER, "--depth", "4"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loss 1.0 ['--depth', '4'] True" in proc.stdout
    x = torch.arange(6).view(2, 3)
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert entries == [{"kind": "train", "batch": np_.batch_digest(x, x + 1), "loss": 1.0},
                       {"kind": "eval", "batch": np_.batch_digest(x, x)}]


def test_nanochat_parity_lays_out_the_same_bytes_for_both(tiny_base, tmp_path, monkeypatch):
    """Both base dirs hold our shards byte for byte (nanochat's under base_data_climbmix/) and our tokenizer:
    nanochat's tokenizer.pkl unpickles to an encoding that encodes as ours."""
    import pickle
    from bench.studies import nanochat_parity as np_
    from train.tokenizer import load_tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    ours, theirs = np_.prepare(tmp_path / "work", "tiny")
    src = sorted((tiny_base / "data" / "tiny").glob("*.parquet"))
    for base, folder in ((ours, "data/tiny"), (theirs, "base_data_climbmix")):
        assert [(p.name, p.read_bytes()) for p in sorted((base / folder).glob("*.parquet"))] == \
            [(p.name, p.read_bytes()) for p in src]
    tok = load_tokenizer(tiny_base / "tokenizer")
    assert load_tokenizer(ours / "tokenizer").fingerprint == tok.fingerprint
    enc = pickle.loads((theirs / "tokenizer" / "tokenizer.pkl").read_bytes())
    text = (tiny_base / "src" / "json" / "decoder.py").read_text()
    assert enc.encode_ordinary(text) == tok.enc.encode_ordinary(text) and enc.n_vocab == tok.vocab_size
    assert enc.encode_single_token("<|bos|>") == tok.bos_id
    assert (theirs / "tokenizer" / "token_bytes.pt").read_bytes() == (tiny_base / "tokenizer" / "token_bytes.pt"
                                                                       ).read_bytes()
    (ours / "stale").write_text("")
    np_.prepare(tmp_path / "work", "tiny")  # again: fresh folders
    assert not (ours / "stale").exists()
