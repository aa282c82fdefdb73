"""Runs that survive what clusters and users do to them, through the real CLI on the tiny corpus: no poisoned
checkpoint, damage found by checksum, `latest` falling back to a good step, changed flags said and in effect,
another tokenizer or dataset refused, a lock per run folder, leftovers cleaned, Ctrl-C and SIGHUP saving, one
line and exit 2 for every error a user can cause."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import (REPO, SHORT, TINY, ckpt, cli_env, data_file, metrics, one_line_error, run, run_patched,
                     step_losses, wait_for_lines)
from train import checkpoint, pretrain
from train.errors import UserError, run_cli

pytestmark = pytest.mark.slow  # the CLI in subprocesses
# ----------------------------------------------------------------------------------------------
# 1. no poisoned checkpoint

def test_weights_that_went_non_finite_are_never_saved(tiny_base):
    proc = run([*SHORT, "--num-iterations", "8", "--save-every", "1", "--embedding-lr", "1e39",
                "--model-tag", "blowup"], tiny_base, check=False)
    line = one_line_error(proc, r"(non-finite or diverged values at step \d+ in .*: not saved|"
                                r"loss became nan at step \d+)")
    folder = ckpt(tiny_base, "blowup")
    saved = checkpoint.saved_steps(folder)
    for step in saved:  # every checkpoint that exists holds finite numbers only
        state = checkpoint.load_model_state(folder, step, "cpu")
        assert all(t.isfinite().all() for t in state.values()), step
    assert (f"last good checkpoint is step {saved[-1]}" in line) if saved else "no checkpoint to resume" in line
    again = run([*SHORT, "--num-iterations", "2", "--save-every", "1", "--model-tag", "blowup",
                 "--resume-from-step", "latest"], tiny_base)  # the requeued job: from a good one, or afresh
    assert "Traceback" not in again.stderr


def test_a_non_finite_val_bpb_stops_the_run_without_saving(tiny_base):
    patch = "import train.pretrain as p\np.val_bpb = lambda run: float('nan')"
    proc = run_patched(patch, [*TINY, "--num-iterations", "4", "--eval-every", "2", "--model-tag", "nanbpb"],
                       tiny_base)
    one_line_error(proc, r"val bpb became nan at step 0; there is no checkpoint to resume from")
    assert checkpoint.saved_steps(ckpt(tiny_base, "nanbpb")) == []


# ----------------------------------------------------------------------------------------------
# 2. changed flags on resume take effect, and are said

def test_changed_flags_on_resume_take_effect_and_are_said(tiny_base):
    args = [*SHORT, "--num-iterations", "8", "--save-every", "4"]
    run([*args, "--model-tag", "flags"], tiny_base)
    for tag in ("flags-lr", "flags-batch"):
        shutil.copytree(ckpt(tiny_base, "flags"), ckpt(tiny_base, tag))
    lr = run([*args, "--model-tag", "flags-lr", "--resume-from-step", "4", "--matrix-lr", "0.08", "--set-aside"],
             tiny_base)
    assert "in effect from here: --matrix-lr 0.02 -> 0.08" in lr.stdout
    # an unchanged resume continues the same curve (test_pretrain): this one parts from it after step 5
    a, b = step_losses(metrics(tiny_base, "flags")), step_losses(metrics(tiny_base, "flags-lr"))
    assert a[5] == b[5] and a[8] != b[8]  # step 5's loss is the checkpoint's weights; then the new LR acts
    # another device batch at the same total batch (more accumulation) resumes too
    run([*args, "--model-tag", "flags-batch", "--resume-from-step", "4", "--device-batch-size", "2", "--set-aside"],
        tiny_base)


# ----------------------------------------------------------------------------------------------
# 3. another tokenizer (same vocabulary size) or other data is refused

def test_another_tokenizer_or_dataset_is_refused_on_resume(tiny_base, tmp_path):
    run([*SHORT, "--num-iterations", "2", "--model-tag", "fingerprint"], tiny_base)
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    run(["build", "--from", tiny_base / "src" / "json", "--name", "json"], other, module="train.dataset")
    run(["train", "--dataset", "json", "--vocab-size", "512"], other, module="train.tokenizer")  # other merges
    proc = run([*SHORT, "--num-iterations", "4", "--model-tag", "fingerprint", "--resume-from-step", "2"], other,
               check=False)
    one_line_error(proc, "tokenizer differs from the one checkpoint step 2 was trained with")

    moved = tmp_path / "moved"
    shutil.copytree(tiny_base, moved)
    shards = sorted((moved / "data" / "tiny").glob("*.parquet"))
    shards[0].rename(shards[0].with_name("shard_99990.parquet"))  # the training shards are no longer the same
    base_args = [*SHORT, "--num-iterations", "4", "--model-tag", "fingerprint", "--resume-from-step", "2"]
    one_line_error(run(base_args, moved, check=False), "data differs from checkpoint step 2's.*--allow-data-change")
    run([*base_args, "--allow-data-change"], moved)


# ----------------------------------------------------------------------------------------------
# 4, 5, 11. damage found, latest falls back, broken files are one line

def test_damage_is_found_and_latest_falls_back_to_the_newest_good_step(tiny_base):
    run([*SHORT, "--num-iterations", "6", "--save-every", "3", "--model-tag", "damage"], tiny_base)
    folder = ckpt(tiny_base, "damage")
    model = data_file(folder, 6)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    model.write_bytes(bytes(data))
    proc = run([*SHORT, "--num-iterations", "8", "--model-tag", "damage", "--resume-from-step", "6"], tiny_base,
               check=False)
    one_line_error(proc, "step_000006/model/__0_0.distcp is damaged")
    latest = run([*SHORT, "--num-iterations", "8", "--model-tag", "damage", "--resume-from-step", "latest"],
                 tiny_base)
    assert "skipped step 6:" in latest.stdout and "latest: step 3" in latest.stdout


def test_a_broken_checkpoint_is_one_line(tiny_base):
    run([*SHORT, "--num-iterations", "2", "--model-tag", "broken"], tiny_base)
    breakages = [  # (what is done to the folder's step 2, what the one line says)
        (lambda f: data_file(f, 2).write_bytes(b""), "step_000002/model/__0_0.distcp has 0 bytes"),
        (lambda f: (f / "step_000002_meta.json").write_bytes(b'{"step": 2, "x": "\xff"}'), "meta .* is unreadable"),
        (lambda f: (f / "step_000002_meta.json").write_text('{"step": 2}'), "lacks model_config"),
    ]
    for i, (breakage, message) in enumerate(breakages):
        shutil.copytree(ckpt(tiny_base, "broken"), ckpt(tiny_base, f"broken{i}"))
        breakage(ckpt(tiny_base, f"broken{i}"))
        one_line_error(run([*SHORT, "--num-iterations", "4", "--model-tag", f"broken{i}", "--resume-from-step", "2"],
                           tiny_base, check=False), message)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_orphan(tiny_base):
    """torch reports a full disk as a RuntimeError of its zip writer: here it comes after part of a DCP file."""
    patch = ("import torch.distributed.checkpoint.filesystem as fs\nreal = fs._write_item\n"
             "def write(transforms, stream, *a, **k):\n"
             "    if 'step_000004' in str(getattr(stream, 'name', '')):  # the second checkpoint\n"
             "        stream.write(b'partial')\n"
             "        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0')\n"
             "    return real(transforms, stream, *a, **k)\n"
             "fs._write_item = write")
    proc = run_patched(patch, [*SHORT, "--num-iterations", "4", "--save-every", "2", "--model-tag", "fulldisk"],
                       tiny_base)
    one_line_error(proc, r"could not write the checkpoint of step 4 .*the last good checkpoint is step 2")
    assert sorted(p.name for p in ckpt(tiny_base, "fulldisk").glob("step_000004*")) == []  # no orphan, no temp file
    assert not list(ckpt(tiny_base, "fulldisk").glob(".step_*"))


def test_a_small_tmpfs_filled_by_a_save(tiny_base):
    folder = ckpt(tiny_base, "tmpfs")
    folder.mkdir(parents=True)
    probe = run([*SHORT, "--num-iterations", "2", "--model-tag", "tmpfs-size"], tiny_base)
    assert probe.returncode == 0
    one = sum(p.stat().st_size for p in ckpt(tiny_base, "tmpfs-size").rglob("*") if p.is_file()
              and p.relative_to(ckpt(tiny_base, "tmpfs-size")).as_posix().startswith("step_000002"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.6) // 4096 * 4096}", "tmpfs",
                       str(folder)], capture_output=True).returncode != 0:
        pytest.skip("no tmpfs can be mounted here (not root): the full disk is simulated in the test above")
    try:
        proc = run([*SHORT, "--num-iterations", "4", "--save-every", "2", "--model-tag", "tmpfs"], tiny_base,
                   check=False)
        one_line_error(proc, r"could not write the checkpoint of step 4 .*last good checkpoint is step 2")
        assert not list(folder.glob("step_000004*")) and not list(folder.glob(".step_*"))
    finally:
        subprocess.run(["umount", str(folder)])


# ----------------------------------------------------------------------------------------------
# 6, 7. bad flags: one line, exit 2 (in process: they are refused before anything is built)

@pytest.mark.parametrize("flags, message", [
    (["--model-tag", ".."], "bad --model-tag"), (["--model-tag", "../x"], "bad --model-tag"),
    (["--model-tag", "/tmp/x"], "bad --model-tag"), (["--num-iterations", "0"], "--num-iterations"),
    (["--num-iterations", "-5"], "--num-iterations"), (["--eval-every", "0"], "--eval-every"),
    (["--save-every", "-3"], "--save-every"), (["--sample-every", "0"], "--sample-every"),
    (["--core-metric-every", "0"], "--core-metric-every"), (["--final-lr-frac", "-1"], "--final-lr-frac"),
    (["--final-lr-frac", "5"], "--final-lr-frac"), (["--matrix-lr", "-1"], "--matrix-lr"),
    (["--adam-beta1", "2"], "--adam-beta1"), (["--adam-beta2", "-1"], "--adam-beta2"),
    (["--resume-from-step", "-5"], "--resume-from-step"), (["--embedding-lr", "nan"], "--embedding-lr"),
    (["--matrix-lr", "inf"], "--matrix-lr"), (["--target-flops", "0"], "--target-flops"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--target-param-data-ratio", "1e-300", "--total-batch-size", "-1"], "--target-param-data-ratio"),
])
def test_bad_values_are_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(pretrain.main, [*SHORT, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


# ----------------------------------------------------------------------------------------------
# 8, 9. a lock per run folder; leftovers cleaned

def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(tiny_base):
    args = [*SHORT, "--num-iterations", "400", "--model-tag", "locked"]
    first = subprocess.Popen([sys.executable, "-m", "train.pretrain", *args], env=cli_env(tiny_base),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for_lines(ckpt(tiny_base, "locked") / "metrics.jsonl", 2, first)
        one_line_error(run(args, tiny_base, check=False), r"in use by another run \(host .* pid \d+\)")
    finally:
        first.kill()  # kill -9: the lock is never released by the run itself
        first.communicate()
    after = run([*SHORT, "--num-iterations", "2", "--model-tag", "locked", "--resume-from-step", "latest"],
                tiny_base)
    assert f"pid {first.pid}" in after.stdout and "took over the lock" in after.stdout


def test_leftovers_of_killed_saves_are_removed_at_start(tiny_base):
    folder = ckpt(tiny_base, "leftovers")
    run([*SHORT, "--num-iterations", "2", "--model-tag", "leftovers"], tiny_base)
    (folder / ".step_000004_meta.json.tmp123-456").write_bytes(b"half")
    (folder / "step_000004").mkdir()
    (folder / "step_000004" / "__0_0.distcp").write_bytes(b"orphan")  # a save killed before its meta
    (folder / "step_000005_optimizer_rank0.pt").write_bytes(b"orphan")  # format 2's
    proc = run([*SHORT, "--num-iterations", "4", "--save-every", "2", "--keep-last", "1", "--model-tag",
                "leftovers", "--resume-from-step", "2"], tiny_base)
    assert all(name in proc.stdout for name in (".step_000004_meta.json.tmp123-456", "step_000004,",
                                                  "step_000005_optimizer_rank0.pt")), proc.stdout
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("step_", ".step_"))) == [
        "step_000004", "step_000004_meta.json"]


# ----------------------------------------------------------------------------------------------
# 10. Ctrl-C and SIGHUP save like SIGTERM; a second Ctrl-C stops at once

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_sighup_save_and_say_how_to_resume(tiny_base, sig):
    tag = f"signal-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", *SHORT, "--num-iterations", "400",
                             "--model-tag", tag], env=cli_env(tiny_base), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_lines(ckpt(tiny_base, tag) / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, (proc.returncode, err[-2000:])
    step = int(out.split(f"stopped by {sig.name} at step ")[1].split(":")[0])
    assert checkpoint.saved_steps(ckpt(tiny_base, tag)) == [step]


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored_after_the_run():
    """Real SIGINTs to this process, with the run's handler: the first asks for a save, the second stops. The
    handlers are the run's only while it runs (stop_signals)."""
    import time
    saved = {sig: signal.getsignal(sig) for sig in pretrain.StopSignal.SIGNALS}
    with pretrain.stop_signals(pretrain.StopSignal()) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert {sig: signal.getsignal(sig) for sig in saved} == saved


