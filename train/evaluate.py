"""Validation bits per byte and greedy sampling."""
import math

import torch

from train.distributed import all_reduce_sum

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "def fibonacci(n):",
    "import os\n",
)


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, autocast) -> float:
    """Cross-entropy in nats over every target that has bytes, divided by ln 2 x total bytes, over all ranks.

    Counting bytes rather than tokens makes the number comparable across tokenizers. Special tokens
    (0 bytes) and ignored targets (-1) count neither nats nor bytes.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        with autocast:
            nats = model(x, y, loss_reduction="none")
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        total_nats += (nats.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    all_reduce_sum(total_nats)
    all_reduce_sum(total_bytes)
    if total_bytes.item() == 0:
        return float("nan")
    return (total_nats / (math.log(2) * total_bytes.double())).item()


@torch.no_grad()
def sample(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16, autocast=None) -> list[str]:
    """Greedy continuations of fixed prompts (KV cache inside model.generate), within the positions the model
    can take (its rotary table): a model of a very short context gets fewer new tokens, and the prompts' ends."""
    out = []
    max_tokens = min(max_tokens, model.rotary_seq_len - 1)
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend_bos=True)[-(model.rotary_seq_len - max_tokens):]
        if autocast is not None:
            with autocast:
                new = model.generate(ids, max_tokens)
        else:
            new = model.generate(ids, max_tokens)
        out.append(prompt + tokenizer.decode(list(new)))
    return out
