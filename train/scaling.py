"""The scaling laws: from --depth to model shape, tokens, batch, steps, LR and weight-decay scaling.

Everything is anchored at depth 12, where the hyperparameters were tuned:
  D     = ratio x scaling_params                       (target tokens, "Chinchilla-style" horizon)
  D_ref = ratio x scaling_params(d12, same vocab, seq len, aspect ratio, head dim);  B_ref = 2^19 tokens
  B     = 2^round(log2(B_ref x (D / D_ref)^0.383))     when --total-batch-size is -1 (Power Lines)
  every LR x sqrt(B / B_ref); AdamW LRs also x (model_dim / 768)^-0.5 (muP-style width scaling)
  Muon weight decay = wd x sqrt(B / B_ref) x D_ref / D (constant T_epoch)
Parameter counts and FLOPs come from the real model built on the meta device (no memory).
"""
import math
from dataclasses import dataclass, replace

import torch

from model.config import GPTConfig, config_from_depth
from train.errors import UserError

REF_DEPTH = 12
B_REF = 2 ** 19  # tokens per step at d12
BATCH_EXPONENT = 0.383  # B grows as D^0.383 (Power Lines, arXiv 2505.13738)


@dataclass
class Plan:
    config: GPTConfig
    model_dim: int
    n_head: int
    params: dict  # parameter counts by group (model.num_scaling_params())
    scaling_params: int
    total_params: int
    target_tokens: int
    total_batch_size: int
    num_iterations: int
    lr_scale: float
    adam_width_scale: float
    weight_decay: float
    flops_per_token: float
    grad_accum_steps: int
    device_batch_size: int
    max_seq_len: int
    world_size: int

    def to_json(self) -> dict:
        """The derived numbers printed as one JSON line by --dry-run."""
        keys = ("model_dim", "n_head", "scaling_params", "total_params", "target_tokens", "total_batch_size",
                "num_iterations", "lr_scale", "weight_decay", "flops_per_token", "grad_accum_steps")
        return {k: getattr(self, k) for k in keys}


def param_counts(config: GPTConfig) -> tuple[dict, float]:
    """(parameter counts by group, FLOPs per token) of the model, built on the meta device."""
    from model.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    return model.num_scaling_params(), model.estimate_flops()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def make_plan(depth: int, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
              vocab_size: int = 32768, window_pattern: str = "SSSL", device_batch_size: int = 32,
              total_batch_size: int = -1, num_iterations: int = -1, target_flops: float = -1,
              target_param_data_ratio: float = 10.5, weight_decay: float = 0.2, world_size: int = 1) -> Plan:
    """Turn the depth dial (and the user's overrides) into every derived training number."""
    _check(depth >= 1, f"--depth must be at least 1, got {depth}")
    _check(aspect_ratio >= 1, f"--aspect-ratio must be at least 1, got {aspect_ratio}")
    _check(head_dim >= 2 and head_dim % 2 == 0, f"--head-dim must be a positive even number, got {head_dim}")
    _check(max_seq_len >= 1, f"--max-seq-len must be at least 1, got {max_seq_len}")
    _check(vocab_size >= 1, f"the vocabulary size must be at least 1, got {vocab_size}")
    _check(len(window_pattern) > 0 and set(window_pattern) <= {"S", "L"},
           f"--window-pattern must use only the letters S and L, got {window_pattern!r}")
    _check(device_batch_size >= 1, f"--device-batch-size must be at least 1, got {device_batch_size}")
    _check(world_size >= 1, f"the world size must be at least 1, got {world_size}")
    _check(total_batch_size == -1 or total_batch_size >= 1,
           f"--total-batch-size must be -1 (automatic) or positive, got {total_batch_size}")
    _check(target_param_data_ratio > 0, f"--target-param-data-ratio must be positive, got {target_param_data_ratio}")
    _check(weight_decay >= 0, f"--weight-decay must not be negative, got {weight_decay}")

    config = config_from_depth(depth, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern)
    params, flops_per_token = param_counts(config)
    scaling_params = params["scaling_params"]
    ref_config = config_from_depth(REF_DEPTH, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern)
    d_ref = target_param_data_ratio * param_counts(ref_config)[0]["scaling_params"]
    target_tokens = int(target_param_data_ratio * scaling_params)

    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT))
    micro_tokens = device_batch_size * max_seq_len * world_size
    _check(total_batch_size % micro_tokens == 0,
           f"total batch size {total_batch_size:,} tokens is not a multiple of device_batch_size x max_seq_len x "
           f"world_size = {device_batch_size} x {max_seq_len} x {world_size} = {micro_tokens:,}")
    grad_accum_steps = total_batch_size // micro_tokens

    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
    else:
        steps = target_tokens // total_batch_size
    _check(steps >= 1, f"the plan has {steps} optimizer steps (tokens or FLOPs too few for a batch of "
                       f"{total_batch_size:,} tokens); raise the target or give --num-iterations")

    batch_ratio = total_batch_size / B_REF
    return Plan(
        config=config, model_dim=config.n_embd, n_head=config.n_head, params=params,
        scaling_params=scaling_params, total_params=params["total"], target_tokens=target_tokens,
        total_batch_size=total_batch_size, num_iterations=int(steps),
        lr_scale=math.sqrt(batch_ratio),
        adam_width_scale=(config.n_embd / 768) ** -0.5,
        weight_decay=weight_decay * math.sqrt(batch_ratio) * (d_ref / target_tokens),
        flops_per_token=flops_per_token, grad_accum_steps=grad_accum_steps,
        device_batch_size=device_batch_size, max_seq_len=max_seq_len, world_size=world_size,
    )


# Bytes the compiled training step keeps for the backward, per token, per layer, per model_dim channel, with
# relu² recomputed or kept (`python -m bench.activations --depth 20 [--no-recompute-mlp]` reads them from
# AOTAutograd's partitioner on the real graph). The method was checked against an H100: for the model of
# session 1 (45.1 bytes with relu² kept, before the output-saving norms) it gives 48.3 GiB for d20 at device
# batch 16 and 29.9 for d12 at 32, where 48.9 and 29.3 were measured (bench/results/20261124-113712/).
ACTIVATION_BYTES_PER_CHANNEL = {True: 25.1, False: 33.1}
ACTIVATION_BYTES_PER_CHANNEL_ONCE = 8.0  # embedding output, the first layer's input and the loss's input


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
                          headroom: float = 0.9) -> int | None:
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
    """The flag when given; else on for a GPU whose memory the plan would not fit (with 10% to spare) otherwise."""
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    return estimate_memory_gib(plan, recompute_mlp=False) > 0.9 * gpu_memory_gib(device)


def memory_advice(plan: Plan, device: torch.device, recompute: bool, ran_out: bool = False) -> str:
    """How the plan's estimate compares with the GPU, and the device batch that should fit (a smaller one than
    the plan's when it already ran out of memory: the estimate was too low then)."""
    total, need = gpu_memory_gib(device), estimate_memory_gib(plan, recompute)
    start = replace(plan, device_batch_size=plan.device_batch_size // 2) if ran_out else plan
    fit = largest_fitting_batch(start, total, recompute_mlp=True) if start.device_batch_size >= 1 else None
    advice = (f"--device-batch-size {fit} should fit (the same total batch, with more accumulation)" if fit
              else "no device batch size fits: use more GPUs or a smaller --depth")
    return f"the plan needs about {need:.0f} GiB per GPU (an estimate) and the GPU has {total:.0f} GiB; {advice}"
