"""GPU memory: an estimate of a plan's peak per device, the advice on a device batch that fits, and the
choice to recompute relu² in the backward.

The activation bytes come from AOTAutograd's partitioner on the real compiled step
(`python -m bench.activations`); how the estimate compares with measured peaks is in the README.
"""
from dataclasses import replace

import torch

from train.scaling import Plan

HEADROOM = 0.9  # a plan "fits" when its estimate is at most this fraction of the GPU's memory


# Bytes the compiled training step keeps for the backward, per token, per layer, per model_dim channel, with
# relu² recomputed (True) or kept (False): `python -m bench.activations --depth 20 [--no-recompute-mlp]`.
ACTIVATION_BYTES_PER_CHANNEL = {True: 25.1, False: 33.1}
RECOMPUTE_SAVES = 1 - ACTIVATION_BYTES_PER_CHANNEL[True] / ACTIVATION_BYTES_PER_CHANNEL[False]  # of a layer's: 24%
# once per model: the embedding output, the first layer's input, the loss's input, and backout's kept residual
ACTIVATION_BYTES_PER_CHANNEL_ONCE = 12.0


def estimate_memory_gib(plan: Plan, recompute_mlp: bool = True, bytes_per_channel: float | None = None) -> float:
    """An ESTIMATE of peak GPU memory per device in GiB: fp32 weights and grads, their bf16 copies under
    autocast, optimizer state (AdamW: 2 fp32 moments; Muon: fp32 momentum; sharded over ranks) and one
    micro-batch of activations (bytes_per_channel: per layer, instead of the table above)."""
    p = plan.params
    adam_params = p["wte"] + p["value_embeds"] + p["lm_head"] + p["scalars"]
    muon_params = p["transformer_matrices"]
    weights_and_grads = 2 * 4 * p["total"] + 2 * (muon_params + p["lm_head"])
    optimizer = (2 * 4 * adam_params + 4 * muon_params) / plan.world_size
    cfg = plan.config
    tokens = plan.device_batch_size * plan.max_seq_len
    per_layer = ACTIVATION_BYTES_PER_CHANNEL[recompute_mlp] if bytes_per_channel is None else bytes_per_channel
    per_token = cfg.n_embd * (cfg.n_layer * per_layer + ACTIVATION_BYTES_PER_CHANNEL_ONCE)
    return (weights_and_grads + optimizer + tokens * per_token) / 2**30


def largest_fitting_batch(plan: Plan, total_gib: float, recompute_mlp: bool = True,
                          headroom: float = HEADROOM) -> int | None:
    """The largest device batch, halving from the plan's, whose estimate fits in headroom x total_gib and that
    still divides the total batch (the same optimization, more accumulation); None if not even 1 fits."""
    batch = plan.device_batch_size
    while batch >= 1:
        divides = plan.total_batch_size % (batch * plan.max_seq_len * plan.world_size) == 0
        need = estimate_memory_gib(replace(plan, device_batch_size=batch), recompute_mlp)
        if divides and need <= headroom * total_gib:
            return batch
        batch //= 2
    return None


def gpu_memory_gib(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def choose_recompute_mlp(flag: bool | None, plan: Plan, device: torch.device) -> bool:
    """The flag when given; else on for a GPU whose memory (times HEADROOM) the plan would not fit otherwise."""
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    return estimate_memory_gib(plan, recompute_mlp=False) > HEADROOM * gpu_memory_gib(device)


def memory_advice(plan: Plan, device: torch.device, recompute: bool, ran_out: bool = False) -> str:
    """How the plan's estimate compares with the GPU, and the device batch that should fit (a smaller one than
    the plan's when it already ran out of memory: the estimate was too low then)."""
    total, need = gpu_memory_gib(device), estimate_memory_gib(plan, recompute)
    start = replace(plan, device_batch_size=plan.device_batch_size // 2) if ran_out else plan
    fit = largest_fitting_batch(start, total, recompute_mlp=True) if start.device_batch_size >= 1 else None
    advice = (f"--device-batch-size {fit} should fit (the same total batch, with more accumulation)" if fit
              else "no device batch size fits: use more GPUs or a smaller --depth")
    return f"the plan needs about {need:.0f} GiB per GPU (an estimate) and the GPU has {total:.0f} GiB; {advice}"
