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
from dataclasses import dataclass

import torch

from model.config import ASPECT_RATIO, HEAD_DIM, MAX_SEQ_LEN, VOCAB_SIZE, WINDOW_PATTERN, GPTConfig, config_from_depth
from train.errors import require

REF_DEPTH = 12
B_REF = 2 ** 19  # tokens per step at d12
BATCH_EXPONENT = 0.383  # B grows as D^0.383 (Power Lines, arXiv 2505.13738)
# Defaults of the plan (and of train.pretrain's flags of the same names)
DEVICE_BATCH_SIZE = 32
TARGET_PARAM_DATA_RATIO = 10.5
WEIGHT_DECAY = 0.2  # Muon's at the reference depth, before the rescaling


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


def make_plan(depth: int, aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM, max_seq_len: int = MAX_SEQ_LEN,
              vocab_size: int = VOCAB_SIZE, window_pattern: str = WINDOW_PATTERN,
              device_batch_size: int = DEVICE_BATCH_SIZE, total_batch_size: int = -1, num_iterations: int = -1,
              target_flops: float = -1, target_param_data_ratio: float = TARGET_PARAM_DATA_RATIO,
              weight_decay: float = WEIGHT_DECAY, world_size: int = 1) -> Plan:
    """Turn the depth dial (and the user's overrides) into every derived training number."""
    require(depth >= 1, f"--depth must be at least 1, got {depth}")
    require(aspect_ratio >= 1, f"--aspect-ratio must be at least 1, got {aspect_ratio}")
    require(head_dim >= 2 and head_dim % 2 == 0, f"--head-dim must be a positive even number, got {head_dim}")
    require(max_seq_len >= 1, f"--max-seq-len must be at least 1, got {max_seq_len}")
    require(vocab_size >= 1, f"the vocabulary size must be at least 1, got {vocab_size}")
    require(len(window_pattern) > 0 and set(window_pattern) <= {"S", "L"},
            f"--window-pattern must use only the letters S and L, got {window_pattern!r}")
    require(device_batch_size >= 1, f"--device-batch-size must be at least 1, got {device_batch_size}")
    require(world_size >= 1, f"the world size must be at least 1, got {world_size}")
    require(total_batch_size == -1 or total_batch_size >= 1,
            f"--total-batch-size must be -1 (automatic) or positive, got {total_batch_size}")
    require(target_param_data_ratio > 0, f"--target-param-data-ratio must be positive, got {target_param_data_ratio}")
    require(weight_decay >= 0, f"--weight-decay must not be negative, got {weight_decay}")

    config = config_from_depth(depth, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern)
    params, flops_per_token = param_counts(config)
    scaling_params = params["scaling_params"]
    ref_config = config_from_depth(REF_DEPTH, aspect_ratio, head_dim, max_seq_len, vocab_size, window_pattern)
    d_ref = target_param_data_ratio * param_counts(ref_config)[0]["scaling_params"]
    target_tokens = int(target_param_data_ratio * scaling_params)
    require(target_tokens >= 1, f"--target-param-data-ratio {target_param_data_ratio} gives {target_tokens} training "
                                "tokens (the batch size and weight decay laws scale with them): raise it")

    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT))
    micro_tokens = device_batch_size * max_seq_len * world_size
    require(total_batch_size % micro_tokens == 0,
            f"total batch size {total_batch_size:,} tokens is not a multiple of device_batch_size x max_seq_len x "
            f"world_size = {device_batch_size} x {max_seq_len} x {world_size} = {micro_tokens:,}")
    grad_accum_steps = total_batch_size // micro_tokens

    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
    else:
        steps = target_tokens // total_batch_size
    require(steps >= 1, f"the plan has {steps} optimizer steps (tokens or FLOPs too few for a batch of "
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
