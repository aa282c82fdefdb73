"""End-to-end: the train.pretrain CLI on a tiny corpus, on the CPU.

The corpus is a slice of the Python standard library (offline, on every machine); the tokenizer is
trained on it with a small vocabulary so that everything runs in seconds.
"""
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, TINY, cli_env, free_port, metrics, run, run_patched, step_losses, torchrun, wait_for_lines
from train import checkpoint

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess


@pytest.fixture
def base(tiny_base):
    return tiny_base


def test_tiny_run_loss_falls_and_ends_with_checkpoint_and_bpb(base):
    proc = run([*TINY, "--num-iterations", "40", "--eval-every", "20", "--model-tag", "falls"], base)
    losses = step_losses(metrics(base, "falls"))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    bpbs = [r["val/bpb"] for r in metrics(base, "falls") if "val/bpb" in r]
    assert len(bpbs) == 3 and bpbs[-1] < bpbs[0]
    assert checkpoint.damage(base / "base_checkpoints" / "falls", 40) is None
    assert "val bpb" in proc.stdout
    assert (base / "base_checkpoints" / "falls" / "metrics.png").stat().st_size > 10_000  # the run's curves


def test_resume_continues_the_same_loss_curve(base):
    run([*TINY, "--num-iterations", "12", "--save-every", "6", "--eval-every", "-1", "--model-tag", "full"], base)
    ckpts = base / "base_checkpoints"
    shutil.copytree(ckpts / "full", ckpts / "resumed")
    (ckpts / "resumed" / "metrics.jsonl").unlink()
    proc = run([*TINY, "--num-iterations", "12", "--save-every", "6", "--eval-every", "-1", "--model-tag", "resumed",
                "--resume-from-step", "6", "--set-aside"], base)
    assert "other settings" not in proc.stdout  # nothing changed: nothing to say
    full, resumed = step_losses(metrics(base, "full")), step_losses(metrics(base, "resumed"))
    assert sorted(resumed) == list(range(7, 13))
    for s in range(7, 13):
        assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-6), (s, resumed[s], full[s])


@pytest.mark.parametrize("args, message", [
    (["--depth", "0"], "depth"),
    (["--window-pattern", "SXL"], "window-pattern"),
    (["--total-batch-size", "1000"], "multiple"),
    (["--device-type", "cuda"], "CUDA"),
    (["--resume-from-step", "99", "--model-tag", "nothing-here"], "no checkpoint"),
    (["--fp8"], "fp8|FP8|torchao"),
    (["--depth", "two"], "invalid int"),
    (["--dataset", "missing-corpus"], "missing-corpus"),
    (["--kernel-attention", "fa3"], "fa3"),
    (["--kernel-attention", "nonsense"], "invalid choice"),
])
def test_bad_flags_exit_2_with_one_line(base, args, message, monkeypatch, capsys):
    """In this process, as `python -m train.pretrain` would run it (a forced kernel that cannot run here is refused
    by the first forward pass)."""
    argv = [*TINY, "--num-iterations", "2", *args]  # a later flag overrides TINY's
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    from train import pretrain
    from train.errors import run_cli as run_main
    with pytest.raises(SystemExit) as e:
        run_main(pretrain.main, argv)
    code, stderr = e.value.code, capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    err = stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    assert re.search(message, err[0]), err[0]


