"""GPU memory: an estimate of a plan's peak per device in either data-parallel mode (replicated or FSDP2), the
fewest GPUs each mode needs, the advice on a device batch that fits, and the choices made from it: relu² recomputed
in the backward (--recompute-mlp), each block checkpointed (--activation-checkpointing) and FSDP2 (--fsdp auto).

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
# A checkpointed layer (GPT.checkpoint_blocks) keeps only its input, the fp32 residual stream; its backward runs it
# again and holds that one layer's activations (the table above) meanwhile:
# `python -m bench.activations --depth 20 --checkpoint-blocks`.
CHECKPOINTED_BYTES_PER_CHANNEL = 4.0
CHECKPOINTING = ("auto", "on", "off")  # --activation-checkpointing
# the dry run's columns: (name, relu² recomputed, blocks checkpointed)
SETTINGS = (("kept", False, False), ("recomputed", True, False), ("checkpointed", True, True))


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


def _activations(plan: Plan, recompute_mlp: bool, bytes_per_channel: float | None, checkpoint_blocks: bool) -> float:
    cfg = plan.config
    per_layer = ACTIVATION_BYTES_PER_CHANNEL[recompute_mlp] if bytes_per_channel is None else bytes_per_channel
    # checkpointed: every layer's input, plus one layer's activations while its backward runs it again
    layers = cfg.n_layer * CHECKPOINTED_BYTES_PER_CHANNEL + per_layer if checkpoint_blocks else cfg.n_layer * per_layer
    return plan.device_batch_size * plan.max_seq_len * cfg.n_embd * (layers + ACTIVATION_BYTES_PER_CHANNEL_ONCE)


def memory_parts(plan: Plan, mode: str = "replicated", recompute_mlp: bool = True, world_size: int | None = None,
                 bytes_per_channel: float | None = None, checkpoint_blocks: bool = False) -> dict:
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
      modes (every rank runs its whole micro-batch through every layer); checkpoint_blocks: each layer's input, and
      one layer's activations while its backward runs it again.
    scratch: the optimizer step's buffers (after the backward has freed the activations, so the peak is the larger
      of the two): replicated, every Muon shape's gradients padded to chunk x world and reduce-scattered at once;
      fsdp, the Muon owner's whole matrices (about 4 k / world + 9 chunk matrices in fp32 for its largest shape).
    total: weights + grads + optimizer + max(activations + gathered, scratch)."""
    from train.fsdp import ranks_per_copy
    from train.optim import SHARD_MIN_NUMEL
    world = plan.world_size if world_size is None else world_size
    if mode == "fsdp":  # on several nodes a copy of the model is sharded over a node's ranks (HSDP)
        world = ranks_per_copy(world)
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
    activations = _activations(plan, recompute_mlp, bytes_per_channel, checkpoint_blocks)
    parts = dict(weights=weights, grads=grads, optimizer=optimizer + muon_state, gathered=gathered,
                 activations=activations, scratch=scratch)
    parts = {k: v / 2**30 for k, v in parts.items()}
    parts["total"] = (parts["weights"] + parts["grads"] + parts["optimizer"]
                      + max(parts["activations"] + parts["gathered"], parts["scratch"]))
    return parts


def estimate_memory_gib(plan: Plan, recompute_mlp: bool = True, bytes_per_channel: float | None = None,
                        mode: str = "replicated", world_size: int | None = None,
                        checkpoint_blocks: bool = False) -> float:
    """memory_parts()'s total: one rank's estimated peak in GiB."""
    return memory_parts(plan, mode, recompute_mlp, world_size, bytes_per_channel, checkpoint_blocks)["total"]


def fewest_gpus(plan: Plan, total_gib: float, mode: str = "replicated", recompute_mlp: bool = True,
                headroom: float = HEADROOM, checkpoint_blocks: bool = False) -> int | None:
    """The fewest GPUs of total_gib each (1, 2, 4, ... up to MAX_GPUS) on which mode's estimate fits at the plan's
    device batch; None if none does (the activations alone may not: a smaller device batch then). The total batch
    must still split over them (train.scaling.make_plan says so)."""
    world = 1
    while world <= MAX_GPUS:
        need = estimate_memory_gib(plan, recompute_mlp, mode=mode, world_size=world,
                                   checkpoint_blocks=checkpoint_blocks)
        if need <= headroom * total_gib:
            return world
        world *= 2
    return None


def largest_fitting_batch(plan: Plan, total_gib: float, recompute_mlp: bool = True, headroom: float = HEADROOM,
                          mode: str = "replicated", checkpoint_blocks: bool = False) -> int | None:
    """The largest device batch, halving from the plan's, whose estimate fits in headroom x total_gib and that
    still divides the total batch (the same optimization, more accumulation); None if not even 1 fits."""
    batch = plan.device_batch_size
    while batch >= 1:
        divides = plan.total_batch_size % (batch * plan.max_seq_len * plan.world_size) == 0
        need = estimate_memory_gib(replace(plan, device_batch_size=batch), recompute_mlp, mode=mode,
                                   checkpoint_blocks=checkpoint_blocks)
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


