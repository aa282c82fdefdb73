"""bench/gpu_check.sh and what it stands on: the CPU smoke run and its check.json, steps under a deadline, the
commit in a results file, the profile's categories, and the tuned-config table (lookup, fallback, key format)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton

from bench import check, step_profile, timing, triton_shim, tune
from kernels import attention as attention_kernel
from kernels import newton_schulz as ns_kernel
from kernels import tuned
from tests.helpers import REPO


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_key(tmp_path):
    pytest.importorskip("torchao", reason="the FP8 step needs torchao (pip install -e .[fp8])")
    results, out = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, RESULTS=str(results), OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((results / "check.json").read_text())
    assert set(check.KEYS) <= set(doc), set(check.KEYS) - set(doc)
    assert doc["mode"] == "cpu" and doc["env"]["git_commit"] == timing.git_commit()
    assert [s["step"] for s in doc["steps"]] == ["env", "d20", "fp8", "ab_newton_schulz", "ab_cross_entropy",
                                                 "ab_attention", "fp8_rowwise", "ab_variants_attention",
                                                 "ab_variants_newton_schulz"]
    assert all(s["status"] == "ok" for s in doc["steps"]), doc["steps"]
    d20 = doc["d20_step"]
    assert d20["ours"]["status"] == d20["torch_only"]["status"] == "ok" and d20["speedup"] > 0
    assert d20["ours"]["loss"] == pytest.approx(d20["torch_only"]["loss"], rel=1e-3)  # same seed, same batches
    shares = [c["share"] for c in doc["profile"]["categories"]]
    assert sum(shares) == pytest.approx(1.0) and len(doc["profile"]["top_kernels"]) == 15
    assert doc["fp8"]["tensorwise"]["status"] == "ok" and doc["fp8"]["speedup_tensorwise"] > 0
    assert set(doc["kernels_ab"]) == set(check.AB_OPS)
    assert doc["bf16_correctness"]["all_ok"] and doc["bf16_correctness"]["rows"]
    assert "## Profile of our step" in (results / "check.md").read_text()
    # copied to $OUT after the steps: the last check.json, rebuilt after the last step
    assert (out / "results" / "results" / "check.json").read_text() == (results / "check.json").read_text()


def _steps(tmp_path, script: str) -> list[dict]:
    body = f"set -u; cd {REPO}; dir={tmp_path}; PY={sys.executable}; source bench/steps.sh; {script}"
    subprocess.run(["bash", "-c", body], check=True, capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]


def test_steps_past_their_limit_or_the_deadline_are_marked(tmp_path):
    rows = _steps(tmp_path, "deadline=$(( $(date +%s) + 100 )); step quick 20 true; step slow 11 sleep 60; "
                            "step broken 20 false; deadline=$(date +%s); step late 20 true")
    assert [(r["step"], r["status"].split(" (")[0]) for r in rows] == [
        ("quick", "ok"), ("slow", "timed out"), ("broken", "failed or wrong results"), ("late", "not run")]


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
    monkeypatch.setitem(tuned.AUTOTUNED, "fake", autotuned)
    cuda = torch.device("cuda")
    tuned.launch("fake", plain, lambda meta: (1280 // meta["BLOCK"],), (1, 2), {"POLY": True}, key, cuda)
    assert plain.calls == [((20,), (1, 2), {"POLY": True, "BLOCK": 64, "num_warps": 4, "num_stages": 3})]
    assert autotuned.calls == []
    tuned.launch("fake", plain, lambda meta: (1,), (1, 2), {}, key | {"m": 768}, cuda)  # a key not in the table
    with tuned.autotuning_only():  # bench.tune: tables ignored
        tuned.launch("fake", plain, lambda meta: (1,), (1, 2), {}, key, cuda)
    assert len(autotuned.calls) == 2 and len(plain.calls) == 1
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

    def record(name, kernel, grid, args, kwargs, key, device):
        seen[name] = key  # and nothing runs

    monkeypatch.setattr(tuned, "launch", record)
    monkeypatch.setattr(attention_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(ns_kernel, "interpreting", lambda: False)
    q, k, v = (torch.randn(1, 64, 2, 16, dtype=torch.float16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, 2, 64)
    for call in (lambda: attention_kernel._forward_into(q, k, v, 32, 0.25, out, lse),
                 lambda: attention_kernel._backward_into(q, q, k, v, out, lse, 32, 0.25, q, k, v),
                 lambda: attention_kernel._backward_into(q, q, k, v, out, lse, 32, 0.25, q, k, v, "triton_fused_bwd"),
                 lambda: attention_kernel._forward_into(q, k, v, 32, 0.25, out, lse, "triton_tma"),
                 lambda: attention_kernel._backward_into(q, q, k, v, out, lse, 32, 0.25, q, k, v, "triton_tma"),
                 lambda: attention_kernel._backward_into(q, q, k, v, out, lse, 32, 0.25, q, k, v, "triton_dq_delta"),
                 lambda: ns_kernel._gram(torch.randn(2, 32, 48, dtype=torch.float16), torch.empty(2, 32, 32,
                                         dtype=torch.float16), "tf32", False),
                 lambda: ns_kernel._update(torch.randn(2, 32, 32, dtype=torch.float16),
                                           torch.randn(2, 32, 48, dtype=torch.float16),
                                           torch.empty(2, 32, 48, dtype=torch.float16), 1.0, "tf32", False, True),
                 lambda: ns_kernel._gram(torch.randn(2, 32, 48, dtype=torch.float16), torch.empty(2, 32, 32,
                                         dtype=torch.float16), "tf32", False, fused=True),
                 lambda: ns_kernel._update(torch.randn(2, 32, 32, dtype=torch.float16),
                                           torch.randn(2, 32, 48, dtype=torch.float16),
                                           torch.empty(2, 32, 48, dtype=torch.float16), 1.0, "tf32", False, True,
                                           fused=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    assert set(seen) == set(tuned.AUTOTUNED)  # every autotuned kernel launched once at least
    for name, key in seen.items():
        assert list(key) == list(tuned.AUTOTUNED[name].keys) + ["dtype"], name
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