def test_tokenizer_vocab_mismatch_on_resume_is_one_line(base, tmp_path):
    run([*TINY, "--num-iterations", "2", "--eval-every", "-1", "--model-tag", "vocab"], base)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    run(["train", "--dataset", "tiny", "--vocab-size", "600"], other, module="train.tokenizer")
    proc = run([*TINY, "--num-iterations", "4", "--model-tag", "vocab", "--resume-from-step", "2"], other, check=False)
    assert proc.returncode == 2 and "vocabulary" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_fp8_emulated_run_resumes_without_fp8(base):
    """An FP8 run (torchao's CPU emulation) checkpoints plain weights that a bf16 run resumes from."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install -e .[fp8])")
    wide = [*TINY, "--aspect-ratio", "64", "--head-dim", "64", "--eval-every", "-1", "--model-tag", "fp8"]
    proc = run([*wide, "--num-iterations", "4", "--fp8", "--fp8-emulate"], base)
    # 2 layers x (c_q, c_k, c_v, c_proj, c_fc, mlp c_proj)
    assert "converted 12 linear layers" in proc.stdout, proc.stdout[-2000:]
    run([*wide, "--num-iterations", "6", "--resume-from-step", "4"], base)
    losses = step_losses(metrics(base, "fp8"))
    assert sorted(losses) == list(range(1, 7)) and all(v == v and v < 20 for v in losses.values())


def test_dry_run_needs_no_data_and_prints_the_plan_as_json(tmp_path):
    proc = run(["--depth", "20", "--dry-run"], tmp_path)
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(plan) == {"model_dim", "n_head", "scaling_params", "total_params", "target_tokens",
                         "total_batch_size", "num_iterations", "lr_scale", "weight_decay", "flops_per_token",
                         "grad_accum_steps", "optimizer_groups", "memory"}
    assert plan["model_dim"] == 1280 and plan["n_head"] == 10
    groups = {g["group"]: g for g in plan["optimizer_groups"]}
    assert set(groups) == {"lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear_backout",
                           "matrices"}
    assert groups["x0_lambdas"]["betas"] == [0.96, 0.95] and groups["smear_backout"]["lr"] == 0.2
    assert groups["matrices"]["beta2"] == 0.9 and groups["wte"]["weight_decay"] == 0.001
    assert "estimated GPU memory" in proc.stdout


def written_by(ckpt, step) -> set[int]:
    """The ranks whose DCP files a checkpoint's meta lists (__{rank}_{i}.distcp)."""
    return {int(name.split("__")[1].split("_")[0]) for name in checkpoint.load_meta(ckpt, step)["files"]
            if name.endswith(".distcp")}


def test_async_save_writes_what_a_save_writes_while_training_goes_on(base):
    """--async-save on 2 ranks: the checkpoints are those of the same run saving in line, bit for bit, with their
    digests (that training goes on meanwhile: the next test)."""
    args = [*TINY, "--device-batch-size", "2", "--num-iterations", "6", "--save-every", "2", "--eval-every", "-1"]
    torchrun([*args, "--model-tag", "in-line"], base)
    proc = torchrun([*args, "--model-tag", "background", "--async-save"], base)
    folders = [base / "base_checkpoints" / tag for tag in ("in-line", "background")]
    assert checkpoint.saved_steps(folders[1]) == [2, 4, 6]
    for step in (2, 4, 6):
        assert checkpoint.damage(folders[1], step) is None
        for part in ("model", "optimizer"):
            a, b = (checkpoint.load_tensors(folder, step, part) for folder in folders)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, part)
    assert step_losses(metrics(base, "in-line")) == step_losses(metrics(base, "background"))
    assert all(f"step {s:05d} | saved checkpoint" in proc.stdout for s in (2, 4, 6))


def test_a_kill_during_a_background_save_leaves_the_one_before(base):
    """kill -9 while --async-save's thread writes step 4 (its writes slowed down), once training has gone on to step
    6 meanwhile: step 2 stays the latest, and the next run removes what the killed save left."""
    slow = ("import time\nimport torch.distributed.checkpoint.filesystem as fs\nreal = fs._write_item\n"
            "def write(transforms, stream, *a, **k):\n"
            "    if 'step_000004' in str(getattr(stream, 'name', '')):\n"
            "        time.sleep(600)\n"
            "    return real(transforms, stream, *a, **k)\n"
            "fs._write_item = write\nimport sys\nfrom train import pretrain\nfrom train.errors import run_cli\n"
            "run_cli(pretrain.main, sys.argv[1:])")
    args = [*TINY, "--num-iterations", "6", "--save-every", "2", "--eval-every", "-1", "--model-tag", "killed"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *args, "--async-save"], env=cli_env(base), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = base / "base_checkpoints" / "killed"
    deadline = time.time() + 120
    while not (list(folder.glob("step_000004/*/*.distcp"))  # the thread is in step 4's (slowed) writes
               and 6 in step_losses(metrics(base, "killed"))):  # and the run has trained on
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    assert (folder / "step_000004").is_dir() and checkpoint.newest_good_step(folder) == (2, [])
    again = run([*args[:-2], "--model-tag", "killed", "--resume-from-step", "latest"], base)
    assert "removed what unfinished saves left" in again.stdout and "step_000004" in again.stdout
    assert "--resume-from-step latest: step 2" in again.stdout and checkpoint.saved_steps(folder) == [2, 4, 6]


