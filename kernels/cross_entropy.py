"""Fused linear cross-entropy with soft-cap: loss = CE(cap·tanh(h·Wᵀ/cap), y), without the N x V logits.

Design (the chunked one of Liger-Kernel / the "materialize a chunk only" family): rows of h are taken a
chunk at a time (CHUNK_ELEMENTS logits, ~512 MB in bf16, instead of N x V). For each chunk
  1. cuBLAS: logits = h_c · Wᵀ into one reused buffer (inputs' dtype, fp32 accumulation),
  2. Triton, one program per row: soft-cap, online logsumexp over the vocabulary in fp32, the row's loss,
     then (when a gradient is wanted) dlogits = (softmax - onehot) · (1 - tanh²) written over the logits,
  3. cuBLAS: dh_c = dlogits · W and dW += dlogitsᵀ · h_c (dW accumulated in fp32).
For reduction 'mean' (training) the gradients are made in the forward pass, so the backward only scales
them by the incoming gradient: 6NHV FLOPs in all, like the unfused model. For 'none' (bpb evaluation,
usually without grad) the forward keeps the row logsumexp and a backward pass redoes steps 1-3 with the
per-row incoming gradients.
Every row of W takes part in the softmax, padding rows included (the model pads the vocabulary to a multiple
of 64; targets never point at them); to leave the padding out, pass weight[:vocab_size].
Benchmarks: with a gradient wanted, the 'mean' forward already does the backward's matmuls (6NHV), so time
forward + backward together.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import KernelUnavailable, choose, implementation, interpreting, register, triton_runs_on

SOFTCAP = 15.0  # nanochat's logit soft-cap, and the default here
CHUNK_ELEMENTS = 1 << 28  # logits per chunk: 8192 rows at V = 32768 (512 MB in bf16)


def flops(N: int, H: int, V: int) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs of the lm_head + loss: 2NHV for the logits, 4NHV for dh and dW."""
    return 2 * N * H * V, 4 * N * H * V


# ----------------------------------------------------------------------------------------------
# Triton kernel: soft-cap + logsumexp + loss (+ dlogits in place) for one chunk of logits rows

