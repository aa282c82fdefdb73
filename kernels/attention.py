"""Causal sliding-window attention (FlashAttention-style), in the model's (B, T, H, D) layout.

Key j is visible to query i iff j <= i and i - j <= window (window -1 = full causal; 0 = itself only).
GQA: query head h reads kv head h // (Hq // Hkv). Softmax scale: `scale`, by default 1/sqrt(D).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import TRITON, KernelUnavailable, choose, implementation, interpreting, register, triton_runs_on
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
def _head(X, b, h, stride_b, stride_t, stride_h, B, T, H,
          BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Where head h of batch b of a (B, T, H, HEAD_DIM) tensor is read from, BLOCK rows at a time (_tile): TMA, a
    tensor descriptor over the whole tensor (Hopper's copy engine; b and h become coordinates); else its base."""
    if TMA:
        src = tl.make_tensor_descriptor(X, shape=[B, T, H, HEAD_DIM], strides=[stride_b, stride_t, stride_h, 1],
                                        block_shape=[1, BLOCK, 1, HEAD_DIM])
    else:
        src = X + b * stride_b + h * stride_h
    return src


@triton.jit
def _tile(src, b, h, start, stride_t, offs_d, T, MASKED: tl.constexpr, BLOCK: tl.constexpr,
          HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of a head from _head's source. Rows past T are zeros: with TMA always (the copy
    engine fills them), with pointers in MASKED blocks."""
    if TMA:
        x = src.load([b, start, h, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        x = _load_rows(src, start + tl.arange(0, BLOCK), stride_t, offs_d, T, MASKED)
    return x


@triton.jit
def _query_block(Hq, group, BLOCK_M: tl.constexpr):
    """This program's (batch, head) row, batch, query head, kv head and first query; the longest (latest)
    query blocks start first."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    return pid_bh, pid_bh // Hq, h, h // group, pid_m * BLOCK_M


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
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
               start, stop, T, window, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _tile(k_src, b, hk, start_n, stride_kt, offs_d, T, MASKED, BLOCK_N, HEAD_DIM, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p, alpha, l_i, m_i = _softmax_step(qk, l_i, m_i, rows, start_n + offs_n, window, qk_scale, MASKED)
        acc = acc * alpha[:, None]
        v = _tile(v_src, b, hk, start_n, stride_vt, offs_d, T, MASKED, BLOCK_N, HEAD_DIM, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
              stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
              B, Hq, Hkv, T, window, group, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_bh, b, h, hk, m0 = _query_block(Hq, group, BLOCK_M)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    k_src = _head(K, b64, hk, stride_kb, stride_kt, stride_kh, B, T, Hkv, BLOCK_N, HEAD_DIM, TMA)
    v_src = _head(V, b64, hk, stride_vb, stride_vt, stride_vh, B, T, Hkv, BLOCK_N, HEAD_DIM, TMA)
    q_src = _head(Q, b64, h, stride_qb, stride_qt, stride_qh, B, T, Hq, BLOCK_M, HEAD_DIM, TMA)
    q = _tile(q_src, b, h, m0, stride_qt, offs_d, T, True, BLOCK_M, HEAD_DIM, TMA)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo = _key_ranges(m0, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                               m0, tl.minimum(m0 + BLOCK_M, T), T, window, qk_scale,
                               True, BLOCK_N, HEAD_DIM, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                               full_lo, m0, T, window, qk_scale, False, BLOCK_N, HEAD_DIM, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                               lo, full_lo, T, window, qk_scale, True, BLOCK_N, HEAD_DIM, PRECISION, TMA)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows past T (never stored) would divide 0 by 0
    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=rows < T)
    tl.store(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
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
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
                cols, offs_d, start, stop, T, window, qk_scale, sm_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr):
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
        if FUSED_DQ:  # this key block's share of dq, added into the fp32 accumulator (FlashAttention-2's way)
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], dq, mask=rows[:, None] < T,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DQ,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                   stride_dqb, stride_dqt, stride_dqh,
                   Hq, Hkv, T, window, group, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                   FUSED_DQ: tl.constexpr):
    """dk, dv of one block of keys of one kv head, summed over the query heads of its GQA group. FUSED_DQ: also
    this block's share of each query head's dq, atomically added to DQ (fp32, zeroed): no dq kernel then."""
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
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_d, n0, diag_end, T, window, qk_scale, sm_scale,
                             True, BLOCK_M, PRECISION, FUSED_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_d, diag_end, mid_end, T, window, qk_scale, sm_scale,
                             False, BLOCK_M, PRECISION, FUSED_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_d, mid_end, q_end, T, window, qk_scale, sm_scale,
                             True, BLOCK_M, PRECISION, FUSED_DQ)

    kv_mask = cols[:, None] < T
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
              start, stop, T, window, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _tile(k_src, b, hk, start_n, stride_kt, offs_d, T, MASKED, BLOCK_N, HEAD_DIM, TMA)
        v = _tile(v_src, b, hk, start_n, stride_vt, offs_d, T, MASKED, BLOCK_N, HEAD_DIM, TMA)
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
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, O,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                 stride_dqb, stride_dqt, stride_dqh, stride_ob, stride_ot, stride_oh,
                 B, Hq, Hkv, T, window, group, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                 TMA: tl.constexpr, OWN_DELTA: tl.constexpr):
    """dq of one block of queries of one head: the forward's loop over key blocks, recomputing p from lse.
    OWN_DELTA: delta = rowsum(o·do) of its rows computed here from O and stored to DELTA (the dk/dv kernel, launched
    after this one, reads it): no preprocessing kernel, no second read of dO."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_bh, b, h, hk, m0 = _query_block(Hq, group, BLOCK_M)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = rows < T
    b64 = b.to(tl.int64)
    q_src = _head(Q, b64, h, stride_qb, stride_qt, stride_qh, B, T, Hq, BLOCK_M, HEAD_DIM, TMA)
    do_src = _head(DO, b64, h, stride_dob, stride_dot, stride_doh, B, T, Hq, BLOCK_M, HEAD_DIM, TMA)
    q = _tile(q_src, b, h, m0, stride_qt, offs_d, T, True, BLOCK_M, HEAD_DIM, TMA)
    do = _tile(do_src, b, h, m0, stride_dot, offs_d, T, True, BLOCK_M, HEAD_DIM, TMA)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=in_seq, other=0.0)
    if OWN_DELTA:
        o_src = _head(O, b64, h, stride_ob, stride_ot, stride_oh, B, T, Hq, BLOCK_M, HEAD_DIM, TMA)
        o = _tile(o_src, b, h, m0, stride_ot, offs_d, T, True, BLOCK_M, HEAD_DIM, TMA)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, delta, mask=in_seq)
    else:
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=in_seq, other=0.0)
    k_src = _head(K, b64, hk, stride_kb, stride_kt, stride_kh, B, T, Hkv, BLOCK_N, HEAD_DIM, TMA)
    v_src = _head(V, b64, hk, stride_vb, stride_vt, stride_vh, B, T, Hkv, BLOCK_N, HEAD_DIM, TMA)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, full_lo = _key_ranges(m0, window, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                   m0, tl.minimum(m0 + BLOCK_M, T), T, window, qk_scale, True, BLOCK_N, HEAD_DIM, PRECISION, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                   full_lo, m0, T, window, qk_scale, False, BLOCK_N, HEAD_DIM, PRECISION, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kt, stride_vt, rows, offs_n, offs_d,
                   lo, full_lo, T, window, qk_scale, True, BLOCK_N, HEAD_DIM, PRECISION, TMA)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_seq[:, None])


# Block sizes. On a GPU a small autotune set keyed on (T, window, D), for Hopper and Ampere alike: 8 warps for
# D = 128 (fewer registers per thread), 4 for D = 64. Under the interpreter one small config (tests change it to
# cover other block shapes).
def _configs(*specs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


_FWD_CONFIGS = _configs((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3))
_DKDV_CONFIGS = _configs((32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3))
# the fused-dq backward at D 128: only 8 warps keep its registers from spilling (bench.compile_check)
_DKDV_FUSED_CONFIGS = _configs((32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3))
_DQ_CONFIGS = _configs((128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3))
_TUNE_KEY = ["T", "window", "HEAD_DIM"]
tuned.register("attention.fwd", triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_attn_fwd))
tuned.register("attention.dkdv", triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dkdv))
# the autotuner runs every config on the real arguments: DQ, which the fused kernel adds into, is zeroed before each
tuned.register("attention.dkdv_fused",
               triton.autotune(_DKDV_FUSED_CONFIGS, key=_TUNE_KEY, reset_to_zero=["DQ"])(_attn_bwd_dkdv))
tuned.register("attention.dq", triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq))
# the kernels with TMA on: their own autotuners and table entries (the choice may differ), the same configs
for _name, _cfgs, _kernel in (("fwd", _FWD_CONFIGS, _attn_fwd), ("dq", _DQ_CONFIGS, _attn_bwd_dq)):
    tuned.register(f"attention.{_name}_tma", triton.autotune(_cfgs, key=_TUNE_KEY)(_kernel))
tuned.register("attention.dq_delta", triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq))  # OWN_DELTA on
# (BLOCK_M, BLOCK_N) without autotuning: under the interpreter, and for fp32 inputs on a GPU (exact dots on CUDA
# cores, where larger blocks spill registers: `python -m bench.compile_check` shows how much).
SMALL_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}

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


def _launch(kernel, name, T, window, heads, args, kwargs, q):
    """One program per (block of T, head): on a GPU for fp16/bf16 the tuned table's config (kernels/tuned.py) or
    autotuned; SMALL_BLOCKS for exact fp32 dots on a GPU (a correctness path: no tensor cores) and under the
    interpreter.
    The forward and dq kernels block the queries (BLOCK_M), the dk/dv kernel the keys (BLOCK_N)."""
    kind = name.split("_")[0]  # dkdv_fused, fwd_tma: variants of the dkdv and fwd kernels
    block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if interpreting() or kwargs["PRECISION"] == "ieee":
        sizes = dict(zip(("BLOCK_M", "BLOCK_N"), SMALL_BLOCKS[kind]))
        kernel[(triton.cdiv(T, sizes[block]), heads)](*args, **kwargs, **sizes, num_warps=4,
                                                      num_stages=1 if interpreting() else 2)
    else:
        key = dict(T=T, window=window, HEAD_DIM=kwargs["HEAD_DIM"], dtype=q.dtype)
        tuned.launch(f"attention.{name}", kernel, lambda meta: (triton.cdiv(T, meta[block]), heads), args, kwargs,
                     key, q.device)


def _window_arg(window: int, T: int) -> int:
    return T if full_window(window, T) else window  # full attention = a window longer than the sequence


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots (no tf32)


TRITON_IMPLS = TRITON["attention"]  # ours


def _tma_workspace(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a kernel builds on the device (triton.set_allocator's contract)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """A tensor descriptor needs a 16-byte aligned base and positive 16-byte multiple strides: t, or a copy."""
    aligned = t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _tma_inputs(*ts: torch.Tensor) -> list[torch.Tensor]:
    """ts as tensor descriptors can read them (_tma_ready), with the allocator for the descriptors set on a GPU (per
    call: triton keeps it per thread, and the backward runs on autograd's)."""
    if ts[0].is_cuda:
        triton.set_allocator(_tma_workspace)
    return [_tma_ready(t) for t in ts]


def _forward_into(q, k, v, window: int, scale: float, out, lse, impl: str = "triton") -> None:
    """Forward kernel into out (B, T, Hq, D) and lse (B, Hq, T) fp32: base-2 logsumexp of the scaled scores.
    impl "triton_tma": q, k, v read through tensor descriptors."""
    B, T, Hq, D = q.shape
    tma = impl == "triton_tma"
    if tma:
        q, k, v = _tma_inputs(q, k, v)
    w, meta = _window_arg(window, T), dict(HEAD_DIM=D, PRECISION=_precision(q), TMA=tma)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            B, Hq, k.size(2), T, w, Hq // k.size(2), LOG2E * scale)
    _launch(_attn_fwd, "fwd_tma" if tma else "fwd", T, w, B * Hq, args, meta, q)


def _backward_into(dout, q, k, v, out, lse, window: int, scale: float, dq, dk, dv, impl: str = "triton") -> None:
    """delta = rowsum(out·dout), then dk/dv per key block (summed over a GQA group), dq per query block. By impl:
      triton_fused_bwd  dq accumulated in fp32 by the dk/dv kernel instead (one kernel, atomics: summation order
                        not fixed);
      triton_tma        the dq kernel reads through tensor descriptors (the dk/dv kernel does not: with them it
                        spills at D 128, where it does not without; bench.compile_check);
      triton_dq_delta   the dq kernel runs first and computes delta itself (no preprocessing kernel)."""
    assert impl in TRITON_IMPLS, impl
    fused_dq, tma, dq_delta = impl == "triton_fused_bwd", impl == "triton_tma", impl == "triton_dq_delta"
    B, T, Hq, D = q.shape
    Hkv = k.size(2)
    delta = _empty((B, Hq, T), torch.float32, q.device)
    w, group, sm_scale = _window_arg(window, T), Hq // Hkv, scale
    qk_scale, meta = sm_scale * LOG2E, dict(HEAD_DIM=D, PRECISION=_precision(q))

    do_, q_, k_, v_ = _tma_inputs(dout, q, k, v) if tma else (dout, q, k, v)
    dq_launch = (_attn_bwd_dq, "dq_tma" if tma else "dq_delta" if dq_delta else "dq", T, w, B * Hq,
                 (q_, k_, v_, do_, dq, lse, delta, out, *_strides(q_), *_strides(k_), *_strides(v_), *_strides(do_),
                  *_strides(dq), *_strides(out), B, Hq, Hkv, T, w, group, qk_scale, sm_scale),
                 meta | dict(TMA=tma, OWN_DELTA=dq_delta), q)
    if dq_delta:  # the dq kernel first: it writes the delta the dk/dv kernel reads
        _launch(*dq_launch)
    else:
        pre_block = 32 if interpreting() else 128
        _attn_bwd_preprocess[(triton.cdiv(T, pre_block), B * Hq)](
            out, dout, delta, *_strides(out), *_strides(dout), Hq, T, HEAD_DIM=D, BLOCK_M=pre_block)
    dq_acc = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device) if fused_dq else dq
    _launch(_attn_bwd_dkdv, "dkdv_fused" if fused_dq else "dkdv", T, w, B * Hkv,
            (q, k, v, dout, dk, dv, lse, delta, dq_acc, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
             *_strides(dk), *_strides(dv), *_strides(dq_acc), Hq, Hkv, T, w, group, qk_scale, sm_scale),
            meta | dict(FUSED_DQ=fused_dq), q)
    if fused_dq:
        dq.copy_(dq_acc)
    elif not dq_delta:
        _launch(*dq_launch)


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
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                impl: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, T, Hq, D) in q's dtype, lse (B, Hq, T) fp32). impl (one of TRITON_IMPLS): which forward kernel
    (_forward_into) and which backward (_backward_into)."""
    qk, kk, vk = _for_kernels(q, k, v)
    B, T, Hq, _ = q.shape
    out, lse = _like(qk), _empty((B, Hq, T), torch.float32, q.device)
    if out.numel():
        _forward_into(qk, kk, vk, window, scale, out, lse, impl)
    return out.to(q.dtype), lse


@_forward_op.register_fake
def _(q, k, v, window, scale, impl="triton"):
    B, T, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, Hq, T, dtype=torch.float32)


@torch.library.custom_op("nanochat::attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, window: int, scale: float,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype, recomputing the scores from the saved lse."""
    dout_k, qk, kk, vk, ok = _for_kernels(dout, q, k, v, out)
    dq, dk, dv = _like(qk), _like(kk), _like(vk)
    if q.numel():
        _backward_into(dout_k, qk, kk, vk, ok, lse, window, scale, dq, dk, dv, impl)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, window, scale, impl):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale, impl = inputs
    out, lse = output
    ctx.window, ctx.scale, ctx.impl = window, scale, impl
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, ctx.window, ctx.scale, ctx.impl)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(q: torch.Tensor) -> bool:
    """Our kernel takes q's dtype and head dim."""
    return q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.size(-1) in TRITON_HEAD_DIMS


