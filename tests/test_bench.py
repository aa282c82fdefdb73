"""The benchmark harness itself (bench/), fast on a CPU: timing helpers, the op registry and its references,
the bench.ab and bench.mfu CLIs at tiny sizes, and the report from sample JSON."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import ab, mfu, ops, report, timing
from kernels import attention as attention_kernel
from kernels import dispatch
from train.errors import UserError, run_cli as run_main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def exits_2_with_one_line(main, args, capsys) -> str:
    """Run a CLI's main in-process as `python -m` would; it must exit 2 with one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------
# timing

def test_copies_exceed_twice_l2():
    l2 = 50 * 2**20
    for set_bytes in (1, 1000, 3 * 2**20, 30 * 2**20, 60 * 2**20, 200 * 2**20):
        n = timing.copies_needed(set_bytes, l2, max_copies=10**9)
        assert n * set_bytes > 2 * l2
        assert n == 1 or (n - 1) * set_bytes <= 2 * l2  # no more copies than needed
    assert timing.copies_needed(1, l2) == timing.MAX_COPIES  # tiny inputs are capped
    assert timing.copies_needed(0, l2) == 1


def test_rotation_cycles_through_every_input_set():
    seen = []
    made = iter(range(100))
    rot = timing.rotation(lambda t: seen.append(int(t)), lambda: (torch.tensor(next(made)),), l2=20)
    # each set holds 8 bytes: 2 x 20 / 8 -> 6 sets
    assert len(rot.input_sets) == 6
    for _ in range(13):
        rot()
    assert seen == [0, 1, 2, 3, 4, 5] * 2 + [0]


def test_tensor_bytes_counts_nested_tensors():
    x = torch.zeros(10, dtype=torch.bfloat16)
    assert timing.tensor_bytes((x, [torch.zeros(3)], {"a": torch.zeros(2, dtype=torch.int64)}, 5)) == 20 + 12 + 16


def test_bench_cpu_measures_the_call():
    res = timing.bench_cpu(lambda: time.sleep(0.004), min_reps=3, max_reps=5, budget_s=0.0)
    assert 3.5 <= res["ms"] < 100
    assert res["p20"] <= res["ms"] <= res["p80"]
    calls = []
    timing.bench_cpu(lambda a, b: calls.append((a, b)), lambda: (1, 2), warmup=1, min_reps=4, max_reps=4)
    assert calls == [(1, 2)] * 5


def test_peak_memory_is_none_off_cuda():
    assert timing.peak_memory(lambda: torch.zeros(10), "cpu") is None


