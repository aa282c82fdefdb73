"""GPU memory: an estimate of a plan's peak per device in either data-parallel mode (replicated or FSDP2), the
fewest GPUs each mode needs, the advice on a device batch that fits, and the choices made from it: relu² recomputed
in the backward (--recompute-mlp) and FSDP2 (--fsdp auto).

The activation bytes come from AOTAutograd's partitioner on the real compiled step
(`python -m bench.activations`); how the estimate compares with measured peaks is in docs/gpu.md.
"""
import functools
import math
from dataclasses import replace

import torch

from train.scaling import Plan

HEADROOM = 0.9  # a plan "fits" when its estimate is at most this fraction of the GPU's memory
MODES = ("replicated", "fsdp")
# the GPU assumed where none is detected (a dry run on a CPU): an H100 80GB, 85.0e9 bytes as torch reports it
DEFAULT_GPU_GIB = 85.0e9 / 2**30
DEFAULT_GPU = "H100 80GB"
MAX_GPUS = 1024  # fewest_gpus looks at 1, 2, 4, ... up to this many


# Bytes the compiled training step keeps for the backward, per token, per layer, per model_dim channel, with
# relu² recomputed (True) or kept (False): `python -m bench.activations --depth 20 [--no-recompute-mlp]`.
ACTIVATION_BYTES_PER_CHANNEL = {True: 25.1, False: 33.1}
RECOMPUTE_SAVES = 1 - ACTIVATION_BYTES_PER_CHANNEL[True] / ACTIVATION_BYTES_PER_CHANNEL[False]  # of a layer's: 24%
# once per model: the embedding output, the first layer's input, the loss's input, and backout's kept residual
ACTIVATION_BYTES_PER_CHANNEL_ONCE = 12.0


@functools.lru_cache(maxsize=16)
def _layout(config_items: tuple) -> tuple:
    """(AdamW parameters' shapes, Muon groups as (count, rows, cols), the largest block's parameters, the root's
    parameters: everything outside the blocks) of the model, built on the meta device; groups as make_optimizer's."""
    from model.config import GPTConfig
    from model.gpt import GPT
    with torch.device("meta"):
        model = GPT(GPTConfig(**dict(config_items)))
    groups = model.param_groups()
    adamw = tuple(tuple(p.shape) for name, ps in groups.items() if name != "matrices" for p in ps)
    shapes = [tuple(p.shape) for p in groups["matrices"]]
    muon = tuple((shapes.count(s), *s) for s in sorted(set(shapes)))
    block = max(sum(p.numel() for p in b.parameters()) for b in model.transformer.h)
    return adamw, muon, block, sum(math.prod(s) for s in adamw)


def _activations(plan: Plan, recompute_mlp: bool, bytes_per_channel: float | None) -> float:
    cfg = plan.config
    per_layer = ACTIVATION_BYTES_PER_CHANNEL[recompute_mlp] if bytes_per_channel is None else bytes_per_channel
    return plan.device_batch_size * plan.max_seq_len * cfg.n_embd * (cfg.n_layer * per_layer +
                                                                     ACTIVATION_BYTES_PER_CHANNEL_ONCE)