# ----------------------------------------------------------------------------------------------
# 12. epochs announced, no step logged twice after a resume, valid JSON only

def test_epochs_are_announced_and_a_resume_logs_no_step_twice(tiny_base):
    args = [*SHORT, "--num-iterations", "12", "--save-every", "6", "--model-tag", "epochs"]
    proc = run([*args, "--eval-tokens", "40960", "--eval-every", "12"], tiny_base)  # the val split: 34K tokens

    def passes(out):  # (step, passes) of each "the data repeats" line
        return [(int(m[1]), int(m[2])) for m in re.finditer(r"step (\d+) \| the train split of 'tiny' is being read "
                                                            r"again \(pass (\d+)\)", out)]
    said = passes(proc.stdout)
    assert said and [n for _, n in said] == sorted({n for _, n in said}), said  # each pass once, in order
    assert proc.stdout.count("more than the val split") == 1
    again = run([*args, "--resume-from-step", "6", "--set-aside"], tiny_base)  # as if killed after step 12 was logged
    steps = [r["step"] for r in metrics(tiny_base, "epochs") if "train/loss" in r]
    assert steps == list(range(1, 13)) and "dropped" in again.stdout
    assert passes(again.stdout) == [(s, n) for s, n in said if s > 6]  # what came after the checkpoint, again