def _run_triton(q, k, v, window, scale, name: str):
    if not triton_runs_on(q):
        raise KernelUnavailable(f"attention: impl {name!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if not supports(q):
        raise KernelUnavailable(f"attention: impl {name!r} takes fp32/fp16/bf16 with head dim in {TRITON_HEAD_DIMS}, "
                                f"got {q.dtype} and D = {q.size(-1)}")
    return _forward_op(q, k, v, window, default_scale(q) if scale is None else float(scale), name)[0]


@register("attention", "triton")
def _triton(q, k, v, window, scale=None):
    return _run_triton(q, k, v, window, scale, "triton")


@register("attention", "triton_fused_bwd")
def _triton_fused_bwd(q, k, v, window, scale=None):
    """Ours with the one-kernel backward (dq by fp32 atomics); selectable, not auto, until a GPU shows it faster."""
    return _run_triton(q, k, v, window, scale, "triton_fused_bwd")


@register("attention", "triton_tma")
def _triton_tma(q, k, v, window, scale=None):
    """Ours with the forward's and the dq kernel's loads through tensor descriptors (TMA on Hopper); selectable, not
    auto, until a GPU shows it faster."""
    return _run_triton(q, k, v, window, scale, "triton_tma")


@register("attention", "triton_dq_delta")
def _triton_dq_delta(q, k, v, window, scale=None):
    """Ours with delta = rowsum(dO·O) computed by the dq kernel, launched first, instead of a kernel of its own;
    selectable, not auto, until a GPU shows it faster."""
    return _run_triton(q, k, v, window, scale, "triton_dq_delta")


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