def test_device_info_records_the_machine():
    info = timing.device_info("cpu")
    for key in ("date", "git_commit", "torch", "triton", "device", "driver"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert info["git_commit"] is None or len(info["git_commit"].split("+")[0]) == 40


# ----------------------------------------------------------------------------------------------
# the op registry: shapes, FLOPs, references

@pytest.mark.parametrize("op", list(ops.OPS.values()), ids=list(ops.OPS))
def test_every_shape_id_parses_back(op):
    for shape in op.gpu_shapes() + op.cpu_shapes():
        assert op.parse_shape(shape.id).dims == shape.dims


def test_spec_shapes_are_all_there():
    ns, ce, at = ops.OPS["newton_schulz"], ops.OPS["cross_entropy"], ops.OPS["attention"]
    assert len(ns.gpu_shapes()) == 10 and ns.gpu_shapes()[-1].dims == ops.NS_MODELS[20]
    assert {s.dims for s in ce.gpu_shapes()} == {(N, H, 32768) for N in (8192, 65536) for H in (768, 1280, 1664)}
    assert {s.dims for s in at.gpu_shapes()} == {(B, 2048, H, H, 128, w) for B in (8, 32) for H in (6, 10, 13)
                                                for w in (1024, -1)}
    assert ns.parse_shape("d20-all").dims == ops.NS_MODELS[20]


@pytest.mark.parametrize("op,text", [("newton_schulz", "48x768"), ("newton_schulz", "0x3x3"),
                                     ("newton_schulz", "d13-all"),
                                     ("cross_entropy", "8192x768"), ("cross_entropy", "axbxc"),
                                     ("attention", "8x2048x6x128:w"), ("attention", "8x2048x6x128x4"),
                                     ("attention", "8x2048x6"), ("attention", "8x2048x6x128:half")])
def test_bad_shapes_are_user_errors(op, text):
    with pytest.raises(UserError):
        ops.OPS[op].parse_shape(text)


def test_visible_pairs_match_a_brute_force_count():
    for T in (1, 2, 7, 64, 129):
        for w in (-1, 0, 1, 5, T - 2, T - 1, T, 3 * T):
            i = torch.arange(T)
            lag = i[:, None] - i[None, :]
            brute = int(((lag >= 0) & ((lag <= w) if w >= 0 else True)).sum())
            assert attention_kernel.visible_pairs(T, w) == brute, (T, w)


def test_flop_counts():
    ns, ce, at = ops.OPS["newton_schulz"], ops.OPS["cross_entropy"], ops.OPS["attention"]
    f = ns.flops(ns.parse_shape("2x768x3072+1x3072x768"), False)
    per = 5 * (4 * 768**2 * 3072 + 2 * 768**3)
    assert f["dense"] == 3 * per
    assert f["dense"] / f["symmetric"] == pytest.approx(1.385, abs=1e-3)  # the spec's ceiling for 768 x 3072
    sq = ns.flops(ns.parse_shape("1x1280x1280"), False)
    assert sq["dense"] / sq["symmetric"] == pytest.approx(1.5)
    assert ce.flops(ce.parse_shape("8x4x16"), True) == {"matmul": 6 * 8 * 4 * 16}
    s = at.parse_shape("2x2048x6x128:full")
    assert at.flops(s, False)["causal"] == 4 * 128 * 2048 * 2049 // 2 * 2 * 6
    assert at.flops(s, True)["causal"] == pytest.approx(3.5 * at.flops(s, False)["causal"])


def test_bench_names_are_the_dispatchers():
    """The bench reads the one list of implementation names (kernels.dispatch.IMPLS): nothing of its own."""
    for op in ops.OPS.values():
        assert op.impls == dispatch.IMPLS[op.name] and set(op.cpu_impls) <= set(op.impls)
    names = {name for impls in dispatch.IMPLS.values() for name in impls}
    assert set(ops.NOT_ON_CPU) <= names
    assert all(impl in dispatch.IMPLS[op] for op, impl in mfu.TORCH_VERSIONS.items())


def test_ce_reference_chunked_equals_unchunked():
    op = ops.OPS["cross_entropy"]
    h, w, t = op.make_inputs(op.parse_shape("37x8x50"), torch.float64, "cpu", True, seed=3)
    t[5] = -1  # an ignored row
    z = 15 * torch.tanh((h @ w.t()) / 15)
    loss = F.cross_entropy(z, t, ignore_index=-1)
    dh, dw = torch.autograd.grad(loss, (h, w))
    for chunk_bytes in (1, 8 * 50 * 4 * 7, 2**30):  # one row, 7 rows, everything at once
        rl, rdh, rdw = ops.ce_reference(h, w, t, torch.float64, chunk_bytes=chunk_bytes)
        assert ops.rel_error(rl, loss) < 1e-12 and ops.rel_error(rdh, dh) < 1e-12 and ops.rel_error(rdw, dw) < 1e-12
    assert rdh[5].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("window,hkv", [(-1, 4), (0, 4), (5, 2), (200, 1)])
def test_attention_reference_matches_sdpa(window, hkv):
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 33, 4, 16
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, T, hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    ref = ops.attention_reference(q, k, v, window, torch.float64)
    i = torch.arange(T)
    mask = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= window) if window >= 0 else True)
    kk, vv = (x.repeat_interleave(H // hkv, dim=2).transpose(1, 2) for x in (k, v))
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask).transpose(1, 2)
    assert ops.rel_error(ref, sdpa) < 1e-12


def test_polar_express_reference_lands_in_the_band():
    G = torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for X in (ops.polar_express(G, torch.float64), ops.polar_express(G.mT, torch.float64).mT):
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.6 and s.max() < 1.25


def test_rel_error_never_passes_nan():
    assert ops.rel_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == float("inf")


def test_measure_checks_against_the_reference_and_flags_a_wrong_impl(monkeypatch):
    op = ops.OPS["cross_entropy"]
    shape = op.parse_shape("64x16x100")
    row = ops.measure(op, shape, "fwd+bwd", "torch", "cpu")
    assert row["status"] == "ok", row["reason"]
    assert row["ok"] and row["rel_error"] < 1e-6 and row["ms"] > 0
    assert row["tflops"]["matmul"] == pytest.approx(6 * 64 * 16 * 100 / row["ms"] / 1e9)
    assert row["pct_h100_peak"] == pytest.approx(100 * row["tflops"]["matmul"] * 1e12 / 989e12)

    real_run = op.run

    def off_by_a_bit(impl, inputs, backward):  # a "fast" kernel with a 1% bug in dW
        loss, dh, dw = real_run(impl, inputs, backward)
        return loss, dh, dw * 1.01

    monkeypatch.setattr(op, "run", off_by_a_bit)
    bad = ops.measure(op, shape, "fwd+bwd", "torch", "cpu", timed=False)
    assert bad["status"] == "ok" and not bad["ok"] and bad["rel_error"] > 5e-3


def test_measure_reports_a_crash_as_an_error_row(monkeypatch):
    op = ops.OPS["newton_schulz"]

    def boom(impl, inputs, backward):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(op, "run", boom)
    row = ops.measure(op, op.cpu_shapes()[0], "fwd", "torch", "cpu")
    assert row["status"] == "error" and row["reason"] == "RuntimeError: kernel exploded"


# ----------------------------------------------------------------------------------------------
# bench.ab

def test_ab_json_and_chart(tmp_path, capsys):
    out = tmp_path / "ab.json"
    ab.main(["cross_entropy", "--shape", "96x16x200", "--shape", "33x8x64", "--json", str(out),
             "--plot", str(tmp_path / "ce.png")])
    doc = json.loads(out.read_text())
    assert doc["kind"] == "ab" and doc["device"]["device"] == "cpu" and "git_commit" in doc["device"]
    rows = doc["results"]
    assert {r["impl"] for r in rows} == set(ops.OPS["cross_entropy"].impls)
    torch_rows = [r for r in rows if r["impl"] == "torch"]
    assert len(torch_rows) == 2 and all(r["status"] == "ok" and r["ok"] and r["ms"] > 0 for r in torch_rows)
    assert all(r["status"] == "skipped" and r["reason"] for r in rows if r["impl"] != "torch")
    assert (tmp_path / "ce.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "N96 H16 V200" in text and "skipped triton" in text


def test_ab_all_runs_every_op_on_cpu(tmp_path):
    out = tmp_path / "all.json"
    ab.main(["all", "--json", str(out), "--rep", "1"])
    rows = json.loads(out.read_text())["results"]
    assert {r["op"] for r in rows} == set(ops.OPS)
    assert not [r for r in rows if r["status"] == "error"]


def test_ab_variants_with_skipped_or_alone():
    """--variants: our selectable variants (dispatch.VARIANTS) with the rest, left out, or alone beside auto's."""
    from kernels.dispatch import OURS, VARIANTS

    def impls(*argv):
        (op, op_cases), = ab.select(ab.build_parser().parse_args([*argv, "--device", "cpu"]))
        return list(dict.fromkeys(impl for _, _, impl in op_cases))
    assert impls("attention") == list(ops.OPS["attention"].impls)
    assert impls("attention", "--variants", "skip") == [i for i in ops.OPS["attention"].impls
                                                        if i not in VARIANTS["attention"]]
    assert impls("attention", "--variants", "only") == [OURS["attention"], *VARIANTS["attention"]]
    assert impls("newton_schulz", "--variants", "only") == ["triton_full", "triton_fused"]
    assert impls("attention", "--impl", "sdpa,triton_tma,triton", "--variants", "skip") == ["sdpa", "triton"]


@pytest.mark.parametrize("args", [["nosuchop"], ["attention", "--shape", "8x2048"], ["attention", "--impl", "nope"],
                                  ["all", "--shape", "1x2x3"], ["attention", "--rep", "0"],
                                  ["attention", "--device", "tpu"], ["cross_entropy", "--variants", "only"],
                                  ["attention", "--bogus"]])
def test_ab_bad_input_is_one_line_and_exit_2(args, capsys):
    exits_2_with_one_line(ab.main, args, capsys)


@pytest.mark.slow
def test_ab_as_a_command():
    res = run_cli("bench.ab", "nosuchop")
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: unknown op 'nosuchop'; choose from newton_schulz, cross_entropy, attention or all"


# ----------------------------------------------------------------------------------------------
# bench.mfu

def test_mfu_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "mfu.json"
    mfu.main(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--vocab-size", "256",
              "--steps", "2", "--warmup", "1", "--json", str(out), "--compare"])
    doc = json.loads(out.read_text())
    assert doc["kind"] == "mfu" and doc["depth"] == 1
    names = [r["variant"] for r in doc["results"]]
    assert names == ["default", "torch (all)", "torch attention", "torch cross_entropy", "torch newton_schulz"]
    from train.scaling import make_plan
    fpt = make_plan(1, max_seq_len=32, vocab_size=256, device_batch_size=2, total_batch_size=64).flops_per_token
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["loss_finite"]
        assert r["flops_per_token"] == fpt
        assert r["tflops"] == pytest.approx(fpt * r["tokens_per_s"] / 1e12)
        assert r["mfu_h100"] == pytest.approx(100 * r["tflops"] * 1e12 / 989e12) and r["mfu_device"] is None
    assert "tok/s" in capsys.readouterr().out


def test_mfu_compare_one_op(tmp_path):
    out = tmp_path / "mfu.json"
    mfu.main(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--vocab-size", "256",
              "--steps", "1", "--warmup", "0", "--json", str(out), "--compare", "newton_schulz"])
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["default", "torch newton_schulz"]