def choose_checkpointing(flag: str, plan: Plan, device: torch.device, mode: str, recompute_mlp: bool) -> bool:
    """--activation-checkpointing on/off as given; auto: checkpointing_auto on a GPU's memory (no GPU: off)."""
    if flag != "auto" or device.type != "cuda":
        return flag == "on"
    return checkpoint_for(flag, plan, gpu_memory_gib(device), mode, recompute_mlp)


def checkpointing_note(plan: Plan, device: torch.device, mode: str, recompute_mlp: bool) -> str:
    """Why --activation-checkpointing auto turned it on, and the faster way that fits without it."""
    total = gpu_memory_gib(device)
    need = estimate_memory_gib(plan, recompute_mlp, mode=mode)
    batch = largest_fitting_batch(plan, total, recompute_mlp=True, mode=mode)
    faster = (f"; --activation-checkpointing off --device-batch-size {batch} should fit without running each block "
              "twice (the same total batch, more accumulation)" if batch else "")
    return (f"--activation-checkpointing auto: on, since the plan needs about {need:.1f} GiB per GPU without it, more "
            f"than {HEADROOM:.0%} of the GPU's {total:.0f} GiB (estimates){faster}")


def checkpoint_for(flag: str, plan: Plan, total_gib: float, mode: str, recompute_mlp: bool) -> bool:
    """choose_checkpointing's rule for a GPU of total_gib (dry runs: no device to ask), relu² as chosen."""
    if flag != "auto":
        return flag == "on"
    plain, checkpointed = (estimate_memory_gib(plan, recompute_mlp, mode=mode, checkpoint_blocks=on)
                           for on in (False, True))
    return checkpointing_auto(plain, checkpointed, total_gib)


def checkpointing_auto(plain_gib: float, checkpointed_gib: float, gpu_gib: float | None,
                       headroom: float = HEADROOM) -> bool:
    """--activation-checkpointing auto from one rank's estimates without and with it: on only where it is needed and
    helps (it runs every block's forward twice): a GPU (gpu_gib None: a CPU), the plan over headroom x gpu_gib
    without it, and less memory with it (not so with one layer, whose recompute then is the whole model)."""
    return gpu_gib is not None and plain_gib > headroom * gpu_gib and checkpointed_gib < plain_gib


def memory_choices(plan: Plan, gpu_gib: float, mode: str, recompute_flag: bool | None = None,
                   checkpoint_flag: str = "auto") -> tuple[bool, bool]:
    """(relu² recomputed, blocks checkpointed) in mode on a GPU of gpu_gib: the flags, else their rules, relu² first
    (the cheaper), then checkpointing where even that does not fit."""
    recompute = recompute_for(recompute_flag, plan, gpu_gib, mode)
    return recompute, checkpoint_for(checkpoint_flag, plan, gpu_gib, mode, recompute)


def fsdp_auto(replicated_gib: float, fsdp_gib: float, gpu_gib: float | None, world_size: int,
              headroom: float = HEADROOM, checkpointed: bool = False) -> tuple[bool, str | None]:
    """--fsdp auto from the two modes' estimates per rank (each after its memory_choices; checkpointed: with blocks
    checkpointed): (FSDP2 on?, the line that says why, or None). On only where it is needed and helps: more than one
    rank, a GPU (gpu_gib None: a CPU, no device memory to exceed), the replicated plan over headroom x gpu_gib and
    the FSDP2 plan within it."""
    if gpu_gib is None or world_size < 2 or replicated_gib <= headroom * gpu_gib or fsdp_gib > headroom * gpu_gib:
        return False, None
    return True, (f"--fsdp auto: FSDP2, since the replicated plan needs about {replicated_gib:.1f} GiB per GPU, more "
                  f"than {headroom:.0%} of its {gpu_gib:.0f} GiB, and FSDP2 about {fsdp_gib:.1f} GiB "
                  f"({'each with blocks checkpointed; ' if checkpointed else ''}estimates)")


def choose_fsdp(mode_flag: str, recompute_flag: bool | None, plan: Plan, device: torch.device,
                checkpoint_flag: str = "auto") -> tuple[bool, str | None]:
    """--fsdp on/off as given; auto: fsdp_auto on this device's memory (a GPU's), after each mode's relu² and
    checkpointing choices."""
    if mode_flag != "auto":
        return mode_flag == "on", None
    if device.type != "cuda":
        return False, None
    return fsdp_for(plan, gpu_memory_gib(device), recompute_flag, checkpoint_flag)


def fsdp_for(plan: Plan, gpu_gib: float, recompute_flag: bool | None = None,
             checkpoint_flag: str = "auto") -> tuple[bool, str | None]:
    """choose_fsdp's rule for a GPU of gpu_gib: the cheapest that fits of replicated, FSDP2 (it communicates more),
    replicated with blocks checkpointed, FSDP2 with them (every block's forward runs twice: the most costly); where
    none does, replicated. Checkpointing as the flag says when it is on or off."""
    levels = ("off", "auto") if checkpoint_flag == "auto" else (checkpoint_flag,)
    for checkpoint in levels:
        need = needed_gib(plan, gpu_gib, recompute_flag, checkpoint)
        on, why = fsdp_auto(need["replicated"], need["fsdp"], gpu_gib, plan.world_size,
                            checkpointed=checkpoint != "off")
        if on or need["replicated"] <= HEADROOM * gpu_gib:
            break
    return on, why