def test_torchrun_two_ranks_train_save_and_resume_exactly(base):
    """Two gloo ranks through torchrun: each rank writes its part of the checkpoint, val bpb over both ranks, and a
    resumed 2-rank run continues the same loss curve (on another world size: tests/test_reshard.py)."""
    ddp = [*TINY, "--device-batch-size", "2", "--num-iterations", "8", "--save-every", "4", "--eval-every", "4"]
    proc = torchrun([*ddp, "--model-tag", "ddp"], base)
    assert "on 2 x cpu" in proc.stdout, proc.stdout[-2000:]
    ckpt = base / "base_checkpoints" / "ddp"
    for step in (4, 8):
        assert written_by(ckpt, step) == {0, 1} and checkpoint.damage(ckpt, step) is None
        meta = json.loads((ckpt / f"step_{step:06d}_meta.json").read_text())
        assert meta["world_size"] == 2 and len(meta["dataloader"]) == 2
        assert meta["dataloader"][0] != meta["dataloader"][1]  # each rank reads its own row groups
    records = metrics(base, "ddp")
    bpbs = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert len(bpbs) == 3 and all(0 < b < 20 for b in bpbs), bpbs

    shutil.copytree(ckpt, base / "base_checkpoints" / "ddp-resumed")
    (base / "base_checkpoints" / "ddp-resumed" / "metrics.jsonl").unlink()
    torchrun([*ddp, "--model-tag", "ddp-resumed", "--resume-from-step", "4", "--set-aside"], base)
    full, resumed = step_losses(records), step_losses(metrics(base, "ddp-resumed"))
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in resumed:
        assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-6), (s, resumed[s], full[s])

    # one rank refuses (a file it checks is damaged): no rank changes the folder, every rank says why
    shard = ckpt / "step_000004" / "optimizer" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"!")
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = torchrun([*ddp, "--model-tag", "ddp", "--resume-from-step", "4", "--set-aside"], base, check=False)
    assert proc.returncode != 0 and proc.stderr.count("step_000004/optimizer/__1_0.distcp is damaged") == 2, proc.stderr
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not list(ckpt.glob("set-aside-*"))