@pytest.mark.parametrize("args", [["--depth", "0"], ["--fp8", "--device", "cpu", "--depth", "1"],
                                  ["--window-pattern", "SXL"], ["--steps", "-1"], ["--device", "tpu"],
                                  ["--compare", "newton"]])
def test_mfu_bad_input_is_one_line_and_exit_2(args, capsys):
    exits_2_with_one_line(mfu.main, args, capsys)


@pytest.mark.slow
def test_mfu_as_a_command():
    res = run_cli("bench.mfu", "--depth", "0")
    assert res.returncode == 2 and res.stderr.strip() == "error: --depth must be at least 1, got 0"


# ----------------------------------------------------------------------------------------------
# bench.report

def sample_results(folder: Path) -> None:
    info = {"device": "NVIDIA H100 80GB HBM3", "driver": "570.1", "cuda": "12.8", "torch": "2.11.0",
            "triton": "3.6.0", "date": "2026-01-01T00:00:00+00:00", "git_commit": "a" * 40}

    def row(impl, ms, label="B8 T2048 H6 D128 w1024", mode="fwd", ok=True, status="ok", reason=None):
        flops = 1e12
        return {"op": "attention", "shape": "x", "label": label, "mode": mode, "impl": impl, "dtype": "bfloat16",
                "status": status, "reason": reason, "ms": ms if status == "ok" else None, "flops": {"causal": flops},
                "tflops": {"causal": flops / ms / 1e9} if status == "ok" else None, "ok": ok, "rel_error": 1e-3,
                "tol": 1e-2}

    rows = [row("triton", 2.0), row("sdpa", 3.0), row("flex", 1.0, ok=False),
            row("fa3", None, status="skipped", reason="flash_attn_interface is not installed"),
            row("triton", 5.0, mode="fwd+bwd"), row("sdpa", 4.0, mode="fwd+bwd")]
    (folder / "ab_attention.json").write_text(json.dumps({"kind": "ab", "device": info, "args": {}, "results": rows}))
    mfu_rows = [{"variant": "default", "forced": {}, "status": "ok", "tokens_per_s": 400000.0, "tflops": 400.0,
                 "mfu_h100": 40.4, "mfu_device": 40.4},
                {"variant": "torch (all)", "forced": {"attention": "sdpa"}, "status": "ok", "tokens_per_s": 300000.0,
                 "tflops": 300.0, "mfu_h100": 30.3, "mfu_device": 30.3},
                {"variant": "torch attention", "forced": {"attention": "sdpa"}, "status": "error",
                 "reason": "out of memory"}]
    args = {"device_batch_size": 32, "seq_len": 2048, "compile": True, "device": "cuda"}
    (folder / "mfu_d20.json").write_text(json.dumps({"kind": "mfu", "device": info, "depth": 20, "args": args,
                                                      "flops_per_token": 1e9, "results": mfu_rows}))