def needed_gib(plan: Plan, gpu_gib: float, recompute_flag: bool | None = None,
               checkpoint_flag: str = "auto") -> dict[str, float]:
    """Each mode's estimate per rank after its relu² and checkpointing choices (memory_choices) on a GPU of
    gpu_gib."""
    need = {}
    for mode in MODES:
        recompute, checkpoint = memory_choices(plan, gpu_gib, mode, recompute_flag, checkpoint_flag)
        need[mode] = estimate_memory_gib(plan, recompute, mode=mode, checkpoint_blocks=checkpoint)
    return need


def plan_memory(plan: Plan, gpu_gib: float | None = None, gpu: str | None = None) -> dict:
    """What --dry-run prints and puts in its JSON line: per mode, relu² kept, relu² recomputed, and blocks checkpointed
    (relu² recomputed too), one rank's estimate at the plan's world size and the fewest GPUs of gpu_gib (default: this
    machine's first GPU, else DEFAULT_GPU) that fit it at the plan's device batch; per mode the largest device batch
    that fits at this world size (relu² recomputed; and blocks checkpointed too); and what --fsdp auto and
    --activation-checkpointing auto would pick at this world size."""
    if gpu_gib is None:
        if torch.cuda.is_available():
            gpu_gib, gpu = gpu_memory_gib(torch.device("cuda", 0)), torch.cuda.get_device_name(0)
        else:
            gpu_gib, gpu = DEFAULT_GPU_GIB, f"{DEFAULT_GPU} (assumed: no GPU here)"
    out = {"gpu": gpu or "given", "gpu_gib": round(gpu_gib, 2), "headroom": HEADROOM, "world_size": plan.world_size,
           "device_batch_size": plan.device_batch_size}
    for mode in MODES:
        out[mode] = {how: {
            "gib": estimate_memory_gib(plan, rc, mode=mode, checkpoint_blocks=ck),  # unrounded: the table rounds once
            "fewest_gpus": fewest_gpus(plan, gpu_gib, mode, rc, checkpoint_blocks=ck)} for how, rc, ck in SETTINGS}
        for key, ck in (("largest_device_batch", False), ("largest_device_batch_checkpointed", True)):
            out[mode][key] = largest_fitting_batch(plan, gpu_gib, recompute_mlp=True, mode=mode, checkpoint_blocks=ck)
    out["fsdp_auto"] = fsdp_for(plan, gpu_gib)[0]
    chosen = "fsdp" if out["fsdp_auto"] else "replicated"
    out["activation_checkpointing_auto"] = memory_choices(plan, gpu_gib, chosen)[1]
    return out


def memory_advice(plan: Plan, device: torch.device, recompute: bool, ran_out: bool = False,
                  mode: str = "replicated", checkpoint_blocks: bool = False) -> str:
    """How the plan's estimate compares with the GPU, and what should fit, the cheapest first: a smaller device batch
    in this mode; FSDP2 where it fits a larger one; checkpointing where nothing fits without it. A smaller batch than
    the plan's when it already ran out of memory (the estimate was too low then)."""
    total = gpu_memory_gib(device)
    need = estimate_memory_gib(plan, recompute, mode=mode, checkpoint_blocks=checkpoint_blocks)
    start = replace(plan, device_batch_size=plan.device_batch_size // 2) if ran_out else plan

    def fit(m, ck):
        return largest_fitting_batch(start, total, recompute_mlp=True, mode=m, checkpoint_blocks=ck) \
            if start.device_batch_size >= 1 else None
    modes = [mode] + (["fsdp"] if mode == "replicated" and plan.world_size > 1 else [])
    for checkpoint in [True] if checkpoint_blocks else [False, True]:  # checkpointing where nothing fits without
        fits = {m: fit(m, checkpoint) for m in modes}
        best = max(modes, key=lambda m: fits[m] or 0)  # on a tie the first: this mode
        if fits[best]:
            break
    if not fits[best]:
        advice = "no device batch size fits: use more GPUs or a smaller --depth"
    else:
        switches, why = [], []
        if best != mode:
            switches.append("--fsdp on")
            why.append("weights, gradients and optimizer state sharded over the ranks")
        if checkpoint and not checkpoint_blocks:
            switches.append("--activation-checkpointing on")
            why.append("each block run again in the backward")
        flags = f"{' and '.join(switches)} with " if switches else ""
        why = why or ["the same total batch, with more accumulation"]
        advice = f"{flags}--device-batch-size {fits[best]} should fit ({'; '.join(why)})"
    return f"the plan needs about {need:.0f} GiB per GPU (an estimate) and the GPU has {total:.0f} GiB; {advice}"