def memory_parts(plan: Plan, mode: str = "replicated", recompute_mlp: bool = True, world_size: int | None = None,
                 bytes_per_channel: float | None = None) -> dict:
    """An ESTIMATE of one rank's peak GPU memory in GiB, by part, in data-parallel mode `mode` over world_size ranks
    (the plan's by default); the rank counted is the one that holds most (rank 0: the first rows, Muon matrices).

    replicated (DistMuonAdamW): fp32 weights and grads whole on every rank, bf16 copies of the matrices and lm_head
      under autocast; optimizer state: Muon's momentum (and factored second moment) for the ceil(k / world) matrices
      a rank owns per shape, AdamW's 2 fp32 moments by rows for tensors of >= SHARD_MIN_NUMEL elements whose rows
      split evenly, whole on every rank otherwise (train.optim._adamw_rows).
    fsdp (FSDP2 + FSDPMuonAdamW): weights, grads and AdamW moments cut by rows (ceil(rows / world), torch.chunk's);
      the Muon state as above; gathered while the forward and backward run: 3 blocks' bf16 weights (the one running,
      the one prefetched, the last block kept gathered) and one block's unsharded fp32 gradients at its
      reduce-scatter, the root's (embeddings, lm_head, scalars) fp32 weights and gradients unsharded through the
      backward, and lm_head's bf16 copy under autocast.
    activations: one micro-batch's (bytes_per_channel: per layer, instead of the table above); the same in both
      modes (every rank runs its whole micro-batch through every layer).
    scratch: the optimizer step's buffers (after the backward has freed the activations, so the peak is the larger
      of the two): replicated, every Muon shape's gradients padded to chunk x world and reduce-scattered at once;
      fsdp, the Muon owner's whole matrices (about 4 k / world + 9 chunk matrices in fp32 for its largest shape).
    total: weights + grads + optimizer + max(activations + gathered, scratch)."""
    from train.optim import SHARD_MIN_NUMEL
    world = plan.world_size if world_size is None else world_size
    adamw, muon, block, root = _layout(tuple(sorted(plan.config.to_dict().items())))
    numel = math.prod
    muon_numel = sum(k * r * c for k, r, c in muon)
    total = muon_numel + sum(numel(s) for s in adamw)
    lm_head = plan.params["lm_head"]
    muon_state = sum(4 * -(-k // world) * (r * c + (r if r >= c else c)) for k, r, c in muon)
    if mode == "replicated":
        weights, grads = 4 * total + 2 * (muon_numel + lm_head), 4 * total
        evenly = [s for s in adamw if numel(s) >= SHARD_MIN_NUMEL and s[0] % world == 0]
        optimizer = 8 * sum(numel(s) for s in adamw) - 8 * sum(numel(s) for s in evenly) * (1 - 1 / world)
        gathered = 0
        scratch = sum(4 * r * c * -(-k // world) * (world + 2) for k, r, c in muon)
    elif mode == "fsdp":
        def rows(s):
            return -(-s[0] // world) * numel(s[1:])
        weights = grads = 4 * (sum(k * rows((r, c)) for k, r, c in muon) + sum(rows(s) for s in adamw))
        optimizer = 8 * sum(rows(s) for s in adamw)
        gathered = (3 * 2 + 4) * block + (4 + 4) * root + 2 * lm_head
        scratch = max((4 * (4 * k * rows((r, c)) + 9 * -(-k // world) * r * c) for k, r, c in muon), default=0)
    else:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    activations = _activations(plan, recompute_mlp, bytes_per_channel)
    parts = dict(weights=weights, grads=grads, optimizer=optimizer + muon_state, gathered=gathered,
                 activations=activations, scratch=scratch)
    parts = {k: v / 2**30 for k, v in parts.items()}
    parts["total"] = (parts["weights"] + parts["grads"] + parts["optimizer"]
                      + max(parts["activations"] + parts["gathered"], parts["scratch"]))
    return parts


def estimate_memory_gib(plan: Plan, recompute_mlp: bool = True, bytes_per_channel: float | None = None,
                        mode: str = "replicated", world_size: int | None = None) -> float:
    """memory_parts()'s total: one rank's estimated peak in GiB."""
    return memory_parts(plan, mode, recompute_mlp, world_size, bytes_per_channel)["total"]


def fewest_gpus(plan: Plan, total_gib: float, mode: str = "replicated", recompute_mlp: bool = True,
                headroom: float = HEADROOM) -> int | None:
    """The fewest GPUs of total_gib each (1, 2, 4, ... up to MAX_GPUS) on which mode's estimate fits at the plan's
    device batch; None if none does (the activations alone may not: a smaller device batch then). The total batch
    must still split over them (train.scaling.make_plan says so)."""
    world = 1
    while world <= MAX_GPUS:
        if estimate_memory_gib(plan, recompute_mlp, mode=mode, world_size=world) <= headroom * total_gib:
            return world
        world *= 2
    return None


def largest_fitting_batch(plan: Plan, total_gib: float, recompute_mlp: bool = True,
                          headroom: float = HEADROOM, mode: str = "replicated") -> int | None:
    """The largest device batch, halving from the plan's, whose estimate fits in headroom x total_gib and that
    still divides the total batch (the same optimization, more accumulation); None if not even 1 fits."""
    batch = plan.device_batch_size
    while batch >= 1:
        divides = plan.total_batch_size % (batch * plan.max_seq_len * plan.world_size) == 0
        need = estimate_memory_gib(replace(plan, device_batch_size=batch), recompute_mlp, mode=mode)
        if divides and need <= headroom * total_gib:
            return batch
        batch //= 2
    return None


def gpu_memory_gib(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def choose_recompute_mlp(flag: bool | None, plan: Plan, device: torch.device, mode: str = "replicated") -> bool:
    """The flag when given; else on for a GPU whose memory (times HEADROOM) the plan would not fit otherwise."""
    if flag is not None or device.type != "cuda":
        return bool(flag)  # no GPU: no device memory to exceed
    return recompute_for(None, plan, gpu_memory_gib(device), mode)


def recompute_for(flag: bool | None, plan: Plan, total_gib: float, mode: str) -> bool:
    """choose_recompute_mlp's rule for a GPU of total_gib (dry runs: no device to ask)."""
    if flag is not None:
        return flag
    return estimate_memory_gib(plan, recompute_mlp=False, mode=mode) > HEADROOM * total_gib


def fsdp_auto(replicated_gib: float, fsdp_gib: float, gpu_gib: float | None, world_size: int,
              headroom: float = HEADROOM) -> tuple[bool, str | None]:
    """--fsdp auto from the two modes' estimates per rank (each after its relu² recompute choice): (FSDP2 on?, the
    line that says why, or None). On only where it is needed and helps: more than one rank, a GPU (gpu_gib None:
    a CPU, no device memory to exceed), the replicated plan over headroom x gpu_gib and the FSDP2 plan within it."""
    if gpu_gib is None or world_size < 2 or replicated_gib <= headroom * gpu_gib or fsdp_gib > headroom * gpu_gib:
        return False, None
    return True, (f"--fsdp auto: FSDP2, since the replicated plan needs about {replicated_gib:.1f} GiB per GPU, more "
                  f"than {headroom:.0%} of its {gpu_gib:.0f} GiB, and FSDP2 about {fsdp_gib:.1f} GiB (estimates)")


def choose_fsdp(mode_flag: str, recompute_flag: bool | None, plan: Plan,
                device: torch.device) -> tuple[bool, str | None]:
    """--fsdp on/off as given; auto: fsdp_auto on this device's memory (a GPU's), after each mode's recompute
    choice."""
    if mode_flag != "auto":
        return mode_flag == "on", None
    if device.type != "cuda":
        return False, None
    gpu = gpu_memory_gib(device)
    need = needed_gib(plan, gpu, recompute_flag)
    return fsdp_auto(need["replicated"], need["fsdp"], gpu, plan.world_size)


def needed_gib(plan: Plan, gpu_gib: float, recompute_flag: bool | None = None) -> dict[str, float]:
    """Each mode's estimate per rank after its relu² recompute choice (recompute_for) on a GPU of gpu_gib."""
    return {mode: estimate_memory_gib(plan, recompute_for(recompute_flag, plan, gpu_gib, mode), mode=mode)
            for mode in MODES}


def plan_memory(plan: Plan, gpu_gib: float | None = None, gpu: str | None = None) -> dict:
    """What --dry-run prints and puts in its JSON line: per mode, relu² kept and recomputed, one rank's estimate at
    the plan's world size and the fewest GPUs of gpu_gib (default: this machine's first GPU, else DEFAULT_GPU) that
    fit it at the plan's device batch; per mode the largest device batch that fits at this world size (relu²
    recomputed); and what --fsdp auto would pick at this world size."""
    if gpu_gib is None:
        if torch.cuda.is_available():
            gpu_gib, gpu = gpu_memory_gib(torch.device("cuda", 0)), torch.cuda.get_device_name(0)
        else:
            gpu_gib, gpu = DEFAULT_GPU_GIB, f"{DEFAULT_GPU} (assumed: no GPU here)"
    out = {"gpu": gpu or "given", "gpu_gib": round(gpu_gib, 2), "headroom": HEADROOM, "world_size": plan.world_size,
           "device_batch_size": plan.device_batch_size}
    for mode in MODES:
        out[mode] = {("recomputed" if rc else "kept"): {
            "gib": estimate_memory_gib(plan, rc, mode=mode),  # unrounded: the printed table rounds once
            "fewest_gpus": fewest_gpus(plan, gpu_gib, mode, rc)} for rc in (False, True)}
        out[mode]["largest_device_batch"] = largest_fitting_batch(plan, gpu_gib, recompute_mlp=True, mode=mode)
    need = needed_gib(plan, gpu_gib)
    out["fsdp_auto"] = fsdp_auto(need["replicated"], need["fsdp"], gpu_gib, plan.world_size)[0]
    return out


def memory_advice(plan: Plan, device: torch.device, recompute: bool, ran_out: bool = False,
                  mode: str = "replicated") -> str:
    """How the plan's estimate compares with the GPU, and the device batch (and mode) that should fit (a smaller
    batch than the plan's when it already ran out of memory: the estimate was too low then)."""
    total, need = gpu_memory_gib(device), estimate_memory_gib(plan, recompute, mode=mode)
    start = replace(plan, device_batch_size=plan.device_batch_size // 2) if ran_out else plan

    def fit(m):
        return largest_fitting_batch(start, total, recompute_mlp=True, mode=m) if start.device_batch_size >= 1 \
            else None
    here = fit(mode)
    other = fit("fsdp") if mode == "replicated" and plan.world_size > 1 else None
    if other and (here is None or other > here):
        advice = (f"--fsdp on with --device-batch-size {other} should fit (weights, gradients and optimizer state "
                  "sharded over the ranks)")
    elif here:
        advice = f"--device-batch-size {here} should fit (the same total batch, with more accumulation)"
    else:
        advice = "no device batch size fits: use more GPUs or a smaller --depth"
    return f"the plan needs about {need:.0f} GiB per GPU (an estimate) and the GPU has {total:.0f} GiB; {advice}"
