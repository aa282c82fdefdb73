"""pytest-benchmark cases: `pytest bench --benchmark-only`.

On CUDA everything runs at the spec's shapes; on a CPU the torch paths run at tiny shapes and the rest is
skipped with its reason. BENCH_SHAPES=small runs the tiny shapes on CUDA too (a quick check).
Tests marked cuda are skipped without one (the root conftest.py).
"""
import os
import time

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL = not HAS_CUDA or os.environ.get("BENCH_SHAPES", "") == "small"


def synced(fn, device=DEVICE):
    """fn followed by a device synchronisation, so a host timer sees the work finish, not just its launch."""
    def call(*args):
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return call


def rounds_for(fn, budget_s: float = 0.3, lo: int = 3, hi: int = 100) -> int:
    """How many pytest-benchmark rounds fit in about budget_s, from one timed call."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(lo, min(hi, int(budget_s / max(dt, 1e-6))))
