"""Where a training step's time goes: torch.profiler over a few steps, each kernel's time put in one category.

Used by `python -m bench.mfu --profile FILE.json` (after the timed steps, so compilation and autotuning are done).
A kernel's category comes first from the op that launched it (anything under Optimizer.step is the optimizer,
under our attention or cross-entropy op that op, the op's own matmuls included), then from its name (cuBLAS
matmuls, inductor's fused elementwise and norm kernels, copies, communication). On CUDA, idle is the steps' wall
time minus the kernels' time (one stream: the kernels do not overlap); on the CPU the units are the ops' own CPU
time.
"""
import re
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType

OPTIMIZER = "Newton-Schulz / optimizer"
# (category, pattern on the name of the launching op or any op above it), first match wins
BY_CALLER = (
    (OPTIMIZER, r"^Optimizer\.step"),
    ("cross-entropy", r"nanochat::linear_ce|cross_entropy"),
    ("attention backward", r"nanochat::attention_backward|_attention_backward|flash.*backward|flex.*backward"),
    ("attention forward", r"nanochat::attention_forward|scaled_dot_product|_flash_attention|flex_attention"),
)
# (category, pattern on the kernel's own name), first match wins
BY_NAME = (
    (OPTIMIZER, r"_symmetric_kernel|_update_kernel|polar_express"),
    ("attention backward", r"_attn_bwd|flash_bwd|fmha.*bwd"),
    ("attention forward", r"_attn_fwd|flash_fwd|fmha"),
    ("cross-entropy", r"_softcap_ce|cross_entropy|nll_loss|log_softmax"),
    ("communication", r"nccl|all_reduce|allreduce|all_gather|reduce_scatter"),
    ("copies", r"[Mm]emcpy|[Mm]emset|^aten::copy_|direct_copy|CatArrayBatchedCopy"),
    ("matmuls (cuBLAS)", r"gemm|xmma|cutlass|nvjet|cublas|^aten::(mm|addmm|bmm|baddbmm|matmul)$"),
    ("elementwise and norms (inductor-fused)", r"^triton_|^aten::|elementwise|reduce"),
)
OTHER, IDLE = "other", "idle (no kernel running)"
CATEGORIES = tuple(dict.fromkeys([c for c, _ in BY_CALLER + BY_NAME] + [OTHER, IDLE]))


def category(name: str, callers: list[str]) -> str:
    """The category of a kernel (or CPU op) called name, launched under the ops callers (innermost first)."""
    for cat, pattern in BY_CALLER:
        if any(re.search(pattern, c) for c in callers):
            return cat
    for cat, pattern in BY_NAME:
        if re.search(pattern, name):
            return cat
    return OTHER


def _callers(event) -> list[str]:
    out = []
    while event is not None:
        out.append(event.name)
        event = event.cpu_parent
    return out


def units(events, on_cuda: bool):
    """(name, callers, microseconds) of every kernel (CUDA) or of every CPU op's own time (CPU)."""
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if on_cuda:
            for k in e.kernels:
                yield k.name, _callers(e), k.duration
        elif e.self_cpu_time_total > 0:
            yield e.name, _callers(e), e.self_cpu_time_total


def summarize(unit_list, wall_us: float, steps: int, on_cuda: bool, top: int = 15) -> dict:
    """The categories' ms per step and share of the step, and the top kernels by time."""
    by_cat, by_name = defaultdict(float), {}
    for name, callers, us in unit_list:
        cat = category(name, callers)
        by_cat[cat] += us
        entry = by_name.setdefault(name, {"name": name, "category": cat, "us": 0.0, "calls": 0})
        entry["us"] += us
        entry["calls"] += 1
    busy = sum(by_cat.values())
    total = max(wall_us, busy) if on_cuda else busy
    if on_cuda:
        by_cat[IDLE] = total - busy
    rows = [{"category": c, "ms_per_step": by_cat[c] / steps / 1e3, "share": by_cat[c] / total if total else 0.0}
            for c in CATEGORIES if c in by_cat]
    kernels = sorted(by_name.values(), key=lambda k: -k["us"])[:top]
    top_rows = [{"name": k["name"], "category": k["category"], "ms_per_step": k["us"] / steps / 1e3,
                 "calls_per_step": k["calls"] / steps, "share": k["us"] / total if total else 0.0} for k in kernels]
    return {"steps": steps, "step_ms": wall_us / steps / 1e3, "busy_ms_per_step": busy / steps / 1e3,
            "units": "CUDA kernels" if on_cuda else "CPU ops (self time)",
            "categories": sorted(rows, key=lambda r: -r["ms_per_step"]), "top_kernels": top_rows}


def profile_steps(step, device: torch.device, steps: int = 3) -> dict:
    """Profile `steps` calls of step() (already warmed up) and summarize them."""
    on_cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        if on_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    return summarize(list(units(prof.events(), on_cuda)), wall_us, steps, on_cuda)


def table(doc: dict) -> str:
    lines = [f"step {doc['step_ms']:.1f} ms over {doc['steps']} profiled steps ({doc['units']})",
             f"{'category':<38} {'ms/step':>9} {'share':>7}"]
    lines += [f"{r['category']:<38} {r['ms_per_step']:>9.2f} {100 * r['share']:>6.1f}%" for r in doc["categories"]]
    lines += ["", f"top {len(doc['top_kernels'])} kernels", f"{'ms/step':>9} {'share':>7} {'calls':>6}  name"]
    lines += [f"{k['ms_per_step']:>9.2f} {100 * k['share']:>6.1f}% {k['calls_per_step']:>6.0f}  "
              f"{k['name'][:90]}  [{k['category']}]" for k in doc["top_kernels"]]
    return "\n".join(lines)