@triton.jit
def _tanh(x):
    # portable across triton versions (tl.math.tanh is not everywhere); x is fp32
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softcap_ce_rows_kernel(
    logits_ptr, stride_row, targets_ptr, nats_ptr, lse_ptr, row_grad_ptr,
    V, ignore_index, softcap,
    CAPPED: tl.constexpr, LSE_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(targets_ptr + row)
    valid = (y != ignore_index) & (y >= 0) & (y < V)

    # the target's capped logit, read before the gradient overwrites the row
    z_y = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    if CAPPED:
        z_y = softcap * _tanh(z_y / softcap)

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + row)
    else:
        # pass 1: online max and sum of exp over the capped logits
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if CAPPED:
                z = softcap * _tanh(z / softcap)  # tanh(-inf) = -1: re-mask below
                z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        tl.store(nats_ptr + row, tl.where(valid, lse - z_y, 0.0))

    if WRITE_GRAD:
        # pass 2: dloss/dlogits = (softmax - onehot) · dcap/dz, times the row's gradient; 0 for ignored rows
        scale = tl.where(valid, 1.0, 0.0)
        if ROW_GRAD:
            scale = scale * tl.load(row_grad_ptr + row)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if CAPPED:
                t = _tanh(z / softcap)
                g = tl.exp(softcap * t - lse) - tl.where(start + cols == y, 1.0, 0.0)
                g = g * (1.0 - t * t)
            else:
                g = tl.exp(z - lse) - tl.where(start + cols == y, 1.0, 0.0)
            tl.store(row_ptr + start + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# plain-PyTorch reference (materializes the logits; also the CPU path)

def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap·tanh(logits/softcap) (logits unchanged when softcap is None or 0)."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = SOFTCAP,
                     ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the soft-capped logits (N, V), in fp32. 'mean' over non-ignored targets (0 when all
    are ignored); 'none': fp32 nats of targets' shape."""
    y = targets.reshape(-1)
    nats = F.cross_entropy(softcapped(logits.float(), softcap), y, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return nats.view(targets.shape)
    return nats.sum() / (y != ignore_index).sum().clamp(min=1)


@register("cross_entropy", "torch")
def reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = SOFTCAP,
              ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """The unfused math, like the model without the kernel: logits in the inputs' dtype, loss in fp32."""
    return loss_from_logits(h.reshape(-1, h.shape[-1]) @ weight.t(), targets, softcap, ignore_index, reduction)


# ----------------------------------------------------------------------------------------------
# the chunked driver: cuBLAS matmuls around the Triton row kernel

def _rows_per_chunk(N: int, V: int) -> int:
    rows = max(1, CHUNK_ELEMENTS // V)
    if rows >= 128:
        rows -= rows % 128  # whole tensor-core tiles
    return min(rows, N)


def _ce_rows(logits, targets, nats, lse, softcap, ignore_index, lse_given, write_grad, row_grad=None):
    n, V = logits.shape
    if n == 0:
        return
    if interpreting():
        block_v, num_warps = min(128, triton.next_power_of_2(V)), 4
    else:
        block_v = min(4096, triton.next_power_of_2(V))
        num_warps = 16 if block_v >= 4096 else 8 if block_v >= 1024 else 4
    _softcap_ce_rows_kernel[(n,)](
        logits, logits.stride(0), targets, nats, lse, row_grad if row_grad is not None else lse,
        V, ignore_index, softcap or 1.0,
        CAPPED=bool(softcap), LSE_GIVEN=lse_given, WRITE_GRAD=write_grad, ROW_GRAD=row_grad is not None,
        BLOCK_V=block_v, num_warps=num_warps,
    )


@functools.cache
def _addmm_into_fp32_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(acc, a, b, out_dtype=fp32, out=acc) takes 16-bit a, b on this device (probed once)."""
    a = torch.ones(2, 2, dtype=dtype, device=device_type)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 2).all())


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, keeping the sum over chunks in fp32 whatever the inputs' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    elif _addmm_into_fp32_works(a.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # a torch build without out_dtype for this dtype: rounded to a's dtype once per chunk
        acc.add_(a @ b)


def _chunked(h, weight, targets, softcap, ignore_index, nats, lse, lse_given, dh, dw, row_grad=None):
    """The loop over row chunks. Fills nats and lse (unless lse_given); with dh/dw given, also the gradients
    of sum(row_grad · nats) (row_grad None = 1 per row) into dh (h's dtype) and dw (fp32, accumulated)."""
    N, V = h.shape[0], weight.shape[0]
    want_grad = dh is not None
    rows = _rows_per_chunk(N, V)
    buffer = torch.empty(rows, V, dtype=h.dtype, device=h.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        logits = buffer[: r1 - r0]
        torch.mm(h[r0:r1], weight.t(), out=logits)
        _ce_rows(logits, targets[r0:r1], nats[r0:r1], lse[r0:r1], softcap, ignore_index, lse_given, want_grad,
                 None if row_grad is None else row_grad[r0:r1])
        if want_grad:  # logits now holds dlogits
            torch.mm(logits, weight, out=dh[r0:r1])
            _addmm_fp32(dw, logits.t(), h[r0:r1])


def _check_inputs(h, weight, targets):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"cross_entropy: expected h (N, H), weight (V, H), targets (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if h.dtype != weight.dtype:
        raise ValueError(f"cross_entropy: h and weight dtypes differ ({h.dtype} vs {weight.dtype})")


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile: no graph break) and their autograd

@torch.library.custom_op("nanochat::linear_ce_forward", mutates_args=())
def _forward_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, ignore_index: int,
                reduction: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dh, dw). For 'mean' with with_grad, dh (h's dtype) and dw (fp32) are the gradients of the
    loss, made here so the backward only scales them; otherwise they are empty and lse serves the backward."""
    _check_inputs(h, weight, targets)
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    N, H = h.shape
    precompute = with_grad and reduction == "mean"
    nats = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if precompute else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if precompute else h.new_empty(0)
    _chunked(h, weight, targets, softcap, ignore_index, nats, lse, False,
             dh if precompute else None, dw if precompute else None)
    if reduction == "none":
        return nats, lse, dh, dw
    inv_count = 1.0 / (targets != ignore_index).sum().clamp(min=1).float()
    if precompute:
        dh.mul_(inv_count)
        dw.mul_(inv_count)
    return nats.sum() * inv_count, lse, dh, dw


@_forward_op.register_fake
def _(h, weight, targets, softcap, ignore_index, reduction, with_grad):
    N, H = h.shape
    precompute = with_grad and reduction == "mean"
    loss = h.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    lse = h.new_empty(N, dtype=torch.float32)
    dh = h.new_empty((N, H)) if precompute else h.new_empty(0)
    dw = h.new_empty(weight.shape, dtype=torch.float32) if precompute else h.new_empty(0)
    return loss, lse, dh, dw


@torch.library.custom_op("nanochat::linear_ce_backward", mutates_args=())
def _backward_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                 row_grad: torch.Tensor, softcap: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dw) of sum(row_grad · nats), recomputing the logits chunk by chunk from the saved row lse."""
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    dh = torch.empty_like(h)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    _chunked(h, weight, targets, softcap, ignore_index, lse, lse, True, dh, dw,
             row_grad.float().contiguous())
    return dh, dw.to(weight.dtype)


@_backward_op.register_fake
def _(h, weight, targets, lse, row_grad, softcap, ignore_index):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    h, weight, targets, softcap, ignore_index, reduction, with_grad = inputs
    _, lse, dh, dw = output
    ctx.softcap, ctx.ignore_index, ctx.reduction = softcap, ignore_index, reduction
    ctx.precomputed = with_grad and reduction == "mean"
    ctx.save_for_backward(h, weight, targets, lse, dh, dw)


def _backward(ctx, grad_loss, _grad_lse, _grad_dh, _grad_dw):
    h, weight, targets, lse, dh, dw = ctx.saved_tensors
    if ctx.precomputed:
        grad_h, grad_w = dh * grad_loss, (dw * grad_loss).to(weight.dtype)  # dh keeps h's dtype
    else:
        row_grad = grad_loss
        if ctx.reduction == "mean":
            row_grad = (grad_loss / (targets != ctx.ignore_index).sum().clamp(min=1)).expand(h.shape[0])
        grad_h, grad_w = _backward_op(h, weight, targets, lse, row_grad, ctx.softcap, ctx.ignore_index)
    return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
            None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Our kernel takes h and weight: fp32/fp16/bf16, one dtype."""
    return h.dtype in (torch.float32, torch.float16, torch.bfloat16) and h.dtype == weight.dtype


@register("cross_entropy", "triton")
def _fused(h, weight, targets, softcap, ignore_index, reduction):
    if not triton_runs_on(h):
        raise KernelUnavailable("cross_entropy: impl 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if not supports(h, weight):
        raise KernelUnavailable(f"cross_entropy: impl 'triton' takes fp32/fp16/bf16 h and weight of one dtype, "
                                f"got {h.dtype} and {weight.dtype}")
    h2 = h.reshape(-1, h.shape[-1])
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss = _forward_op(h2, weight, targets.reshape(-1), softcap or 0.0, ignore_index, reduction, with_grad)[0]
    return loss.view(targets.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------
# public function

def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = SOFTCAP, ignore_index: int = -1, reduction: str = "mean",
                         impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of softcap·tanh(h·weightᵀ/softcap) against targets (ignore_index = no loss).

    h (..., H), weight (V, H) (every row is in the softmax, padding rows included), targets (...) int64
    in [0, V) or ignore_index (not checked on the fused path: a check would wait on the GPU).
    softcap None or 0 turns the cap off. reduction 'mean' (fp32 scalar, over non-ignored targets, 0 if none)
    or 'none' (fp32 nats of targets' shape). impl: one of dispatch.IMPLS["cross_entropy"] or "auto"
    (ours on CUDA with fp16/bf16/fp32 inputs, else the torch reference).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'none', got {reduction!r}")
    softcap = float(softcap) if softcap else None
    impl = choose("cross_entropy", impl, h, supports(h, weight))
    return implementation("cross_entropy", impl)(h, weight, targets, softcap, ignore_index, reduction)
