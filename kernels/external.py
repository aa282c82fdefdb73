"""Other libraries' kernels (and torch's own fused or compiled paths), behind the same signatures as ours and
registered with the dispatcher the same way: the peers of the A/B, and what "auto" may pick over ours.

Each is imported when it is first called (never at import), and says in one line when it cannot run here.
"""
import functools

import torch
import torch.nn.functional as F

from kernels.attention import full_window, heads_first, visible
from kernels.cross_entropy import reference as cross_entropy_reference
from kernels.dispatch import KernelUnavailable, register
from kernels.newton_schulz import orthogonalize_reference

# ----------------------------------------------------------------------------------------------
# attention: q (B, T, Hq, D), k and v (B, T, Hkv, D), window (-1 = full), softmax scale -> (B, T, Hq, D)


@register("attention", "sdpa")
def sdpa_attention(q, k, v, window, scale):
    """torch's SDPA: is_causal (flash / cuDNN backends) on full layers, an explicit T x T mask on windowed ones."""
    T = q.size(1)
    q, k, v = heads_first(q, k, v)
    if full_window(window, T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
    pos = torch.arange(T, device=q.device)
    mask = visible(pos, pos, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


BLOCK_MASKS_KEPT = 8
_block_masks: dict = {}  # (T, window, device) -> FlexAttention BlockMask, the oldest dropped past BLOCK_MASKS_KEPT


def flex_block_mask(T: int, window: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    key = (T, -1 if full_window(window, T) else window, str(device))
    if key not in _block_masks:
        if len(_block_masks) >= BLOCK_MASKS_KEPT:
            _block_masks.pop(next(iter(_block_masks)))
        w = key[1]

        def mask_mod(b, h, i, j):
            return (j <= i) & ((i - j <= w) if w >= 0 else True)

        _block_masks[key] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _block_masks[key]


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


@register("attention", "flex")
def flex_attention(q, k, v, window, scale):
    """FlexAttention with a sliding-window block mask (compiled; inside a compiled model, traced with it)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention as eager_flex
    except ImportError:
        raise KernelUnavailable("attention: impl 'flex' needs torch.nn.attention.flex_attention") from None
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise KernelUnavailable("attention: impl 'flex' has no backward on CPU (FlexAttention); use a CUDA tensor")
    mask = flex_block_mask(q.size(1), window, q.device)
    fn = eager_flex if torch.compiler.is_compiling() else compiled_flex_attention()
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1)).transpose(1, 2)


@functools.cache
def fa3_module():
    """FlashAttention-3's flash_attn_interface (Hopper only), or None; any import failure means "not here"."""
    try:
        import flash_attn_interface
    except Exception:  # noqa: BLE001 - a broken build is as absent as a missing one
        return None
    return flash_attn_interface


def _flash_window(window: int, T: int) -> tuple[int, int]:
    return (-1 if full_window(window, T) else window, 0)


@register("attention", "fa3")
def fa3_attention(q, k, v, window, scale):
    fa3 = fa3_module()
    if fa3 is None:
        raise KernelUnavailable("attention: impl 'fa3' needs FlashAttention-3 (flash_attn_interface, Hopper only)")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise KernelUnavailable("attention: impl 'fa3' needs fp16/bf16 CUDA tensors")
    out = fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=_flash_window(window, q.size(1)))
    return out[0] if isinstance(out, tuple) else out


@register("attention", "fa2")
def fa2_attention(q, k, v, window, scale):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise KernelUnavailable("attention: impl 'fa2' needs FlashAttention-2 (pip install flash-attn)") from None
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise KernelUnavailable("attention: impl 'fa2' needs fp16/bf16 CUDA tensors")
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=_flash_window(window, q.size(1)))

# ----------------------------------------------------------------------------------------------
# linear cross-entropy: (h, weight, targets, softcap, ignore_index, reduction) -> fp32 loss


@functools.cache
def compiled_cross_entropy_reference():
    return torch.compile(cross_entropy_reference)


@register("cross_entropy", "compile")
def compiled_cross_entropy(h, weight, targets, softcap, ignore_index, reduction):
    """Our torch reference under torch.compile (inductor fuses the soft-cap into the logits' epilogue)."""
    return compiled_cross_entropy_reference()(h, weight, targets, softcap, ignore_index, reduction)


@register("cross_entropy", "liger")
def liger_cross_entropy(h, weight, targets, softcap, ignore_index, reduction):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise KernelUnavailable("cross_entropy: impl 'liger' needs Liger-Kernel (pip install liger-kernel)") from None
    out = liger_fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                           ignore_index=ignore_index, reduction=reduction, softcap=softcap)
    out = out[0] if isinstance(out, tuple) else out
    return out.float().view(targets.shape) if reduction == "none" else out.float()


@register("cross_entropy", "cce")
def cut_cross_entropy(h, weight, targets, softcap, ignore_index, reduction):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    except ImportError:
        raise KernelUnavailable("cross_entropy: impl 'cce' needs cut-cross-entropy "
                                "(pip install cut-cross-entropy)") from None
    out = cce_linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                   ignore_index=ignore_index, softcap=softcap, reduction=reduction)
    return out.float().view(targets.shape) if reduction == "none" else out.float()

# ----------------------------------------------------------------------------------------------
# Muon orthogonalization: (G, steps) -> G's shape and dtype


@functools.cache
def compiled_orthogonalize_reference():
    return torch.compile(orthogonalize_reference, dynamic=False)


@register("newton_schulz", "compile")
def compiled_orthogonalize(G, steps):
    """Our torch Polar Express under torch.compile, as nanochat runs it (one graph per stack shape)."""
    return compiled_orthogonalize_reference()(G, steps)