def test_two_nodes_meet_through_torchruns_rendezvous(base):
    """Multi-node as users launch it: one torchrun per node, c10d rendezvous at an endpoint (here 2 'nodes' of
    one gloo process each on this machine); ranks are assigned by the rendezvous and train as one job, in FSDP2 mode:
    sharded within each node, replicated across the nodes (HSDP)."""
    env = cli_env(base, OMP_NUM_THREADS="1")
    endpoint = f"127.0.0.1:{free_port()}"
    args = [*TINY, "--device-batch-size", "2", "--num-iterations", "3", "--eval-every", "-1", "--model-tag", "nodes",
            "--fsdp", "on"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=nodes-test",
           "-m", "train.pretrain", *map(str, args)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert any("on 2 x cpu" in out and "HSDP (FSDP2 over each node's 1 rank, replicated over 2 nodes)" in out
               for out, _ in outs), [out[-1000:] for out, _ in outs]
    ckpt = base / "base_checkpoints" / "nodes"
    assert written_by(ckpt, 3) == {0, 1}
    assert sorted(step_losses(metrics(base, "nodes"))) == [1, 2, 3]


def test_wandb_offline_run_logs_the_metrics(base, tmp_path):
    """--run NAME with WANDB_MODE=offline: no network, a local wandb run with the same metrics as metrics.jsonl."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e .[wandb])")
    env = cli_env(base, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *TINY, "--num-iterations", "3", "--eval-every", "3",
                           "--run", "offline-test", "--model-tag", "wandb"],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))[:20]
    # the run's record log (protobuf): every metric we log is in it by name, the val bpb value as its JSON text
    log = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in ("train/loss", "val/bpb", "train/mfu", "train/tok_per_sec", "total_flops"):
        assert key.encode() in log, key
    bpb = [r["val/bpb"] for r in metrics(base, "wandb") if "val/bpb" in r][-1]
    assert json.dumps(bpb).encode() in log


def test_waiting_for_a_job_that_died_fails_at_once(tmp_path):
    import time
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    with pytest.raises(pytest.fail.Exception, match="job exit 3"):
        wait_for_lines(tmp_path / "metrics.jsonl", 1, proc, timeout=60)
    assert time.time() - t0 < 30


def test_sigterm_saves_a_checkpoint_that_resumes(base):
    """A scheduler's SIGTERM: the run finishes a step, checkpoints, exits 143; a resumed run goes on from there, each
    step logged once. (That a resumed run continues the uninterrupted loss curve: test_resume_continues_the_same_loss_
    curve.)"""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", *TINY, "--num-iterations", "400", "--eval-every",
                             "-1", "--model-tag", "sig"], env=cli_env(base), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_lines(base / "base_checkpoints" / "sig" / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out[-2000:], err[-2000:])
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert 5 <= stopped < 400 and "Traceback" not in err
    assert f"resume with --resume-from-step {stopped}" in out
    assert (base / "base_checkpoints" / "sig" / f"step_{stopped:06d}_meta.json").exists()
    run([*TINY, "--num-iterations", stopped + 2, "--eval-every", "-1", "--model-tag", "sig", "--resume-from-step",
         stopped], base)
    assert sorted(step_losses(metrics(base, "sig"))) == list(range(1, stopped + 3))


def test_sigterm_to_torchrun_saves_every_ranks_shard(base):
    """torchrun forwards SIGTERM to its workers: both ranks agree on the step, both optimizer shards are saved."""
    import signal
    env = cli_env(base, OMP_NUM_THREADS="1")
    args = [*TINY, "--device-batch-size", "2", "--num-iterations", "500", "--eval-every", "-1", "--model-tag", "sig2"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "train.pretrain", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    ckpt = base / "base_checkpoints" / "sig2"
    wait_for_lines(ckpt / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # torchrun itself ends with exit 1 and its own SignalException once it has forwarded the signal and its
    # workers are done; the workers must have stopped cleanly: no traceback of ours
    assert proc.returncode == 1 and "SignalException" in err, (proc.returncode, err[-3000:])
    assert err.count("Traceback (most recent call last)") == 1 and "train/pretrain.py" not in err, err[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    meta = json.loads((ckpt / f"step_{stopped:06d}_meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["dataloader"]) == 2
    assert written_by(ckpt, stopped) == {0, 1}


def test_resume_latest_starts_fresh_then_continues_from_the_last_checkpoint(base):
    """What a requeued job runs every time: the same command with --resume-from-step latest."""
    cmd = [*TINY, "--num-iterations", "8", "--save-every", "3", "--eval-every", "-1", "--model-tag", "latest",
           "--resume-from-step", "latest"]
    first = run(cmd, base)
    assert "no checkpoint yet" in first.stdout
    ckpts = base / "base_checkpoints" / "latest"
    for step in (6, 8):  # as if the first run had been stopped after step 3's checkpoint
        for f in ckpts.glob(f"step_{step:06d}_*"):
            f.unlink()
    again = run(cmd, base)
    assert "--resume-from-step latest: step 3" in again.stdout and "from step 3" in again.stdout
    assert (ckpts / "step_000008_meta.json").exists()
    bad = run([*TINY, "--resume-from-step", "newest"], base, check=False)
    assert bad.returncode == 2 and "latest" in bad.stderr.strip().splitlines()[-1]


def test_keep_last_prunes_old_checkpoints(base):
    run([*TINY, "--num-iterations", "8", "--save-every", "2", "--keep-last", "2", "--eval-every", "-1",
         "--model-tag", "keep"], base)
    from train import checkpoint
    assert checkpoint.saved_steps(base / "base_checkpoints" / "keep") == [6, 8]
    bad = run([*TINY, "--keep-last", "0"], base, check=False)
    assert bad.returncode == 2 and "--keep-last" in bad.stderr.strip().splitlines()[-1]


def test_a_failed_save_is_one_line_naming_the_last_good_checkpoint(base):
    """A save that cannot be written (disk full, quota; here a full disk at step 4) stops the run with one line."""
    full = ("import torch.distributed.checkpoint as dcp\nreal = dcp.FileSystemWriter.write_data\n"
            "def write_data(self, plan, planner):\n"
            "    if 'step_000004' in str(self.path):\n"
            "        raise OSError(28, 'No space left on device')\n"
            "    return real(self, plan, planner)\n"
            "dcp.FileSystemWriter.write_data = write_data")
    proc = run_patched(full, [*TINY, "--num-iterations", "6", "--save-every", "2", "--eval-every", "-1",
                              "--model-tag", "blocked"], base)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and "the last good checkpoint is step 2" in last, last
    assert checkpoint.saved_steps(base / "base_checkpoints" / "blocked") == [2]
    assert not (base / "base_checkpoints" / "blocked" / "step_000004").exists()
    (base / "base_checkpoints" / "file-not-dir").write_text("")  # a file where the run's folder goes
    proc = run([*TINY, "--num-iterations", "2", "--model-tag", "file-not-dir"], base, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot create" in proc.stderr.strip().splitlines()[-1]
    proc = run([*TINY, "--num-iterations", "2", "--model-tag", "file-not-dir/x"], base, check=False)
    assert proc.returncode == 2 and "bad --model-tag" in proc.stderr.strip().splitlines()[-1]
