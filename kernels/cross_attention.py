"""Flash cross-attention for resampler queries, with split-KV, forward and backward.

Layout: q (Bq, Hq, Lq, D) with Bq in {1, B} (Bq = 1: one set of learnable queries, broadcast by a
zero batch stride, never copied); k, v (B, Hkv, Lk, D) with Hq = GROUP * Hkv (query head h reads
kv head h // GROUP: grouped-query attention by indexing); o (B, Hq, Lq, D). Any strides. D <= 256:
BLOCK_D is D rounded up to a power of two (at least 64), the tail masked (80, 96, 112 ...). Padding: keys at
positions >= kv_lens[b] and keys with key_mask[b, n] == False are not attended. Two sources
(TWO_SOURCES): the keys are k ‖ k2 (and v ‖ v2), read in place (``_kv_ptrs``); key n >= L1 is row
n - L1 of the second; key_mask then covers the first L1 keys and the second source is always attended.

Forward (online softmax, fp32 statistics in base 2: s = q.k * scale * log2(e)):
  A program's rows are one head's queries; with PACK_GQA (opt-in, ``attention_fwd(pack_gqa=True)``)
  they run over the GROUP query heads of one kv head and their queries, so each K/V tile loaded serves
  the whole group in the block.
  For each row block and a chunk of the keys (split s of S), stream K/V blocks keeping the running
  max m, the running sum l and the unnormalised output acc; store acc / l and lse = m + log2(l).
  With S = 1 that is the result. With S > 1 (flash-decoding: a few queries cannot fill 132 SMs,
  so the keys are split; S minimises the modelled time, ``choose_fwd_splits``), each split writes
  fp32 partials and ``attn_combine_kernel`` merges them:
  lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s - lse) o_s, in split order (deterministic).
  With COMBINE (the default, ``combine_in_kernel``) the merge runs in the same launch instead: each
  split counts its arrival on an integer counter per query block, and the last to arrive merges all
  partials from memory in split order, so the result is the same bits whichever program that is.
  A query row with no valid key gets o = 0 and lse = +inf, so that every recomputed probability
  2^(s - lse) in backward is 0: zero gradients, no NaN.
Backward (recompute P block by block from the saved lse; never the Lq x Lk matrix):
  delta = rowsum(dO * O)                                 attn_delta_kernel
  dK, dV: one program per (kv block, batch, kv head) loops over its GROUP query heads and all
          query blocks: dV += P^T dO, dK += dS^T Q      attn_bwd_dkdv_kernel
  dQ: one program per (query block, query head, Bq) loops over the batch when Bq = 1 (the
          gradient of broadcast queries) and over all key blocks: dQ += dS K
                                                         attn_bwd_dq_kernel
      For broadcast queries the batch loop is split (``choose_splits``) into fp32 partials summed in
      split order, else 32 programs would do Idefics2's whole dQ; at small batch the key loop splits
      too where the modelled time says so (``dq_splits_for``).
  with dS = P * (dP - delta), dP = dO V^T. Every output element has exactly one owner program that
  sums in a fixed order: no atomics, bitwise-reproducible gradients.
  Single pass (no query-head groups and every query in one block, where ``bwd_plan`` models it
  faster: BLIP-2's Q-Former, OpenFlamingo's perceiver): a dQ program then meets each (sample, head,
  key block) of its share alone, so it forms delta from O, and stores that block's dK and dV as it
  goes (nothing left to sum over): one launch instead of three, K and V read once instead of twice.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from mmfuse.kernels._common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    LAUNCH_US,
    PEAK_BYTES,
    PEAK_FLOPS,
    cdiv,
    empty,
    fp32_pair,
    gpu_config_on,
    next_pow2,
    num_sms,
    pair_value,
)
from mmfuse.kernels._launch import launch_kernel

LOG2E = 1.4426950408889634


@triton.jit
def _key_valid(offs_n, n_end, mask_row_ptr, stride_mn, L1, HAS_MASK: tl.constexpr, TWO_SOURCES: tl.constexpr):
    """Keys of this block that may be attended: inside the split / kv_len, and key_mask True. With two
    sources the mask covers the first (L1 keys) and the second is always attended."""
    valid = offs_n < n_end
    if HAS_MASK:
        if TWO_SOURCES:
            km = tl.load(mask_row_ptr + offs_n * stride_mn, mask=valid & (offs_n < L1), other=1)
        else:
            km = tl.load(mask_row_ptr + offs_n * stride_mn, mask=valid, other=0)
        valid = valid & (km != 0)
    return valid


@triton.jit
def _kv_ptrs(base, base2, offs_n, offs_d, stride_n, stride_d, stride2_n, stride2_d, L1,
             TWO_SOURCES: tl.constexpr, KEYS_ON_COLS: tl.constexpr):
    """Addresses of a K or V tile (keys x D, or D x keys with KEYS_ON_COLS). With TWO_SOURCES the keys
    are the concatenation of two tensors that is never built: key n < L1 is row n of source 1, key
    n >= L1 row n - L1 of source 2 (the perceiver's media ‖ latents); a tile may straddle L1."""
    if KEYS_ON_COLS:
        n = offs_n[None, :]
        d = offs_d[:, None]
    else:
        n = offs_n[:, None]
        d = offs_d[None, :]
    ptrs = base + n * stride_n + d * stride_d
    if TWO_SOURCES:
        ptrs = tl.where(n < L1, ptrs, base2 + (n - L1) * stride2_n + d * stride2_d)
    return ptrs


@triton.jit
def _merge_splits(op_base, o_offs, lsep_base, lse_offs, stride_ps, stride_qs, SPLITS, mask_m, mask,
                  ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(o, lse) of a row block from its SPLITS partials at ``op_base + o_offs`` (rows x D, fp32) and
    ``lsep_base + lse_offs`` (rows): lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s - lse) o_s, splits
    taken in order (deterministic); the split kernel's in-kernel combine and ``attn_combine_kernel``
    both call it, so the two give the same bits. Loads bypass L1 (.cg): in the in-kernel combine they
    read what other programs wrote. Rows with no valid key in any split get o = 0, lse = +inf."""
    m = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(lsep_base + s * stride_qs + lse_offs, mask=mask_m, other=float("-inf"),
                                  cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    for s in range(0, SPLITS):
        w = tl.exp2(tl.load(lsep_base + s * stride_qs + lse_offs, mask=mask_m, other=float("-inf"),
                            cache_modifier=".cg") - m_safe)
        total += w
        acc += w[:, None] * tl.load(op_base + s * stride_ps + o_offs, mask=mask, other=0.0, cache_modifier=".cg")
    empty_row = total == 0.0
    out = acc / tl.where(empty_row, 1.0, total)[:, None]
    lse = tl.where(empty_row, float("inf"), m_safe + tl.log2(tl.where(empty_row, 1.0, total)))
    return out, lse


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, o_ptr, lse_ptr, merged_o_ptr, merged_lse_ptr, arrivals_ptr,
    kv_lens_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_k2b, stride_k2h, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2n, stride_v2d,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_fob, stride_foh, stride_fom, stride_fod,
    stride_flb, stride_flh, stride_flm,
    stride_mb, stride_mn, stride_lens,
    Hkv, Lq, Lk, L1, D, GROUP, CHUNK, SPLITS, qk_scale, qk_scale_lo,
    HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr, TWO_SOURCES: tl.constexpr, PARTIAL: tl.constexpr,
    COMBINE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr, PACK_GQA: tl.constexpr,
):
    # The scales come as fp32 pairs (hi, lo): a GPU passes a Python float as fp32, and fp64 needs more.
    qk_scale = pair_value(qk_scale, qk_scale_lo, ACC_DTYPE)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        # The rows run over the GROUP query heads that read this kv head (pid_bh = b * Hkv + kv head),
        # then their queries: row r is query r % Lq of head hkv * GROUP + r // Lq, so a K/V tile loaded
        # once serves every head of the group in the block (one head per block when Lq is a multiple of
        # BLOCK_M). (Lq may arrive as the constant 1: the JIT specialises it.)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        head_in_group = rows // Lq
        h = hkv * GROUP + head_in_group
        m = rows - head_in_group * Lq
        row_ok = rows < GROUP * Lq
    else:  # one query head per program (pid_bh = b * Hq + head): its Lq queries
        b = pid_bh // (Hkv * GROUP)
        h = pid_bh % (Hkv * GROUP)
        hkv = h // GROUP
        m = rows
        row_ok = rows < Lq
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # a power-of-two head dim: no column mask at all
        mask_d = tl.full((BLOCK_D,), 1, tl.int1)
    else:
        mask_d = offs_d < D
    q_rows = h * stride_qh + m * stride_qm  # (with one head per program, h is the program's one)
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)

    # This program's keys: [n_start, n_end), clipped to the sample's length.
    n_start = split * CHUNK
    n_end = tl.minimum(n_start + CHUNK, Lk)
    if HAS_LENS:
        n_end = tl.minimum(n_end, tl.load(kv_lens_ptr + b * stride_lens).to(tl.int32))
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    k2_base = k2_ptr + b * stride_k2b + hkv * stride_k2h
    v2_base = v2_ptr + b * stride_v2b + hkv * stride_v2h
    mask_row = mask_ptr + b * stride_mb

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if EVEN_N:  # full key blocks, no padding: every key mask below folds away
            valid = tl.full((BLOCK_N,), 1, tl.int1)
        else:
            valid = _key_valid(offs_n, n_end, mask_row, stride_mn, L1, HAS_MASK, TWO_SOURCES)
        kt = tl.load(_kv_ptrs(k_base, k2_base, offs_n, offs_d, stride_kn, stride_kd, stride_k2n, stride_k2d, L1,
                              TWO_SOURCES, True), mask=valid[None, :] & mask_d[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
        m_new = tl.maximum(m_i, tl.max(tl.where(valid[None, :], qk * qk_scale, float("-inf")), 1))
        # Rows that have seen no valid key yet keep m = -inf: subtract 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        # qk * scale - m as one fma: the product is not rounded before the max is subtracted, so
        # large logits keep their low bits (the rounding of m itself is common to the row and
        # cancels against l).
        p = tl.where(valid[None, :], tl.exp2(tl.fma(qk, qk_scale, -m_safe[:, None])), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_kv_ptrs(v_base, v2_base, offs_n, offs_d, stride_vn, stride_vd, stride_v2n, stride_v2d, L1,
                             TWO_SOURCES, False), mask=valid[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
        m_i = m_new

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = m_i + tl.log2(tl.where(empty_row, 1.0, l_i))
    # An empty partial weighs nothing in the merge (-inf); an empty final row makes every
    # recomputed probability 2^(s - lse) zero in backward (+inf).
    lse = tl.where(empty_row, float("-inf") if PARTIAL else float("inf"), lse)
    o_rows = h * stride_oh + m * stride_om
    lse_rows = h * stride_lh + m * stride_lm
    o_ptrs = o_ptr + split * stride_os + b * stride_ob + o_rows[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])
    tl.store(lse_ptr + split * stride_ls + b * stride_lb + lse_rows, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)

    if COMBINE:
        # The split of this query block that arrives last merges all of them, in split order, from
        # memory (its own partial too): the result does not depend on which split that is. The barrier
        # puts every warp's partial stores before the arrival, whose release publishes them and whose
        # acquire (in the last program) orders the merge's loads after every other split's release.
        # Integer atomics only: nothing is summed in arrival order.
        tl.debug_barrier()
        arrival = arrivals_ptr + pid_bh * tl.num_programs(0) + pid_m
        if tl.atomic_add(arrival, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            out, lse = _merge_splits(
                o_ptr + b * stride_ob, o_rows[:, None] + offs_d[None, :] * stride_od, lse_ptr + b * stride_lb,
                lse_rows, stride_os, stride_ls, SPLITS, row_ok, row_ok[:, None] & mask_d[None, :], ACC_DTYPE,
                BLOCK_M, BLOCK_D)
            tl.store(merged_o_ptr + b * stride_fob + (h * stride_foh + m * stride_fom)[:, None]
                     + offs_d[None, :] * stride_fod, out.to(merged_o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & mask_d[None, :])
            tl.store(merged_lse_ptr + b * stride_flb + h * stride_flh + m * stride_flm,
                     lse.to(merged_lse_ptr.dtype.element_ty), mask=row_ok)
            tl.store(arrival, 0)  # back to zero for the next launch (kernel boundaries order it)


@triton.jit
def attn_combine_kernel(
    op_ptr, lsep_ptr, o_ptr, lse_ptr,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
    stride_qs, stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    Hq, Lq, D, SPLITS,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o = sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s, splits merged in order."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    out, lse = _merge_splits(
        op_ptr + b * stride_pb + h * stride_ph, offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd,
        lsep_ptr + b * stride_qb + h * stride_qh, offs_m * stride_qm, stride_ps, stride_qs, SPLITS, mask_m, mask,
        ACC_DTYPE, BLOCK_M, BLOCK_D)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse.to(lse_ptr.dtype.element_ty),
             mask=mask_m)


@triton.jit
def attn_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_db, stride_dh, stride_dm,
    Hq, Lq, D,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O): the softmax backward's correction term, computed once per row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(ACC_DTYPE)
    do = tl.load(do_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(delta_ptr + b * stride_db + h * stride_dh + offs_m * stride_dm, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk2_ptr, dv2_ptr,
    kv_lens_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_k2b, stride_k2h, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2n, stride_v2d,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn, stride_lens,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dk2b, stride_dk2h, stride_dk2n, stride_dk2d,
    stride_dv2b, stride_dv2h, stride_dv2n, stride_dv2d,
    Hkv, Lq, Lk, L1, D, GROUP, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr, TWO_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dK, dV of one key block of one (batch, kv head): sums over the GROUP query heads sharing it
    and over every query block, in that fixed order. EVEN_D: D is a power of two (no column masks)."""
    qk_scale = pair_value(qk_scale, qk_scale_lo, ACC_DTYPE)  # (hi, lo): ``fp32_pair``
    sm_scale = pair_value(sm_scale, sm_scale_lo, ACC_DTYPE)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # (Without column masks the 2-byte D = 64 tile keeps to 255 registers on sm_80 with Triton 3.6, where
    # the one loop below spilled 16 B with them.)
    mask_d = (offs_d < BLOCK_D) if EVEN_D else (offs_d < D)
    n_end = Lk
    if HAS_LENS:
        n_end = tl.minimum(n_end, tl.load(kv_lens_ptr + b * stride_lens).to(tl.int32))
    valid = _key_valid(offs_n, n_end, mask_ptr + b * stride_mb, stride_mn, L1, HAS_MASK, TWO_SOURCES)
    kv_mask = (offs_n < Lk)[:, None] & mask_d[None, :]
    k = tl.load(_kv_ptrs(k_ptr + b * stride_kb + hkv * stride_kh, k2_ptr + b * stride_k2b + hkv * stride_k2h,
                         offs_n, offs_d, stride_kn, stride_kd, stride_k2n, stride_k2d, L1, TWO_SOURCES, False),
                mask=kv_mask, other=0.0)
    v = tl.load(_kv_ptrs(v_ptr + b * stride_vb + hkv * stride_vh, v2_ptr + b * stride_v2b + hkv * stride_v2h,
                         offs_n, offs_d, stride_vn, stride_vd, stride_v2n, stride_v2d, L1, TWO_SOURCES, False),
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    # One loop over (query head of the group, query block), head-major: the sums' fixed order, and one
    # pipeline. Nested loops let the pipeliner prefetch within a head only: it drained every copy and
    # waited for the next head's first block at each head (Idefics2: 4 exposed waits a program, not 1).
    m_blocks = tl.cdiv(Lq, BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    q_tile = rows[:, None] * stride_qm + offs_d[None, :] * stride_qd  # (the same offsets every iteration)
    do_tile = rows[:, None] * stride_gm + offs_d[None, :] * stride_gd
    for it in range(0, GROUP * m_blocks):
        h = hkv * GROUP + it // m_blocks
        m0 = (it % m_blocks) * BLOCK_M
        offs_m = m0 + rows
        mask_m = offs_m < Lq
        q = tl.load(q_ptr + (b * stride_qb + h * stride_qh + m0 * stride_qm) + q_tile,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptr + (b * stride_gb + h * stride_gh + m0 * stride_gm) + do_tile,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        row = b * stride_lb + h * stride_lh + offs_m * stride_lm
        lse = tl.load(lse_ptr + row, mask=mask_m, other=float("inf"))  # padded rows: P = 0
        delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
        # Padding query rows are left out too: their q = 0 meets a key of -inf as 0 * inf = NaN.
        # (Selecting before the exp2 kept D = 256 spill-free on Triton 3.6-3.8 sm_90; after it, not.)
        p = tl.exp2(tl.where(mask_m[:, None] & valid[None, :], tl.fma(qk, qk_scale, -lse[:, None]),
                             float("-inf")))
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
    # Two sources: the rows of a straddling block go to their own output.
    dk_ptrs = _kv_ptrs(dk_ptr + b * stride_dkb + hkv * stride_dkh, dk2_ptr + b * stride_dk2b + hkv * stride_dk2h,
                       offs_n, offs_d, stride_dkn, stride_dkd, stride_dk2n, stride_dk2d, L1, TWO_SOURCES, False)
    # A key left out has P = 0, but a NaN in its v still reaches its dS column as 0 * NaN: its dK is 0.
    # (Once here, not per query block: masking the K/V loads by ``valid`` spilled at D = 256.)
    dk = tl.where(valid[:, None], dk * sm_scale, 0.0)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    dv_ptrs = _kv_ptrs(dv_ptr + b * stride_dvb + hkv * stride_dvh, dv2_ptr + b * stride_dv2b + hkv * stride_dv2h,
                       offs_n, offs_d, stride_dvn, stride_dvd, stride_dv2n, stride_dv2d, L1, TWO_SOURCES, False)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kv_lens_ptr, mask_ptr,
    o_ptr, dk_ptr, dv_ptr, dk2_ptr, dv2_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_k2b, stride_k2h, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2n, stride_v2d,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn, stride_lens,
    stride_dqs, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dk2b, stride_dk2h, stride_dk2n, stride_dk2d,
    stride_dv2b, stride_dv2h, stride_dv2n, stride_dv2d,
    Hq, Lq, Lk, L1, D, GROUP, BATCH_LOOP, BATCH_CHUNK, KEY_CHUNK, KEY_SPLITS, qk_scale, qk_scale_lo, sm_scale,
    sm_scale_lo,
    HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr, TWO_SOURCES: tl.constexpr, SINGLE_PASS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one (query batch, head). For broadcast queries (Bq = 1) the program
    loops over the BATCH_LOOP samples that share them, in order: dQ is their fixed-order sum. Split
    (grid axis 2): split s takes samples [s*BATCH_CHUNK, (s+1)*BATCH_CHUNK) and writes its own fp32
    partial at s*stride_dqs; the launcher sums the partials in split order. A grid of query blocks x
    heads alone is 32 programs for Idefics2, whatever the batch: the split is what fills the GPU. At
    small batch the keys split too (KEY_SPLITS chunks of KEY_CHUNK keys, a multiple of BLOCK_N): split
    s takes batch chunk s // KEY_SPLITS and key chunk s % KEY_SPLITS, one fp32 partial each.

    SINGLE_PASS (GROUP = 1 and one query block holds every query, the launcher's condition): then this
    program is the only one to meet each (sample, head, key block) it visits, so it also stores that
    block's dK and dV (complete: there is no other query block or head to sum over) and forms delta
    from O itself. The whole backward is this one launch, and K, V are read once instead of twice."""
    qk_scale = pair_value(qk_scale, qk_scale_lo, ACC_DTYPE)  # (hi, lo): ``fp32_pair``
    sm_scale = pair_value(sm_scale, sm_scale_lo, ACC_DTYPE)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bq = pid_bh // Hq
    h = pid_bh % Hq
    hkv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_md = mask_m[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + bq * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    # Split s (grid axis 2) = (batch chunk s // KEY_SPLITS, key chunk s % KEY_SPLITS).
    split = tl.program_id(2)
    batch_split = split // KEY_SPLITS
    n_start = (split % KEY_SPLITS) * KEY_CHUNK
    for i in range(batch_split * BATCH_CHUNK, tl.minimum(batch_split * BATCH_CHUNK + BATCH_CHUNK, BATCH_LOOP)):
        b = bq + i  # bq = 0 when looping over the batch; i = 0 otherwise
        do = tl.load(do_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm
                     + offs_d[None, :] * stride_gd, mask=mask_md, other=0.0)
        row = b * stride_lb + h * stride_lh + offs_m * stride_lm
        lse = tl.load(lse_ptr + row, mask=mask_m, other=float("inf"))
        if SINGLE_PASS:
            o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                        + offs_d[None, :] * stride_od, mask=mask_md, other=0.0)
            delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
        else:
            delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
        n_end = Lk
        if HAS_LENS:
            n_end = tl.minimum(n_end, tl.load(kv_lens_ptr + b * stride_lens).to(tl.int32))
        # Keys past kv_lens still get their dK = dV = 0 stored when this program owns them.
        n_stop = tl.minimum(Lk if SINGLE_PASS else n_end, n_start + KEY_CHUNK)
        n_end = tl.minimum(n_end, n_start + KEY_CHUNK)
        for n0 in range(n_start, n_stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = _key_valid(offs_n, n_end, mask_ptr + b * stride_mb, stride_mn, L1, HAS_MASK, TWO_SOURCES)
            kv_mask = valid[:, None] & (offs_d < D)[None, :]
            k = tl.load(_kv_ptrs(k_ptr + b * stride_kb + hkv * stride_kh, k2_ptr + b * stride_k2b + hkv * stride_k2h,
                                 offs_n, offs_d, stride_kn, stride_kd, stride_k2n, stride_k2d, L1, TWO_SOURCES,
                                 False), mask=kv_mask, other=0.0)
            v = tl.load(_kv_ptrs(v_ptr + b * stride_vb + hkv * stride_vh, v2_ptr + b * stride_v2b + hkv * stride_v2h,
                                 offs_n, offs_d, stride_vn, stride_vd, stride_v2n, stride_v2d, L1, TWO_SOURCES,
                                 False), mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
            keep = valid[None, :]
            if SINGLE_PASS:  # dK sums over the query rows: a padding row's q = 0 meets a -inf key as NaN
                keep = keep & mask_m[:, None]
            p = tl.where(keep, tl.exp2(tl.fma(qk, qk_scale, -lse[:, None])), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE).to(ACC_DTYPE)
            if SINGLE_PASS:
                # K and V were loaded as 0 where a key is left out, so P, dP and dS are 0 there and so
                # are its dK and dV: no select needed (a NaN in a masked-out row never enters).
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                store_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
                tl.store(_kv_ptrs(dk_ptr + b * stride_dkb + hkv * stride_dkh,
                                  dk2_ptr + b * stride_dk2b + hkv * stride_dk2h, offs_n, offs_d, stride_dkn,
                                  stride_dkd, stride_dk2n, stride_dk2d, L1, TWO_SOURCES, False),
                         (dk.to(ACC_DTYPE) * sm_scale).to(dk_ptr.dtype.element_ty), mask=store_mask)
                tl.store(_kv_ptrs(dv_ptr + b * stride_dvb + hkv * stride_dvh,
                                  dv2_ptr + b * stride_dv2b + hkv * stride_dv2h, offs_n, offs_d, stride_dvn,
                                  stride_dvd, stride_dv2n, stride_dv2d, L1, TWO_SOURCES, False),
                         dv.to(ACC_DTYPE).to(dv_ptr.dtype.element_ty), mask=store_mask)
    dq_ptrs = (dq_ptr + split * stride_dqs + bq * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
               + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Block sizes and the split rule
# ----------------------------------------------------------------------------------------------
#: Under the interpreter: small blocks, so odd sizes span several of them.
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32)
#: Wave efficiency the split count aims for (132 SMs on an H100).
TARGET_WAVE_EFFICIENCY = 0.85
MAX_SPLITS = 64
#: Pipeline depth of the tensor-core tiles (2-byte inputs, TF32). With 2, Triton's pipeliner issues the
#: next key block's copies at the end of an iteration and waits for *all* copies (``async_wait
#: {num = 0}`` in the TTGIR) at the top of the next: the load latency is exposed once per key block,
#: hidden only behind the async P.V product. With 3 the wait leaves the following block's copies in
#: flight (``num = 2``), one whole iteration of compute ahead. Measured with 2 on an H100: ~1.8 us per
#: key block per program at 64 queries x 64 keys x D 128, one program per SM (Idefics2's resampler, 144
#: us at batch 8, 29.6 us at batch 1), ~15% of an SM's tensor-core rate (bench/NOTES.md, session 18).
#: The FMA (IEEE fp32) and fp64 tiles keep 2: not the speed path, and their registers were tuned at 2.
TENSOR_CORE_STAGES = 3


def block_d(D: int, gpu: bool | None = None) -> int:
    """The head-dim tile: D rounded up to a power of two, the tail masked; on a GPU at least 64. Head
    dims below 64 (none in bench/shapes.py; the gradchecks' tiny ones) share the 64 tile there, their
    MMAs multiplying zero columns (up to 4x the work at D = 16, on shapes that cost microseconds), so
    two tile families fewer are compiled and tested for every dtype and kernel. The interpreter keeps
    16 (its verdicts at tiny D, e.g. the large-logit test, were measured with it)."""
    if gpu is None:
        gpu = not INTERPRET or gpu_config_on()
    return max(64 if gpu else 16, next_pow2(D))


def gpu_blocks(Lq: int, D: int, backward: bool = False, elem_bytes: int = 2, combine: bool = False,
               ieee: bool = False) -> dict:
    """Tiles on a GPU, chosen so that no config spills on sm_80 or sm_90 (the compile test checks).
    Forward: 64 queries (32 when there are fewer, for 2-byte inputs to D = 128) x 64
    keys (32 past D = 128, and past D = 64 for 4-byte inputs, whose Q tile alone is 64 x 128 fp32),
    4 warps at D <= 128 for 2-byte inputs, else 8: at 64 rows and 8 warps both warpgroups computed the
    same Q.K^T and softmax (the TTGIR lays 8 warps along 64 rows), and on an H100 Idefics2's resampler
    (D = 96) took 104.5 us at 8 warps, 75.2 at 4 (batch 8, 3 stages; bench/NOTES.md, session 20).
    Backward: 32 queries x 64 keys (16 past D = 128), 8 warps: the dK/dV program keeps two fp32 (keys x D)
    accumulators plus its K and V tiles in registers. Tensor-core tiles (2-byte inputs, TF32) pipeline
    ``TENSOR_CORE_STAGES`` deep (TF32's dK/dV 2). fp64 (gradcheck, not speed): 16 queries (32 at D <= 64
    forward) x 16 keys; an fp64 value takes two registers and an MMA's A operand (Q, dO) is held whole by
    every warp of its rows: 32-row tiles spilled from D = 128, and these are the tiles that compile clean on
    Triton 3.6-3.9, except dK/dV past D = 64 and dQ at D = 256, which spill on every tile tried
    (bench/NOTES.md).
    ``combine``: the forward merging its split partials in the kernel, whose merge tile sits beside the
    forward's registers: 8 warps for the 64-query tile at D <= 64 (4 spilled 8 B on sm_80, Triton 3.9);
    at D = 65-128 it keeps 4 (255 registers on sm_80, no spill on Triton 3.6-3.9; H100, Idefics2 at
    batch 1 split 6 ways: 22.2 us against 27.4 at 8 warps).
    ``ieee``: 4-byte inputs without TF32, whose dots run on FMA units and hold operand rows per thread:
    the forward takes 64 x 32 at D <= 64 and 32 x 16 beyond (the TF32 tiles spilled 72-7936 B; these
    compile clean with or without the combine on Triton 3.6-3.9, 63-164 registers); the backward 16
    queries x 32 keys at D <= 64 and 16 x 16 beyond, 8 warps, two stages except dQ and the single pass
    at D = 65-128 (one: with two they spilled 8 B on sm_90) and dK/dV (``dkdv_num_stages``: one; its loop
    over the group's heads and query blocks, one loop since session 21, spilled 1.6 KB at two stages on
    Triton 3.9 and takes 62-80 registers at one). dK/dV at D = 256 spilled on every tile tried (320-400 B
    at 16 x 16)."""
    bd = block_d(D, gpu=True)
    if ieee and elem_bytes == 4:
        if backward:
            return dict(BLOCK_M=16, BLOCK_N=32 if bd <= 64 else 16, num_warps=8,
                        num_stages=1 if bd == 128 else 2, dkdv_num_stages=1)
        return dict(BLOCK_M=64 if bd <= 64 else 32, BLOCK_N=32 if bd <= 64 else 16, num_warps=8, num_stages=2)
    if elem_bytes == 8:
        if backward:
            return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)
        return dict(BLOCK_M=32 if bd <= 64 else 16, BLOCK_N=16, num_warps=4, num_stages=2)
    if backward:
        # 4-byte inputs past D = 64: 16 queries (32 spilled 32 B in dK/dV with TF32 at D = 128 on sm_90,
        # Triton 3.6 / 3.8 / 3.9, and 16-32 B at D = 256 on 3.6).
        # TF32's dK/dV keeps 2 stages: with 3 it spilled 8 B on sm_80 at D = 64 and 256 (Triton 3.6 / 3.7).
        return dict(BLOCK_M=16 if (bd > 64 and elem_bytes == 4) else 32, BLOCK_N=64 if bd <= 128 else 16,
                    num_warps=8, num_stages=TENSOR_CORE_STAGES,
                    dkdv_num_stages=2 if elem_bytes == 4 else TENSOR_CORE_STAGES)
    warps = 4 if (bd <= 128 and elem_bytes <= 2) else 8
    wide = bd > (128 if elem_bytes <= 2 else 64)
    # A 32-query tile only for 2-byte inputs up to D = 128: fp32 is not the speed path (and each tile
    # is a config compiled per Triton version and dtype), and at D = 256 the 32x32 tile spilled 8 B on
    # sm_90 (Triton 3.6) where the 64-query one does not.
    short = Lq <= 32 and elem_bytes <= 2 and bd <= 128
    if combine and not short and warps == 4 and bd <= 64:
        warps = 8
    return dict(BLOCK_M=32 if short else 64, BLOCK_N=32 if wide else 64, num_warps=warps,
                num_stages=TENSOR_CORE_STAGES)


def dq_blocks(blk: dict) -> dict:
    """dQ's tiles at backward tiles ``blk``: the same, unless ``blk["dq"]`` overrides some of them (the
    kernel profile's sweep times dQ's tile apart from dK/dV's, which share it; no rule sets it yet)."""
    return dict(blk, **blk["dq"]) if "dq" in blk else blk


def dkdv_stages(blk: dict) -> int:
    """Pipeline stages of the dK/dV launch at backward tiles ``blk``: their own where ``gpu_blocks``
    gives dK/dV other stages than dQ (IEEE fp32 at D = 65-128, TF32), else the tiles' ``num_stages``."""
    return blk.get("dkdv_num_stages", blk["num_stages"])


def blocks_for(Lq: int, D: int, backward: bool = False, elem_bytes: int = 2, combine: bool = False,
               ieee: bool = False) -> dict:
    if INTERPRET and not gpu_config_on():
        return dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1)
    return gpu_blocks(Lq, D, backward, elem_bytes, combine, ieee)


def single_pass_blocks(Lq: int, D: int, elem_bytes: int = 2, gpu: bool | None = None, ieee: bool = False) -> dict:
    """Tiles of the single-pass backward: the backward's, except that 33-64 queries take one 64-query
    block for 2-byte inputs at D <= 64 (OpenFlamingo's 64 latents), where the program's Q, dO, O and
    fp32 dQ tiles still fit beside a key block's (the compile check holds it to no spills)."""
    if gpu is None:
        gpu = not INTERPRET or gpu_config_on()
    if not gpu:
        return dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1)
    blk = gpu_blocks(Lq, D, backward=True, elem_bytes=elem_bytes, ieee=ieee)
    if blk["BLOCK_N"] > 32:
        blk = dict(blk, BLOCK_N=32)
    if 32 < Lq <= 64 and elem_bytes <= 2 and block_d(D, gpu=True) <= 64:
        blk = dict(blk, BLOCK_M=64)
    return blk


def rowwise_blocks(D: int, gpu: bool | None = None) -> dict:
    """Tiles of the row-wise kernels (split combine, delta): whole rows of BLOCK_D, and as many rows as
    keep one (rows x BLOCK_D) fp32 tile at 32 values per thread of 4 warps, so no head dim spills
    (64 rows at D <= 64, 32 at D <= 128, 16 at D = 256). The interpreter takes its small blocks."""
    if gpu is None:
        gpu = not INTERPRET or gpu_config_on()
    bd = block_d(D, gpu)
    rows = max(16, min(64, 4096 // bd)) if gpu else INTERPRETER_BLOCKS["BLOCK_M"]
    return dict(BLOCK_M=rows, BLOCK_D=bd, num_warps=4)


def split_efficiency(programs: int, key_blocks: int, splits: int, sms: int) -> float:
    """Useful key-block iterations over those the occupied waves could run, one program per SM at a
    time: programs * splits programs each run ceil(key_blocks / splits) blocks."""
    per_split = cdiv(key_blocks, splits)
    launched = programs * cdiv(key_blocks, per_split)
    waves = cdiv(launched, sms)
    return programs * key_blocks / (waves * sms * per_split)


def choose_splits(programs: int, key_blocks: int, sms: int) -> int:
    """The fewest splits of the keys reaching TARGET_WAVE_EFFICIENCY (fewer splits = less combine
    traffic), else the most efficient count. ``programs`` = query blocks x batch x heads."""
    best, best_eff = 1, 0.0
    for s in range(1, min(MAX_SPLITS, key_blocks) + 1):
        eff = split_efficiency(programs, key_blocks, s, sms)
        if eff >= TARGET_WAVE_EFFICIENCY:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def dq_efficiency(programs: int, batch_loop: int, key_blocks: int, b: int, k: int, sms: int) -> float:
    """Useful (sample, key block) iterations of dQ over what its occupied waves could run, with the
    batch loop split ``b`` ways and the keys ``k`` ways."""
    per = cdiv(batch_loop, b) * cdiv(key_blocks, k)
    return programs * batch_loop * key_blocks / (cdiv(programs * b * k, sms) * sms * per)


def dq_splits_for(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, blocks: dict,
                  sms: int, single_pass: bool = False) -> tuple[int, int]:
    """(batch splits, key splits) of dQ (``_dq_splits``, cached per shape: it runs on every backward).
    ``single_pass``: of the launch that also writes dK, dV (``attn_bwd_dq_kernel``'s SINGLE_PASS)."""
    return _dq_splits(B, Bq, Hq, Hkv, Lq, Lk, D, elem, blocks["BLOCK_M"], blocks["BLOCK_N"], sms, single_pass)[:2]


@functools.lru_cache(maxsize=4096)
def _dq_splits(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, block_m: int, block_n: int,
               sms: int, single_pass: bool = False) -> tuple[int, int, float]:
    """(batch splits, key splits, modelled µs) of dQ. The batch loop of shared queries splits first
    (``choose_splits``); when that cannot reach TARGET_WAVE_EFFICIENCY (batch 1, or few samples) the
    keys may split too, if the modelled time says so (roofline at the grid's efficiency, the fp32
    partials written and read back, the summing launch): Idefics2 at batch 1 (32 programs over 78 key
    blocks) splits, the short key sets of OpenFlamingo and BLIP-2 do not. The single pass does five
    matrix products instead of three, reads O and writes dK, dV besides."""
    programs = cdiv(Lq, block_m) * Bq * Hq
    batch_loop = B if Bq == 1 else 1
    key_blocks = max(1, cdiv(Lk, block_n))
    b = choose_splits(programs, batch_loop, sms)
    b = cdiv(batch_loop, cdiv(batch_loop, b))
    k = choose_splits(programs * b, key_blocks, sms)
    k = cdiv(key_blocks, cdiv(key_blocks, k))
    flops = (10 if single_pass else 6) * B * Hq * Lq * Lk * D
    base = (2 * B * Hkv * Lk + B * Hq * Lq + Bq * Hq * Lq) * D * elem
    if single_pass:
        base += (2 * B * Hkv * Lk + B * Hq * Lq) * D * elem
    partial = Bq * Hq * Lq * D * 4

    def us(kk):
        total = b * kk
        t = max(flops / (PEAK_FLOPS * dq_efficiency(programs, batch_loop, key_blocks, b, kk, sms)),
                (base + (total * partial if total > 1 else partial // 2)) / PEAK_BYTES) * 1e6 + LAUNCH_US
        return t + ((total * partial + partial // 2) / PEAK_BYTES * 1e6 + LAUNCH_US if total > 1 else 0.0)

    if split_efficiency(programs, batch_loop, b, sms) >= TARGET_WAVE_EFFICIENCY or us(k) >= us(1):
        return b, 1, us(1)
    return b, k, us(k)


def single_pass_eligible(Hq: int, Hkv: int, Lq: int, block_m: int) -> bool:
    """The single-pass backward's condition: each (sample, head, key block) is met by exactly one dQ
    program, i.e. no query-head group shares the keys and one query block holds every query."""
    return Hq == Hkv and 1 <= Lq <= block_m


def bwd_plan(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, blocks: dict,
             single_blocks: dict, sms: int) -> tuple[bool, int, int]:
    """(single pass, dQ's batch splits, dQ's key splits) of a backward needing every gradient: the
    single pass (at ``single_blocks``) where it is allowed and its modelled time is lower than that of
    delta + dK/dV + dQ (at ``blocks``). ``_bwd_plan``, cached per shape."""
    return _bwd_plan(B, Bq, Hq, Hkv, Lq, Lk, D, elem, blocks["BLOCK_M"], blocks["BLOCK_N"],
                     single_blocks["BLOCK_M"], single_blocks["BLOCK_N"], sms)


@functools.lru_cache(maxsize=4096)
def _bwd_plan(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, block_m: int, block_n: int,
              single_m: int, single_n: int, sms: int) -> tuple[bool, int, int]:
    b, k, dq_us = _dq_splits(B, Bq, Hq, Hkv, Lq, Lk, D, elem, block_m, block_n, sms)
    if not single_pass_eligible(Hq, Hkv, Lq, single_m):
        return False, b, k
    rows = B * Hq * Lq
    delta_us = (2 * rows * D * elem + rows * 4) / PEAK_BYTES * 1e6 + LAUNCH_US
    dkdv_programs = max(1, cdiv(Lk, block_n)) * B * Hkv
    dkdv_bytes = (4 * B * Hkv * Lk + Bq * Hq * Lq + rows) * D * elem + 2 * rows * 4
    dkdv_eff = dkdv_programs / (cdiv(dkdv_programs, sms) * sms)
    dkdv_us = max(8 * B * Hq * Lq * Lk * D / (PEAK_FLOPS * dkdv_eff), dkdv_bytes / PEAK_BYTES) * 1e6 + LAUNCH_US
    sb, sk, single_us = _dq_splits(B, Bq, Hq, Hkv, Lq, Lk, D, elem, single_m, single_n, sms, True)
    if single_us < delta_us + dkdv_us + dq_us:
        return True, sb, sk
    return False, b, k


def fwd_rows(B: int, Hq: int, Hkv: int, Lq: int, packed: bool = False) -> tuple[int, int]:
    """(rows of one row set, row sets) of the forward: one head's Lq queries per (sample, head), or with
    ``packed`` (PACK_GQA) a kv head's group of query heads x Lq per (sample, kv head)."""
    if packed and Hq > Hkv:
        return Hq // Hkv * Lq, B * Hkv
    return Lq, B * Hq


def fwd_programs(B: int, Hq: int, Hkv: int, Lq: int, block_m: int, packed: bool = False) -> int:
    """The forward's programs before any key split: ``block_m``-row blocks of each row set (``fwd_rows``)."""
    rows, sets = fwd_rows(B, Hq, Hkv, Lq, packed)
    return cdiv(rows, block_m) * sets


def fwd_modelled_us(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, splits: int,
                    sms: int, blocks=None, combine_in_kernel: bool = False, packed: bool = False) -> float:
    """Roofline of the forward with ``splits`` key splits (H100 figures of kernels/_common.py) at
    ``blocks`` (default: ``gpu_blocks``' tensor-core tiles; the launcher passes the tiles it launches,
    IEEE fp32's included):
    max(FLOPs / (peak x the split's wave efficiency), bytes / bandwidth) + a launch, and with splits
    the fp32 partials (o and lse) written, read back by the combine, its output and its launch (none
    with ``combine_in_kernel``: the same bytes, in the tail of the one launch). ``packed``: the programs
    of PACK_GQA (``fwd_programs``)."""
    blk = blocks or gpu_blocks(Lq, D, elem_bytes=elem)
    programs = fwd_programs(B, Hq, Hkv, Lq, blk["BLOCK_M"], packed)
    key_blocks = max(1, cdiv(Lk, blk["BLOCK_N"]))
    flops = 4 * B * Hq * Lq * Lk * D
    out = B * Hq * Lq * (D * elem + 4)
    partials = splits * B * Hq * Lq * (D + 1) * 4
    inputs = (Bq * Hq * Lq + 2 * B * Hkv * Lk) * D * elem
    eff = split_efficiency(programs, key_blocks, splits, sms)
    us = max(flops / (PEAK_FLOPS * eff), (inputs + (partials if splits > 1 else out)) / PEAK_BYTES) * 1e6 + LAUNCH_US
    if splits > 1:
        us += (partials + out) / PEAK_BYTES * 1e6 + (0.0 if combine_in_kernel else LAUNCH_US)
    return us


#: Device µs of one key block per program at the 64 queries x 64 keys x 128 head-dim tile, one program
#: per SM, by (pipeline depth, warps), each fitted to an H100 measurement of Idefics2's resampler at
#: batch 8 (128 programs, 78 key blocks each, less the model's 3 us launch): 2 stages, 8 warps: 144 us
#: (session 17); 3 stages: 104.5 us at 8 warps, 75.2 at 4 (session 20; session 18 had predicted 0.8 us
#: a block for 3 stages). 4 warps at 2 stages takes the 8-warp figure (as session 18's check did).
KEY_BLOCK_US = {(2, 8): 1.81, (3, 8): 1.30, (3, 4): 0.93}


def fwd_block_bound_us(B: int, Hq: int, Lq: int, Lk: int, D: int, splits: int, sms: int, blocks: dict,
                       stages: int = TENSOR_CORE_STAGES) -> float:
    """The forward's time as its key-block iterations bound it (``fwd_modelled_us`` is the roofline,
    which an H100 beat by no margin: it predicted 24 us where 144 were measured): the waves of
    programs (one per SM) x the key blocks each program walks x ``KEY_BLOCK_US[stages, warps]``, scaled
    by the tile's multiply-adds against the measured 64 x 64 x 128 tile, plus a launch. A model of the
    measured point, not a law: checked against the three other H100 points in bench/NOTES.md
    (session 18); not used by any launcher decision."""
    bm, bn, bd = blocks["BLOCK_M"], blocks["BLOCK_N"], block_d(D, gpu=True)
    key_blocks = max(1, cdiv(Lk, bn))
    per_split = cdiv(key_blocks, max(1, splits))
    programs = cdiv(Lq, bm) * B * Hq * cdiv(key_blocks, per_split)
    scale = bm * bn * bd / (64 * 64 * 128)
    per_block = KEY_BLOCK_US.get((stages, blocks["num_warps"]), KEY_BLOCK_US[stages, 8])
    return cdiv(programs, sms) * per_split * per_block * scale + LAUNCH_US


#: Where the forward's split partials are merged: "auto" (the default: in the split kernel itself, its
#: last program per query block merging them, with the split count the merge launch's model chooses),
#: "kernel" (in the split kernel, split by the in-kernel model) or "launch" (``attn_combine_kernel``, a
#: second launch). Measured on an H100 (bench/NOTES.md, "Fifth GPU session"): the two merges take the
#: same device time (Idefics2's resampler at one image: 29.6-30.2 against 29.9-30.9 us, the same bits),
#: and the one launch saves the host a Triton launch (per call 0.063-0.167 against 0.182-0.204 ms in two
#: runs: host-bound and noisy). Inside CUDA-graph capture the merge stays in the kernel, on counters of
#: the graph's own (``_arrival_counters``): the same kernels as the warm-up before the capture compiled.
SPLIT_COMBINE = os.environ.get("MMFUSE_SPLIT_COMBINE", "auto")
SPLIT_COMBINE_MODES = ("auto", "launch", "kernel")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def combine_mode(combine: str | None = None) -> str:
    """The merge mode asked for: ``combine`` (a caller's choice) else ``MMFUSE_SPLIT_COMBINE``."""
    mode, source = (SPLIT_COMBINE, "MMFUSE_SPLIT_COMBINE") if combine is None else (combine, "combine")
    if mode not in SPLIT_COMBINE_MODES:
        raise ValueError(f"{source}: expected {'None or ' if combine is not None else ''}one of "
                         f"{SPLIT_COMBINE_MODES}, got {mode!r}")
    return mode


def combine_in_kernel(combine: str | None = None) -> bool:
    """Whether a split forward merges its partials in the same launch (``combine_mode``: "auto" and
    "kernel" do)."""
    return combine_mode(combine) != "launch"


def choose_fwd_splits(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, sms: int,
                      blocks=None, in_kernel: bool = False, packed: bool = False) -> int:
    """Key splits of the forward (``_fwd_splits``, cached per shape: it runs on every forward and costs
    up to 64 roofline evaluations); ``in_kernel``: with the merge in the split kernel's launch;
    ``packed``: PACK_GQA's programs."""
    blk = blocks or gpu_blocks(Lq, D, elem_bytes=elem)
    return _fwd_splits(B, Bq, Hq, Hkv, Lq, Lk, D, elem, sms, blk["BLOCK_M"], blk["BLOCK_N"], in_kernel, packed)


@functools.lru_cache(maxsize=4096)
def _fwd_splits(B: int, Bq: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, elem: int, sms: int, block_m: int,
                block_n: int, in_kernel: bool = False, packed: bool = False) -> int:
    """Key splits of the forward minimising ``fwd_modelled_us`` (fewer on ties): occupancy against the
    partials' bytes and the combine launch. Short key sets (OpenFlamingo, BLIP-2) stay in one launch;
    with the merge in the kernel OpenFlamingo's splits at batch 1 (3 ways), BLIP-2's still does not."""
    blk = dict(BLOCK_M=block_m, BLOCK_N=block_n)  # all fwd_modelled_us reads of the blocks
    key_blocks = max(1, cdiv(Lk, blk["BLOCK_N"]))
    best, best_us = 1, fwd_modelled_us(B, Bq, Hq, Hkv, Lq, Lk, D, elem, 1, sms, blk, packed=packed)
    for s in range(2, min(MAX_SPLITS, key_blocks) + 1):
        s_eff = cdiv(key_blocks, cdiv(key_blocks, s))  # splits launched for this chunk size
        us = fwd_modelled_us(B, Bq, Hq, Hkv, Lq, Lk, D, elem, s_eff, sms, blk, in_kernel, packed)
        if us < best_us * (1 - 1e-9):
            best, best_us = s_eff, us
    return best


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _strides4(t):
    return list(t.stride())  # 4-D views only


def _mask_args(kv_lens, key_mask, like):
    """(lens, mask, (stride_mb, stride_mn, stride_lens)): any views (strided, expanded) are read in place,
    except for fp64 (``like``'s dtype), which reads the key mask widened to int64: Triton sizes an MMA
    operand's register layout by the narrowest load its values depend on, and a key block's fp64 K, V
    and P depend on the byte mask; fp64 MMA has no such layout ("fp64 don't support largeK MMA", a
    compile failure on Triton 3.6-3.8; 3.9 copes). A (B, Lk) copy, on the gradcheck path only."""
    lens = kv_lens if kv_lens is not None else like
    if key_mask is not None and like.dtype == torch.float64:
        mask = key_mask.to(torch.int64)
    else:
        mask = key_mask.view(torch.uint8) if key_mask is not None else like
    stride_m = (mask.stride(0), mask.stride(1)) if key_mask is not None else (0, 0)
    return lens, mask, (*stride_m, kv_lens.stride(0) if kv_lens is not None else 0)


def _second_source(k, v, k2, v2):
    """(k2, v2, their 8 strides, L1, two_sources): the latter key rows when given, else dummies."""
    if k2 is None:
        return k, v, [0] * 8, k.shape[2], False
    return k2, v2, _strides4(k2) + _strides4(v2), k.shape[2], True


#: Arrival counters of the in-kernel combine, per (device, stream): int32 zeros that every launch
#: leaves at zero again (its last program per query block resets its own). One set per stream, so
#: that launches on two streams never share a counter; grown (a zeroed copy) when a grid needs more.
#: While a CUDA graph is captured each launch gets fresh zeros instead (a memset node of that graph, from
#: its memory pool): graphs never share counters with each other or with eager launches, so any two may
#: replay at once on different streams.
_ARRIVALS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    if _capturing(device):
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _ARRIVALS[key] = counters
    return counters


def attention_fwd(q, k, v, kv_lens, key_mask, scale, splits=None, acc=torch.float32, precision="ieee",
                  k2=None, v2=None, combine=None, pack_gqa=False):
    """``k2, v2``: optional second key/value source (B, Hkv, L2, D): the keys are k ‖ k2, never built.
    ``combine``: where split partials are merged, "auto", "launch" or "kernel" (``combine_in_kernel``; None:
    ``MMFUSE_SPLIT_COMBINE``). ``pack_gqa``: a program's rows run over the query heads of one kv head
    (PACK_GQA; with grouped heads only). Off by default and by every caller but the kernel profile's
    sweep, which times it with two of Idefics2's heads per 128-row tile: not yet measured on a GPU.
    Returns (o (B, Hq, Lq, D) in q's dtype, stored head-interleaved (B, Lq, Hq, D); lse (B, Hq, Lq) in
    ``acc``, base 2; +inf on empty rows)."""
    B, Hkv, Lk, D = k.shape
    k2, v2, s2, L1, two = _second_source(k, v, k2, v2)
    Lk = L1 + (k2.shape[2] if two else 0)
    Hq, Lq = q.shape[1], q.shape[2]
    # Stored as (B, Lq, Hq, D), returned as a (B, Hq, Lq, D) view: the layout every caller merges heads
    # in (transformers' (B, L, H, D), projections' (B, L, H*D)), so no caller copies for layout.
    o = empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = empty((B, Hq, Lq), dtype=acc, device=q.device)
    if o.numel() == 0:
        return o, lse
    ieee = precision == "ieee"  # (fp32's FMA tiles: ``gpu_blocks``)
    group = Hq // Hkv
    blk = blocks_for(Lq, D, elem_bytes=q.element_size(), ieee=ieee)
    BM, BN, BD = blk["BLOCK_M"], blk["BLOCK_N"], block_d(D)
    packed = bool(pack_gqa) and group > 1
    rows, row_sets = fwd_rows(B, Hq, Hkv, Lq, packed)
    qs = _strides4(q)
    if q.shape[0] == 1:
        qs[0] = 0  # one set of queries for every sample
    key_blocks = max(1, cdiv(Lk, BN))
    in_kernel = combine_in_kernel(combine)
    if splits is None:
        # "auto" splits as the merge launch's model says: with the merge in the kernel the model drops a
        # launch's time and splits OpenFlamingo's keys 3 ways, which measured slower on the device than
        # 1 (7.6 against 6.6 us); "kernel" keeps the in-kernel model (bench/NOTES.md, "Fifth GPU session").
        splits = choose_fwd_splits(B, q.shape[0], Hq, Hkv, Lq, Lk, D, q.element_size(), num_sms(q.device), blk,
                                   combine_mode(combine) == "kernel", packed)
    splits = max(1, min(int(splits), key_blocks))
    chunk = cdiv(key_blocks, splits) * BN
    splits = cdiv(max(Lk, 1), chunk)
    lens, mask, mask_strides = _mask_args(kv_lens, key_mask, lse)
    # fp64 (the gradchecks' dtype, not a speed path) keeps the combine launch: no fp64 spec of the merged
    # forward is compiled.
    in_kernel = in_kernel and splits > 1 and q.element_size() <= 4
    if in_kernel:  # the same tile; its warps may differ (``gpu_blocks``)
        blk = blocks_for(Lq, D, elem_bytes=q.element_size(), combine=True, ieee=ieee)
    if splits == 1:
        o_t, l_t = o, lse
        os_, ls_ = [0, *o.stride()], [0, *lse.stride()]
    else:
        o_t = empty((splits, B, Hq, Lq, D), dtype=acc, device=q.device)
        l_t = empty((splits, B, Hq, Lq), dtype=acc, device=q.device)
        os_, ls_ = list(o_t.stride()), list(l_t.stride())
    grid = (cdiv(rows, BM), row_sets, splits)
    arrivals = _arrival_counters(q.device, grid[0] * grid[1]) if in_kernel else lse
    try:
        launch_kernel(attn_fwd_kernel, grid,
            q, k, v, k2, v2, o_t, l_t, o, lse, arrivals, lens, mask, *qs, *_strides4(k), *_strides4(v), *s2, *os_,
            *ls_, *o.stride(), *lse.stride(), *mask_strides, Hkv, Lq, Lk, L1, D, group, chunk, splits,
            *fp32_pair(scale * LOG2E, acc),
            # The mask-free fast paths: EVEN_D (D is a power of two), EVEN_N (no padding and Lk a multiple
            # of BLOCK_N, so every key block is full; splits are whole blocks). Decided here, not by
            # ``triton.heuristics``, whose wrapper rebuilds a dict of all 61 arguments per flag on every
            # launch (~7 us of host time; bench/NOTES.md, "Host time, session 21").
            EVEN_D=D == BD, EVEN_N=kv_lens is None and key_mask is None and Lk % BN == 0,
            HAS_LENS=kv_lens is not None, HAS_MASK=key_mask is not None, TWO_SOURCES=two, PARTIAL=splits > 1,
            COMBINE=in_kernel, INPUT_PRECISION=precision, ACC_DTYPE=_tl_acc(acc), BLOCK_M=BM, BLOCK_N=BN,
            BLOCK_D=BD, PACK_GQA=packed, num_warps=blk["num_warps"], num_stages=blk["num_stages"], **LAUNCH_OPTIONS,
        )
    except BaseException:
        # A launch stopped part-way (the interpreter interrupted; on a GPU a failed launch leaves no usable
        # context) may leave counters mid-count, and the next launch would merge at the wrong arrival.
        if in_kernel:
            arrivals.zero_()
        raise
    if splits > 1 and not in_kernel:
        rb = rowwise_blocks(D)
        launch_kernel(attn_combine_kernel, (cdiv(Lq, rb["BLOCK_M"]), B * Hq),
            o_t, l_t, o, lse, *o_t.stride(), *l_t.stride(), *o.stride(), *lse.stride(), Hq, Lq, D, splits,
            ACC_DTYPE=_tl_acc(acc), **rb, num_stages=1, **LAUNCH_OPTIONS,
        )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, kv_lens, key_mask, scale, need_q=True, need_kv=True,
                  acc=torch.float32, precision="ieee", dq_splits=None, k2=None, v2=None, single_pass=None):
    """(dq shaped like q, dk, dv shaped like k, v); None for what is not needed. ``dq_splits``: how
    many ways dQ splits the batch loop of shared queries, or (batch splits, key splits) (default:
    the modelled choice on the device's SMs). ``single_pass``: the whole backward in one launch
    (``attn_bwd_dq_kernel`` with SINGLE_PASS; every gradient needed, no query-head groups, every query
    in one block); None: where ``bwd_plan`` models it faster than delta + dK/dV + dQ.
    With a second source ``k2, v2``: dk and dv are pairs (shaped like k, k2 and v, v2), written by the
    same kernel (a key block straddling the seam stores each row in its own tensor)."""
    B, Hkv, Lk, D = k.shape
    k2, v2, s2, L1, two = _second_source(k, v, k2, v2)
    Lk = L1 + (k2.shape[2] if two else 0)
    Bq, Hq, Lq = q.shape[0], q.shape[1], q.shape[2]
    elem = q.element_size()
    ieee = precision == "ieee"  # (fp32's FMA tiles: ``gpu_blocks``)
    blk = blocks_for(Lq, D, backward=True, elem_bytes=elem, ieee=ieee)
    single_blk = single_pass_blocks(Lq, D, elem, ieee=ieee)
    eligible = need_q and need_kv and single_pass_eligible(Hq, Hkv, Lq, single_blk["BLOCK_M"]) and B > 0
    if single_pass and not eligible:
        raise ValueError(f"attention_bwd: single_pass=True needs dq, dk and dv, Hq == Hkv and 1 <= Lq <= BLOCK_M "
                         f"(= {single_blk['BLOCK_M']}) and B > 0; got need_q={need_q}, need_kv={need_kv}, Hq={Hq}, "
                         f"Hkv={Hkv}, Lq={Lq}, B={B}")
    plan = None
    if eligible and single_pass is None:
        plan = bwd_plan(B, Bq, Hq, Hkv, Lq, Lk, D, elem, blk, single_blk, num_sms(q.device))
        single_pass = plan[0]
    single = bool(eligible and single_pass)
    if single:
        blk = single_blk
    BM, BN, BD = blk["BLOCK_M"], blk["BLOCK_N"], block_d(D)
    qs = _strides4(q)
    if Bq == 1:
        qs[0] = 0
    delta = empty((B, Hq, Lq), dtype=acc, device=q.device)
    lens, mask, mask_strides = _mask_args(kv_lens, key_mask, delta)
    common = dict(HAS_LENS=kv_lens is not None, HAS_MASK=key_mask is not None, TWO_SOURCES=two,
                  INPUT_PRECISION=precision,
                  ACC_DTYPE=_tl_acc(acc), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  num_warps=blk["num_warps"], num_stages=blk["num_stages"], **LAUNCH_OPTIONS)
    if delta.numel() and not single:
        rb = rowwise_blocks(D)
        launch_kernel(attn_delta_kernel, (cdiv(Lq, rb["BLOCK_M"]), B * Hq),
            o, do, delta, *_strides4(o), *_strides4(do), *delta.stride(), Hq, Lq, D,
            ACC_DTYPE=_tl_acc(acc), **rb, num_stages=1, **LAUNCH_OPTIONS)
    dq = dk = dv = None
    kv_out = [0] * 16
    if need_kv:
        dk = empty(k.shape, dtype=k.dtype, device=k.device)
        dv = empty(v.shape, dtype=v.dtype, device=v.device)
        dk2 = empty(k2.shape, dtype=k.dtype, device=k.device) if two else dk
        dv2 = empty(v2.shape, dtype=v.dtype, device=v.device) if two else dv
        kv_out = _strides4(dk) + _strides4(dv) + (_strides4(dk2) + _strides4(dv2) if two else [0] * 8)
        if B * Hkv * Lk * D and not single:
            launch_kernel(attn_bwd_dkdv_kernel, (cdiv(Lk, BN), B * Hkv),
                q, k, v, k2, v2, do, lse, delta, dk, dv, dk2, dv2, lens, mask,
                *qs, *_strides4(k), *_strides4(v), *s2, *_strides4(do), *lse.stride(), *mask_strides,
                *kv_out, Hkv, Lq, Lk, L1, D, Hq // Hkv, *fp32_pair(scale * LOG2E, acc), *fp32_pair(scale, acc),
                EVEN_D=D == BD, **dict(common, num_stages=dkdv_stages(blk)))
    if need_q:
        dq = empty(q.shape, dtype=q.dtype, device=q.device)
        if dq.numel() and B == 0:  # shared queries over an empty batch: an empty sum
            dq.zero_()
        elif dq.numel():
            batch_loop = B if Bq == 1 else 1
            qblk = blk if single else dq_blocks(blk)
            BM, BN = qblk["BLOCK_M"], qblk["BLOCK_N"]
            key_blocks = max(1, cdiv(Lk, BN))
            if plan is not None and qblk is blk:
                splits, key_splits = plan[1:]
            else:
                splits, key_splits = dq_splits_for(B, Bq, Hq, Hkv, Lq, Lk, D, elem, qblk, num_sms(q.device),
                                                   single_pass=single)
            if dq_splits is not None:
                splits, key_splits = (dq_splits, 1) if isinstance(dq_splits, int) else dq_splits
            chunk = cdiv(batch_loop, max(1, min(int(splits), batch_loop)))
            key_chunk = cdiv(key_blocks, max(1, min(int(key_splits), key_blocks))) * BN
            key_splits = cdiv(max(Lk, 1), key_chunk)
            splits = cdiv(batch_loop, chunk) * key_splits
            # Shared queries, split over the batch: fp32 partials, summed below in split order.
            target = empty((splits, *q.shape), dtype=acc, device=q.device) if splits > 1 else dq
            launch_kernel(attn_bwd_dq_kernel, (cdiv(Lq, BM), Bq * Hq, splits),
                q, k, v, k2, v2, do, lse, delta, target, lens, mask,
                o, *((dk, dv, dk2, dv2) if single else (delta,) * 4),
                *qs, *_strides4(k), *_strides4(v), *s2, *_strides4(do), *lse.stride(), *mask_strides,
                target.stride(0) if splits > 1 else 0, *_strides4(target[0] if splits > 1 else dq),
                *_strides4(o), *kv_out,
                Hq, Lq, Lk, L1, D, Hq // Hkv, batch_loop, chunk, key_chunk, key_splits,
                *fp32_pair(scale * LOG2E, acc), *fp32_pair(scale, acc), SINGLE_PASS=single,
                **dict(common, BLOCK_M=BM, BLOCK_N=BN, num_warps=qblk["num_warps"], num_stages=qblk["num_stages"]))
            if splits > 1:
                dq = target.sum(0).to(q.dtype)  # over the leading dim: a fixed order, no atomics
    if need_kv and two:
        dk, dv = (dk, dk2), (dv, dv2)
    return dq, dk, dv


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_aot.py, `mmfuse report`)
# ----------------------------------------------------------------------------------------------
_AOT_ELEM = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}
_ALL = ("fwd", "dkdv", "dq")
#: Configs beyond the fp16 / Idefics2 set that the launchers pick for other dtypes: fp32 with TF32,
#: fp32 without it (its own FMA tiles, ``gpu_blocks``' ieee) and fp64, every kernel at each head-dim
#: tile (D = 64 / 96 / 256 for the tiles 64 / 128 / 256; fp64 at D = 3, the gradchecks' size). Not
#: TF32's forward at D = 256, IEEE fp32's dK/dV at D = 256, nor fp64's dK/dV past D = 64 and dQ at
#: D = 256: they spill (``KNOWN_UNCOMPILED`` in tests/test_gpu_configs.py, bench/NOTES.md).
COVERAGE_PLANS = [
    *[(D, "fp32-tf32", "*fp32", "tf32", ("fwd", "dkdv", "dq")[(D > 64):], 64) for D in (64, 96, 256)],
    # IEEE fp32's FMA tiles (dK/dV at D = 256 spills on every tile: not compiled)
    *[(D, "fp32", "*fp32", "ieee", ("fwd", "dq") if D == 256 else ("fwd", "dkdv", "dq"), 64) for D in (64, 96, 256)],
    *[(D, "fp64", "*fp64", "ieee", kernels, 64) for D, kernels in ((3, _ALL), (96, ("fwd", "dq")), (256, ("fwd",)))],
]


def aot_specs():
    """Idefics2-like launch (16 query heads over 4 KV heads, 64 latents, 4964 keys, batch 8) at the
    head dims 64 / 96 / 128 / 256; fp16 for every kernel, bf16 and TF32 for the forward."""
    from mmfuse._aot import CompileSpec

    B, Hq, Hkv, Lq, Lk, splits = 8, 16, 4, 64, 4964, 4
    specs = []

    def strides(*shape):
        out, acc = [], 1
        for n in reversed(shape):
            out.append(acc)
            acc *= n
        return out[::-1]

    def spec(name, fn, variant, dtype, ptr, D, args, cx, tensor_cores, warps, stages, sm90="wgmma"):
        blk = "x".join(str(cx[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if b in cx)
        return CompileSpec(kernel=f"cross_attention/{name}", variant=variant, dtype=dtype,
                           config=f"D={D} {blk} w{warps} s{stages}", fn=fn, args=tuple(args.items()),
                           constexprs=tuple(cx.items()), num_warps=warps, num_stages=stages,
                           tensor_cores=tensor_cores, sm90_instr=sm90)

    # (D, dtype, pointer type, INPUT_PRECISION, kernels, queries): fp16 at every head-dim tile, bf16's and
    # TF32's forward at D = 96 (Idefics2), then the configs only other dtypes or query counts reach
    # (``COVERAGE_PLANS``: tests/test_gpu_configs.py derives what the launchers can pick and fails on a
    # config no spec compiles).
    plans = [(D, "fp16", "*fp16", "ieee", ("fwd", "dkdv", "dq"), Lq) for D in (64, 96, 128, 256)]
    plans += [(96, "bf16", "*bf16", "ieee", ("fwd",), Lq), (96, "fp32-tf32", "*fp32", "tf32", ("fwd",), Lq)]
    plans += COVERAGE_PLANS
    for D, dtype, ptr, precision, kernels, lq in plans:
        elem = _AOT_ELEM[ptr]
        acc_ptr, acc = ("*fp64", tl.float64) if elem == 8 else ("*fp32", tl.float32)
        mask_ptr = "*i64" if elem == 8 else "*u8"  # fp64 reads the key mask widened (``_mask_args``)
        fwd_blk = gpu_blocks(lq, D, elem_bytes=elem, ieee=precision == "ieee")
        bwd_blk = gpu_blocks(lq, D, backward=True, elem_bytes=elem, ieee=precision == "ieee")
        q_s = [0] + strides(Hq, lq, D)  # broadcast learnable queries
        k_s = strides(B, Hkv, Lk, D)
        o_s = strides(B, Hq, lq, D)
        l_s = strides(B, Hq, lq)
        short = ", <= 32 queries" if lq <= 32 else ""
        for name in kernels:
            blk = fwd_blk if name == "fwd" else bwd_blk
            BM, BN, BD, warps, stages = blk["BLOCK_M"], blk["BLOCK_N"], block_d(D, gpu=True), blk["num_warps"], \
                dkdv_stages(blk) if name == "dkdv" else blk["num_stages"]
            common = dict(HAS_LENS=True, HAS_MASK=True, TWO_SOURCES=False, INPUT_PRECISION=precision,
                          ACC_DTYPE=acc, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
            one_source = dict(k2_ptr=ptr, v2_ptr=ptr, L1=Lk, **{f"stride_{t}2{a}": 0 for t in "kv" for a in "bhnd"})
            if name == "fwd":
                op_s = strides(splits, B, Hq, lq, D)
                lp_s = strides(splits, B, Hq, lq)
                args = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=acc_ptr, lse_ptr=acc_ptr, kv_lens_ptr="*i32",
                            mask_ptr=mask_ptr, **dict(zip(["stride_qb", "stride_qh", "stride_qm", "stride_qd"], q_s)),
                            **dict(zip(["stride_kb", "stride_kh", "stride_kn", "stride_kd"], k_s)),
                            **dict(zip(["stride_vb", "stride_vh", "stride_vn", "stride_vd"], k_s)),
                            **dict(zip(["stride_os", "stride_ob", "stride_oh", "stride_om", "stride_od"], op_s)),
                            **dict(zip(["stride_ls", "stride_lb", "stride_lh", "stride_lm"], lp_s)),
                            # The merged output of the in-kernel combine (dummies without COMBINE).
                            merged_o_ptr=ptr, merged_lse_ptr=acc_ptr, arrivals_ptr=acc_ptr,
                            **dict(zip(["stride_fob", "stride_foh", "stride_fom", "stride_fod"], o_s)),
                            **dict(zip(["stride_flb", "stride_flh", "stride_flm"], l_s)),
                            stride_mb=Lk, stride_mn=1, stride_lens=1, Hkv=Hkv, Lq=lq, Lk=Lk, D=D, GROUP=Hq // Hkv,
                            CHUNK=cdiv(cdiv(Lk, BN), splits) * BN, SPLITS=splits, qk_scale=0.1, qk_scale_lo=0.0,
                            **one_source)
                cx = dict(common, PARTIAL=True, COMBINE=False, EVEN_D=D == BD, EVEN_N=False, PACK_GQA=False)
                # fp32 without TF32 multiplies on CUDA cores; fp64 has DMMA (mma.sync) and no wgmma form,
                # nor does a 32-row tile (wgmma needs 64 rows per warpgroup).
                specs.append(spec("attn_fwd_kernel", attn_fwd_kernel, "split-KV partial, lens+mask" + short, dtype,
                                  ptr, D, args, cx, precision == "tf32" or elem != 4, warps, stages,
                                  sm90="mma.sync" if elem == 8 or BM < 64 else "wgmma"))
                if dtype == "fp16" and D in (64, 128):  # the mask-free path: no padding, 4096 keys
                    # Without kv_lens / key_mask the launcher passes the lse buffer for both pointers.
                    even = dict(args, o_ptr=ptr, lse_ptr="*fp32", kv_lens_ptr="*fp32", mask_ptr="*fp32", Lk=4096,
                                arrivals_ptr="*fp32", stride_os=0, stride_ls=0, SPLITS=1,
                                **dict(zip(["stride_ob", "stride_oh", "stride_om", "stride_od"], o_s)),
                                **dict(zip(["stride_lb", "stride_lh", "stride_lm"], strides(B, Hq, lq))),
                                CHUNK=4096, L1=4096, **dict(zip(["stride_kb", "stride_kh", "stride_kn", "stride_kd"],
                                                       strides(B, Hkv, 4096, D))),
                                **dict(zip(["stride_vb", "stride_vh", "stride_vn", "stride_vd"],
                                           strides(B, Hkv, 4096, D))))
                    cx = dict(common, HAS_LENS=False, HAS_MASK=False, PARTIAL=False, COMBINE=False, EVEN_D=D == BD,
                              EVEN_N=True, PACK_GQA=False)
                    specs.append(spec("attn_fwd_kernel", attn_fwd_kernel, "no split, no padding (EVEN_N)", dtype,
                                      ptr, D, even, cx, True, warps, stages))
            else:
                base = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr=acc_ptr, delta_ptr=acc_ptr,
                            **dict(zip(["stride_qb", "stride_qh", "stride_qm", "stride_qd"], q_s)),
                            **dict(zip(["stride_kb", "stride_kh", "stride_kn", "stride_kd"], k_s)),
                            **dict(zip(["stride_vb", "stride_vh", "stride_vn", "stride_vd"], k_s)),
                            **dict(zip(["stride_gb", "stride_gh", "stride_gm", "stride_gd"], o_s)),
                            **dict(zip(["stride_lb", "stride_lh", "stride_lm"], l_s)),
                            kv_lens_ptr="*i32", mask_ptr=mask_ptr, stride_mb=Lk, stride_mn=1, stride_lens=1, Lq=lq,
                            Lk=Lk, D=D,
                            GROUP=Hq // Hkv, qk_scale=0.1, qk_scale_lo=0.0, sm_scale=0.1, sm_scale_lo=0.0,
                            **one_source)
                if name == "dkdv":
                    args = dict(base, dk_ptr=ptr, dv_ptr=ptr, dk2_ptr=ptr, dv2_ptr=ptr, Hkv=Hkv,
                                **dict(zip(["stride_dkb", "stride_dkh", "stride_dkn", "stride_dkd"], k_s)),
                                **dict(zip(["stride_dvb", "stride_dvh", "stride_dvn", "stride_dvd"], k_s)),
                                **{f"stride_d{t}2{a}": 0 for t in "kv" for a in "bhnd"})
                    specs.append(spec("attn_bwd_dkdv_kernel", attn_bwd_dkdv_kernel, "dK, dV over the group",
                                      dtype, ptr, D, args, dict(common, EVEN_D=D == BD),
                                      precision == "tf32" or elem != 4, warps, stages,
                                      sm90="wgmma" if BN >= 64 and elem != 8 else "mma.sync"))
                else:
                    # Shared queries over batch 8: 2 x 16 programs, the batch split 4 ways (fp32 partials).
                    dq_splits = choose_splits(cdiv(lq, BM) * Hq, B, 132)
                    # (The single pass's outputs are dummies here: SINGLE_PASS is off.)
                    args = dict(base, dq_ptr=acc_ptr, Hq=Hq, BATCH_LOOP=B, BATCH_CHUNK=cdiv(B, dq_splits),
                                KEY_CHUNK=cdiv(Lk, BN) * BN, KEY_SPLITS=1,
                                stride_dqs=Hq * lq * D,
                                **dict(zip(["stride_dqb", "stride_dqh", "stride_dqm", "stride_dqd"],
                                           strides(1, Hq, lq, D))),
                                o_ptr=ptr, dk_ptr=acc_ptr, dv_ptr=acc_ptr, dk2_ptr=acc_ptr, dv2_ptr=acc_ptr,
                                **dict(zip(["stride_ob", "stride_oh", "stride_om", "stride_od"], o_s)),
                                **{f"stride_d{t}{a}": 0 for t in ("k", "v", "k2", "v2") for a in "bhnd"})
                    specs.append(spec("attn_bwd_dq_kernel", attn_bwd_dq_kernel, "dQ, batch split",
                                      dtype, ptr, D, args, dict(common, SINGLE_PASS=False),
                                      precision == "tf32" or elem != 4, warps, stages,
                                      sm90="wgmma" if BM >= 64 and elem != 8 else "mma.sync"))
                    # The single pass (no head groups, every query in one block): the same program also
                    # stores dK, dV and forms delta from O. Broadcast queries over the batch, split; one
                    # spec per tile it takes (<= 32 queries, and 33-64).
                    dq_args = args
                    for sp_blk in {repr(b_): b_ for b_ in (single_pass_blocks(n, D, elem, gpu=True, ieee=precision == "ieee")
                                                           for n in (32, 64))}.values():
                        lq1 = sp_blk["BLOCK_M"] - 5
                        per_row = [0] + strides(Hkv, lq1, D)
                        args = dict(dq_args, Hq=Hkv, GROUP=1, Lq=lq1, dk_ptr=ptr, dv_ptr=ptr, dk2_ptr=ptr, dv2_ptr=ptr,
                                    stride_dqs=Hkv * lq1 * D, **dict(zip(["stride_lb", "stride_lh", "stride_lm"],
                                                                        strides(B, Hkv, lq1))),
                                    **{f"stride_{t}{a}": x for t in ("q", "dq") for a, x in zip("bhmd", per_row)},
                                    **{f"stride_{t}{a}": x for t in ("g", "o") for a, x in zip("bhmd",
                                                                                             strides(B, Hkv, lq1, D))},
                                    **{f"stride_{t}{a}": x for t in ("dk", "dv") for a, x in zip("bhnd", k_s)})
                        cx = dict(common, SINGLE_PASS=True, BLOCK_M=sp_blk["BLOCK_M"], BLOCK_N=sp_blk["BLOCK_N"])
                        sp = spec("attn_bwd_dq_kernel", attn_bwd_dq_kernel, "single pass (dQ, dK, dV)", dtype, ptr, D,
                                  args, cx, precision == "tf32" or elem != 4, sp_blk["num_warps"],
                                  sp_blk["num_stages"], sm90="wgmma" if sp_blk["BLOCK_M"] >= 64 and elem != 8
                                  else "mma.sync")
                        specs.append(sp)
    # A head dim whose rows are not 16-byte multiples (fp64 at D = 3, the gradchecks') has no 128-bit
    # loads to make.
    import dataclasses

    specs = [dataclasses.replace(sp, wide_load_archs=()) if dict(sp.args).get("D", 0) * _AOT_ELEM.get(
        dict(sp.args).get("q_ptr", dict(sp.args).get("o_ptr")), 2) % 16 else sp for sp in specs]
    # The perceiver's keys from two sources, never concatenated: context (B, N, Hkv*D) and latents
    # (B, Lq, Hkv*D) in the projections' layouts, Idefics2 at D = 96 (N = Lk - Lq context tokens).
    import dataclasses

    D = 96
    src1 = [(Lk - Lq) * Hkv * D, D, Hkv * D, 1]
    src2 = [Lq * Hkv * D, D, Hkv * D, 1]
    two = {f"stride_{t}{a}": x for t in ("k", "v", "dk", "dv") for a, x in zip("bhnd", src1)}
    two.update({f"stride_{t}2{a}": x for t in ("k", "v", "dk", "dv") for a, x in zip("bhnd", src2)})
    for sp in list(specs):
        if sp.dtype == "fp16" and sp.config.startswith(f"D={D} ") and sp.variant in (
                "split-KV partial, lens+mask", "dK, dV over the group", "dQ, batch split"):
            args = dict(sp.args)
            args.update({n: x for n, x in two.items() if n in args}, L1=Lk - Lq)
            specs.append(dataclasses.replace(sp, variant=sp.variant + ", two sources", args=tuple(args.items()),
                                             constexprs=tuple(dict(sp.constexprs, TWO_SOURCES=True).items())))
    # dQ at batch 1: the keys split 4 ways (KEY_SPLITS a runtime integer, fp32 partials).
    for sp in list(specs):
        if sp.dtype == "fp16" and sp.variant == "dQ, batch split" and sp.config.startswith(f"D={D} "):
            kb = cdiv(Lk, dict(sp.constexprs)["BLOCK_N"])
            args = dict(sp.args, BATCH_LOOP=1, BATCH_CHUNK=1, KEY_SPLITS=4,
                        KEY_CHUNK=cdiv(kb, 4) * dict(sp.constexprs)["BLOCK_N"])
            specs.append(dataclasses.replace(sp, variant="dQ, key split (batch 1)", args=tuple(args.items())))
    # Without a split: the forward with padding in one launch (the split rule's choice at larger
    # batch: output in q's dtype, no partials), and dQ of queries per sample (no batch to split:
    # written straight in q's dtype), at D = 64 and 96.
    for sp in list(specs):
        if sp.dtype != "fp16" or sp.config.split()[0] not in ("D=64", "D=96"):
            continue
        a, D = dict(sp.args), dict(sp.args)["D"]
        if sp.variant == "split-KV partial, lens+mask":
            o_s, l_s = strides(B, Hq, Lq, D), strides(B, Hq, Lq)
            a.update(o_ptr="*fp16", stride_os=0, stride_ls=0, SPLITS=1, CHUNK=cdiv(Lk, dict(sp.constexprs)["BLOCK_N"]) *
                     dict(sp.constexprs)["BLOCK_N"], **dict(zip(["stride_ob", "stride_oh", "stride_om", "stride_od"],
                                                                o_s)),
                     **dict(zip(["stride_lb", "stride_lh", "stride_lm"], l_s)))
            specs.append(dataclasses.replace(sp, variant="no split, lens+mask", args=tuple(a.items()),
                                             constexprs=tuple(dict(sp.constexprs, PARTIAL=False).items())))
        elif sp.variant == "dQ, batch split":
            q_s = strides(B, Hq, Lq, D)  # queries per sample: nothing to loop over
            a.update(dq_ptr="*fp16", BATCH_LOOP=1, BATCH_CHUNK=1, stride_dqs=0,
                     **dict(zip(["stride_qb", "stride_qh", "stride_qm", "stride_qd"], q_s)),
                     **dict(zip(["stride_dqb", "stride_dqh", "stride_dqm", "stride_dqd"], q_s)))
            specs.append(dataclasses.replace(sp, variant="dQ, queries per sample (no split)", args=tuple(a.items())))
    # At most 32 queries (BLIP-2's Q-Former, Idefics3-size resamplers): the forward's 32-query tile.
    for sp in list(specs):
        if sp.dtype == "fp16" and sp.variant == "split-KV partial, lens+mask" and sp.config.split()[0] in ("D=64",
                                                                                                       "D=96"):
            D = dict(sp.args)["D"]
            blk = gpu_blocks(32, D)
            cx = dict(sp.constexprs, BLOCK_M=blk["BLOCK_M"], BLOCK_N=blk["BLOCK_N"])
            bd = cx["BLOCK_D"]
            specs.append(dataclasses.replace(
                sp, variant="split-KV partial, lens+mask, <= 32 queries", args=tuple(dict(sp.args, Lq=32).items()),
                constexprs=tuple(cx.items()), num_warps=blk["num_warps"], num_stages=blk["num_stages"],
                sm90_instr="mma.sync",  # a 32-row tile: wgmma needs 64 rows per warpgroup
                config=f"D={D} {blk['BLOCK_M']}x{blk['BLOCK_N']}x{bd} w{blk['num_warps']} s{blk['num_stages']}"))
    # The in-kernel combine (the default): the split forward whose last program
    # per query block merges the partials, at every forward tile of fp16 / bf16, TF32 and IEEE fp32 (its
    # merge adds registers: the 64-query tile at D <= 64 takes 8 warps, ``gpu_blocks``): fp16 at D = 64,
    # 96 (both query tiles, and the perceiver's two key sources) and 256, TF32 at D = 64 and 96, IEEE fp32
    # at D = 64, 96 and 256. (fp64 keeps the combine launch; TF32 at D = 256 spills either way.)
    for sp in list(specs):
        if sp.variant.startswith("split-KV partial, lens+mask") and (
                (sp.dtype == "fp16" and sp.config.split()[0] in ("D=64", "D=96", "D=256"))
                or (sp.dtype == "fp32-tf32" and sp.config.split()[0] in ("D=64", "D=96"))
                or sp.dtype == "fp32"):
            lq, D, elem = dict(sp.args)["Lq"], dict(sp.args)["D"], _AOT_ELEM[dict(sp.args)["q_ptr"]]
            warps = gpu_blocks(lq, D, elem_bytes=elem, combine=True, ieee=sp.dtype == "fp32")["num_warps"]
            specs.append(dataclasses.replace(
                sp, variant=sp.variant.replace("partial", "in-kernel combine"), num_warps=warps,
                config=sp.config.replace(f" w{sp.num_warps} ", f" w{warps} "),
                args=tuple(dict(sp.args, arrivals_ptr="*i32").items()),
                constexprs=tuple(dict(sp.constexprs, COMBINE=True).items())))
    # The row-wise kernels' tiles: one per BLOCK_D (rowwise_blocks), in fp32 (16- and 32-bit inputs)
    # and fp64.
    for D, dtype in [(D, dtype) for dtype in ("fp16", "fp64") for D in ((64, 96, 256) if dtype == "fp16" else (3, 96, 256))]:
        rb = rowwise_blocks(D, gpu=True)
        ptr, acc_ptr, acc = ("*fp64", "*fp64", tl.float64) if dtype == "fp64" else ("*fp16", "*fp32", tl.float32)
        cx = dict(ACC_DTYPE=acc, BLOCK_M=rb["BLOCK_M"], BLOCK_D=rb["BLOCK_D"])
        o_s, l_s = strides(B, Hq, Lq, D), strides(B, Hq, Lq)
        args = dict(op_ptr=acc_ptr, lsep_ptr=acc_ptr, o_ptr=ptr, lse_ptr=acc_ptr,
                    **dict(zip(["stride_ps", "stride_pb", "stride_ph", "stride_pm", "stride_pd"],
                               strides(splits, B, Hq, Lq, D))),
                    **dict(zip(["stride_qs", "stride_qb", "stride_qh", "stride_qm"], strides(splits, B, Hq, Lq))),
                    **dict(zip(["stride_ob", "stride_oh", "stride_om", "stride_od"], o_s)),
                    **dict(zip(["stride_lb", "stride_lh", "stride_lm"], l_s)), Hq=Hq, Lq=Lq, D=D, SPLITS=splits)
        specs.append(spec("attn_combine_kernel", attn_combine_kernel, "merge splits", dtype, ptr, D, args,
                          cx, False, rb["num_warps"], 1))
        args = dict(o_ptr=ptr, do_ptr=ptr, delta_ptr=acc_ptr,
                    **dict(zip(["stride_ob", "stride_oh", "stride_om", "stride_od"], o_s)),
                    **dict(zip(["stride_gb", "stride_gh", "stride_gm", "stride_gd"], o_s)),
                    **dict(zip(["stride_db", "stride_dh", "stride_dm"], l_s)), Hq=Hq, Lq=Lq, D=D)
        specs.append(spec("attn_delta_kernel", attn_delta_kernel, "rowsum(dO*O)", dtype, ptr, D, args,
                          cx, False, rb["num_warps"], 1))
    return specs
