"""The second round of faults (issue #24), through the real CLI on the tiny corpus and the real save path: a resume
past the plan, runs that would mix in one folder, --keep-last after an older resume, a damaged or hand-edited meta,
an evaluation a stop signal would have lost, a checkpoint a run diverges from at once, a context too short for the
sampler, and the errors that were tracebacks."""
import errno
import json
import os
import re
import shutil

import pytest
import torch

from helpers import SHORT, TINY, ckpt, data_file, metrics, one_line_error, run, run_patched
from train import checkpoint
from train.errors import UserError

pytestmark = pytest.mark.slow  # the CLI in subprocesses


def files(folder):
    """{path: bytes} of the checkpoint files and the metrics file of a folder (what a refused run must not touch)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------
# 1. a resume past the plan is refused; a finished run says so and writes nothing

def test_a_resume_past_the_plan_is_refused_and_a_finished_one_is_complete(tiny_base):
    args = [*SHORT, "--save-every", "2", "--model-tag", "past"]
    run([*args, "--num-iterations", "4"], tiny_base)
    folder = ckpt(tiny_base, "past")
    before = files(folder)
    for extra in ([], ["--warmdown-ratio", "0"]):  # the warmdown's division once divided by zero here
        proc = run([*args, "--num-iterations", "2", "--resume-from-step", "latest", *extra], tiny_base, check=False)
        one_line_error(proc, r"checkpoint step 4 is past this run's last step \(2.*raise --num-iterations")
    again = run([*args, "--num-iterations", "4", "--resume-from-step", "latest"], tiny_base)  # a requeued job
    assert "the run is complete" in again.stdout and "saved checkpoint" not in again.stdout
    assert files(folder) == before


# ----------------------------------------------------------------------------------------------
# 3, 10. a fresh start in a used folder: refused (nothing touched), or the old run set aside

def test_a_fresh_start_in_a_used_folder_is_refused_or_sets_the_old_run_aside(tiny_base):
    args = [*SHORT, "--num-iterations", "2", "--model-tag", "used"]
    run([*args, "--seed", "1"], tiny_base)
    folder = ckpt(tiny_base, "used")
    before = files(folder)
    proc = run(args, tiny_base, check=False)
    one_line_error(proc, r"holds checkpoints of an earlier run \(steps 2\).*--resume-from-step latest.*--model-tag.*"
                         r"--set-aside")
    assert files(folder) == before  # the earlier run's metrics are where they were
    proc = run([*args, "--set-aside"], tiny_base)
    aside, = folder.glob("set-aside-*")
    assert {p.name for p in aside.iterdir()} == {n.split("/")[0] for n in before if n.startswith("step_")} | {
        "metrics.jsonl"}
    assert (aside / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert [r["step"] for r in metrics(tiny_base, "used") if "train/loss_step" in r] == [1, 2]  # the new run's
    saved = checkpoint.load_meta(folder, 2)
    assert saved["user_config"]["seed"] == 42  # `latest` now finds this run's step 2, not the earlier one's


def test_a_failed_start_leaves_the_metrics_file_as_it_was(tiny_base):
    """A folder with a metrics file and no checkpoint (a run killed before its first save): a start that fails
    (wandb without a login) moves nothing aside."""
    folder = ckpt(tiny_base, "no-login")
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 6.0}\n')
    proc = run([*SHORT, "--num-iterations", "2", "--model-tag", "no-login", "--run", "some-name"], tiny_base,
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert files(folder) == {"metrics.jsonl": b'{"step": 1, "train/loss": 6.0}\n'}


# ----------------------------------------------------------------------------------------------
# 4. --keep-last after resuming an older step keeps what the resumed run writes

def test_keep_last_after_an_older_resume_keeps_the_new_checkpoints(tiny_base):
    args = [*SHORT, "--num-iterations", "6", "--model-tag", "keep-older"]
    run([*args, "--save-every", "2"], tiny_base)
    folder = ckpt(tiny_base, "keep-older")
    before = files(folder)
    one_line_error(run([*args, "--resume-from-step", "2"], tiny_base, check=False),
                   r"holds checkpoints after step 2 \(steps 4, 6\).*--set-aside")
    assert files(folder) == before
    proc = run([*args, "--save-every", "1", "--keep-last", "1", "--resume-from-step", "2", "--set-aside"], tiny_base)
    assert checkpoint.saved_steps(folder) == [6]  # the resumed run's newest, not the set-aside run's
    assert re.findall(r"deleted the checkpoint of step (\d+)", proc.stdout) == ["2", "3", "4", "5"]
    aside, = folder.glob("set-aside-*")
    assert checkpoint.saved_steps(aside) == [4, 6]
    meta = checkpoint.load_meta(folder, 6)
    assert meta["user_config"]["save_every"] == 1


# ----------------------------------------------------------------------------------------------
# 5. every flipped bit of a meta is found; a meta with values of the wrong type is one line

def save_small(folder, step=3):
    model = {"w": torch.arange(6.0)}
    meta = {"step": step, "model_config": {"n_layer": 2}, "user_config": {"seed": 42}, "world_size": 1,
            "dataloader": [{"epoch": 1, "shard": 0, "row_group": 9, "rank": 0, "world_size": 1, "buffer": []}],
            "loop_state": {"smooth_loss": 1.5, "val_bpb": 2.25}, "tokenizer": "abc", "val_bpb": 2.25,
            "dataset": {"name": "tiny", "train_shards": ["shard_00000.parquet"]}}
    checkpoint.save_checkpoint(folder, step, {"model": model}, meta)
    return folder / f"step_{step:06d}_meta.json"


def test_every_flipped_bit_of_a_meta_is_found(tmp_path):
    path = save_small(tmp_path)
    good = path.read_bytes()
    assert checkpoint.damage(tmp_path, 3) is None
    for i in range(len(good) * 8):
        bad = bytearray(good)
        bad[i // 8] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(UserError):
            checkpoint.load_meta(tmp_path, 3)
    path.write_bytes(good)
    checkpoint.load_meta(tmp_path, 3)


def test_a_meta_with_wrong_types_is_passed_over_by_latest(tmp_path):
    save_small(tmp_path, step=3)
    path = save_small(tmp_path, step=6)
    meta = json.loads(path.read_text())
    for key, value in (("world_size", "1"), ("dataloader", {"epoch": 1}), ("loop_state", [1.5]), ("files", []),
                       ("step", True)):
        edited = {k: v for k, v in meta.items() if k not in ("meta_sha256", "format")} | {key: value}
        path.write_text(json.dumps(edited))  # hand-edited, as a meta from before the digest
        with pytest.raises(UserError, match="wrong type|not the meta of step"):
            checkpoint.load_meta(tmp_path, 6)
        assert checkpoint.newest_good_step(tmp_path)[0] == 3
    edited = {k: v for k, v in meta.items() if k != "files"} | {"filez": meta["files"]}  # a renamed key
    path.write_text(json.dumps(edited))
    assert "damaged" in checkpoint.damage(tmp_path, 6)


def test_unreadable_checkpoint_files_are_one_line(tmp_path):
    save_small(tmp_path)
    model = data_file(tmp_path, 3)
    model.unlink()
    model.mkdir()  # a folder where the weights were (or a file this user may not read)
    assert "missing" in checkpoint.damage(tmp_path, 3)
    with pytest.raises(UserError, match="missing"):
        checkpoint.load_model_state(tmp_path, 3, "cpu")
    model.rmdir()
    save_small(tmp_path)

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "file_digest", unreadable)
        assert "unreadable: Permission denied" in checkpoint.damage(tmp_path, 3)
        with pytest.raises(UserError, match="unreadable: Permission denied"):
            checkpoint.load_model_state(tmp_path, 3, "cpu")


# ----------------------------------------------------------------------------------------------
# 7. an evaluation due at a stopping step is not lost

def test_an_eval_a_stop_signal_skipped_runs_when_the_run_resumes(tiny_base):
    """SIGTERM during the last step, which ends at an eval step: the run saves without evaluating and exits 143;
    resumed, it evaluates step 5 first, once, and its `done:` line reports that value."""
    patch = ("import os, signal\nfrom train import step as s\nreal = s.TrainStep.__call__\n"
             "def call(self, n):\n"
             "    if n == 4:\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "    return real(self, n)\n"
             "s.TrainStep.__call__ = call")
    args = [*TINY, "--num-iterations", "5", "--eval-every", "5", "--model-tag", "eval-stop"]
    proc = run_patched(patch, args, tiny_base)
    assert proc.returncode == 143 and "stopped by SIGTERM at step 5" in proc.stdout, proc.stdout[-2000:]
    assert [r["step"] for r in metrics(tiny_base, "eval-stop") if "val/bpb" in r] == [0]
    files = sorted(p for p in (ckpt(tiny_base, "eval-stop") / "step_000005").rglob("*") if p.is_file())
    weights = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    resumed = run([*args, "--resume-from-step", "latest"], tiny_base)
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == weights  # only the meta is written again
    bpbs = [(r["step"], r["val/bpb"]) for r in metrics(tiny_base, "eval-stop") if "val/bpb" in r]
    assert [s for s, _ in bpbs] == [0, 5]
    assert f"done: val bpb {bpbs[-1][1]}" in resumed.stdout
    assert "the run is complete" in run([*args, "--resume-from-step", "latest"], tiny_base).stdout


# ----------------------------------------------------------------------------------------------
# 8. weights far beyond training are not saved; a checkpoint the run diverges from at once is marked suspect

def test_diverged_weights_are_never_saved(tiny_base):
    proc = run([*SHORT, "--num-iterations", "3", "--save-every", "1", "--scalar-lr", "1e38", "--model-tag", "huge"],
               tiny_base, check=False)
    one_line_error(proc, r"non-finite or diverged values at step \d+ in .*lambdas.*: not saved")
    assert checkpoint.saved_steps(ckpt(tiny_base, "huge")) == []


def test_a_checkpoint_the_run_diverges_from_at_once_is_marked_and_latest_passes_over_it(tiny_base):
    args = [*SHORT, "--num-iterations", "4", "--save-every", "1", "--model-tag", "suspect"]
    run([*args, "--num-iterations", "2"], tiny_base)
    nan_loss = ("import torch\nfrom train import step as s\nreal = s.TrainStep.__call__\n"
                "def call(self, n):\n"
                "    loss, lrm = real(self, n)\n"
                "    return loss * float('nan'), lrm\n"
                "s.TrainStep.__call__ = call")
    proc = run_patched(nan_loss, [*args, "--resume-from-step", "latest"], tiny_base)
    one_line_error(proc, r"loss became nan at step 2; it diverged at once from checkpoint step 2, which may itself "
                         r"be bad: it is marked suspect .*the last good checkpoint is step 1")
    folder = ckpt(tiny_base, "suspect")
    assert checkpoint.suspect_marker(folder, 2).exists()
    # diverging at once again, from step 1, after passing over step 2: the cause is elsewhere, nothing more marked
    proc = run_patched(nan_loss, [*args, "--resume-from-step", "latest"], tiny_base)
    one_line_error(proc, r"diverged at once from checkpoint step 1 too, after `latest` passed over a checkpoint "
                         r"marked suspect: .*nothing more is marked")
    assert not checkpoint.suspect_marker(folder, 1).exists()
    proc = run([*args, "--resume-from-step", "latest"], tiny_base)
    assert "latest: step 1" in proc.stdout
    assert checkpoint.saved_steps(folder) == [1, 2, 3, 4]  # step 2 written again, unmarked
    assert [checkpoint.suspect_marker(aside, 2).exists() for aside in folder.glob("set-aside-*")] == [True]


def test_latest_refuses_when_no_checkpoint_of_the_folder_can_be_resumed(tmp_path):
    from train import resume
    save_small(tmp_path, step=3)
    data_file(tmp_path, 3).write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"none of the checkpoints .* can be resumed \(steps 3, said above\)"):
        resume.pick_step("latest", tmp_path, print)
    assert resume.pick_step("latest", tmp_path, print, fresh_ok=True) == -1  # --set-aside: afresh


# ----------------------------------------------------------------------------------------------
# 9. a context too short for the sampler's prompts

def test_a_two_token_context_samples_and_saves(tiny_base):
    proc = run([*SHORT, "--max-seq-len", "2", "--total-batch-size", "8", "--num-iterations", "2", "--sample-every",
                "1", "--model-tag", "short"], tiny_base)
    assert proc.stdout.count("sample:") == 10 and checkpoint.saved_steps(ckpt(tiny_base, "short")) == [2]


# ----------------------------------------------------------------------------------------------
# 11. what were tracebacks

def test_cpu_out_of_memory_at_an_allocation_is_one_line(tiny_base):
    patch = ("from model import gpt\n"
             "def init_weights(self):\n"
             "    raise RuntimeError(\"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
             "memory: you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)\")\n"
             "gpt.GPT.init_weights = init_weights")
    proc = run_patched(patch, [*SHORT, "--num-iterations", "2", "--model-tag", "cpu-oom"], tiny_base)
    one_line_error(proc, "out of CPU memory")


def test_a_full_disk_at_the_lock_or_the_metrics_file_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UserError, match=r"cannot write .*\.lock: No space left on device"):
        checkpoint.FolderLock(tmp_path)
    monkeypatch.undo()
    from train import metrics as metrics_module
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.setattr(metrics_module, "atomic_write", lambda *a, **k: full())
    with pytest.raises(UserError, match="cannot continue the metrics file .*No space left on device"):
        metrics_module.continue_file(path, 1)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_copy_for_the_aside_folder_is_not_a_move(tmp_path):
    """continue_file with a set-aside folder copies the whole file there before it drops the later records."""
    from train import metrics as metrics_module
    path, aside = tmp_path / "metrics.jsonl", tmp_path / "aside"
    aside.mkdir()
    path.write_text('{"step": 1}\n{"step": 2}\n')
    metrics_module.continue_file(path, 1, aside)
    assert path.read_text() == '{"step": 1}\n' and (aside / "metrics.jsonl").read_text().count("step") == 2
    shutil.rmtree(aside)


# ----------------------------------------------------------------------------------------------
# 6. a rebuilt dataset is named on resume, through the CLI (the digests a checkpoint records)

def test_a_rebuilt_dataset_is_refused_on_resume(tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    args = [*SHORT, "--num-iterations", "4", "--save-every", "2", "--model-tag", "rebuilt"]
    run([*args, "--num-iterations", "2"], base)
    assert checkpoint.load_meta(ckpt(base, "rebuilt"), 2)["dataset"]["digests"]
    run(["build", "--from", base / "src", "--name", "tiny", "--docs-per-row-group", "8", "--seed", "7"], base,
        module="train.dataset")  # the same shard names, other documents in them
    one_line_error(run([*args, "--resume-from-step", "2"], base, check=False),
                   r"the data differs from checkpoint step 2's \(other documents in .*was the dataset rebuilt\?\)")
    proc = run([*args, "--resume-from-step", "2", "--allow-data-change"], base)
    assert "the loader starts at its beginning" in proc.stdout


# ----------------------------------------------------------------------------------------------
# 1. a step saved on the way to a later last step, resumed as the last: evaluated as the last, then complete

def test_a_step_saved_on_the_way_is_evaluated_when_it_becomes_the_last(tiny_base):
    args = [*TINY, "--eval-every", "100", "--save-every", "2", "--model-tag", "on-the-way"]
    run([*args, "--num-iterations", "4"], tiny_base)  # val bpb at 0 and 4 (the last)
    proc = run([*args, "--num-iterations", "2", "--resume-from-step", "2", "--set-aside"], tiny_base)
    assert "the run is complete" not in proc.stdout
    assert [r["step"] for r in metrics(tiny_base, "on-the-way") if "val/bpb" in r] == [0, 2]
    again = run([*args, "--num-iterations", "2", "--resume-from-step", "latest"], tiny_base)
    assert "the run is complete" in again.stdout and "done: val bpb" in again.stdout
