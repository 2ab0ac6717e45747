"""Token merge and norm read inside the projector's first GEMM, forward and backward.

Modern projectors merge neighbouring vision tokens and normalise before their first Linear: Qwen2/2.5-VL
(RMSNorm or LayerNorm per source token, then a 2x2 view merge), Idefics3 / SmolVLM (pixel shuffle),
Qwen3-VL's deepstack mergers and LFM2-VL / Aya (a norm over the merged row). In PyTorch each step is a
pass over the activations (and pixel shuffle a `.contiguous()` copy). Here the first GEMM reads its A
operand straight from the vision tower's output:

Layout. x (T, C): T source tokens of C channels, any strides. Merged row m (of M) is G source tokens
side by side, K = G*C columns; column k = j*C + c is channel c of token tok(m, j), where
    tok(m, j) = map[m, j]   with a (M, G) int32 table (pixel shuffle / unshuffle: any permutation)
    tok(m, j) = m*G + j     without one (Qwen's merge: the G neighbours are adjacent rows already).
Norm (NORM: 0 none, 1 LayerNorm, 2 RMSNorm) over a source token's C channels (pre-merge, Qwen's ln_q)
or, with NORM_POST, over the merged row's K columns:
    A[m, k] = (x[tok, c] - mean[r]) * rstd[r] * gamma[i] (+ beta[i])
    r, i = tok, c (pre-merge)  or  m, k (post-merge)
mean / rstd per normalised row come from ``norm_stats_kernel`` (a pre-pass over x: 8 bytes per row out),
computed in fp32 with two passes over the row (mean first, then the centred sum of squares: exact where
|mean| >> std, which E[x^2] - E[x]^2 is not). A LayerNorm is normalised in the load (not folded into W
with mean / rstd in the epilogue), which keeps the GEMM's operand exactly what PyTorch's norm would
output, one rounding to the input dtype; the fold would subtract mean * (gamma W) from the raw x's
product (|mean| >> std loses std's bits in bf16). An RMSNorm has no mean: from FOLD_MIN_ROWS rows its
gamma is folded into the first weight by the statistics' launch (``fold_gamma``) and the GEMM reads x
raw, rstd scaling the accumulator (FOLDED: A then goes from shared memory to the tensor cores unchanged,
where normalising it costs a round trip through registers per K step).

``mapped_gemm_kernel`` runs the three GEMMs that touch A (MAPPED selects which operand is mapped):
  0  forward   act(A @ W^T + b)      A read through the map and normalised in the load (or FOLDED)
  1  dW        dH^T @ A              A as the B operand, the same loads
  2  dX        dA = dH @ W           stored through the map: a permutation store into x's layout (every
                                      element written once when the map is a permutation: no atomics)
and ``norm_bwd_kernel`` turns dA into dx with one row-wise pass (re-reading x; dgamma / dbeta as fp32
per-program partials summed in a fixed order by the launcher: deterministic).
With MAPPED = 0 the merged A never exists in memory, nor does the norm's output. Where the GPU measured
that slower (``written_forward_applies``: large GEMMs), the forward instead writes A once
(``norm_rows_kernel``) and runs its first GEMM unmapped.
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
    acc_dtype,
    cdiv,
    dot_precision,
    empty,
    forced_tile,
    fp32_pair,
    gpu_config_on,
    grouped_tile,
    grouped_tile_of,
    mma,
    num_sms,
    pair_value,
)
from mmfuse.kernels._launch import launch_kernel
from mmfuse.kernels.linear import (GROUP_M, INTERPRETER_TILE, _tma_tile, block_k_for, candidate_tiles,
                                   gated_epilogue, gemm_epilogue)
from mmfuse.kernels import linear as KL
from mmfuse.kernels._tuning import TileChooser



@triton.jit
def token_offsets(rows, cols, col0, map_ptr, stride_map, C, G, stride_xt, stride_xc, row_ok, col_ok,
                  ALIGNED: tl.constexpr, TABLE: tl.constexpr):
    """(offset of x[tok(row, col // C), col % C], token) for a (rows x cols) tile of merged coordinates.
    TABLE: tok = map[row, j], a load; else tok = row * G + j, arithmetic, so the GEMM's pipeliner sees
    plain pointer loads and buffers them as deep as an unmapped GEMM's (an address that depends on a
    load in the same iteration got one or two buffers from Triton 3.6-3.9, not num_stages - 1).
    ALIGNED: the columns col0 .. col0 + len(cols) - 1 lie in one token's C channels (C divisible by
    the block), so the token is one value per row: a (rows x 1) gather instead of (rows x cols)."""
    if ALIGNED:
        j = col0 // C
        c = cols - j * C
        if TABLE:
            tok = tl.load(map_ptr + rows.to(tl.int64) * stride_map + j, mask=row_ok, other=0).to(tl.int64)
        else:
            tok = rows.to(tl.int64) * G + j
        tok = tok[:, None]
    else:
        j = cols // C
        c = cols % C
        if TABLE:
            tok = tl.load(map_ptr + rows[:, None].to(tl.int64) * stride_map + j[None, :],
                          mask=row_ok[:, None] & col_ok[None, :], other=0).to(tl.int64)
        else:
            tok = rows[:, None].to(tl.int64) * G + j[None, :]
    return tok * stride_xt + c[None, :] * stride_xc, tok


@triton.jit
def load_normalised(x_ptr, rows, cols, col0, row_ok, col_ok, map_ptr, stats_ptr, gamma_ptr, beta_ptr,
                    C, G, K, stride_xt, stride_xc, stride_map, stride_gamma, stride_beta,
                    ALIGNED: tl.constexpr, TABLE: tl.constexpr, NORM: tl.constexpr, NORM_POST: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """A[rows, cols] of the merged, normalised operand (0 outside the masks), in OUT_DTYPE. One code
    for LayerNorm and RMSNorm: an RMSNorm's statistics hold mean = 0 and its beta is zeros."""
    offs, tok = token_offsets(rows, cols, col0, map_ptr, stride_map, C, G, stride_xt, stride_xc, row_ok, col_ok,
                              ALIGNED, TABLE)
    mask = row_ok[:, None] & col_ok[None, :]
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if NORM:
        a = a.to(ACC_DTYPE)
        if NORM_POST:
            r = rows[:, None].to(tl.int64)
            gi = cols
        else:
            r = tok
            gi = cols % C
        if ALIGNED or NORM_POST:  # one statistic per row
            rmask = row_ok[:, None]
        else:
            rmask = mask
        mean = tl.load(stats_ptr + 2 * r, mask=rmask, other=0.0)
        rstd = tl.load(stats_ptr + 2 * r + 1, mask=rmask, other=0.0)
        a = tl.where(mask, normalise(a, mean, rstd, gamma_ptr, beta_ptr, gi, col_ok, stride_gamma, stride_beta), 0.0)
    return a.to(OUT_DTYPE)


@triton.jit
def normalise(a, mean, rstd, gamma_ptr, beta_ptr, gi, col_ok, stride_gamma, stride_beta):
    """(a - mean) * rstd * gamma + beta for columns gi of the normalised row (a, mean, rstd in fp32+)."""
    gamma = tl.load(gamma_ptr + gi * stride_gamma, mask=col_ok, other=0.0)
    beta = tl.load(beta_ptr + gi * stride_beta, mask=col_ok, other=0.0)
    return (a - mean) * rstd * gamma[None, :] + beta[None, :]


@triton.jit
def norm_stats_kernel(
    x_ptr, map_ptr, stats_ptr, w_ptr, gamma_ptr, wf_ptr,
    R, C, G, stride_xt, stride_xc, stride_map, eps, eps_lo,
    STATS_PROGRAMS, N, K, stride_wn, stride_wk, stride_gamma,
    CENTER: tl.constexpr,       # LayerNorm (the mean subtracted); else RMSNorm (mean 0)
    ALIGNED: tl.constexpr,      # C % BLOCK_C == 0: one token per row per column block
    TABLE: tl.constexpr,        # tokens from map (else row r's are r * G .. r * G + G - 1)
    FOLD: tl.constexpr,         # programs past STATS_PROGRAMS write wf = gamma * w (the folded forward's B)
    FOLD_POST: tl.constexpr,    # gamma runs along all K columns of w (a norm per merged row), else per C
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The light pass before a merged projector's first GEMM: the norm's statistics and, for the folded
    RMSNorm forward, its first weight with gamma folded in, in one launch (the forward stays at one launch
    more than its GEMMs). Program p < STATS_PROGRAMS: ``row_stats`` of rows p * BLOCK_R ...; the others:
    ``fold_gamma`` of weight rows (p - STATS_PROGRAMS) * BLOCK_R ..."""
    eps = pair_value(eps, eps_lo, ACC_DTYPE)  # an fp32 pair (``fp32_pair``): fp64 needs it
    pid = tl.program_id(0)
    if FOLD:
        if pid < STATS_PROGRAMS:
            row_stats(pid, x_ptr, map_ptr, stats_ptr, R, C, G, stride_xt, stride_xc, stride_map, eps, CENTER,
                      ALIGNED, TABLE, ACC_DTYPE, BLOCK_R, BLOCK_C)
        else:
            fold_gamma(pid - STATS_PROGRAMS, w_ptr, gamma_ptr, wf_ptr, N, K, C, stride_wn, stride_wk, stride_gamma,
                       FOLD_POST, ACC_DTYPE, BLOCK_R, BLOCK_C)
    else:
        row_stats(pid, x_ptr, map_ptr, stats_ptr, R, C, G, stride_xt, stride_xc, stride_map, eps, CENTER,
                  ALIGNED, TABLE, ACC_DTYPE, BLOCK_R, BLOCK_C)


@triton.jit
def row_stats(pid, x_ptr, map_ptr, stats_ptr, R, C, G, stride_xt, stride_xc, stride_map, eps,
              CENTER: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr, ACC_DTYPE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """stats[r] = (mean, rstd) of normalised row r: the G*C values of tokens map[r, 0..G-1] (a source
    token: G = 1 and map[r, 0] = r; a merged row: its tokens). CENTER for LayerNorm; else
    RMSNorm, which stores mean = 0. Two passes over the row: the mean, then the centred squares, summed
    relative to the running largest |value| (as a robust 2-norm is), so a row of finite values never
    overflows to rstd = 0 (|x| > 1.8e19 would, squared in fp32): the folded forward divides by rstd.
    The second pass also sums the centred values, whose mean is the first mean's rounding error: added
    back, the stored mean is the row's mean to ~half an ulp (the rounded sum alone was off by up to ~1.5
    ulps, which (x - mean) * rstd multiplies by rstd: at |mean| >> std, 13x PyTorch's error in the
    normalised values; bench/NOTES.md, session 19). The squares stay those about the first mean: they
    exceed those about the refined one by width * error^2, below the variance's last bit unless the
    std is under ~1e-3 |mean|, where x's own rounding already dominates."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    width = C * G
    total = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    if CENTER:
        for k0 in range(0, width, BLOCK_C):
            cols = k0 + tl.arange(0, BLOCK_C)
            col_ok = cols < width
            offs, _ = token_offsets(rows, cols, k0, map_ptr, stride_map, C, G, stride_xt, stride_xc, row_ok, col_ok,
                                    ALIGNED, TABLE)
            x = tl.load(x_ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            total += tl.sum(x.to(ACC_DTYPE), axis=1)
    mean = total / width
    big = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)      # the largest |value - mean| so far
    squares = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)  # sum of ((value - mean) / big)^2
    # sum of (value - mean), width x the first mean's error: summed from the scaled values times big (the
    # unscaled sum kept one more value live and spilled 8 B at 64 registers, Triton 3.9, sm_90)
    residue = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_C):
        cols = k0 + tl.arange(0, BLOCK_C)
        col_ok = cols < width
        mask = row_ok[:, None] & col_ok[None, :]
        offs, _ = token_offsets(rows, cols, k0, map_ptr, stride_map, C, G, stride_xt, stride_xc, row_ok, col_ok,
                                ALIGNED, TABLE)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - mean[:, None], 0.0)
        big_new = tl.maximum(big, tl.max(tl.abs(d), axis=1))
        inv = 1.0 / tl.where(big_new > 0, big_new, 1.0)
        ratio = big * inv
        d = d * inv[:, None]
        squares = squares * ratio * ratio + tl.sum(d * d, axis=1)
        residue += tl.sum(d, axis=1) * big_new
        big = big_new
    # mean square = big^2 * squares / width; past big ~ 1e18 (big^2 near fp32's range) eps is negligible.
    # (Each branch sees safe values only: padded rows have big = squares = 0.)
    huge = big > 1e18
    rstd_huge = 1.0 / (tl.where(huge, big, 1.0) * tl.sqrt(tl.where(huge, squares, 1.0) / width))
    small = tl.where(huge, 0.0, big)
    rstd = tl.where(huge, rstd_huge, 1.0 / tl.sqrt(small * small * squares / width + eps))
    if CENTER:  # (an RMSNorm's mean stays 0: its residue is the row's sum, which may overflow)
        mean += residue * (1.0 / width)
    tl.store(stats_ptr + 2 * rows, mean.to(stats_ptr.dtype.element_ty), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, rstd.to(stats_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def fold_gamma(pid, w_ptr, gamma_ptr, wf_ptr, N, K, C, stride_wn, stride_wk, stride_gamma,
               FOLD_POST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """wf[n, k] = w[n, k] * gamma[k] (post-merge) or gamma[k % C] (per token), for BLOCK_R rows of the
    (N, K) weight: the product in ACC_DTYPE (exact for 16-bit operands), rounded once to the weight's
    dtype (wf is contiguous)."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    for k0 in range(0, K, BLOCK_C):
        cols = k0 + tl.arange(0, BLOCK_C)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
        gi = cols if FOLD_POST else cols % C
        gamma = tl.load(gamma_ptr + gi * stride_gamma, mask=col_ok, other=0.0)
        wf = w.to(ACC_DTYPE) * gamma.to(ACC_DTYPE)[None, :]
        tl.store(wf_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], wf.to(wf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_rows_kernel(
    x_ptr, map_ptr, stats_ptr, gamma_ptr, beta_ptr, out_ptr,
    M, K, C, G, stride_xt, stride_xc, stride_map, stride_gamma, stride_beta, stride_om, eps, eps_lo,
    CENTER: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr, NORM_POST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STATS: tl.constexpr,        # compute and store this program's statistics first (else read them)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[m, :] = the merged, normalised row m (the first GEMM's A operand), written once so that a GEMM
    reads it unmapped (both operands from shared memory, TMA on Hopper): the backward's dW, and the
    forward's first GEMM where that measured faster than normalising in its loads (``normalised_rows``).
    STATS (the forward): the program first computes its rows' statistics, as ``norm_stats_kernel``
    would, and stores them for the backward — its merged rows (a norm per merged row), or, a norm per
    source token without a table, the G * BLOCK_R adjacent tokens those rows hold — then normalises from
    them: one launch, x read once from HBM."""
    pid = tl.program_id(0)
    if STATS:
        eps = pair_value(eps, eps_lo, ACC_DTYPE)
        if NORM_POST:
            row_stats(pid, x_ptr, map_ptr, stats_ptr, M, C, G, stride_xt, stride_xc, stride_map, eps, CENTER,
                      ALIGNED, TABLE, ACC_DTYPE, BLOCK_R, BLOCK_C)
        else:  # merged rows pid * BLOCK_R ... hold tokens (pid * G + j) * BLOCK_R ..., j < G
            for j in range(G):
                row_stats(pid * G + j, x_ptr, map_ptr, stats_ptr, M * G, C, 1, stride_xt, stride_xc, stride_map,
                          eps, CENTER, ALIGNED, False, ACC_DTYPE, BLOCK_R, BLOCK_C)
        tl.debug_barrier()  # every thread's statistics stored before any thread reads them back
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    for k0 in range(0, K, BLOCK_C):
        cols = k0 + tl.arange(0, BLOCK_C)
        col_ok = cols < K
        a = load_normalised(x_ptr, rows, cols, k0, row_ok, col_ok, map_ptr, stats_ptr, gamma_ptr, beta_ptr, C, G, K,
                            stride_xt, stride_xc, stride_map, stride_gamma, stride_beta, ALIGNED, TABLE, True,
                            NORM_POST, ACC_DTYPE, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], a,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def mapped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr,
    map_ptr, stats_ptr, gamma_ptr, beta_ptr,
    b2_ptr, bias2_ptr, aux2_ptr,  # GATED: the up projection's W^T (B's strides), bias, pre-activation
    M, N, K, C, G,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_auxm, stride_auxn,
    stride_bias, stride_bias2, stride_map, stride_gamma, stride_beta,
    MAPPED: tl.constexpr,       # 0: A is x merged + normalised; 1: B is; 2: C is stored through the map
    NORM: tl.constexpr,         # normalise in the load (LayerNorm or RMSNorm: the same code)
    NORM_POST: tl.constexpr,    # statistics and gamma / beta per merged row (else per source token)
    ALIGNED: tl.constexpr,      # C % (the mapped operand's block along the merged columns) == 0
    TABLE: tl.constexpr,        # tokens from the map (else merged row m is tokens m * G .. m * G + G - 1)
    FOLDED: tl.constexpr,       # (MAPPED 0, RMSNorm) B holds gamma * W: A read raw, rstd scales the accumulator
    GATED: tl.constexpr,        # (MAPPED 0) C = act(A @ B + bias) * (A @ B2 + bias2): one A tile, two B tiles
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,           # the operands not read through the map are TMA descriptors (Hopper)
    A_TRANS: tl.constexpr,       # (TMA) A's descriptor is over A^T (dW's dH^T)
    B_TRANS: tl.constexpr,       # (TMA) B's descriptor is over B^T (the forward's W^T: over W)
    NUM_PROGRAMS: tl.constexpr,  # > 0: that many persistent programs walk the tiles (Hopper); 0: a grid of tiles
):
    """C = A @ B with one operand in the merged layout (module docstring). The mapped operand's
    "strides" are x's (token, channel); rows past M / columns past N wrap as in fused_gemm_kernel.
    GATED (SwiGLU / GeGLU on a merged operand: Aya Vision, Command A) normalises and gathers each A
    tile once for both products; the launcher stores g and u (aux, aux2) where the backward's GEMMs
    read them as one (M, 2N) operand in the weight's row order.
    On Hopper (issue 14's core: ``TMA``, ``NUM_PROGRAMS``) the operands that are not the merge (the
    weight, dH) arrive by TMA, the merged operand stays a pointer gather (TMA cannot express a token
    table, nor a norm in the load), and persistent programs walk the tiles in grouped order."""
    if NUM_PROGRAMS == 0:
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _mapped_tile(pid_m, pid_n, a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, map_ptr, stats_ptr, gamma_ptr, beta_ptr,
                     b2_ptr, bias2_ptr, aux2_ptr, M, N, K, C, G, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                     stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2, stride_map, stride_gamma,
                     stride_beta, MAPPED, NORM, NORM_POST, ALIGNED, TABLE, FOLDED, GATED, ACTIVATION, HAS_BIAS,
                     STORE_AUX, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, A_TRANS, B_TRANS)
    else:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS):
            pid_m, pid_n = grouped_tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _mapped_tile(pid_m, pid_n, a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, map_ptr, stats_ptr, gamma_ptr,
                         beta_ptr, b2_ptr, bias2_ptr, aux2_ptr, M, N, K, C, G, stride_am, stride_ak, stride_bk,
                         stride_bn, stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                         stride_map, stride_gamma, stride_beta, MAPPED, NORM, NORM_POST, ALIGNED, TABLE, FOLDED,
                         GATED, ACTIVATION, HAS_BIAS, STORE_AUX, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N,
                         BLOCK_K, EVEN_K, TMA, A_TRANS, B_TRANS)


@triton.jit
def _mapped_tile(
    pid_m, pid_n, a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, map_ptr, stats_ptr, gamma_ptr, beta_ptr,
    b2_ptr, bias2_ptr, aux2_ptr, M, N, K, C, G,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_auxm, stride_auxn,
    stride_bias, stride_bias2, stride_map, stride_gamma, stride_beta,
    MAPPED: tl.constexpr, NORM: tl.constexpr, NORM_POST: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr,
    FOLDED: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_AUX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr, A_TRANS: tl.constexpr, B_TRANS: tl.constexpr,
):
    """One output tile of ``mapped_gemm_kernel``."""
    op_dtype = c_ptr.dtype.element_ty  # every operand's dtype (the launchers keep them one)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = offs_m % M
    cols_b = offs_n % N
    if not (TMA and MAPPED != 0):  # A by pointers
        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if not (TMA and MAPPED != 1):  # B (and GATED's B2: W_up^T, with W_gate^T's strides) by pointers
        b_off = offs_k[:, None] * stride_bk + cols_b.to(tl.int64)[None, :] * stride_bn
        b_ptrs = b_ptr + b_off
        b2_ptrs = b2_ptr + b_off

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GATED else (1, 1), dtype=ACC_DTYPE)
    # FOLDED: an RMSNorm's gamma is in B (the launcher's gamma * W), so A reaches the MMA as loaded
    # (shared memory straight to the tensor cores: normalising in the load costs a shared -> registers
    # -> shared round trip per K step, and on Hopper wgmma then takes A from registers). What is left of
    # the norm is a positive scale per row and slot, x @ (gamma W)^T summed over slots j with rstd[tok(m, j)];
    # the accumulator is kept in units of the current slot's rstd (rescaled by the ratio at each slot,
    # as online softmax rescales by its running max), and by a merged row's rstd at the end post-merge.
    tl.static_assert(not FOLDED or (MAPPED == 0 and not NORM and not GATED and (NORM_POST or ALIGNED)))
    if MAPPED == 0 and ALIGNED and (TABLE or (FOLDED and not NORM_POST)):
        # One token per row and slot j (ALIGNED: a K step never straddles two slots): the tokens come
        # outside the channel loop, so its addresses are plain pointer steps, which the pipeliner buffers
        # num_stages - 1 deep (an address from a load in the same iteration got one or two buffers: the
        # forward of a pixel shuffle ran ~4x slower than its GEMM).
        rows = rows_a.to(tl.int64)
        scale = tl.full((BLOCK_M,), 1.0, dtype=ACC_DTYPE)  # FOLDED per token: the accumulator's unit
        for j in range(0, G):
            if TABLE:
                tok = tl.load(map_ptr + rows * stride_map + j).to(tl.int64)
            else:
                tok = rows * G + j
            x_ptrs = a_ptr + tok[:, None] * stride_am + offs_k[None, :] * stride_ak
            if FOLDED and not NORM_POST:
                rstd_j = tl.load(stats_ptr + 2 * tok + 1).to(ACC_DTYPE)
                acc = acc * (scale / rstd_j)[:, None]
                scale = rstd_j
            if NORM:
                r = rows if NORM_POST else tok
                mean = tl.load(stats_ptr + 2 * r)[:, None]
                rstd = tl.load(stats_ptr + 2 * r + 1)[:, None]
            for c0 in range(0, C, BLOCK_K):
                a = tl.load(x_ptrs)
                if NORM:
                    gi = (j * C if NORM_POST else 0) + c0 + offs_k
                    a = normalise(a.to(ACC_DTYPE), mean, rstd, gamma_ptr, beta_ptr, gi, gi >= 0, stride_gamma,
                                  stride_beta)
                a = a.to(op_dtype)
                if TMA:
                    b = _tma_tile(b_ptr, pid_n * BLOCK_N, j * C + c0, B_TRANS, True)
                else:
                    b = tl.load(b_ptrs)
                acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)
                if GATED:
                    if TMA:
                        b2 = _tma_tile(b2_ptr, pid_n * BLOCK_N, j * C + c0, B_TRANS, True)
                    else:
                        b2 = tl.load(b2_ptrs)
                    acc_up = mma(a, b2, acc_up, INPUT_PRECISION, ACC_DTYPE)
                    if not TMA:
                        b2_ptrs += BLOCK_K * stride_bk
                x_ptrs += BLOCK_K * stride_ak
                if not TMA:
                    b_ptrs += BLOCK_K * stride_bk
        if FOLDED and not NORM_POST:
            acc = acc * scale[:, None]
    else:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            ks = k * BLOCK_K + offs_k
            k_ok = ks < K
            if MAPPED == 0:
                a = load_normalised(a_ptr, rows_a, ks, k * BLOCK_K, rows_a >= 0, k_ok, map_ptr,
                                    stats_ptr, gamma_ptr, beta_ptr, C, G, K, stride_am, stride_ak, stride_map,
                                    stride_gamma, stride_beta, ALIGNED, TABLE, NORM, NORM_POST, ACC_DTYPE, op_dtype)
            elif TMA:  # the copy engine zero-fills past K
                a = _tma_tile(a_ptr, pid_m * BLOCK_M, k * BLOCK_K, A_TRANS, False)
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if MAPPED == 1:
                b = load_normalised(b_ptr, ks, cols_b, (pid_n * BLOCK_N) % N, k_ok, cols_b >= 0,
                                    map_ptr, stats_ptr, gamma_ptr, beta_ptr, C, G, N, stride_bk, stride_bn, stride_map,
                                    stride_gamma, stride_beta, ALIGNED, TABLE, NORM, NORM_POST, ACC_DTYPE, op_dtype)
            elif TMA:
                b = _tma_tile(b_ptr, pid_n * BLOCK_N, k * BLOCK_K, B_TRANS, True)
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)
            if GATED:
                if TMA:
                    b2 = _tma_tile(b2_ptr, pid_n * BLOCK_N, k * BLOCK_K, B_TRANS, True)
                elif EVEN_K:
                    b2 = tl.load(b2_ptrs)
                else:
                    b2 = tl.load(b2_ptrs, mask=k_ok[:, None], other=0.0)
                acc_up = mma(a, b2, acc_up, INPUT_PRECISION, ACC_DTYPE)
                if not TMA:
                    b2_ptrs += BLOCK_K * stride_bk
            if not (TMA and MAPPED != 0):
                a_ptrs += BLOCK_K * stride_ak
            if not (TMA and MAPPED != 1):
                b_ptrs += BLOCK_K * stride_bk
    if FOLDED and NORM_POST:
        acc = acc * tl.load(stats_ptr + 2 * rows_a.to(tl.int64) + 1).to(ACC_DTYPE)[:, None]

    if MAPPED == 2:
        # dA straight into x's layout: the inverse of the forward's gather, a permutation store.
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        offs, _ = token_offsets(offs_m, offs_n, pid_n * BLOCK_N, map_ptr, stride_map, C, G, stride_cm, stride_cn,
                                offs_m < M, offs_n < N, ALIGNED, TABLE)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif GATED:
        gated_epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, c_ptr, bias_ptr, bias2_ptr, aux_ptr, aux2_ptr,
                       stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                       ACTIVATION, HAS_BIAS, STORE_AUX, False, ACC_DTYPE, BLOCK_M, BLOCK_N)
    else:
        gemm_epilogue(acc, pid_m, pid_n, M, N, c_ptr, bias_ptr, aux_ptr,
                      stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
                      ACTIVATION, HAS_BIAS, STORE_AUX, False, ACC_DTYPE, BLOCK_M, BLOCK_N)