def test_meta_never_holds_nan_and_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(checkpoint.CheckpointWriteError):
        checkpoint.save_checkpoint(tmp_path, 3, {"model": {"w": torch.ones(2)}, "optimizer": {"m": torch.ones(2)}},
                                   {"step": 3, "val_bpb": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_the_metrics_file_takes_back_a_line_it_could_not_write(tmp_path):
    from train.metrics import MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log({"step": 1, "train/loss": 2.0})

    class Full:
        def __init__(self, f):
            self.f = f

        def fileno(self):
            return self.f.fileno()

        def write(self, data):
            self.f.write(data[:5])  # half a line reaches the disk, then it is full
            raise OSError(28, "No space left on device")

    log.file = Full(log.file)
    with pytest.raises(UserError, match="cannot append to the metrics file .*No space left"):
        log.log({"step": 2, "train/loss": 1.5})
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "train/loss": 2.0}]


def test_wandb_without_a_login_and_an_unwritable_base_dir_are_one_line(tiny_base, tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_DIR": str(tmp_path), "HOME": str(tmp_path), "WANDB_API_KEY": ""}
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *SHORT, "--num-iterations", "2", "--run", "x",
                           "--model-tag", "wandb-login"], env=cli_env(tiny_base, **env), capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    one_line_error(proc, "wandb could not start run 'x'.*wandb login")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    one_line_error(run(["build", "--from", tiny_base / "src" / "json", "--name", "x"], blocked / "base", check=False,
                       module="train.dataset"),  # a base dir under a file
                   "cannot write the dataset")
    shutil.copytree(tiny_base / "data", tmp_path / "tok" / "data")
    (tmp_path / "tok" / "tokenizer").write_text("")  # a file where the tokenizer's folder goes
    one_line_error(run(["train", "--dataset", "tiny", "--vocab-size", "300"], tmp_path / "tok", check=False,
                       module="train.tokenizer"), "cannot write the tokenizer")
