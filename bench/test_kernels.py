"""A pytest-benchmark case per op x shape x pass x implementation, from the same registry as bench.ab.

Each case first checks the implementation against the high-precision reference (a wrong kernel fails here,
whatever its speed), then times it. The pytest-benchmark timer is the host's, so every call ends with a
device synchronisation and inputs rotate past L2; on CUDA, do_bench's median (CUDA events) and the
throughputs derived from it go into extra_info as well.
"""
import pytest
import torch

from bench import ops, timing
from bench.conftest import DEVICE, SMALL, rounds_for, synced

CASES = [(op, shape, mode, impl) for op in ops.OPS.values() for shape, mode, impl in ops.cases(op, SMALL)]


def case_id(case) -> str:
    op, shape, mode, impl = case
    return f"{op.name}-{shape.id}-{mode}-{impl}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_kernel(benchmark, case):
    op, shape, mode, impl = case
    row = ops.measure(op, shape, mode, impl, DEVICE, timed=DEVICE == "cuda")
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    assert row["status"] == "ok", row["reason"]
    assert row["ok"], f"relative error {row['rel_error']:.2e} above {row['tol']:.0e}: the kernel is wrong here"

    backward = mode == "fwd+bwd"
    dtype = ops.default_dtype(DEVICE)
    seeds = iter(range(1, 10 ** 6))
    make = lambda: op.make_inputs(shape, dtype, DEVICE, backward, seed=next(seeds))  # noqa: E731
    call = timing.rotation(synced(lambda *a: op.run(impl, a, backward)), make,
                           timing.l2_bytes() if DEVICE == "cuda" else 0)
    benchmark.pedantic(call, rounds=rounds_for(call), warmup_rounds=1)

    info = {k: row.get(k) for k in ("label", "dtype", "rel_error", "peak_mem_mb", "flops", "bytes")}
    if row.get("ms") is not None:  # CUDA: do_bench (events, L2 flushed) is the number to quote
        info |= {"do_bench_ms": row["ms"], "tflops": row["tflops"], "pct_h100_peak": row["pct_h100_peak"],
                 "pct_device_peak": row["pct_device_peak"], "gbps": row["gbps"], "copies": row["copies"]}
    elif benchmark.stats is not None:
        ms = benchmark.stats.stats.median * 1e3
        info |= {"tflops": {k: f / ms / 1e9 for k, f in row["flops"].items()}, "gbps": row["bytes"] / ms / 1e6}
    benchmark.extra_info.update(info)
    if DEVICE == "cuda":
        del call
        torch.cuda.empty_cache()
