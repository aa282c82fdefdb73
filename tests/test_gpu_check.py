"""bench/gpu_check.sh and what it stands on: check.json and check.md from a results folder (a CPU run's, in
tests/data), the whole script on the CPU (marked long), steps under a deadline, the commit in a results file, the
profile's categories, and the tuned-config table (lookup, fallback, key format)."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton

from bench import check, step_profile, timing, triton_shim, tune
from kernels import attention as attention_kernel
from kernels import newton_schulz as ns_kernel
from kernels import dispatch, tuned
from tests.helpers import REPO


CPU_RESULTS = Path(__file__).parent / "data" / "gpu_check_cpu"  # `RESULTS=... bash bench/gpu_check.sh --cpu`


def check_cpu_results(doc: dict, folder: Path) -> None:
    """What check.json and check.md of a CPU run of the check hold."""
    assert set(check.KEYS) <= set(doc), set(check.KEYS) - set(doc)
    assert doc["mode"] == "cpu" and doc["env"]["device"] == "cpu"
    assert [s["step"] for s in doc["steps"]] == ["env", "d20", "fp8", "ab_newton_schulz", "ab_cross_entropy",
                                                 "ab_attention", "fp8_rowwise"]
    assert all(s["status"] == "ok" for s in doc["steps"]), doc["steps"]
    d20 = doc["d20_step"]
    assert d20["ours"]["status"] == d20["torch_only"]["status"] == "ok" and d20["speedup"] > 0
    assert d20["ours"]["loss"] == pytest.approx(d20["torch_only"]["loss"], rel=1e-3)  # same seed, same batches
    shares = [c["share"] for c in doc["profile"]["categories"]]
    assert sum(shares) == pytest.approx(1.0) and len(doc["profile"]["top_kernels"]) == 15
    assert doc["fp8"]["tensorwise"]["status"] == "ok" and doc["fp8"]["speedup_tensorwise"] > 0
    assert set(doc["kernels_ab"]) == set(dispatch.OPS)
    assert doc["bf16_correctness"]["all_ok"] and doc["bf16_correctness"]["rows"]
    md = (folder / "check.md").read_text()
    assert "## Profile of our step" in md and "### attention" in md and "| B1 T128 H2 D32 full | fwd+bwd |" in md


def test_check_assembles_every_key_of_a_results_folder(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(CPU_RESULTS, folder)
    check.main([str(folder), "--mode", "cpu"])
    check_cpu_results(json.loads((folder / "check.json").read_text()), folder)


def test_check_marks_the_fastest_correct_impl_and_the_wrong_ones():
    def row(impl, ms, shape="B8 T2048 H6 D128 w1024", mode="fwd", ok=True, status="ok", reason=None):
        return {"shape": shape, "mode": mode, "impl": impl, "status": status, "reason": reason, "ms": ms,
                "tflops": 1e3 / ms if ms else None, "ok": ok, "rel_error": 2e-3 if ok else 0.5}
    table = check.ab_table([row("triton", 2.0), row("sdpa", 3.0), row("flex", 1.0, ok=False),
                            row("fa3", None, status="skipped", reason="flash_attn_interface is not installed"),
                            row("triton", 5.0, mode="fwd+bwd"), row("sdpa", 4.0, mode="fwd+bwd"),
                            row("flex", None, mode="fwd+bwd", status="error", reason="out of memory")])
    assert "| B8 T2048 H6 D128 w1024 | fwd | **2 (500) 2e-03** | 3 (333) 2e-03 | 1 (1e+03) 5e-01 ! wrong | - |" \
        in table
    assert "| B8 T2048 H6 D128 w1024 | fwd+bwd | 5 (200) 2e-03 | **4 (250) 2e-03** | error | - |" in table
    assert "- fa3 skipped (1 case): flash_attn_interface is not installed" in table
    assert "- flex error (1 case): out of memory" in table


@pytest.mark.slow
@pytest.mark.long
def test_cpu_run_of_the_whole_script_writes_every_key(tmp_path):
    """The script itself, at tiny shapes on the CPU: every step, and $OUT holds the last check.json."""
    pytest.importorskip("torchao", reason="the FP8 step needs torchao (pip install -e .[fp8])")
    results, out = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, RESULTS=str(results), OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((results / "check.json").read_text())
    check_cpu_results(doc, results)
    assert doc["env"]["git_commit"] == timing.git_commit()
    # copied to $OUT after the steps: the last check.json, rebuilt after the last step
    assert (out / "results" / "results" / "check.json").read_text() == (results / "check.json").read_text()


def test_the_script_parses_and_refuses_an_unknown_part():
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=REPO).returncode == 0
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "everything"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument everything" in proc.stderr


def _steps(tmp_path, script: str) -> list[dict]:
    body = f"set -u; cd {REPO}; dir={tmp_path}; PY={sys.executable}; MODE=cpu; source bench/gpu_check.sh; {script}"
    subprocess.run(["bash", "-c", body], check=True, capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]


def test_steps_past_their_limit_or_the_deadline_are_marked(tmp_path):
    """And the tests part runs a test file as a step."""
    rows = _steps(tmp_path, "deadline=$(( $(date +%s) + 100 )); step quick 20 true; step slow 11 sleep 60; "
                            "step broken 20 false; TEST_FILES=tests/test_lint.py part_tests; "
                            "deadline=$(date +%s); step late 20 true")
    assert [(r["step"], r["status"].split(" (")[0]) for r in rows] == [
        ("quick", "ok"), ("slow", "timed out"), ("broken", "failed or wrong results"), ("test_lint", "ok"),
        ("late", "not run")]
    assert (tmp_path / "test_lint.xml").exists() and "test_lint: 1 passed" in (tmp_path / "summary.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_tests_part_fails_at_once_without_a_gpu(tmp_path):
    """On a GPU machine whose torch sees no GPU every cuda test would skip and pass: the part says so instead."""
    rows = _steps(tmp_path, "deadline=$(( $(date +%s) + 100 )); MODE=gpu; part_tests")
    assert [(r["step"], r["status"].split(":")[0]) for r in rows] == [("tests", "failed")]


def test_a_forced_stale_commit_never_reaches_a_results_file(monkeypatch):
    monkeypatch.setattr(timing, "_run", lambda cmd: None)  # a copy of the tree without .git
    monkeypatch.setenv("GIT_COMMIT", "0123abcd:" + "f" * 16)  # a stamp of some other tree
    assert timing.git_commit() is None and timing.device_info("cpu")["git_commit"] is None
    monkeypatch.setenv("GIT_COMMIT", f"0123abcd:{timing.source_hash()}")  # this very tree
    assert timing.git_commit() == "0123abcd"
    monkeypatch.setenv("GIT_COMMIT", "0123abcd")  # no source hash at all
    assert timing.git_commit() is None


def test_profile_categories():
    assert step_profile.category("sm90_xmma_gemm_bf16", ["aten::mm", "MmBackward0"]) == "matmuls (cuBLAS)"
    assert step_profile.category("sm90_xmma_gemm_bf16", ["aten::mm", "Optimizer.step#MuonAdamW.step"]) == \
        step_profile.OPTIMIZER
    assert step_profile.category("_symmetric_kernel", ["nanochat::polar_express"]) == step_profile.OPTIMIZER
    assert step_profile.category("_attn_bwd_dq", ["CompiledFunctionBackward"]) == "attention backward"
    assert step_profile.category("nvjet_tst_128x256", ["aten::mm", "nanochat::linear_ce_forward"]) == "cross-entropy"
    assert step_profile.category("flash_fwd_kernel", ["aten::_scaled_dot_product_flash_attention"]) == \
        "attention forward"
    assert step_profile.category("triton_poi_fused_add_mul_0", []) == "elementwise and norms (inductor-fused)"
    assert step_profile.category("ncclDevKernel_AllReduce_Sum_bf16", []) == "communication"
    assert step_profile.category("Memcpy DtoD (Device -> Device)", []) == "copies"
    doc = step_profile.summarize([("gemm", [], 40.0), ("triton_poi_x", [], 20.0)], wall_us=100.0, steps=2,
                                 on_cuda=True)
    shares = {r["category"]: r["share"] for r in doc["categories"]}
    assert shares == pytest.approx({"matmuls (cuBLAS)": 0.4, "elementwise and norms (inductor-fused)": 0.2,
                                    step_profile.IDLE: 0.4})
    assert doc["top_kernels"][0]["ms_per_step"] == pytest.approx(0.02)


# --- the tuned-config table


class FakeKernel:
    """Stands for a jit function or an autotuner: records kernel[grid](*args, **kwargs)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuned, "_device_name", lambda device: "NVIDIA H200")
    tuned._read.cache_clear()
    yield tmp_path
    tuned._read.cache_clear()


