"""End-to-end training steps (forward, backward, MuonAdamW) on random tokens: tok/s and MFU in extra_info.

CUDA: d12 and d20 at 32 x 2048 tokens per step, compiled, bf16 autocast. CPU: a tiny model (depth 2,
64 tokens x 2 sequences, vocabulary 4096), so the step still gets measured on every machine.
"""
import math

import pytest

from bench import mfu
from bench.conftest import DEVICE, HAS_CUDA, rounds_for, synced


def bench_steps(benchmark, depth, batch, seq_len, compile, warmup, **kw):
    try:
        trainer = mfu.build_trainer(depth, DEVICE, batch, seq_len, compile=compile, **kw)
    except ImportError as e:
        pytest.skip(f"the training stack is not importable: {e}")
    try:
        for _ in range(warmup):  # compilation and autotuning happen here, not in the timed rounds
            trainer.step()
        step = synced(trainer.step)
        loss = benchmark.pedantic(step, rounds=rounds_for(step, budget_s=3.0, lo=3, hi=20), warmup_rounds=1)
        assert math.isfinite(loss.item()), "the loss is not finite: timing a broken step means nothing"
        info = {"depth": depth, "batch": batch, "seq_len": seq_len, "compile": compile}
        if benchmark.stats is not None:
            info |= mfu.speed(trainer, benchmark.stats.stats.median)
        benchmark.extra_info.update(info)
    finally:
        del trainer
        mfu.free(DEVICE)


@pytest.mark.cuda
@pytest.mark.parametrize("depth", [12, 20])
def test_train_step(benchmark, depth):
    bench_steps(benchmark, depth, batch=32, seq_len=2048, compile=True, warmup=3)


def test_train_step_tiny(benchmark):
    if HAS_CUDA:
        pytest.skip("on CUDA the d12 and d20 steps are measured instead")
    bench_steps(benchmark, 2, batch=2, seq_len=64, compile=False, warmup=1, vocab_size=4096)
