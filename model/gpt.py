"""The GPT: nanochat's architecture, its init, parameter groups, FLOP estimate and KV-cache sampling.

token embedding -> rms_norm -> smear (each position mixes in a gated share of the previous one) = x0;
per layer: x = resid_lambda*x + x0_lambda*x0, x += attn(norm(x)), x += mlp(norm(x)); backout (minus a share of
the residual stream after the middle layer); final norm; untied lm_head; logits soft-capped at 15.
Attention: rotary, QK norm, then q and k each x1.2 (in the softmax scale), a sliding window per layer.

Build on the meta device, then `to_empty(device)` + `init_weights()`: every real number is set in
init_weights, so planning (parameter counts, FLOPs) for a big model costs no memory.
"""
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from kernels.attention import attention, heads_first, visible
from kernels.cross_entropy import SOFTCAP, linear_cross_entropy, loss_from_logits, softcapped
from model.config import GPTConfig

VE_GATE_CHANNELS = 12  # the value-embedding gate looks at the first 12 channels of the attention input
SMEAR_CHANNELS = 24  # the smear gate looks at the first 24 channels of the normalised embedding
QK_GAIN = 1.2  # q and k are each scaled by this after the QK norm: the softmax scale is QK_GAIN² / sqrt(D)
BACKOUT_INIT = 0.2
ROPE_BASE = 100_000


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable weights."""
    return F.rms_norm(x, (x.size(-1),))


class _NormKeepingOutput(torch.autograd.Function):
    """RMSNorm whose backward reads its output y and 1/rms instead of its input, dx = (dy - y·mean(dy·y)) / rms.

    y is what the next op keeps anyway (in autocast's dtype), so the norm's input is no longer kept for the
    backward: in front of the blocks' matmuls that is the fp32 residual stream, as the QK norm q and k before
    it; 12 bytes per channel per layer per token at d20 (bench.activations), the trick of Apex's
    memory-efficient norms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for bf16 inputs
        # the eps of F.rms_norm on fp32 (as CUDA autocast runs it), also for bf16 inputs such as q and k
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + torch.finfo(x32.dtype).eps)
        y = (x32 * rstd).to(dtype)
        ctx.save_for_backward(y, rstd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, rstd = ctx.saved_tensors
        y, dy = y.to(rstd.dtype), dy.to(rstd.dtype)
        return (rstd * (dy - y * (dy * y).mean(-1, keepdim=True))).to(ctx.x_dtype), None


def pre_norm(x: torch.Tensor) -> torch.Tensor:
    """The norm in front of matmuls (and attention), in the dtype they compute in (autocast's, else x's)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if not (torch.is_grad_enabled() and x.requires_grad):
        return norm(x).to(dtype)
    return _NormKeepingOutput.apply(x, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels by position-dependent angles. x: (B, T, H, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, shape (1, seq_len, 1, head_dim // 2), fp32."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Attention of the last Tq positions over all Tk cached ones, causal with a window (sampling only).

    q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D) -> (B, Tq, Hq, D). Plain SDPA with an explicit mask: the
    cost does not matter here, training never comes this way.
    """
    Tq, Tk = q.size(1), k.size(1)
    mask = visible(torch.arange(Tk - Tq, Tk, device=q.device), torch.arange(Tk, device=q.device), window)
    y = F.scaled_dot_product_attention(*heads_first(q, k, v), attn_mask=mask, scale=softmax_scale(q.size(-1)))
    return y.transpose(1, 2)


def softmax_scale(head_dim: int) -> float:
    return QK_GAIN ** 2 / math.sqrt(head_dim)


class KVCache:
    """Keys and values of every layer for the positions seen so far (one sequence batch, sampling)."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # positions already in the cache (advanced after the last layer)
        self.last_embedding: torch.Tensor | None = None  # the last position's normalised embedding (for smear)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=1)
            v = torch.cat([self.v[layer], v], dim=1)
        self.k[layer], self.v[layer] = k, v
        if layer == len(self.k) - 1:
            self.pos = k.size(1)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)
                        if config.has_value_embedding(layer) else None)

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        dtype = q.dtype  # bf16 under CUDA autocast, fp32 on CPU: the attention kernel gets one dtype
        if ve is not None:
            # value residual: mix in this layer's value embedding through a per-head gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1).to(dtype) * ve.view(B, T, self.n_kv_head, self.head_dim).to(dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = pre_norm(q).to(dtype), pre_norm(k).to(dtype), v.to(dtype)  # QK norm
        if kv_cache is None:
            y = attention(q, k, v, window=window, scale=softmax_scale(self.head_dim))
        else:
            k, v = kv_cache.insert(self.layer, k, v)
            y = cached_attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, -1))


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.recompute = False  # set through GPT.recompute_mlp

    def forward(self, x):
        h = self.c_fc(x)
        if self.recompute and torch.is_grad_enabled():
            # Keep only h for the backward and recompute relu(h)² there: otherwise the compiled step keeps
            # both relu(h) and relu(h)², 2 x 4 x n_embd bf16 per token per layer (a quarter of what a layer
            # keeps). Eager mode gains nothing: c_proj keeps relu(h)² there either way.
            a = torch.utils.checkpoint.checkpoint(relu_squared, h, use_reentrant=False)
        else:
            a = relu_squared(h)
        return self.c_proj(a)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None = None):
        x = x + self.attn(pre_norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(pre_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Shapes only: under `torch.device("meta")` nothing here holds data; init_weights() sets it."""
        super().__init__()
        self.config = config
        vocab, d, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.window_sizes = config.window_sizes()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, d),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.backout_layer = L // 2  # the residual stream after this block is what backout subtracts
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim)
                                           for i in range(L) if config.has_value_embedding(i)})
        # Rotary tables for 10x the training context (cheap), so sampling can run past it.
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = rotary_tables(self.rotary_seq_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Activation checkpointing per layer (--activation-checkpointing): a training forward keeps only each layer's
        # input for the backward and runs the layer again there. torch.utils.checkpoint rather than wrapper modules,
        # which would rename the parameters that checkpoints and the optimizer state are keyed by.
        self.checkpoint_blocks = False

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter and buffer gets its value here (after to_empty on the meta-built model), drawn in
        nanochat's order (its GPT.init_weights), so that one seed gives nanochat's initial weights."""
        for tensor, init in self.init_steps():
            init(tensor)

    def init_steps(self) -> list[tuple[torch.Tensor, Callable[[torch.Tensor], object]]]:
        """(tensor, init) for every parameter and buffer, in nanochat's draw order: init(t) fills t, the tensor itself
        or a full-size stand-in of its shape, dtype and device (train.builder initialises a sharded model one whole
        parameter at a time, keeping each rank's rows). Run under no_grad."""
        cfg = self.config
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform bound with the std of N(0, 1/d), without outliers

        def normal(std):
            return lambda t: nn.init.normal_(t, mean=0.0, std=std)

        def uniform(a, b):
            return lambda t: nn.init.uniform_(t, a, b)

        def zeros(t):
            return nn.init.zeros_(t)

        def values(v):
            return lambda t: t.copy_(torch.tensor(v))

        def fill(v):
            return lambda t: t.fill_(v)

        steps = [(self.transformer.wte.weight, normal(0.8)), (self.lm_head.weight, normal(0.001))]
        for block in self.transformer.h:
            steps += [(lin.weight, uniform(-s, s)) for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v)]
            steps.append((block.attn.c_proj.weight, zeros))  # every block starts as the identity
            steps.append((block.mlp.c_fc.weight, uniform(-s * 0.4, s * 0.4)))
            steps.append((block.mlp.c_proj.weight, zeros))
        L = cfg.n_layer  # stronger residual and more of the input embedding in the early layers
        steps.append((self.resid_lambdas, values([1.15 - 0.10 * i / max(L - 1, 1) for i in range(L)])))
        steps.append((self.x0_lambdas, values([0.20 - 0.15 * i / max(L - 1, 1) for i in range(L)])))
        steps.append((self.smear_lambda, fill(0.0)))  # smear starts off
        steps.append((self.backout_lambda, fill(BACKOUT_INIT)))
        steps.append((self.smear_gate.weight, uniform(0.0, 0.02)))
        steps += [(ve.weight, uniform(-s, s)) for ve in self.value_embeds.values()]
        steps += [(block.attn.ve_gate.weight, uniform(0.0, 0.02)) for block in self.transformer.h
                  if block.attn.ve_gate is not None]
        steps.append((self.cos, lambda t: t.copy_(rotary_tables(self.rotary_seq_len, cfg.head_dim, t.device)[0])))
        steps.append((self.sin, lambda t: t.copy_(rotary_tables(self.rotary_seq_len, cfg.head_dim, t.device)[1])))
        return steps

    @property
    def recompute_mlp(self) -> bool:
        """Whether training recomputes each MLP's relu² in the backward instead of keeping it (less memory)."""
        return all(block.mlp.recompute for block in self.transformer.h)

    @recompute_mlp.setter
    def recompute_mlp(self, on: bool) -> None:
        for block in self.transformer.h:
            block.mlp.recompute = bool(on)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters by optimizer treatment: Muon for the block matrices, AdamW for the rest."""
        return {
            "matrices": list(self.transformer.h.parameters()),
            "lm_head": list(self.lm_head.parameters()),
            "wte": list(self.transformer.wte.parameters()),
            "value_embeds": list(self.value_embeds.parameters()),
            "resid_lambdas": [self.resid_lambdas],
            "x0_lambdas": [self.x0_lambdas],
            "smear_backout": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
        }

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by group; scaling_params = transformer_matrices + lm_head (the scaling-law count)."""
        def count(params):
            return sum(p.numel() for p in params)
        groups = self.param_groups()
        out = {
            "wte": count(groups["wte"]),
            "value_embeds": count(groups["value_embeds"]),
            "lm_head": count(groups["lm_head"]),
            "transformer_matrices": count(groups["matrices"]),
            "scalars": count(groups["resid_lambdas"]) + count(groups["x0_lambdas"]) + count(groups["smear_backout"]),
        }
        out["total"] = sum(out.values())
        assert out["total"] == count(self.parameters())
        out["scaling_params"] = out["transformer_matrices"] + out["lm_head"]
        return out

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 x matmul weights (lm_head in, embeddings and scalars out),
        plus 12 x heads x head_dim x visible keys per layer for the attention scores and mixing."""
        matmul_weights = sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_head * self.config.head_dim * (T if w < 0 else min(w, T))
                   for w in self.window_sizes)
        return float(6 * matmul_weights + attn)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Loss (mean, or per-token nats (B, T) with loss_reduction="none") when targets are given,
        else soft-capped fp32 logits (B, T, vocab_size) over the real (unpadded) vocabulary."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        assert pos + T <= self.rotary_seq_len, f"sequence of {pos + T} past the rotary table ({self.rotary_seq_len})"
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = x0 = self.smear(norm(self.transformer.wte(idx)), kv_cache)
        checkpointing = self.checkpoint_blocks and torch.is_grad_enabled() and kv_cache is None
        for i in range(self.config.n_layer):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(self.layer, i, x, x0, idx, cos, sin, use_reentrant=False)
            else:
                x = self.layer(i, x, x0, idx, cos, sin, kv_cache)
            if i == self.backout_layer:
                middle = x
        x = norm(x - self.backout_lambda * middle)
        V = self.config.vocab_size
        if targets is None:
            return softcapped(self.lm_head(x)[..., :V].float(), SOFTCAP)
        if type(self.lm_head) is not nn.Linear:  # lm_head swapped for another module (FP8 training): unfused
            loss = loss_from_logits(self.lm_head(x)[..., :V].reshape(B * T, V), targets, SOFTCAP, -1, loss_reduction)
        else:
            # fused linear + soft-cap + cross-entropy: the (B*T, V) logits never exist in memory.
            # Only the real vocabulary rows of lm_head take part (the padding stays out of the softmax).
            h, w = x.reshape(B * T, -1), self.lm_head.weight[:V]
            if h.is_cuda:
                h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)  # the kernel reads bf16, accumulates fp32
            loss = linear_cross_entropy(h, w, targets.reshape(-1), softcap=SOFTCAP, ignore_index=-1,
                                        reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def layer(self, i: int, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              kv_cache: KVCache | None = None) -> torch.Tensor:
        """Layer i: the residual mix, the value embedding, the block. Checkpointed as one, a layer keeps only x (the
        fp32 residual stream) for the backward: x0 and idx are the model's, the mixed x and ve are recomputed. With the
        mix outside, eager would keep x twice and ve; and torch.compile's partitioner, which keeps the boundary only
        between checkpointed regions that follow each other directly, would recompute the residual stream from x0."""
        x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
        ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
        return self.transformer.h[i](x, ve, cos, sin, self.window_sizes[i], kv_cache)

    def smear(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x[t] += smear_lambda · sigmoid(smear_gate(x[t, :24])) · x[t-1] for t >= 1 (x: the normalised
        embeddings, all on the right before the update). With a KV cache, x[-1] of the previous call is x[t-1]
        of this call's first position."""
        before = None if kv_cache is None else kv_cache.last_embedding
        if kv_cache is not None:
            kv_cache.last_embedding = x[:, -1:]
        prev = x[:, :-1] if before is None else torch.cat([before, x[:, :-1]], dim=1)
        first = x.size(1) - prev.size(1)  # 1: position 0 has no previous one; 0: the cache gave it
        gate = torch.sigmoid(self.smear_gate(x[:, first:, :SMEAR_CHANNELS]))
        smeared = x[:, first:] + self.smear_lambda * gate * prev
        return torch.cat([x[:, :first], smeared], dim=1) if first else smeared

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of tokens (the prompt), max_tokens new ids, with a KV cache."""
        return list(self.stream(tokens, max_tokens))

    @torch.no_grad()
    def stream(self, tokens: list[int], max_tokens: int, temperature: float = 0.0, top_k: int | None = None):
        """Yield max_tokens new ids after tokens (the prompt), one at a time, with a KV cache: the most likely
        at temperature 0, else drawn (torch's global RNG) from softmax(logits / temperature), among the top_k
        most likely when top_k is given."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        if len(tokens) + max_tokens > self.rotary_seq_len:
            raise ValueError(f"prompt + new tokens ({len(tokens) + max_tokens}) exceed {self.rotary_seq_len}")
        device = self.transformer.wte.weight.device
        cache = KVCache(self.config.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=cache)[0, -1]  # prompt first (prefill), then one token at a time
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                if top_k is not None and top_k < logits.size(-1):
                    logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -math.inf)
                nxt = int(torch.multinomial(F.softmax(logits / temperature, dim=-1), 1))
            yield nxt
            ids = torch.tensor([[nxt]], dtype=torch.long, device=device)
