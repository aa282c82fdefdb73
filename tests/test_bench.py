"""The benchmark harness itself (bench/), fast on a CPU: timing helpers, the op registry and its references,
the bench.ab and bench.mfu CLIs at tiny sizes."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import ab, mfu, ops, timing
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


def test_ab_selects_the_impls_asked_for():
    def impls(*argv):
        (op, op_cases), = ab.select(ab.build_parser().parse_args([*argv, "--device", "cpu"]))
        return list(dict.fromkeys(impl for _, _, impl in op_cases))
    assert impls("attention") == list(ops.OPS["attention"].impls)
    assert impls("attention", "--impl", "sdpa,triton") == ["sdpa", "triton"]


@pytest.mark.parametrize("args", [["nosuchop"], ["attention", "--shape", "8x2048"], ["attention", "--impl", "nope"],
                                  ["all", "--shape", "1x2x3"], ["attention", "--rep", "0"],
                                  ["attention", "--device", "tpu"], ["cross_entropy", "--impl", "sdpa"],
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
              "--steps", "1", "--warmup", "0", "--json", str(out), "--compare", "newton_schulz",
              "--activation-checkpointing", "on"])
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["default", "torch newton_schulz"]
    assert all(r["checkpoint_blocks"] and r["status"] == "ok" for r in results)  # forced on, as train.pretrain's flag


@pytest.mark.parametrize("args", [["--depth", "0"], ["--fp8", "--device", "cpu", "--depth", "1"],
                                  ["--window-pattern", "SXL"], ["--steps", "-1"], ["--device", "tpu"],
                                  ["--compare", "newton"], ["--device-batch-size", "0"], ["--seq-len", "0"]])
def test_mfu_bad_input_is_one_line_and_exit_2(args, capsys):
    exits_2_with_one_line(mfu.main, args, capsys)


@pytest.mark.slow
def test_mfu_as_a_command():
    res = run_cli("bench.mfu", "--depth", "0")
    assert res.returncode == 2 and res.stderr.strip() == "error: --depth must be at least 1, got 0"