def _write(table_dir, kernels):
    (table_dir / "nvidia-h200.json").write_text(json.dumps({"device": "NVIDIA H200", "kernels": kernels}))


def test_a_tuned_key_launches_its_config_and_others_autotune(table_dir, monkeypatch):
    key = dict(m=1280, n=1280, dtype=torch.bfloat16)
    _write(table_dir, {"fake": {tuned.key_text(key): {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 3}}})
    plain, autotuned = FakeKernel(), FakeKernel()
    fake = tuned.Autotuned("fake", plain, autotuned)
    cuda = torch.device("cuda")
    tuned.launch(fake, lambda meta: (1280 // meta["BLOCK"],), (1, 2), {"POLY": True}, key, cuda)
    assert plain.calls == [((20,), (1, 2), {"POLY": True, "BLOCK": 64, "num_warps": 4, "num_stages": 3})]
    assert autotuned.calls == []
    tuned.launch(fake, lambda meta: (1,), (1, 2), {}, key | {"m": 768}, cuda)  # a key not in the table
    with tuned.autotuning_only():  # bench.tune: tables ignored
        tuned.launch(fake, lambda meta: (1,), (1, 2), {}, key, cuda)
    assert len(autotuned.calls) == 2 and len(plain.calls) == 1
    tuned.launch(fake, lambda meta: (meta["BLOCK"],), (1,), {}, key, cuda, fixed=tuned.config({"BLOCK": 16}))
    assert plain.calls[-1] == ((16,), (1,), {"BLOCK": 16, "num_warps": 4, "num_stages": 1})  # a fixed config wins
    assert tuned.lookup("fake", key, torch.device("cpu")) is None


def test_a_broken_table_is_warned_about_and_ignored(table_dir):
    (table_dir / "nvidia-h200.json").write_text('{"kernels": {"fake": {"k": {"kwargs": {}}}}}')  # no num_warps
    with pytest.warns(UserWarning, match="ignoring the tuned-config table"):
        assert tuned.lookup("fake", {"k": 1}, torch.device("cuda")) is None


def test_what_the_autotuner_chose_is_what_the_launch_looks_up(table_dir, tmp_path):
    """bench.tune writes the autotuners' cache entries; their keys must be the keys the kernels launch with."""
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in ((32, 4, 2), (64, 8, 3))]
    autotuner = triton.autotune(configs, key=["m", "n"])(ns_kernel._update_kernel)
    autotuner.cache[(1280, 5120, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16")] = configs[1]
    (key, cfg), = triton_shim.autotune_choices(autotuner)
    assert key == {"m": 1280, "n": 5120, "dtype": "bfloat16"}
    tune.write_table(table_dir / "nvidia-h200.json", "NVIDIA H200", {"newton_schulz.update": {tuned.key_text(key):
                                                                                             cfg}}, "abc")
    found = tuned.lookup("newton_schulz.update", dict(m=1280, n=5120, dtype=torch.bfloat16), torch.device("cuda"))
    assert found == {"kwargs": {"BLOCK": 64}, "num_warps": 8, "num_stages": 3}


def test_the_kernels_launch_with_their_autotuners_keys(monkeypatch):
    """Every launch of an autotuned kernel (GPU path) passes the key its autotuner tunes on, plus the dtype."""
    seen = {}

    def record(kernel, grid, args, kwargs, key, device, fixed=None):
        assert fixed is None  # the GPU path: the table or the autotuner
        seen[kernel.name] = key  # and nothing runs

    monkeypatch.setattr(tuned, "launch", record)
    monkeypatch.setattr(attention_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(ns_kernel, "interpreting", lambda: False)
    q, k, v = (torch.randn(1, 64, 2, 16, dtype=torch.float16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, 2, 64)
    for call in (lambda: attention_kernel._forward_into(q, k, v, 32, 0.25, out, lse),
                 lambda: attention_kernel._backward_into(q, q, k, v, out, lse, 32, 0.25, q, k, v),
                 lambda: ns_kernel._gram(torch.randn(2, 32, 48, dtype=torch.float16), torch.empty(2, 32, 32,
                                         dtype=torch.float16), "tf32", False),
                 lambda: ns_kernel._update(torch.randn(2, 32, 32, dtype=torch.float16),
                                           torch.randn(2, 32, 48, dtype=torch.float16),
                                           torch.empty(2, 32, 48, dtype=torch.float16), 1.0, "tf32", False, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    assert set(seen) == set(tuned.AUTOTUNED)  # every autotuned kernel launched once at least
    for name, key in seen.items():
        assert list(key) == list(tuned.AUTOTUNED[name].autotuner.keys) + ["dtype"], name
        assert key["dtype"] == torch.float16


def test_tune_needs_a_gpu_and_merges_a_table_anywhere(tmp_path, capsys):
    from train.errors import UserError
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            tune.main(["--depth", "20", "--out", str(tmp_path)])
    src = tmp_path / "from_gpu.json"
    src.write_text(json.dumps({"device": "NVIDIA H200", "git_commit": "abc", "kernels": {
        "attention.fwd": {"T=2048,window=1024,HEAD_DIM=128,dtype=bfloat16":
                          {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 3}}}}))
    tune.main(["--merge", str(src), "--out", str(tmp_path / "tables")])
    merged = json.loads((tmp_path / "tables" / "nvidia-h200.json").read_text())
    assert merged["kernels"] == json.loads(src.read_text())["kernels"]
