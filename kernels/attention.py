"""Causal sliding-window attention (FlashAttention-style), in the model's (B, T, H, D) layout.

Key j is visible to query i iff j <= i and i - j <= window (window -1 = full causal; 0 = itself only).
GQA: query head h reads kv head h // (Hq // Hkv). Softmax scale: `scale`, by default 1/sqrt(D).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import KernelUnavailable, choose, implementation, interpreting, register, triton_runs_on
from kernels import tuned

CPU_BLOCK = 256  # query rows per block on the CPU path


def full_window(window: int, T: int) -> bool:
    """A window that lets every earlier key through (-1, or at least T - 1)."""
    return window < 0 or window >= T - 1


def visible_pairs(T: int, window: int) -> int:
    """(query, key) pairs a causal window lets through: query i sees min(i, window) + 1 keys."""
    if full_window(window, T):
        return T * (T + 1) // 2
    return (window + 1) * T - window * (window + 1) // 2


def flops(B: int, T: int, Hq: int, D: int, window: int, backward: bool = False) -> int:
    """FLOPs of the forward pass, 4·D per visible (query, key) pair (FlashAttention's convention); with
    backward=True those of the backward pass, 2.5x the forward's."""
    fwd = 4 * D * visible_pairs(T, window) * B * Hq
    return int(fwd * 2.5) if backward else fwd


# ----------------------------------------------------------------------------------------------
# Triton kernels (the structure of Triton's fused-attention tutorial, with a sliding window)
#
# Scores are pre-scaled by log2(e)/sqrt(D) so the softmax uses exp2; the saved row logsumexp is in those
# base-2 units. For a block of queries [m0, m0 + BLOCK_M) (BLOCK_M a multiple of BLOCK_N) the visible keys
# fall in three ranges of key blocks, the rest are never visited:
#   diagonal [m0, m0 + BLOCK_M)   masked (causal edge, sequence tail)
#   middle   [full_lo, m0)        every (query, key) pair visible: no mask, no bounds checks
#   edge     [lo, full_lo)        masked (window edge); empty for full attention
# so the work grows with T x window. The dk/dv kernel mirrors this for a block of keys over the query
# blocks that see it (diagonal, fully visible, then window edge and sequence tail). Padded rows and columns
# past T load as zeros and are never stored.

@triton.jit
def _load_rows(base, idx, stride, offs_d, T, MASKED: tl.constexpr):
    """Rows idx of a (T, HEAD_DIM) matrix; in MASKED blocks rows past T load as zeros."""
    ptrs = base + idx[:, None] * stride + offs_d[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=idx[:, None] < T, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _query_block(Hq, group, BLOCK_M: tl.constexpr):
    """This program's (batch, head) row, batch (int64), query head, kv head and first query; the longest (latest)
    query blocks start first."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    return pid_bh, (pid_bh // Hq).to(tl.int64), h, h // group, pid_m * BLOCK_M


@triton.jit
def _key_ranges(m0, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_lo): the window edge [lo, full_lo) and the fully visible keys [full_lo, m0) of a query block.
    (No negative operands in //: triton and the interpreter round those differently.)"""
    full_lo = tl.minimum((tl.maximum(m0 + BLOCK_M - 1 - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, m0)
    return tl.maximum(m0 - window, 0) // BLOCK_N * BLOCK_N, full_lo


@triton.jit
def _softmax_step(qk, l_i, m_i, rows, cols, window, qk_scale, MASKED: tl.constexpr):
    """The online softmax over one key block's raw scores qk: (p, alpha, l_i, m_new), acc to be scaled by alpha."""
    if MASKED:
        lag = rows[:, None] - cols[None, :]
        qk = tl.where((lag >= 0) & (lag <= window), qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row that has seen no visible key yet keeps m = -inf: shift it by 0 (p = 0, alpha = 0), not NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        qk = qk - shift[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        shift = m_new
        qk = qk * qk_scale - shift[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - shift)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
               start, stop, T, window, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, offs_d, T, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p, alpha, l_i, m_i = _softmax_step(qk, l_i, m_i, rows, cols, window, qk_scale, MASKED)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base, cols, stride_vt, offs_d, T, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
              stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
              Hq, T, window, group, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_bh, b, h, hk, m0 = _query_block(Hq, group, BLOCK_M)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qt, offs_d, T, True)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo = _key_ranges(m0, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               m0, tl.minimum(m0 + BLOCK_M, T), T, window, qk_scale, True, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               full_lo, m0, T, window, qk_scale, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               lo, full_lo, T, window, qk_scale, True, BLOCK_N, PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows past T (never stored) would divide 0 by 0
    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=rows < T)
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                         Hq, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do), the softmax backward's correction term, in fp32."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, stride_ot, offs_d, T, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_dot, offs_d, T, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                cols, offs_d, start, stop, T, window, qk_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, stop, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base, rows, stride_qt, offs_d, T, MASKED)  # padded query rows: zeros, masked out of p
        if MASKED:
            in_seq = rows < T
            lse = tl.load(lse_base + rows, mask=in_seq, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (keys, queries)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            lag = rows[None, :] - cols[:, None]
            pT = tl.where((lag >= 0) & (lag <= window) & in_seq[None, :], pT, 0.0)
        do = _load_rows(do_base, rows, stride_dot, offs_d, T, MASKED)
        if MASKED:
            delta = tl.load(delta_base + rows, mask=in_seq, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                   Hq, Hkv, T, window, group, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of one block of keys of one kv head, summed over the query heads of its GQA group."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K + b * stride_kb + hk * stride_kh, cols, stride_kt, offs_d, T, True)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, cols, stride_vt, offs_d, T, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # query ranges that see this key block: diagonal (masked), fully visible, window edge + tail (masked)
    q_end = tl.minimum(n0 + BLOCK_N + window, T)
    diag_end = tl.minimum(n0 + BLOCK_N, q_end)
    mid_end = tl.maximum(diag_end, tl.minimum((n0 + window + 1) // BLOCK_M * BLOCK_M, T // BLOCK_M * BLOCK_M))
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * Hq + h) * T
        delta_base = DELTA + (b * Hq + h) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             cols, offs_d, n0, diag_end, T, window, qk_scale, True, BLOCK_M, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             cols, offs_d, diag_end, mid_end, T, window, qk_scale, False, BLOCK_M, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             cols, offs_d, mid_end, q_end, T, window, qk_scale, True, BLOCK_M, PRECISION)

    kv_mask = cols[:, None] < T
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
              start, stop, T, window, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, offs_d, T, MASKED)
        v = _load_rows(v_base, cols, stride_vt, offs_d, T, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            lag = rows[:, None] - cols[None, :]
            p = tl.where((lag >= 0) & (lag <= window), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                 stride_dqb, stride_dqt, stride_dqh,
                 Hq, T, window, group, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one block of queries of one head: the forward's loop over key blocks, recomputing p from lse."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_bh, b, h, hk, m0 = _query_block(Hq, group, BLOCK_M)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = rows < T
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qt, offs_d, T, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_dot, offs_d, T, True)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=in_seq, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=in_seq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, full_lo = _key_ranges(m0, window, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                   m0, tl.minimum(m0 + BLOCK_M, T), T, window, qk_scale, True, BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                   full_lo, m0, T, window, qk_scale, False, BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                   lo, full_lo, T, window, qk_scale, True, BLOCK_N, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_seq[:, None])


# Block sizes. On a GPU a small autotune set keyed on (T, window, D), for Hopper and Ampere alike: 8 warps for
# D = 128 (fewer registers per thread), 4 for D = 64. Under the interpreter, and for fp32 inputs on a GPU (exact
# dots on CUDA cores, where larger blocks spill registers: `python -m bench.compile_check` shows how much), one
# small config per kernel (tests change it to cover other block shapes).
def _configs(*specs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


_TUNE_KEY = ["T", "window", "HEAD_DIM"]
FWD = tuned.autotune("attention.fwd", _attn_fwd, _TUNE_KEY, _configs(
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)))
DKDV = tuned.autotune("attention.dkdv", _attn_bwd_dkdv, _TUNE_KEY, _configs(
    (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)))
DQ = tuned.autotune("attention.dq", _attn_bwd_dq, _TUNE_KEY, _configs(
    (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)))
SMALL_BLOCKS = {FWD: (32, 16), DKDV: (16, 32), DQ: (32, 16)}  # (BLOCK_M, BLOCK_N)

LOG2E = 1.4426950408889634
TRITON_HEAD_DIMS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------
# plain-PyTorch reference (explicit T x T mask, fp32) and the CPU path (blocks of queries)

def visible(rows: torch.Tensor, cols: torch.Tensor, window: int) -> torch.Tensor:
    """The mask of which keys (positions cols) each query (positions rows) sees: (len(rows), len(cols)) bool."""
    lag = rows[:, None] - cols[None, :]
    return (lag >= 0) & (lag <= window) if window >= 0 else lag >= 0


def heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(B, T, H, D) -> (B, H, T, D) views for matmul-style attention, k and v repeated to q's head count (GQA)."""
    rep = q.size(2) // k.size(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return q, k, v


def default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.size(-1))


@register("attention", "torch")
def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ + mask) v in fp32 (fp64 for fp64 inputs) with an explicit T x T mask; q's dtype out."""
    T = q.size(1)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = heads_first(*(t.to(dtype) for t in (q, k, v)))
    pos = torch.arange(T, device=q.device)
    scores = (qf @ kf.transpose(-1, -2)) * (default_scale(q) if scale is None else scale)
    scores = scores.masked_fill(~visible(pos, pos, window), float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


@register("attention", "blocked")
def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1, scale: float | None = None, *,
            block: int = CPU_BLOCK) -> torch.Tensor:
    """The portable path: full layers through SDPA(is_causal); windowed ones a block of queries at a time, each
    over its key range [start - window, end) with a mask of that block only (never T x T). Plain autograd."""
    T = q.size(1)
    q, k, v = heads_first(q, k, v)
    if full_window(window, T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
    pos = torch.arange(T, device=q.device)
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        lo = max(0, start - window)
        mask = visible(pos[start:end], pos[lo:end], window)
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, lo:end], v[:, :, lo:end],
                                                   attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# launchers, custom ops (opaque to torch.compile: no graph break) and their autograd

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)  # (B, T, H) strides of a (B, T, H, D) tensor


def _launch_per_head_block(kernel: tuned.Autotuned, t_block: str, T, window, heads, args, kwargs, q):
    """One program per (block of T, head); t_block names the block size that splits T (BLOCK_M: the forward and
    dq kernels block the queries; BLOCK_N: the dk/dv kernel blocks the keys). fp16/bf16 on a GPU: the tuned
    table's config (kernels/tuned.py) or autotuned; SMALL_BLOCKS for exact fp32 dots on a GPU (a correctness
    path: no tensor cores) and under the interpreter."""
    fixed = None
    if interpreting() or kwargs["PRECISION"] == "ieee":
        fixed = tuned.config(dict(zip(("BLOCK_M", "BLOCK_N"), SMALL_BLOCKS[kernel])), num_warps=4,
                             num_stages=1 if interpreting() else 2)
    key = dict(T=T, window=window, HEAD_DIM=kwargs["HEAD_DIM"], dtype=q.dtype)
    tuned.launch(kernel, lambda meta: (triton.cdiv(T, meta[t_block]), heads), args, kwargs, key, q.device, fixed)


def _window_arg(window: int, T: int) -> int:
    return T if full_window(window, T) else window  # full attention = a window longer than the sequence


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots (no tf32)


def _forward_into(q, k, v, window: int, scale: float, out, lse) -> None:
    """Forward kernel into out (B, T, Hq, D) and lse (B, Hq, T) fp32: base-2 logsumexp of the scaled scores."""
    B, T, Hq, D = q.shape
    w = _window_arg(window, T)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            Hq, T, w, Hq // k.size(2), LOG2E * scale)
    _launch_per_head_block(FWD, "BLOCK_M", T, w, B * Hq, args, dict(HEAD_DIM=D, PRECISION=_precision(q)), q)


def _backward_into(dout, q, k, v, out, lse, window: int, scale: float, dq, dk, dv) -> None:
    """delta = rowsum(out·dout), then dk/dv per key block (summed over a GQA group), then dq per query block."""
    B, T, Hq, D = q.shape
    Hkv = k.size(2)
    delta = _empty((B, Hq, T), torch.float32, q.device)
    w, group, qk_scale = _window_arg(window, T), Hq // Hkv, scale * LOG2E
    meta = dict(HEAD_DIM=D, PRECISION=_precision(q))
    pre_block = 32 if interpreting() else 128
    _attn_bwd_preprocess[(triton.cdiv(T, pre_block), B * Hq)](
        out, dout, delta, *_strides(out), *_strides(dout), Hq, T, HEAD_DIM=D, BLOCK_M=pre_block)
    _launch_per_head_block(DKDV, "BLOCK_N", T, w, B * Hkv,
            (q, k, v, dout, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
             *_strides(dk), *_strides(dv), Hq, Hkv, T, w, group, qk_scale, scale), meta, q)
    _launch_per_head_block(DQ, "BLOCK_M", T, w, B * Hq,
            (q, k, v, dout, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
             *_strides(dq), Hq, T, w, group, qk_scale, scale), meta, q)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _like(t: torch.Tensor) -> torch.Tensor:
    return _empty(t.shape, t.dtype, t.device)


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """What the kernels compute in: t's dtype, but fp32 for bf16 on the interpreter (its bf16 tl.dot is wrong)."""
    return torch.float32 if t.dtype == torch.bfloat16 and not t.is_cuda and interpreting() else t.dtype


def _for_kernels(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [_last_dim_contiguous(t.to(_kernel_dtype(t))) for t in ts]


@torch.library.custom_op("nanochat::attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, T, Hq, D) in q's dtype, lse (B, Hq, T) fp32)."""
    qk, kk, vk = _for_kernels(q, k, v)
    B, T, Hq, _ = q.shape
    out, lse = _like(qk), _empty((B, Hq, T), torch.float32, q.device)
    if out.numel():
        _forward_into(qk, kk, vk, window, scale, out, lse)
    return out.to(q.dtype), lse


@_forward_op.register_fake
def _(q, k, v, window, scale):
    B, T, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, Hq, T, dtype=torch.float32)


@torch.library.custom_op("nanochat::attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype, recomputing the scores from the saved lse."""
    dout_k, qk, kk, vk, ok = _for_kernels(dout, q, k, v, out)
    dq, dk, dv = _like(qk), _like(kk), _like(vk)
    if q.numel():
        _backward_into(dout_k, qk, kk, vk, ok, lse, window, scale, dq, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, window, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale = inputs
    out, lse = output
    ctx.window, ctx.scale = window, scale
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(q: torch.Tensor) -> bool:
    """Our kernel takes q's dtype and head dim."""
    return q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.size(-1) in TRITON_HEAD_DIMS


@register("attention", "triton")
def _triton(q, k, v, window, scale=None):
    if not triton_runs_on(q):
        raise KernelUnavailable("attention: impl 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if not supports(q):
        raise KernelUnavailable(f"attention: impl 'triton' takes fp32/fp16/bf16 with head dim in {TRITON_HEAD_DIMS}, "
                                f"got {q.dtype} and D = {q.size(-1)}")
    return _forward_op(q, k, v, window, default_scale(q) if scale is None else float(scale))[0]


# ----------------------------------------------------------------------------------------------
# public function

def _check(q, k, v, window):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or q.size(3) != k.size(3) or k.size(2) == 0 or q.size(2) % k.size(2):
        raise ValueError(f"attention: expected q (B, T, Hq, D), k and v (B, T, Hkv, D) with Hkv dividing Hq; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"attention: window must be an int >= -1 (-1 = full), got {window!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1, impl: str = "auto",
              scale: float | None = None) -> torch.Tensor:
    """Causal attention with a sliding window. q (B, T, Hq, D), k and v (B, T, Hkv, D) -> (B, T, Hq, D).

    window: previous tokens visible (-1 = all; 0 = only itself). scale: of q·k before the softmax (None:
    1/sqrt(D)). impl: one of dispatch.IMPLS["attention"] or "auto" (on CUDA for bf16: FA3 on Hopper when
    installed, else SDPA's flash on full layers and ours on windowed ones; ours for other dtypes; elsewhere the
    blocked torch path). Every implementation is called as fn(q, k, v, window, scale).
    """
    _check(q, k, v, window)
    impl = choose("attention", impl, q, supports(q), full=full_window(window, q.size(1)))
    return implementation("attention", impl)(q, k, v, window, default_scale(q) if scale is None else float(scale))