def test_report_from_sample_json(tmp_path):
    sample_results(tmp_path)
    md = report.write_report([tmp_path], tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == md
    assert "NVIDIA H100 80GB HBM3" in md and "driver 570.1" in md and "aaaaaaaaaaaa" in md
    assert "**2 ms (500)**" in md          # the fastest correct impl, not the wrong one at 1 ms
    assert "1 ms (1,000) ! wrong" in md
    assert "**4 ms (250)**" in md           # fwd+bwd has its own row
    assert "fa3 skipped (1 case): flash_attn_interface is not installed" in md
    assert "400,000" in md and "40.4%" in md and "0.750x" in md and "out of memory" in md
    assert "batch 32x2048, compiled, bf16 autocast" in md
    for png in ("ab_attention.png", "mfu.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_report_cli_errors(tmp_path, capsys):
    assert "no bench.ab or bench.mfu results" in exits_2_with_one_line(report.main, [str(tmp_path)], capsys)
    assert "no such file" in exits_2_with_one_line(report.main, [str(tmp_path / "missing.json")], capsys)
    (tmp_path / "bad.json").write_text("{not json")
    assert "not a readable JSON" in exits_2_with_one_line(report.main, [str(tmp_path / "bad.json")], capsys)


def test_report_cli_writes_next_to_the_results(tmp_path, capsys):
    sample_results(tmp_path)
    report.main([str(tmp_path)])
    assert "| d20 | default |" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists() and (tmp_path / "ab_attention.png").exists()


@pytest.mark.slow
def test_gpu_scripts_parse_and_the_test_runner_reports(tmp_path):
    """The lent-GPU scripts must not fail on a typo in the one call a session gets: both parse, and the test
    runner runs a file, writes its summary and hands back one archive."""
    for script in ("bench/run_gpu.sh", "bench/run_gpu_tests.sh", "bench/gpu_check.sh", "bench/steps.sh"):
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script
    env = dict(os.environ, FILES="tests/test_scaling.py", TOTAL="120", OUT=str(tmp_path / "out"),
               RESULTS=str(tmp_path / "tests-run"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/run_gpu_tests.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test_scaling: passed" in (tmp_path / "out" / "summary.txt").read_text()
    assert (tmp_path / "out" / "tests-run.tar.gz").exists() and (tmp_path / "tests-run" / "test_scaling.xml").exists()


@pytest.mark.slow
def test_crop_report_on_the_tiny_corpus(tiny_base):
    """bench.crop: how much document text the packing crops, as one JSON line."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tiny_base), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.crop", "--dataset", "tiny", "--batches", "3", "--batch-size",
                           "2", "--seq-len", "64"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["used_tokens"] == 3 * 2 * 65 and out["document_tokens"] >= out["used_tokens"]
    assert 0 <= out["cropped_fraction"] < 1 and out["documents"] > 0