@triton.jit
def norm_bwd_block(x_ptr, da_ptr, gamma_ptr, map_ptr, rows, row_ok, k0, mean, rstd, C, G, width,
                   stride_xt, stride_xc, stride_dat, stride_dac, stride_map, stride_gamma,
                   NORM_POST: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """One (rows x BLOCK_C) block of the norm backward's operands: (cols, col_ok, tok, dA, xhat, dA * gamma),
    0 outside the masks. One table lookup serves x and dA (their offsets differ only in strides)."""
    cols = k0 + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    x_offs, tok = token_offsets(rows, cols, k0, map_ptr, stride_map, C, G, stride_xt, stride_xc, row_ok, col_ok,
                                ALIGNED, TABLE)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC_DTYPE)
    da = tl.load(da_ptr + tok * stride_dat + (cols % C)[None, :] * stride_dac, mask=mask, other=0.0).to(ACC_DTYPE)
    gamma = tl.load(gamma_ptr + (cols if NORM_POST else cols % C) * stride_gamma, mask=col_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return cols, col_ok, tok, da, xhat, da * gamma.to(ACC_DTYPE)[None, :]


@triton.jit
def norm_bwd_kernel(
    da_ptr, x_ptr, map_ptr, stats_ptr, gamma_ptr, dx_ptr, dgamma_ptr, dbeta_ptr,
    R, C, G, stride_xt, stride_xc, stride_dat, stride_dac, stride_dxt, stride_dxc, stride_map, stride_gamma,
    CENTER: tl.constexpr, NORM_POST: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx of the norm for BLOCK_R normalised rows (tokens map[r, 0..G-1], as in norm_stats_kernel), from
    dA (the gradient at the norm's output, in x's layout): with g = dA * gamma, xhat = (x - mean) * rstd,
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (an RMSNorm, not CENTER: without mean(g))
    and this program's share of dgamma = sum dA * xhat and dbeta = sum dA over its rows: one fp32
    partial row per program (dgamma_ptr + pid * width), each written once, summed in order by the
    launcher. Pass 1 forms the row sums (and, post-merge, the partials: every column its own gamma);
    pass 2 writes dx (and, pre-merge, the partials over the C channels the rows share)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    width = C * G
    r = rows.to(tl.int64)
    mean = tl.load(stats_ptr + 2 * r, mask=row_ok, other=0.0).to(ACC_DTYPE)
    rstd = tl.load(stats_ptr + 2 * r + 1, mask=row_ok, other=0.0).to(ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    sum_gx = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_C):
        cols, col_ok, tok, da, xhat, g = norm_bwd_block(
            x_ptr, da_ptr, gamma_ptr, map_ptr, rows, row_ok, k0, mean, rstd, C, G, width, stride_xt, stride_xc,
            stride_dat, stride_dac, stride_map, stride_gamma, NORM_POST, ALIGNED, TABLE, ACC_DTYPE, BLOCK_C)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
        if NORM_POST:
            tl.store(dgamma_ptr + pid * width + cols, tl.sum(da * xhat, axis=0), mask=col_ok)
            tl.store(dbeta_ptr + pid * width + cols, tl.sum(da, axis=0), mask=col_ok)
    mean_g = sum_g / width if CENTER else tl.zeros_like(sum_g)
    mean_gx = sum_gx / width
    for k0 in range(0, width, BLOCK_C):
        cols, col_ok, tok, da, xhat, g = norm_bwd_block(
            x_ptr, da_ptr, gamma_ptr, map_ptr, rows, row_ok, k0, mean, rstd, C, G, width, stride_xt, stride_xc,
            stride_dat, stride_dac, stride_map, stride_gamma, NORM_POST, ALIGNED, TABLE, ACC_DTYPE, BLOCK_C)
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        dx_offs = tok * stride_dxt + (cols % C)[None, :] * stride_dxc
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if not NORM_POST:
            tl.store(dgamma_ptr + pid * width + cols, tl.sum(da * xhat, axis=0), mask=col_ok)
            tl.store(dbeta_ptr + pid * width + cols, tl.sum(da, axis=0), mask=col_ok)


@triton.jit
def pool_norm_fwd_kernel(
    x_ptr, map_ptr, gamma_ptr, beta_ptr, pooled_ptr, out_ptr, stats_ptr,
    M, C, G, stride_xt, stride_xc, stride_map, stride_gamma, stride_beta, stride_pm, stride_om,
    eps, eps_lo, gamma_shift, gamma_shift_lo,
    CENTER: tl.constexpr, NORM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Average pooling then the norm, for BLOCK_R pooled rows: pooled[m] = mean of x over tokens map[m, :]
    (rounded to x's dtype, as AvgPool2d returns it), out[m] = (pooled[m] - mean) * rstd * (gamma +
    gamma_shift) + beta (CENTER: LayerNorm; else RMSNorm: mean 0, beta unused; Gemma 3 scales by
    1 + weight: gamma_shift 1). Pass 1 pools (G token rows per block) and stores pooled; passes 2 and 3
    read this program's own pooled rows back (after a barrier: other threads wrote them) for the centred
    squares and the output. Without NORM, pass 1 stores straight to out."""
    eps = pair_value(eps, eps_lo, ACC_DTYPE)  # fp32 pairs (``fp32_pair``): fp64 needs them
    gamma_shift = pair_value(gamma_shift, gamma_shift_lo, ACC_DTYPE)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r = rows.to(tl.int64)
    total = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    dest_ptr = pooled_ptr if NORM else out_ptr
    stride_dest = stride_pm if NORM else stride_om
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < C)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
        for j in range(0, G):
            tok = tl.load(map_ptr + r * stride_map + j, mask=row_ok, other=0).to(tl.int64)
            acc += tl.load(x_ptr + tok[:, None] * stride_xt + cols[None, :] * stride_xc, mask=mask,
                           other=0.0).to(ACC_DTYPE)
        pooled = (acc / G).to(dest_ptr.dtype.element_ty)
        tl.store(dest_ptr + r[:, None] * stride_dest + cols[None, :], pooled, mask=mask)
        total += tl.sum(pooled.to(ACC_DTYPE), axis=1)
    if NORM:
        tl.debug_barrier()
        mean = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)  # an RMSNorm's; its total may overflow
        if CENTER:
            mean = total / C
        squares = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        residue = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)  # C x the mean's rounding error (row_stats)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < C)[None, :]
            p = tl.load(pooled_ptr + r[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            d = tl.where(mask, p - mean[:, None], 0.0)
            squares += tl.sum(d * d, axis=1)
            residue += tl.sum(d, axis=1)
        rstd = 1.0 / tl.sqrt(squares / C + eps)
        if ACC_DTYPE != tl.float64:  # (fp64's mean is exact enough; the correction's division spilled 8 B)
            if CENTER:
                mean += residue / C
        tl.store(stats_ptr + 2 * r, mean.to(stats_ptr.dtype.element_ty), mask=row_ok)
        tl.store(stats_ptr + 2 * r + 1, rstd.to(stats_ptr.dtype.element_ty), mask=row_ok)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            mask = row_ok[:, None] & col_ok[None, :]
            p = tl.load(pooled_ptr + r[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            gamma = tl.load(gamma_ptr + cols * stride_gamma, mask=col_ok, other=0.0).to(ACC_DTYPE) + gamma_shift
            y = (p - mean[:, None]) * rstd[:, None] * gamma[None, :]
            if CENTER:
                y += tl.load(beta_ptr + cols * stride_beta, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
            tl.store(out_ptr + r[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pool_norm_bwd_kernel(
    da_ptr, pooled_ptr, stats_ptr, map_ptr, gamma_ptr, dx_ptr, dgamma_ptr, dbeta_ptr,
    M, C, G, stride_dam, stride_dac, stride_pm, stride_map, stride_gamma, stride_dxt, stride_dxc,
    gamma_shift, gamma_shift_lo,
    CENTER: tl.constexpr, NORM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx of ``pool_norm_fwd_kernel`` for BLOCK_R pooled rows, from dA (M, C) at its output: the norm's
    backward as in norm_bwd_kernel (g = dA * gamma, dp = rstd * (g - mean(g) - xhat *
    mean(g * xhat)), this program's fp32 dgamma / dbeta partial rows, summed in order by the launcher),
    then dx[tok] = dp / G for each of the row's G tokens: a spread store, every token written once
    (pooling windows do not overlap), no atomics."""
    gamma_shift = pair_value(gamma_shift, gamma_shift_lo, ACC_DTYPE)  # (``fp32_pair``)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r = rows.to(tl.int64)
    if NORM:
        mean = tl.load(stats_ptr + 2 * r, mask=row_ok, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(stats_ptr + 2 * r + 1, mask=row_ok, other=0.0).to(ACC_DTYPE)
        sum_g = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        sum_gx = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            mask = row_ok[:, None] & col_ok[None, :]
            da = tl.load(da_ptr + r[:, None] * stride_dam + cols[None, :] * stride_dac, mask=mask, other=0.0).to(ACC_DTYPE)
            p = tl.load(pooled_ptr + r[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            xhat = tl.where(mask, (p - mean[:, None]) * rstd[:, None], 0.0)
            gamma = tl.load(gamma_ptr + cols * stride_gamma, mask=col_ok, other=0.0).to(ACC_DTYPE) + gamma_shift
            g = da * gamma[None, :]
            sum_g += tl.sum(g, axis=1)
            sum_gx += tl.sum(g * xhat, axis=1)
            tl.store(dgamma_ptr + pid * C + cols, tl.sum(da * xhat, axis=0), mask=col_ok)
            tl.store(dbeta_ptr + pid * C + cols, tl.sum(da, axis=0), mask=col_ok)
        # (an RMSNorm's mean(g) is 0: multiplied out rather than dropped, which spilled 8 B at 80 registers
        # on Triton 3.7.1, sm_90; this form holds 96 without, as the runtime flag did)
        mean_g = sum_g / C * (1.0 if CENTER else 0.0)
        mean_gx = sum_gx / C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        da = tl.load(da_ptr + r[:, None] * stride_dam + cols[None, :] * stride_dac, mask=mask, other=0.0).to(ACC_DTYPE)
        if NORM:
            p = tl.load(pooled_ptr + r[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            xhat = (p - mean[:, None]) * rstd[:, None]
            gamma = tl.load(gamma_ptr + cols * stride_gamma, mask=col_ok, other=0.0).to(ACC_DTYPE) + gamma_shift
            dp = rstd[:, None] * (da * gamma[None, :] - mean_g[:, None] - xhat * mean_gx[:, None])
        else:
            dp = da
        dp = (dp / G).to(dx_ptr.dtype.element_ty)
        for j in range(0, G):
            tok = tl.load(map_ptr + r * stride_map + j, mask=row_ok, other=0).to(tl.int64)
            tl.store(dx_ptr + tok[:, None] * stride_dxt + cols[None, :] * stride_dxc, dp, mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
#: GEMM tiles of the mapped kernel (BLOCK_K for 2-byte dtypes), from the compile check.
MAPPED_TILES = ((128, 128, 64, 8, 4), (64, 64, 64, 8, 4))
#: The gated forward holds two accumulators (gate, up) beside the A tile it normalises in registers. At
#: BLOCK_K 64 every tile tried spilled on sm_80 on some Triton of 3.6-3.9 (128x64 w8 8-40 B, 64x64 w8
#: 8-24 B, 4-warp tiles 40-304 B, 128x128 and 64x128 240-2328 B); at BLOCK_K 32 these two hold 143-228
#: registers. IEEE fp32 (FMA): 64x64 spilled 16-48 B at two stages; 64x32 holds 114-122.
MAPPED_GATED_TILES = ((128, 64, 32, 8, 4), (64, 64, 32, 8, 4))
MAPPED_FP32_GATED_TILE = (64, 32, 32, 8, 2)
#: A channel count no block divides: the token (and its statistics) gathered per element.
MAPPED_GATHER_TILE = (64, 64, 64, 8, 3)
#: IEEE fp32 (FMA, no tensor cores): dW spilled at 64x64x32 (16-88 B, 2-4 stages) and 32x64x32; a
#: 16-deep K step holds fewer B values per thread (Triton 3.9, sm_80 / sm_90). Two stages: with the view
#: merge's computed tokens (no table) the forward and dW pipeline fully and spilled 16 B at three.
MAPPED_FP32_TILE = (64, 64, 32, 8, 2)
#: fp64 (gradcheck) takes one small tile.
MAPPED_FP64_TILE = (64, 64, 64, 8, 3)
#: Row-wise kernels: rows per program and columns per step (stats and norm backward); with C not a
#: multiple of 128 the token gather is per element: half the columns per step (the norm backward
#: spilled 16 B at 16x128 on sm_90 with Triton 3.7.1).
ROWWISE = (16, 128)
ROWWISE_GATHER = (16, 64)
#: The pooling kernels: a token per row per pooling slot, so C need not divide the block. fp64's
#: forward spilled 40 B at 16x128 on sm_90 (Triton 3.9): half the columns.
POOL_ROWWISE = (16, 128)
POOL_ROWWISE_FP64 = (16, 64)
INTERPRETER_ROWWISE = (8, 32)

TUNER = TileChooser("merged_gemm/mapped_gemm_kernel")


@functools.lru_cache(maxsize=8)
def _no_table(device: torch.device) -> torch.Tensor:
    """The map pointer of a launch with TABLE off (never read)."""
    return torch.zeros((1, 1), dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """RMSNorm's beta: the kernels run LayerNorm's code with mean = 0 and beta = 0."""
    return torch.zeros(n, dtype=dtype, device=device)


class Merge:
    """The merged operand: x (T, C) any strides; G tokens per merged row, by the (M, G) int32 token
    table, or without one (None: merged row m is tokens m*G .. m*G + G - 1, computed, not loaded); the
    norm ("layer" / "rms" / None) before or after the merge, its gamma, beta and eps; its statistics
    once ``norm_stats`` ran."""

    def __init__(self, x, G, token_map=None, norm=None, post=False, gamma=None, beta=None, eps=1e-6):
        self.x, self.G, self.norm, self.post, self.eps = x, G, norm, post, eps
        self.T, self.C = x.shape
        self.table = token_map is not None
        self.token_map = token_map if self.table else _no_table(x.device)
        self.M, self.K = (token_map.shape[0] if self.table else self.T // G), G * self.C
        width = self.K if post else self.C
        self.gamma = gamma
        self.beta = beta if norm == "layer" else (_zeros(width, x.dtype, x.device) if norm else None)
        self.stats = None
        self.folded = self.folded_from = None  # gamma * W, and the W it came from (``norm_stats(fold=W)``)

    @property
    def rows(self):
        """(normalised rows, tokens per row, whether the table holds them): merged rows post-merge,
        else source tokens (row r is token r)."""
        if self.post:
            return self.M, self.G, self.table
        return self.T, 1, False


def _rowwise(C: int):
    if INTERPRET and not gpu_config_on():
        return INTERPRETER_ROWWISE
    return ROWWISE if C % ROWWISE[1] == 0 else ROWWISE_GATHER


def _stats_buffer(merge: Merge) -> torch.Tensor:
    """(mean, rstd) per normalised row, uninitialised: fp32, fp64 for fp64 inputs."""
    x = merge.x
    return empty((merge.rows[0], 2), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                 device=x.device)


def norm_stats(merge: Merge, fold=None):
    """(mean, rstd) per normalised row into merge.stats (fp32; fp64 for fp64 inputs). ``fold``: the first
    Linear's (N, K) weight, when ``fold_applies``: gamma * W into merge.folded, in the same launch."""
    x = merge.x
    R, G, table = merge.rows
    stats = _stats_buffer(merge)
    br, bc = _rowwise(merge.C)
    programs = cdiv(R, br)
    w, wf = (fold, empty(fold.shape, dtype=fold.dtype, device=fold.device)) if fold is not None else (stats, stats)
    folds = cdiv(w.shape[0], br) if fold is not None else 0
    if programs + folds:
        launch_kernel(norm_stats_kernel, (programs + folds,),
            x, merge.token_map, stats, w, merge.gamma if fold is not None else stats, wf,
            R, merge.C, G, x.stride(0), x.stride(1), merge.token_map.stride(0),
            *fp32_pair(merge.eps, stats.dtype),
            programs, w.shape[0], merge.K, w.stride(0), w.stride(1), merge.gamma.stride(0) if fold is not None else 0,
            CENTER=merge.norm == "layer", ALIGNED=merge.C % bc == 0, TABLE=table, FOLD=fold is not None,
            FOLD_POST=merge.post,
            ACC_DTYPE=acc_dtype(x.dtype), BLOCK_R=br, BLOCK_C=bc, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    merge.stats = stats
    merge.folded, merge.folded_from = (wf, fold) if fold is not None else (None, None)
    return stats


#: The folded RMSNorm forward (``fold_applies``) from this many merged rows. Model (bench/NOTES.md,
#: "Session 15"): normalising in the load ran the Qwen2.5-VL merger's first GEMM at 2.5x the time of the
#: unmapped GEMM of its size on an H100 (2.20 ms against 0.84-0.90 ms), so folding saves ~1.5 GEMM times
#: (2 M N K / F, F ~ 500 TFLOP/s at that size) and costs one pass over W (read and write, 2 N K e bytes at
#: ~3.35 TB/s): a win from M ~ e F / (1.5 BW) ~ 200 rows for 2-byte weights (4-byte ones under TF32: half
#: the FLOP rate, twice the bytes, the same M); 192, three 64-row tiles.
FOLD_MIN_ROWS = 192


def fold_applies(merge: Merge, gated: bool = False) -> bool:
    """Whether the forward folds the norm into its first weight: an RMSNorm (no mean: nothing cancels;
    a LayerNorm's fold subtracts mean * (gamma W) from x @ (gamma W)^T, which loses the signal's bits
    when |mean| >> std: ``test_normalising_in_the_load_is_exact_at_large_mean``), not gated, at least
    FOLD_MIN_ROWS merged rows, and one token per row in every K step the launcher may take (a norm
    per token: its rstd scales whole K steps), or a norm over the merged row; not in fp16, whose
    subnormals start at 6e-5 (a small gamma times a weight of 1e-2 would lose digits there that
    PyTorch's order, rounding x * rstd * gamma ~ 1, keeps; bf16 and fp32 have fp32's range)."""
    if merge.norm != "rms" or gated or merge.M < FOLD_MIN_ROWS or merge.K == 0:  # (K = 0: rstd is NaN, A empty)
        return False
    if merge.x.dtype == torch.float16:  # gamma * W would round into fp16's subnormals where |gamma W| < 6e-5
        return False
    return merge.post or all(merge.C % bk == 0 for bk in _forward_block_ks(merge))


def _forward_block_ks(merge: Merge) -> set:
    """The BLOCK_K values the forward's launch may take (``_launch``'s tile choice)."""
    x = merge.x
    forced = forced_tile("mapped_gemm_kernel")
    if forced is not None:
        return {block_k_for(forced[2], x.element_size())}
    if INTERPRET and not gpu_config_on():
        return {INTERPRETER_TILE[2]}
    tiles = mapped_tiles(x.element_size(), dot_precision(x.dtype), merge.C)
    return {block_k_for(t[2], x.element_size()) for t in tiles}


def mapped_tiles(elem_bytes: int, precision: str, C: int | None = None, mapped: int = 0, gated: bool = False,
                 tma: bool = False) -> tuple:
    """The mapped GEMM's tiles: MAPPED_TILES (MAPPED_GATED_TILES for a gated forward), or the fp32-IEEE /
    fp64 one. Given C, only the tiles whose merged-column block divides C (ALIGNED: one token per row per
    block); if none does, the gather tile (at 128x128 the per-element statistics, pipelined, needed
    272 KB of shared memory on an H100 with Triton 3.6). ``tma``: on the Hopper core, where the forward
    drops 128x128 (244-255 registers on Triton 3.6-3.9, and 32-48 B of spills on 3.9 with a norm: per
    merged row in bf16, per token in TF32)."""
    if elem_bytes == 8:
        tiles = gather = (MAPPED_FP64_TILE,)
    elif elem_bytes == 4 and precision == "ieee":
        tiles = gather = (MAPPED_FP32_GATED_TILE if gated else MAPPED_FP32_TILE,)
    else:
        tiles, gather = MAPPED_GATED_TILES if gated else MAPPED_TILES, (MAPPED_GATHER_TILE,)
        if tma and mapped == 0:
            tiles = tuple(t for t in tiles if t[:2] != (128, 128))
    if C is None:
        return tiles
    aligned = tuple(t for t in tiles if C % (block_k_for(t[2], elem_bytes) if mapped == 0 else t[1]) == 0)
    return aligned or gather


def _tma_layouts(a, b, b2, mapped: int):
    """(A_TRANS, B_TRANS) of the mapped GEMM's operands that are not the merge, read by TMA; None where
    TMA cannot read one (``linear._tma_layout``). The forward's B is W^T (its descriptor over W), dW's
    A is dH^T (over dH), dA's A and B are dH and W as they lie."""
    a_t = KL._tma_layout(a) if mapped != 0 else False
    b_t = KL._tma_layout(b) if mapped != 1 else False
    if b2 is not None and KL._tma_layout(b2) != b_t:
        return None
    return None if a_t is None or b_t is None else (a_t, b_t)


def _launch(a, b, c, merge: Merge, mapped: int, M, N, K, strides, *, bias=None, aux=None, activation=0,
            store_aux=False, b2=None, bias2=None, aux2=None):
    """One mapped GEMM; ``b2`` (the up projection's W^T, B's strides) makes the forward gated, with
    ``bias2`` and ``aux2`` (aux's strides) beside bias and aux."""
    if M == 0 or N == 0:
        return
    x = merge.x
    aux_t = aux if aux is not None else c
    dummy = c  # never dereferenced when its flag is off
    norm = merge.norm is not None and mapped != 2
    gated = b2 is not None
    folded = mapped == 0 and merge.folded is not None  # b is then gamma * W (``norm_stats``)
    stats, gamma, beta = (merge.stats, merge.gamma, merge.beta) if norm else (dummy, dummy, dummy)
    flags = dict(MAPPED=mapped, NORM=norm and not folded, NORM_POST=merge.post and norm, TABLE=merge.table,
                 FOLDED=folded, GATED=gated,
                 ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_AUX=store_aux,
                 INPUT_PRECISION=dot_precision(x.dtype),
                 ACC_DTYPE=acc_dtype(x.dtype))
    seconds = (b2 if gated else dummy, bias2 if bias2 is not None else dummy, aux2 if aux2 is not None else dummy)

    # The Hopper core (MMFUSE_TMA=always; issue 14): the operands that are not the merge by TMA, where
    # TMA can read them (unit stride, 16-byte aligned rows), and persistent programs.
    tma_layout = _tma_layouts(a, b, b2, mapped) if KL._wants_tma(x) and KL.TMA == "always" else None

    def launch(tile, gpu_tile=True):
        bm, bn, bk, warps, stages = tile
        if gpu_tile:
            bk = block_k_for(bk, x.element_size())
        ops, grid = (a, b, seconds[0]), (cdiv(M, bm) * cdiv(N, bn),)
        hopper = dict(TMA=False, A_TRANS=False, B_TRANS=False, NUM_PROGRAMS=0)
        if tma_layout is not None:
            a_trans, b_trans = tma_layout
            programs = KL.TMA_PROGRAMS or num_sms(x.device)
            ops = (KL._tma_operand(a, bm, bk, a_trans) if mapped != 0 else a,
                   KL._tma_operand(b, bk, bn, b_trans) if mapped != 1 else b,
                   KL._tma_operand(b2, bk, bn, b_trans) if gated else seconds[0])
            grid = (min(programs, grid[0]),)
            hopper = dict(TMA=True, A_TRANS=a_trans, B_TRANS=b_trans, NUM_PROGRAMS=programs)
        launch_kernel(mapped_gemm_kernel, grid,
            ops[0], ops[1], c, bias if bias is not None else dummy, aux_t, merge.token_map, stats, gamma, beta,
            ops[2], *seconds[1:],
            M, N, K, merge.C, merge.G, *strides, aux_t.stride(0), aux_t.stride(1),
            bias.stride(0) if bias is not None else 0, bias2.stride(0) if bias2 is not None else 0,
            merge.token_map.stride(0), gamma.stride(0) if norm else 0, beta.stride(0) if norm else 0,
            **flags, EVEN_K=K % bk == 0, ALIGNED=merge.C % (bk if mapped == 0 else bn) == 0, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, **hopper, num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS)

    forced = forced_tile("mapped_gemm_kernel")
    if forced is not None:
        launch(forced)
    elif INTERPRET and not gpu_config_on():  # (under gpu_config: the GPU's choice, which is also faster here)
        launch(INTERPRETER_TILE, gpu_tile=False)
    else:
        key = (x.dtype, x.device, *flags.values(), merge.C, tma_layout)
        tiles = mapped_tiles(x.element_size(), flags["INPUT_PRECISION"], merge.C, mapped, gated,
                             tma=tma_layout is not None)
        launch(TUNER.choose((M, N, K), key, candidate_tiles(M, N, num_sms(x.device), tiles), launch))


def mapped_fwd(merge: Merge, weight, bias=None, activation=0, store_preact=False):
    """y = act(norm_merge(x) @ W^T + b) (M, N), the merged operand read through the map; (y, h). With
    merge.folded (``norm_stats(merge, fold=weight)``) the GEMM reads gamma * W and x raw."""
    M, N, x = merge.M, weight.shape[0], merge.x
    y = empty((M, N), dtype=x.dtype, device=x.device)
    h = empty((M, N), dtype=x.dtype, device=x.device) if (store_preact and activation) else None
    if merge.folded is not None and weight is not merge.folded_from:
        raise ValueError("weight: expected the weight norm_stats folded gamma into (merge.folded_from), got another")
    w_t = (merge.folded if merge.folded is not None else weight).t()
    _launch(x, w_t, y, merge, 0, M, N, merge.K,
            (x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), y.stride(0), y.stride(1)),
            bias=bias, aux=h, activation=activation, store_aux=h is not None)
    return y, h


def mapped_gated_fwd(merge: Merge, weight, gate_half: int, bias=None, activation=0, store_preact=False):
    """h = act(g) * u (M, N) for [g | u] = norm_merge(x) @ W^T + b, W one (2N, K) weight whose half
    ``gate_half`` (0 first, 1 second) is the gate's, in one launch; (h, gu): gu (M, 2N) the pre-activations
    in W's row order (the backward's dGU, dW and dA GEMMs read it as one operand), when saved."""
    M, N, x = merge.M, weight.shape[0] // 2, merge.x
    gate, up = (slice(0, N), slice(N, 2 * N)) if gate_half == 0 else (slice(N, 2 * N), slice(0, N))
    h = empty((M, N), dtype=x.dtype, device=x.device)
    gu = empty((M, 2 * N), dtype=x.dtype, device=x.device) if store_preact else None
    wg_t, wu_t = weight[gate].t(), weight[up].t()
    _launch(x, wg_t, h, merge, 0, M, N, merge.K,
            (x.stride(0), x.stride(1), wg_t.stride(0), wg_t.stride(1), h.stride(0), h.stride(1)),
            bias=bias[gate] if bias is not None else None, aux=gu[:, gate] if gu is not None else None,
            activation=activation, store_aux=gu is not None, b2=wu_t,
            bias2=bias[up] if bias is not None else None, aux2=gu[:, up] if gu is not None else None)
    return h, gu


def rows_take_stats(merge: Merge) -> bool:
    """Whether ``normalised_rows`` can compute the statistics in its own launch (``stats=True``): each
    program then owns the rows it normalises — a norm per merged row, or per source token without a
    table (merged row m holds tokens m*G ...). Per token through a table the tokens a program reads are
    not a range it owns: ``norm_stats`` first. So does fp64 (the gradchecks' dtype, not a speed path):
    its fused launch spilled 16 B on sm_90 (Triton 3.9)."""
    return merge.norm is not None and (merge.post or not merge.table) and merge.x.dtype != torch.float64


def normalised_rows(merge: Merge, stats: bool = False) -> torch.Tensor:
    """The merged, normalised operand (M, K) in x's dtype (``norm_rows_kernel``: one row-wise launch),
    for a GEMM to read unmapped: the backward's dW (``materialise_applies``) and the forward's first GEMM
    (``written_forward_applies``). ``stats``: the same launch computes merge.stats first
    (``rows_take_stats`` must hold); else ``norm_stats`` ran."""
    x = merge.x
    out = empty((merge.M, merge.K), dtype=x.dtype, device=x.device)
    if stats:
        if not rows_take_stats(merge):
            raise ValueError("normalised_rows: stats=True needs a norm per merged row, or per token without a "
                             "table (rows_take_stats)")
        merge.stats = _stats_buffer(merge)
        if merge.K == 0:  # no channels: the statistics of empty rows (NaN, as norm_stats leaves them)
            merge.stats.fill_(float("nan"))
    if merge.M and merge.K:
        br, bc = _rowwise(merge.C)
        launch_kernel(norm_rows_kernel, (cdiv(merge.M, br),),
            x, merge.token_map, merge.stats, merge.gamma, merge.beta, out, merge.M, merge.K, merge.C, merge.G,
            x.stride(0), x.stride(1), merge.token_map.stride(0), merge.gamma.stride(0), merge.beta.stride(0),
            out.stride(0), *fp32_pair(merge.eps, merge.stats.dtype), CENTER=merge.norm == "layer",
            ALIGNED=merge.C % bc == 0, TABLE=merge.table, NORM_POST=merge.post, ACC_DTYPE=acc_dtype(x.dtype),
            STATS=stats, BLOCK_R=br, BLOCK_C=bc, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    return out


#: Where the forward's first GEMM gets its merged, normalised A: "auto" (``written_forward_applies``),
#: "in-load" (read through the map and normalised in the GEMM's loads: the merged operand never exists)
#: or "written" (``normalised_rows`` writes it once, then the unmapped GEMM, TMA on Hopper, reads it; forms
#: with a norm and not gated — the others keep the in-load forward). Read once, at import.
MERGED_FORWARD = os.environ.get("MMFUSE_MERGED_FORWARD", "auto")
MERGED_FORWARD_MODES = ("auto", "in-load", "written")
#: Measured on an H100 (bench/NOTES.md, "Fifth GPU session": the merged GEMM taken apart, bf16): the first
#: GEMM's time over an unmapped GEMM of its size, less 1 — what writing A once saves, as a fraction of
#: that GEMM. The gather alone: 0.26 through a table (InternVL's pixel shuffle), 0.41-0.48 by the view
#: merge (Qwen's); the norm in the load adds 0.88 (LayerNorm) and 1.35 (RMSNorm); folded, nothing.
GATHER_COST = {True: 0.26, False: 0.41}
NORM_IN_LOAD_COST = {"layer": 0.88, "rms": 1.35}
#: The rates the time model takes: an unmapped bf16 GEMM of these sizes on an H100 (540-568 TFLOP/s in
#: that run), HBM (2.9 TB/s, its copy ceiling) and the host's part of one more launch (µs).
WRITTEN_GEMM_TFLOPS, WRITTEN_HBM_TBPS, WRITTEN_LAUNCH_US = 540.0, 2.9, 20.0


def merged_forward_mode() -> str:
    if MERGED_FORWARD not in MERGED_FORWARD_MODES:
        raise ValueError(f"MMFUSE_MERGED_FORWARD: expected one of {MERGED_FORWARD_MODES}, got {MERGED_FORWARD!r}")
    return MERGED_FORWARD


def written_forward_saves_us(M: int, K: int, N: int, elem: int, norm: str | None, table: bool,
                             folded: bool) -> float:
    """Modelled device time the written operand saves the forward (µs; negative: it costs): the mapped
    GEMM's excess over an unmapped one (``GATHER_COST``, ``NORM_IN_LOAD_COST``) against the row-wise pass
    (x read, A written: 2 M K e bytes) and its launch."""
    gemm_us = 2 * M * N * K / (WRITTEN_GEMM_TFLOPS * 1e6)
    excess = GATHER_COST[table] + (0.0 if folded or norm is None else NORM_IN_LOAD_COST[norm])
    return excess * gemm_us - (2 * M * K * elem / (WRITTEN_HBM_TBPS * 1e6) + WRITTEN_LAUNCH_US)


def written_forward_applies(merge: Merge, N: int, gated: bool = False) -> bool:
    """Whether the forward writes the merged, normalised operand once and runs its first GEMM unmapped
    (``MERGED_FORWARD``; "auto": with a norm, not gated, 2- or 4-byte inputs, from FOLD_MIN_ROWS merged
    rows, where ``written_forward_saves_us`` is positive — the Qwen2.5-VL merger and InternVL's mlp1 at
    batch 8 are). The in-load forward never writes A and moves fewer bytes (issue 12's design); the
    GPU measured it slower wherever the GEMM dominates: its gather and in-load norm cost 1.3-2.8x an
    unmapped GEMM, against a row-wise pass of 2 M K e bytes."""
    mode = merged_forward_mode()
    if mode == "in-load" or gated or merge.norm is None or merge.K == 0 or merge.M == 0:
        return False
    if mode == "written":
        return True
    if merge.x.element_size() > 4 or merge.M < FOLD_MIN_ROWS:
        return False
    folded = fold_applies(merge)
    return written_forward_saves_us(merge.M, merge.K, N, merge.x.element_size(), merge.norm, merge.table,
                                    folded) > 0


def materialise_applies(merge: Merge) -> bool:
    """Whether the backward writes the normalised operand once (``normalised_rows``) and runs dW as an
    unmapped GEMM: with a norm (without one the mapped dW's operand reaches the tensor cores as loaded)
    and from FOLD_MIN_ROWS merged rows. Model (bench/NOTES.md, "Session 15"): normalising in the loads
    ran dW at 2.4-4x an unmapped GEMM's time on an H100; the written operand costs a pass (x read, M K e
    bytes written, which dW then reads instead of gathering x: a small fraction of dW's time at N >= 1024)
    and a launch, which the threshold keeps from the smallest calls, as for the forward's fold."""
    return merge.norm is not None and merge.M >= FOLD_MIN_ROWS


def mapped_weight_grad(dh, merge: Merge):
    """dW = dH^T @ norm_merge(x) (N, K), the merged operand as B, read through the map again."""
    N, K, x = dh.shape[1], merge.K, merge.x
    dw = empty((N, K), dtype=dh.dtype, device=dh.device)
    if merge.M == 0:
        dw.zero_()
        return dw
    a = dh.t()
    _launch(a, x, dw, merge, 1, N, K, merge.M, (a.stride(0), a.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1)))
    return dw


def mapped_input_grad(dh, weight, merge: Merge):
    """dA = dH @ W, stored through the map into x's layout (T, C): the gradient at the norm's output
    (or at x, without a norm). Every token of a permutation map is written once."""
    x = merge.x
    da = empty(x.shape, dtype=dh.dtype, device=dh.device)
    if merge.M * merge.G != merge.T:  # tokens no merged row reads get no gradient from it
        da.zero_()
    _launch(dh, weight, da, merge, 2, merge.M, merge.K, dh.shape[1],
            (dh.stride(0), dh.stride(1), weight.stride(0), weight.stride(1), da.stride(0), da.stride(1)))
    return da


def norm_bwd(da, merge: Merge):
    """(dx, dgamma, dbeta or None) of the norm from dA (x's layout): one row-wise launch plus the ordered
    fp32 sums of its per-program partials."""
    x = merge.x
    R, G, table = merge.rows
    width = G * merge.C
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    if merge.post and merge.M * merge.G != merge.T:  # tokens no merged row reads: no gradient
        dx.zero_()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    br, bc = _rowwise(merge.C)
    programs = cdiv(R, br)
    dgamma_p = empty((programs, width), dtype=acc, device=x.device)
    dbeta_p = empty((programs, width), dtype=acc, device=x.device)
    if R:
        launch_kernel(norm_bwd_kernel, (programs,),
            da, x, merge.token_map, merge.stats, merge.gamma, dx, dgamma_p, dbeta_p,
            R, merge.C, G, x.stride(0), x.stride(1), da.stride(0), da.stride(1), dx.stride(0), dx.stride(1),
            merge.token_map.stride(0), merge.gamma.stride(0), CENTER=merge.norm == "layer",
            NORM_POST=merge.post, ALIGNED=merge.C % bc == 0, TABLE=table, ACC_DTYPE=acc_dtype(x.dtype),
            BLOCK_R=br, BLOCK_C=bc, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    dgamma = dgamma_p.sum(0).to(x.dtype)
    dbeta = dbeta_p.sum(0).to(x.dtype) if merge.norm == "layer" else None
    return dx, dgamma, dbeta


def pool_blocks(dtype: torch.dtype) -> tuple:
    """(BLOCK_R, BLOCK_C) of the pooling kernels for this dtype (the interpreter's small blocks there)."""
    if INTERPRET and not gpu_config_on():
        return INTERPRETER_ROWWISE
    return POOL_ROWWISE_FP64 if dtype == torch.float64 else POOL_ROWWISE


def pool_norm_fwd(x, table, G, norm=None, gamma=None, beta=None, eps=1e-6, gamma_shift=0.0, save=False):
    """(out, pooled, stats) of average pooling over the (M, G) int32 table's tokens, then the norm over
    each pooled row's C channels (``pool_norm_fwd_kernel``). out (M, C) in x's dtype; pooled (the norm's
    input, kept for backward) and stats (fp32 (mean, rstd) per row; fp64 for fp64) only with a norm and
    ``save`` (the pooled rows go to a scratch buffer otherwise)."""
    M, C = table.shape[0], x.shape[1]
    out = empty((M, C), dtype=x.dtype, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = empty((M, C), dtype=x.dtype, device=x.device) if norm else out
    stats = empty((M, 2), dtype=acc, device=x.device) if norm else out
    if M and C:
        br, bc = pool_blocks(x.dtype)
        launch_kernel(pool_norm_fwd_kernel, (cdiv(M, br),),
            x, table, gamma if norm else out, beta if norm == "layer" else out, pooled, out, stats,
            M, C, G, x.stride(0), x.stride(1), table.stride(0), gamma.stride(0) if norm else 0,
            beta.stride(0) if norm == "layer" else 0, pooled.stride(0), out.stride(0), *fp32_pair(eps, acc),
            *fp32_pair(gamma_shift, acc),
            CENTER=norm == "layer", NORM=norm is not None, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_R=br, BLOCK_C=bc,
            num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    return out, (pooled if norm and save else None), (stats if norm else None)


def pool_norm_bwd(da, T, table, G, norm=None, gamma=None, pooled=None, stats=None, gamma_shift=0.0):
    """(dx (T, C), dgamma, dbeta) of ``pool_norm_fwd`` from dA (M, C): one row-wise launch; dgamma and
    dbeta (None without a norm; dbeta only for LayerNorm) as ordered fp32 sums of per-program partials."""
    M, C = da.shape
    dx = empty((T, C), dtype=da.dtype, device=da.device)
    if M * G != T:  # tokens no window reads: no gradient
        dx.zero_()
    acc = torch.float64 if da.dtype == torch.float64 else torch.float32
    br, bc = pool_blocks(da.dtype)
    programs = cdiv(M, br)
    dgamma_p = empty((programs, C), dtype=acc, device=da.device) if norm else dx
    dbeta_p = empty((programs, C), dtype=acc, device=da.device) if norm else dx
    if M and C:
        launch_kernel(pool_norm_bwd_kernel, (programs,),
            da, pooled if norm else da, stats if norm else da, table, gamma if norm else da, dx, dgamma_p, dbeta_p,
            M, C, G, da.stride(0), da.stride(1), pooled.stride(0) if norm else 0, table.stride(0),
            gamma.stride(0) if norm else 0, dx.stride(0), dx.stride(1), *fp32_pair(gamma_shift, acc),
            CENTER=norm == "layer", NORM=norm is not None, ACC_DTYPE=acc_dtype(da.dtype), BLOCK_R=br, BLOCK_C=bc,
            num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    if not norm:
        return dx, None, None
    dtype = gamma.dtype
    return dx, dgamma_p.sum(0).to(dtype), dbeta_p.sum(0).to(dtype) if norm == "layer" else None


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_aot.py, `mmfuse report`)
# ----------------------------------------------------------------------------------------------
#: Representative launch: Qwen2.5-VL-7B's merger, one 896px image: 4096 tokens of 1280 channels,
#: merged 4 to a row (M = 1024, K = 5120), first Linear 5120 -> 5120.
AOT_SHAPE = (4096, 1280, 4, 5120)

#: (variant, norm, post, table): the code paths of the merged operand. LayerNorm / RMSNorm share one
#: code (RMSNorm: mean 0, beta 0), so these cover Qwen2/2.5-VL (a norm per token, the view merge: no
#: table), Idefics3 / SmolVLM (pixel shuffle: a table, no norm) and a norm over the merged row of a
#: table (LFM2-VL, Aya); Qwen3-VL's deepstack mergers (a norm over the merged row, no table) combine
#: paths the others compile.
MERGE_FORMS = (("norm per token", True, False, False), ("table, no norm", False, False, True),
               ("norm per merged row, table", True, True, True))
#: The folded RMSNorm forwards (``fold_applies``): Qwen2.5-VL's (per token, the view merge) and a norm
#: over the merged row of a table (the flat K loop, rstd in the epilogue).
FOLDED_FORMS = (("RMSNorm per token folded into W", True, False, False),
                ("RMSNorm per merged row folded into W, table", True, True, True))


def _gemm_spec_args(ptr, mapped, T, C, G, N):
    M, K = T // G, G * C
    gemm = {0: dict(M=M, N=N, K=K, stride_am=C, stride_ak=1, stride_bk=1, stride_bn=K, stride_cm=N, stride_cn=1),
            1: dict(M=N, N=K, K=M, stride_am=1, stride_ak=N, stride_bk=C, stride_bn=1, stride_cm=K, stride_cn=1),
            2: dict(M=M, N=K, K=N, stride_am=N, stride_ak=1, stride_bk=K, stride_bn=1, stride_cm=C, stride_cn=1)}
    return dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, bias_ptr=ptr, aux_ptr=ptr, map_ptr="*i32",
                stats_ptr="*fp64" if ptr == "*fp64" else "*fp32", gamma_ptr=ptr, beta_ptr=ptr,
                b2_ptr=ptr, bias2_ptr=ptr, aux2_ptr=ptr, C=C, G=G,
                **gemm[mapped], stride_auxm=N, stride_auxn=1, stride_bias=1, stride_bias2=0, stride_map=G,
                stride_gamma=1, stride_beta=1)


#: The GEMMs each dtype class compiles, on the tiles it takes: 2-byte (bf16; fp16 is the same code)
#: every form, dA with and without a table; TF32 / IEEE fp32 / fp64 the per-token norm's GEMMs and dA
#: through a table. (variant forms, GEMMs)
def _plans():
    every = [(form, mapped) for form in MERGE_FORMS for mapped in (0, 1)] + [(MERGE_FORMS[0], 2), (MERGE_FORMS[1], 2)]
    per_token = [(MERGE_FORMS[0], mapped) for mapped in (0, 1)] + [(MERGE_FORMS[1], 2)]
    return [("bf16", "*bf16", "ieee", every), ("fp32-tf32", "*fp32", "tf32", per_token),
            ("fp32", "*fp32", "ieee", per_token), ("fp64", "*fp64", "ieee", per_token)]


def aot_specs():
    from mmfuse._aot import CompileSpec

    T, C, G, N = AOT_SHAPE
    specs = []

    def gemm_spec(form, mapped, dtype, ptr, precision, tile, C=C, note="", gated=False, tma=False, folded=False):
        (variant, norm, post, table), (bm, bn, bk, warps, stages) = form, tile
        elem = {"*fp32": 4, "*fp64": 8}.get(ptr, 2)
        block_k = block_k_for(bk, elem)
        args = _gemm_spec_args(ptr, mapped, T, C, G, N)
        if tma:  # the operands that are not the merge as the launcher's descriptors (``_tma_layouts``)
            desc = lambda r, c: f"tensordesc<{ptr[1:]}[{r}, {c}]>"  # noqa: E731
            if mapped == 0:  # W^T: a descriptor over W
                args.update(b_ptr=desc(bn, block_k), b2_ptr=desc(bn, block_k) if gated else ptr)
            elif mapped == 1:  # dH^T: a descriptor over dH
                args.update(a_ptr=desc(block_k, bm))
            else:  # dH and W as they lie
                args.update(a_ptr=desc(bm, block_k), b_ptr=desc(block_k, bn))
        if gated:  # the up half's bias, a unit-stride slice (its W^T has the gate half's strides); the
            args["stride_bias2"] = 1  # pre-activations [g | u] share one (M, 2N) buffer
            args["stride_auxm"] = 2 * N
        if not norm or mapped == 2:  # the launcher passes the output as the unused stats pointer
            args["stats_ptr"] = ptr
        aligned = C % (block_k if mapped == 0 else bn) == 0
        cx = dict(MAPPED=mapped, NORM=norm and mapped != 2 and not folded, NORM_POST=post and mapped != 2,
                  ALIGNED=aligned, TABLE=table, FOLDED=folded, GATED=gated,
                  ACTIVATION=(4 if gated else 1) if mapped == 0 else 0, HAS_BIAS=mapped == 0, STORE_AUX=mapped == 0,
                  INPUT_PRECISION=precision, ACC_DTYPE=tl.float64 if elem == 8 else tl.float32,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=GROUP_M, EVEN_K=args["K"] % block_k == 0)
        cx.update(TMA=tma, A_TRANS=tma and mapped == 1, B_TRANS=tma and mapped == 0, NUM_PROGRAMS=132 if tma else 0)
        what = {0: f"fwd {'silu gated' if gated else 'gelu'}+bias+aux, {variant}", 1: f"dW, {variant}",
                2: "dA stored through the " + ("table" if table else "view merge")}[mapped]
        return CompileSpec(
            kernel="merged_gemm/mapped_gemm_kernel", variant=what + note + (" (TMA, persistent)" if tma else ""),
            dtype=dtype, config=f"{bm}x{bn}x{block_k} w{warps} s{stages}", fn=mapped_gemm_kernel,
            args=tuple(args.items()), constexprs=tuple(cx.items()), num_warps=warps, num_stages=stages,
            tensor_cores=precision == "tf32" or elem != 4, sm90_instr="mma.sync" if elem == 8 else "wgmma",
            **(dict(archs=(90,)) if tma else {}))

    for dtype, ptr, precision, gemms in _plans():
        elem = {"*fp32": 4, "*fp64": 8}.get(ptr, 2)
        for form, mapped in gemms:
            for tile in mapped_tiles(elem, precision):
                specs.append(gemm_spec(form, mapped, dtype, ptr, precision, tile))
        # The folded RMSNorm forwards: both forms in 16 bits, the per-token one (Qwen2.5-VL) in the others.
        for form in FOLDED_FORMS if elem == 2 else FOLDED_FORMS[:1]:
            for tile in mapped_tiles(elem, precision):
                specs.append(gemm_spec(form, 0, dtype, ptr, precision, tile, folded=True))
    # The gated forward (Aya Vision: a norm over the merged row of a pixel shuffle; Command A: no norm):
    # its own tiles in 16 bits, every dtype class on Aya's form, and the gather tile. Its dW and dA are
    # the plain mapped GEMMs above (N = 2 * the gate's width).
    aya, command_a = MERGE_FORMS[2], MERGE_FORMS[1]
    for dtype, ptr, precision, forms in [("bf16", "*bf16", "ieee", (aya, command_a)), ("fp32-tf32", "*fp32", "tf32", (aya,)),
                                         ("fp32", "*fp32", "ieee", (aya,)), ("fp64", "*fp64", "ieee", (aya,))]:
        elem = {"*fp32": 4, "*fp64": 8}.get(ptr, 2)
        for form in forms:
            for tile in mapped_tiles(elem, precision, gated=True):
                specs.append(gemm_spec(form, 0, dtype, ptr, precision, tile, gated=True))
    specs.append(gemm_spec(aya, 0, "bf16", "*bf16", "ieee", MAPPED_GATHER_TILE, C=1176, note=" (C % block != 0)",
                           gated=True))
    # A channel count no block divides (C = 1176, e.g. 1176 = 3 * 392): the per-element token gather.
    for form, mapped in [(MERGE_FORMS[0], 0), (MERGE_FORMS[0], 1), (MERGE_FORMS[1], 2)]:
        specs.append(gemm_spec(form, mapped, "bf16", "*bf16", "ieee", MAPPED_GATHER_TILE, C=1176,
                               note=" (C % block != 0)"))
    # The Hopper core (sm_90, MMFUSE_TMA=always): the 16-bit and TF32 GEMMs above, the weight / dH by
    # TMA, persistent, on every tile it takes, the gather tile included; one form per GEMM and tile (CI
    # time): the one holding the most registers in the pointer kernel (a norm per token, the table's dA,
    # Aya's gated forward).
    heaviest = ("norm per token", "dA stored through the table", "gated+bias+aux, norm per merged row",
                "RMSNorm per token folded into W")
    for sp in list(specs):
        cx = dict(sp.constexprs)
        if sp.kernel.endswith("mapped_gemm_kernel") and sp.dtype in ("bf16", "fp32-tf32") and \
                any(h in sp.variant for h in heaviest):
            form = next(f for f in MERGE_FORMS + FOLDED_FORMS if f[0] in sp.variant) if cx["MAPPED"] != 2 else \
                (MERGE_FORMS[1] if cx["TABLE"] else MERGE_FORMS[0])
            ptr, elem = ("*bf16", 2) if sp.dtype == "bf16" else ("*fp32", 4)
            bk = cx["BLOCK_K"] * (2 if elem == 4 else 1)
            tile = (cx["BLOCK_M"], cx["BLOCK_N"], bk, sp.num_warps, sp.num_stages)
            gather = "(C % block != 0)" in sp.variant
            if tile not in mapped_tiles(elem, cx["INPUT_PRECISION"], mapped=cx["MAPPED"], gated=cx["GATED"],
                                        tma=True) + (MAPPED_GATHER_TILE,):
                continue  # a tile the Hopper launcher does not take
            specs.append(gemm_spec(form, cx["MAPPED"], sp.dtype, ptr, cx["INPUT_PRECISION"], tile,
                                   C=1176 if gather else C, note=" (C % block != 0)" if gather else "",
                                   gated=cx["GATED"], tma=True, folded=cx["FOLDED"]))
    # The row-wise kernels: per source token (G = 1) and per merged row (G = 4, K = 5120 wide), C a
    # multiple of BLOCK_C; and per token with C = 1176 (the per-element gather), bf16.
    every = (("bf16", "*bf16"), ("fp32", "*fp32"), ("fp64", "*fp64"))
    for what, rows, g, C_, dtypes in (("per token", T, 1, C, every),
                                      ("per merged row", T // G, G, C, every[:2]),
                                      ("per token (C % 128 != 0)", T, 1, 1176, every)):
        br, bc = ROWWISE if C_ % ROWWISE[1] == 0 else ROWWISE_GATHER
        # CENTER: LayerNorm, else RMSNorm: different compiles, both in every form and dtype class (Triton
        # 3.6 failed to compile the fp32 RMSNorm per token while CENTER was a runtime int and the specs
        # held RMSNorm in bf16 only; an H100 run found it: bench/NOTES.md, session 20).
        for dtype, ptr, center in [(d, p, c) for c in (True, False) for d, p in dtypes]:
            acc = tl.float64 if ptr == "*fp64" else tl.float32
            acc_ptr = "*fp64" if ptr == "*fp64" else "*fp32"
            norm_name = "" if center else " (RMSNorm)"
            # The folded RMSNorm forward's launch also writes gamma * W (5120 x 5120): per token in every
            # dtype class, per merged row in bf16 (without FOLD the launcher passes stats as the weight
            # pointers, never read).
            folds = not center and ((g == 1 and C_ == C) or (g > 1 and ptr == "*bf16"))
            for fold in (False, True) if folds else (False,):
                w_ptr = ptr if fold else acc_ptr
                stats = dict(x_ptr=ptr, map_ptr="*i32", stats_ptr=acc_ptr, w_ptr=w_ptr, gamma_ptr=w_ptr, wf_ptr=w_ptr,
                             R=rows, C=C_, G=g, stride_xt=C_, stride_xc=1, stride_map=g, eps=1e-6,
                             eps_lo=0.0, STATS_PROGRAMS=cdiv(rows, br), N=N, K=G * C_,
                             stride_wn=G * C_, stride_wk=1, stride_gamma=1 if fold else 0)
                specs.append(CompileSpec(
                    kernel="merged_gemm/norm_stats_kernel",
                    variant=(f"mean, rstd {what} (RMSNorm) + gamma folded into W" if fold
                             else f"mean, rstd {what}{norm_name}"),
                    dtype=dtype, config=f"{br}x{bc} w4", fn=norm_stats_kernel, args=tuple(stats.items()),
                    constexprs=(("CENTER", center), ("ALIGNED", C_ % bc == 0), ("TABLE", g > 1), ("FOLD", fold),
                                ("FOLD_POST", g > 1),
                                ("ACC_DTYPE", acc), ("BLOCK_R", br), ("BLOCK_C", bc)),
                    num_warps=4, num_stages=1, tensor_cores=False))
            # The normalised operand (``normalised_rows``), written once for an unmapped GEMM: the backward's
            # dW (statistics read), and the forward's first GEMM (STATS: computed in the same launch, a norm
            # per merged row or per token of Qwen's adjacent-rows merge, G = 4 without a table).
            rows_args = dict(x_ptr=ptr, map_ptr="*i32", stats_ptr=acc_ptr, gamma_ptr=ptr, beta_ptr=ptr, out_ptr=ptr,
                             M=T // G, K=G * C_, C=C_, G=G, stride_xt=C_, stride_xc=1, stride_map=G, stride_gamma=1,
                             stride_beta=1, stride_om=G * C_, eps=1e-6, eps_lo=0.0)
            forms = [(False, g > 1)] if center or g > 1 else []  # (the backward: the LayerNorm rows per form)
            forms += [(True, g > 1)] if ptr != "*fp64" else []  # the forward's launch (``rows_take_stats``)
            for stats, table in forms:
                specs.append(CompileSpec(
                    kernel="merged_gemm/norm_rows_kernel",
                    variant=(f"normalised operand and its statistics, norm {what}{'' if table else ', no table'}"
                             f"{norm_name}" if stats else f"normalised operand, norm {what}{norm_name}"),
                    dtype=dtype, config=f"{br}x{bc} w4", fn=norm_rows_kernel, args=tuple(rows_args.items()),
                    constexprs=(("CENTER", center), ("ALIGNED", C_ % bc == 0), ("TABLE", table),
                                ("NORM_POST", g > 1),
                                ("ACC_DTYPE", acc), ("STATS", stats), ("BLOCK_R", br), ("BLOCK_C", bc)),
                    num_warps=4, num_stages=1, tensor_cores=False))
            bwd = dict(da_ptr=ptr, x_ptr=ptr, map_ptr="*i32", stats_ptr=acc_ptr, gamma_ptr=ptr, dx_ptr=ptr,
                       dgamma_ptr=acc_ptr, dbeta_ptr=acc_ptr, R=rows, C=C_, G=g, stride_xt=C_, stride_xc=1,
                       stride_dat=C_, stride_dac=1, stride_dxt=C_, stride_dxc=1, stride_map=g, stride_gamma=1)
            specs.append(CompileSpec(
                kernel="merged_gemm/norm_bwd_kernel", variant=f"dx, dgamma, dbeta {what}{norm_name}", dtype=dtype,
                config=f"{br}x{bc} w4", fn=norm_bwd_kernel, args=tuple(bwd.items()),
                constexprs=(("CENTER", center), ("NORM_POST", g > 1), ("ALIGNED", C_ % bc == 0), ("TABLE", g > 1),
                            ("ACC_DTYPE", acc),
                            ("BLOCK_R", br),
                            ("BLOCK_C", bc)),
                num_warps=4, num_stages=1, tensor_cores=False))
    # Average pooling (Gemma 3: 4096 patches of 1152 pooled 16 to a row, RMSNorm): forward and backward,
    # with the norm in every dtype class, without it in bf16.
    R, C_, g = 256, 1152, 16
    for dtype, ptr, norm in (("bf16", "*bf16", True), ("fp32", "*fp32", True), ("fp64", "*fp64", True),
                             ("bf16", "*bf16", False)):
        br, bc = POOL_ROWWISE_FP64 if ptr == "*fp64" else POOL_ROWWISE
        acc = tl.float64 if ptr == "*fp64" else tl.float32
        acc_ptr = "*fp64" if ptr == "*fp64" else "*fp32"
        cx = (("CENTER", False), ("NORM", norm), ("ACC_DTYPE", acc), ("BLOCK_R", br), ("BLOCK_C", bc))
        what = "RMSNorm" if norm else "no norm"
        fwd = dict(x_ptr=ptr, map_ptr="*i32", gamma_ptr=ptr, beta_ptr=ptr, pooled_ptr=ptr, out_ptr=ptr,
                   stats_ptr=acc_ptr if norm else ptr, M=R, C=C_, G=g, stride_xt=C_, stride_xc=1, stride_map=g,
                   stride_gamma=1 if norm else 0, stride_beta=0, stride_pm=C_, stride_om=C_, eps=1e-6,
                   eps_lo=0.0, gamma_shift=1.0, gamma_shift_lo=0.0)
        specs.append(CompileSpec(
            kernel="merged_gemm/pool_norm_fwd_kernel", variant=f"average pool, {what}", dtype=dtype,
            config=f"{br}x{bc} w4", fn=pool_norm_fwd_kernel, args=tuple(fwd.items()), constexprs=cx,
            num_warps=4, num_stages=1, tensor_cores=False))
        bwd = dict(da_ptr=ptr, pooled_ptr=ptr, stats_ptr=acc_ptr if norm else ptr, map_ptr="*i32", gamma_ptr=ptr,
                   dx_ptr=ptr, dgamma_ptr=acc_ptr if norm else ptr, dbeta_ptr=acc_ptr if norm else ptr, M=R, C=C_,
                   G=g, stride_dam=C_, stride_dac=1, stride_pm=C_ if norm else 0, stride_map=g,
                   stride_gamma=1 if norm else 0, stride_dxt=C_, stride_dxc=1, gamma_shift=1.0,
                   gamma_shift_lo=0.0)
        specs.append(CompileSpec(
            kernel="merged_gemm/pool_norm_bwd_kernel", variant=f"dx spread to the window, {what}", dtype=dtype,
            config=f"{br}x{bc} w4", fn=pool_norm_bwd_kernel, args=tuple(bwd.items()), constexprs=cx,
            num_warps=4, num_stages=1, tensor_cores=False))
    return specs
