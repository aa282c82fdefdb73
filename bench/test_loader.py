"""Loader throughput: tokens of (inputs, targets) batches per CPU-second, packing and tokenization included.

The data is the Python standard library as whole files (`python -m train.dataset build --whole-files`: most are
longer than a row, so the loader's counting of long documents is in the measure) and the tokenizer the default
one (vocab 32768, trained on it), both made once per session in a temporary base dir. Batches are the
pretraining default, 32 x 2048. The requirement: more than 300K tokens per CPU-second, so that one core of the
loader makes at least twice what an H100 consumes training d20 (100-150K tokens/s) and the loader never holds a
GPU back. CPU time (time.process_time: every thread of this process, the tokenizer's included) is what the
loader costs whatever else the machine runs; wall time, in pytest-benchmark's stats, depends on that.
"""
import time

import pytest

from bench.conftest import DEVICE, synced
from model.config import MAX_SEQ_LEN, VOCAB_SIZE
from train.scaling import DEVICE_BATCH_SIZE

REQUIRED_TOKENS_PER_CPU_S = 300_000
BATCH, SEQ_LEN = DEVICE_BATCH_SIZE, MAX_SEQ_LEN  # the pretraining defaults
BATCHES_PER_ROUND, ROUNDS = 8, 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("nanochat")))
        from train.dataset import build
        from train.tokenizer import train_tokenizer
        build(split_py=False)
        tok = train_tokenizer("pystdlib", vocab_size=VOCAB_SIZE)
        yield tok


@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "default-threads"])
def test_loader_tokens_per_cpu_second(benchmark, tokenizer, threads):
    """threads: tokenizer threads (None: one per core, up to 8)."""
    from train.dataloader import DataLoader

    loader = DataLoader(tokenizer, BATCH, SEQ_LEN, dataset="pystdlib", device=DEVICE, num_threads=threads)
    next(loader)  # the first fill of the document buffer

    def batches():
        for _ in range(BATCHES_PER_ROUND):  # several batches a round, so refills are counted at their real rate
            x, y = next(loader)
        return x

    cpu0 = time.process_time()
    x = benchmark.pedantic(synced(batches), rounds=ROUNDS, warmup_rounds=1)
    calls = ROUNDS + 1
    if benchmark.stats is None:  # --benchmark-disable ran it once, untimed: time some rounds here
        cpu0, calls = time.process_time(), 3
        for _ in range(calls):
            synced(batches)()
    tokens_per_cpu_s = calls * BATCHES_PER_ROUND * BATCH * SEQ_LEN / (time.process_time() - cpu0)
    assert x.shape == (BATCH, SEQ_LEN) and int(x[:, 0].eq(tokenizer.bos_id).all()) == 1
    benchmark.extra_info.update({"tokens_per_cpu_s": round(tokens_per_cpu_s), "batch": BATCH, "seq_len": SEQ_LEN,
                                 "vocab_size": tokenizer.vocab_size, "dataset": "pystdlib",
                                 "tokenizer_threads": loader.num_threads, "epoch": loader.epoch})
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = round(BATCHES_PER_ROUND * BATCH * SEQ_LEN / benchmark.stats.stats.mean)
    print(f"\nloader: {tokens_per_cpu_s / 1e3:.0f}K tokens per CPU-second ({BATCH} x {SEQ_LEN}, vocab "
          f"{tokenizer.vocab_size}, {loader.num_threads} tokenizer thread(s))")
    assert tokens_per_cpu_s > REQUIRED_TOKENS_PER_CPU_S, \
        f"{tokens_per_cpu_s:,.0f} tokens per CPU-second is below {REQUIRED_TOKENS_PER_CPU_S:,}"
