"""Patch embedding (Conv2d / Conv3d with kernel_size == stride) as one GEMM, forward and backward.

Token m = ((b*GF + pf)*GH + ph)*GW + pw owns the patch whose first pixel sits at
``(b, :, pf*T, ph*P, pw*P)``; column k = ((c*T + t)*P + i)*P + j of the flattened (C, T, P, P)
weight picks the pixel ``(c, pf*T + t, ph*P + i, pw*P + j)`` of that patch. The address of
A[m, k] is therefore ``token_offset[m] + patch_offset[k]``: a sum of a row vector and a column
vector, so the im2col matrix is gathered straight into each A tile and never written to memory.
Images are the video form with T = F = 1 (a zero frame stride).

* forward  ``out[b, n, :] = A[m, :] @ W^T + bias + pos[b, n, :]``, bias and pos in the epilogue,
  written token-major (B, N, D) through strides (so a class-token layout can be a view). Its K runs
  over patch rows padded to RUN = next_pow2(P) pixels (k = row*RUN + j, zeros at j >= P) so the
  gathered pieces are contiguous and the loads pipeline; the weight comes packed in that order
  (``pack_weight``: zero padding, 16-byte aligned rows);
* dW       ``dW = dOut^T @ A``: the reduction runs over tokens and A is gathered again in the
  loop, its columns in the forward's run order (so its loads pipeline too; stored back to the
  C*T*P*P order). A plain GEMM: summing the dOut^T tiles in that loop for ``db`` (as it once did) pulls them
  out of shared memory every step, which cost the Linear's dW 79% of its speed (bench/NOTES.md);
* dpixels  ``dA = dOut @ W`` stored through the same gather addresses: with kernel == stride every
  pixel belongs to exactly one (m, k), so the scatter is a permutation, with no atomics;
* ``batch_sum_kernel``: ``dpos = sum_b dOut[b]`` in a fixed order (pos broadcast over the batch),
  and from the same fp32 sums the per-block column sums that give ``db`` without another read of dOut.

Layout: pixels (B, C, [F,] H, W) and the weight with any strides (NCHW, channels-last, sliced
views); H, W (and F) multiples of P (and T), checked by the caller. K = C*T*P*P need not be a
multiple of BLOCK_K (588 for P = 14, C = 3): the tail is masked. Rows past the edge are clamped
with ``%`` for the loads (never stored), as in ``kernels/linear.py``; columns along the pixel runs
are masked instead (a runtime ``%`` there hides their contiguity from the compiler). P and T are
constexprs, so the index arithmetic divides by constants. The backward reads the weight as a
(D, K) matrix (a view of a contiguous conv weight; other layouts are copied, D*K elements). Offsets are
32-bit (the launchers refuse tensors spanning 2^31 elements or more): 64-bit gather offsets for
every A element cost registers and made the 64x128 tile spill. Every output element is written by
exactly one program: results are bitwise reproducible.
"""

from __future__ import annotations

import functools

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
    gpu_config_on,
    grouped_tile,
    grouped_tile_of,
    mma,
    next_pow2,
    num_sms,
    LAUNCH_US,
    PEAK_BYTES,
    PEAK_FLOPS,
)
from mmfuse.kernels._launch import launch_kernel
from mmfuse.kernels._tuning import TileChooser, largest_tile
from mmfuse.kernels.linear import MIN_WAVE_EFFICIENCY, block_k_for, wave_efficiency


@triton.jit
def _token_offsets(offs_m, M, GRID_F, GRID_H, GRID_W, stride_b, stride_f, stride_h, stride_w,
                   T: tl.constexpr, P: tl.constexpr):
    """Offset of the first pixel of each token's patch (rows past M wrap around)."""
    m = offs_m % M
    pw = m % GRID_W
    r = m // GRID_W
    ph = r % GRID_H
    r = r // GRID_H
    pf = r % GRID_F
    b = r // GRID_F
    return b * stride_b + (pf * T) * stride_f + (ph * P) * stride_h + (pw * P) * stride_w


@triton.jit
def _token_rows(offs_m, M, N_TOK, stride_b, stride_n):
    """Offset of token m's row in a (B, N, D) tensor with any strides (wraps past M)."""
    m = offs_m % M
    return (m // N_TOK) * stride_b + (m % N_TOK) * stride_n


@triton.jit
def _aligned(stride_b, stride_c, stride_f, stride_h, PIX_ALIGN: tl.constexpr):
    """The pixel strides from their quotients by PIX_ALIGN, their largest common power-of-two divisor
    (up to 16; the launcher divides): the product tells the compiler what the JIT's hints cannot. It
    hints only integers divisible by 16, so a 392-pixel row (Qwen2-VL's 392px frames) left the
    gather's address divisibility at 1 element: scalar loads, which the pipeliner does not copy
    asynchronously (a synchronous load every K step; ``tl.multiple_of`` on a scalar did not help)."""
    return stride_b * PIX_ALIGN, stride_c * PIX_ALIGN, stride_f * PIX_ALIGN, stride_h * PIX_ALIGN


@triton.jit
def _run_offsets(run, stride_c, stride_t, stride_i, T: tl.constexpr, P: tl.constexpr):
    """Offset of the first pixel of patch row ``run`` = (c*T + t)*P + i of a (C, T, P, P) patch."""
    i = run % P
    t = (run // P) % T
    c = run // (T * P)
    return c * stride_c + t * stride_t + i * stride_i


@triton.jit
def patch_embed_fwd_kernel(
    pix_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    M, D, K, GRID_F, GRID_H, GRID_W,
    stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,  # _q: the stride // PIX_ALIGN
    stride_wd, stride_bias,
    stride_pb, stride_pn, stride_pd,
    stride_ob, stride_on, stride_od,
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, PIX_ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,           # w_ptr is a TMA descriptor of the packed weight (Hopper)
    NUM_PROGRAMS: tl.constexpr,  # > 0: that many persistent programs walk the tiles (Hopper); 0: a grid of tiles
):
    """out[b, n, d] = sum_k pixels[patch(b, n), k] * W[d, k] + bias[d] + pos[b, n, d].

    The reduction runs over patch rows padded to RUN = next_pow2(P) pixels: k = run*RUN + j, and the
    weight comes packed the same way (zeros at j >= P and past K). A run of pixels is contiguous
    along W, so the gather loads are vectors the pipeliner can copy asynchronously (scalar loads
    cannot be pipelined). K = C*T*P*RUN; the packed weight rows hold a multiple of 64 columns.
    On Hopper (``TMA``, ``NUM_PROGRAMS``; issue 14's core) the weight arrives by TMA (the pixel
    gather cannot: no tensor map describes it) and the grid is persistent; one tile's code either way."""
    stride_xb, stride_xc, stride_xf, stride_xh = _aligned(stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, PIX_ALIGN)
    if NUM_PROGRAMS == 0:
        pid_m, pid_n = grouped_tile(M, D, BLOCK_M, BLOCK_N, GROUP_M)
        _patch_fwd_tile(pid_m, pid_n, pix_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
                        stride_xb, stride_xc, stride_xf, stride_xh, stride_xw, stride_wd, stride_bias,
                        stride_pb, stride_pn, stride_pd, stride_ob, stride_on, stride_od,
                        T, P, RUN, HAS_BIAS, HAS_POS, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN_K, TMA)
    else:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(D, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
            pid_m, pid_n = grouped_tile_of(tile, M, D, BLOCK_M, BLOCK_N, GROUP_M)
            _patch_fwd_tile(pid_m, pid_n, pix_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, M, D, K, GRID_F, GRID_H,
                            GRID_W, stride_xb, stride_xc, stride_xf, stride_xh, stride_xw, stride_wd, stride_bias,
                            stride_pb, stride_pn, stride_pd, stride_ob, stride_on, stride_od,
                            T, P, RUN, HAS_BIAS, HAS_POS, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
                            EVEN_K, TMA)


@triton.jit
def _patch_fwd_tile(
    pid_m, pid_n, pix_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
    stride_xb, stride_xc, stride_xf, stride_xh, stride_xw, stride_wd, stride_bias,
    stride_pb, stride_pn, stride_pd, stride_ob, stride_on, stride_od,
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile of ``patch_embed_fwd_kernel``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # im2col in the load: A[m, k] lives at token_offset[m] + run_offset[k // RUN] + (k % RUN).
    x_rows = _token_offsets(offs_m, M, GRID_F, GRID_H, GRID_W, stride_xb, stride_xf, stride_xh, stride_xw, T, P)
    if not TMA:
        w_ptrs = w_ptr + (offs_n % D)[None, :] * stride_wd + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        j = k % RUN
        x_cols = _run_offsets(k // RUN, stride_xc, stride_xf, stride_xh, T, P) + j * stride_xw
        x_ptrs = pix_ptr + x_rows[:, None] + x_cols[None, :]
        if EVEN_K:
            if P == RUN:
                a = tl.load(x_ptrs)
            else:
                a = tl.load(x_ptrs, mask=(j < P)[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=((j < P) & (k < K))[None, :], other=0.0)
        if TMA:  # (D, KP) rows by TMA: the copy engine zero-fills past D and KP
            b = w_ptr.load([pid_n * BLOCK_N, k0]).T
        else:
            b = tl.load(w_ptrs)  # packed: zero-padded past K to a multiple of BLOCK_K, no mask
            w_ptrs += BLOCK_K
        acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)

    # Epilogue in the accumulator type; one rounding at the store.
    N_TOK = GRID_F * GRID_H * GRID_W
    mask_n = offs_n < D
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)  # any view, stride 0 too
        acc += bias[None, :].to(ACC_DTYPE)
    if HAS_POS:  # pos is (B, N, D) with stride 0 along the dims it is broadcast over
        p_rows = _token_rows(offs_m, M, N_TOK, stride_pb, stride_pn)
        pos = tl.load(pos_ptr + p_rows[:, None] + offs_n[None, :] * stride_pd, mask=mask, other=0.0)
        acc += pos.to(ACC_DTYPE)
    o_rows = _token_rows(offs_m, M, N_TOK, stride_ob, stride_on)
    tl.store(out_ptr + o_rows[:, None] + offs_n[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def patch_embed_dx_kernel(
    dout_ptr, w_ptr, dpix_ptr,
    M, D, K, GRID_F, GRID_H, GRID_W,
    stride_gb, stride_gn, stride_gd,
    stride_wd,
    stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,  # _q: the stride // PIX_ALIGN
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, PIX_ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,           # dout_ptr / w_ptr are TMA descriptors of dOut (M, D) and the packed weight
    NUM_PROGRAMS: tl.constexpr,  # > 0: that many persistent programs walk the tiles (Hopper); 0: a grid of tiles
):
    """dpixels[patch(m), k] = sum_d dOut[m, d] * W[d, k]: a GEMM over D whose store is the
    inverse of the forward's gather (tiles: BLOCK_M tokens x BLOCK_N patch elements). Columns are in
    the forward's padded run order (K = C*T*P*RUN) over its packed weight; j >= P is not stored.
    On Hopper (``TMA``, ``NUM_PROGRAMS``) both operands arrive by TMA (the store stays a scatter)."""
    stride_xb, stride_xc, stride_xf, stride_xh = _aligned(stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, PIX_ALIGN)
    if NUM_PROGRAMS == 0:
        pid_m, pid_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
        _patch_dx_tile(pid_m, pid_n, dout_ptr, w_ptr, dpix_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
                       stride_gb, stride_gn, stride_gd, stride_wd, stride_xb, stride_xc, stride_xf, stride_xh,
                       stride_xw, T, P, RUN, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA)
    else:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N), NUM_PROGRAMS):
            pid_m, pid_n = grouped_tile_of(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
            _patch_dx_tile(pid_m, pid_n, dout_ptr, w_ptr, dpix_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
                           stride_gb, stride_gn, stride_gd, stride_wd, stride_xb, stride_xc, stride_xf, stride_xh,
                           stride_xw, T, P, RUN, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA)


@triton.jit
def _patch_dx_tile(
    pid_m, pid_n, dout_ptr, w_ptr, dpix_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
    stride_gb, stride_gn, stride_gd, stride_wd, stride_xb, stride_xc, stride_xf, stride_xh, stride_xw,
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``patch_embed_dx_kernel``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_K)

    N_TOK = GRID_F * GRID_H * GRID_W
    if not TMA:
        g_ptrs = dout_ptr + _token_rows(offs_m, M, N_TOK, stride_gb, stride_gn)[:, None] + offs_d[None, :] * stride_gd
        # Packed rows hold a multiple of 128 columns (zeros past K): no wrap or mask needed along n.
        w_ptrs = w_ptr + offs_d[:, None] * stride_wd + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_K):
        if TMA:  # the copy engine zero-fills past M, D and the packed columns: no masks
            g = dout_ptr.load([pid_m * BLOCK_M, d0])
            w = w_ptr.load([d0, pid_n * BLOCK_N])
        elif EVEN_K:
            g = tl.load(g_ptrs)
            w = tl.load(w_ptrs)
        else:
            d_left = D - d0
            g = tl.load(g_ptrs, mask=offs_d[None, :] < d_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_d[:, None] < d_left, other=0.0)
        acc = mma(g, w, acc, INPUT_PRECISION, ACC_DTYPE)
        if not TMA:
            g_ptrs += BLOCK_K * stride_gd
            w_ptrs += BLOCK_K * stride_wd

    # Scatter = the forward's gather addresses: each (m, k) is a distinct pixel (kernel == stride).
    x_rows = _token_offsets(offs_m, M, GRID_F, GRID_H, GRID_W, stride_xb, stride_xf, stride_xh, stride_xw, T, P)
    j = offs_n % RUN
    x_cols = _run_offsets(offs_n // RUN, stride_xc, stride_xf, stride_xh, T, P) + j * stride_xw
    mask = (offs_m < M)[:, None] & ((j < P) & (offs_n < K))[None, :]
    tl.store(dpix_ptr + x_rows[:, None] + x_cols[None, :], acc.to(dpix_ptr.dtype.element_ty), mask=mask)


@triton.jit
def patch_embed_dw_kernel(
    dout_ptr, pix_ptr, dw_ptr,
    M, D, K, GRID_F, GRID_H, GRID_W,
    stride_gb, stride_gn, stride_gd,
    stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,  # _q: the stride // PIX_ALIGN
    stride_dws, stride_dwd, stride_dwk, TOKEN_CHUNK,
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, PIX_ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,           # dout_ptr is a TMA descriptor of dOut (M, D), read as dOut^T
    NUM_PROGRAMS: tl.constexpr,  # > 0: that many persistent programs walk tiles x splits (Hopper)
):
    """dW[d, k] = sum_m dOut[m, d] * pixels[patch(m), k] (tiles: BLOCK_M of D x BLOCK_N of K; the
    loop walks BLOCK_K tokens at a time and gathers their patches again). The columns run in the
    forward's padded order (n = run*RUN + j, K = C*T*P*RUN here; columns j >= P are loaded as zeros
    and not stored) so the pixel loads are contiguous pieces the pipeliner copies asynchronously: in
    the flattened order (runs of P = 14) they were 2-byte scalar loads, not pipelined (dW measured
    5x slower than the forward's GEMM of the same size on an H100). Split-K over tokens (grid axis
    1): split s sums tokens [s*TOKEN_CHUNK, (s+1)*TOKEN_CHUNK) (a multiple of BLOCK_K) into its own
    fp32 partial at s*stride_dws; ``dw_combine_kernel`` sums them in split order. One split writes dW
    directly (stride 0). No db here: see ``batch_sum_kernel`` and ``patch_embed_dw``. On Hopper
    (``TMA``, ``NUM_PROGRAMS``) dOut^T arrives by TMA (the pixels stay a gather) and the programs
    walk every (tile, split) pair, the split outermost."""
    if NUM_PROGRAMS == 0:
        pid_m, pid_n = grouped_tile(D, K, BLOCK_M, BLOCK_N, GROUP_M)
        _patch_dw_tile(pid_m, pid_n, tl.program_id(1), dout_ptr, pix_ptr, dw_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
                       stride_gb, stride_gn, stride_gd, stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,
                       stride_dws, stride_dwd, stride_dwk, TOKEN_CHUNK, T, P, RUN, PIX_ALIGN, INPUT_PRECISION,
                       ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA)
    else:
        tiles = tl.cdiv(D, BLOCK_M) * tl.cdiv(K, BLOCK_N)
        for work in tl.range(tl.program_id(0), tiles * tl.cdiv(M, TOKEN_CHUNK), NUM_PROGRAMS):
            pid_m, pid_n = grouped_tile_of(work % tiles, D, K, BLOCK_M, BLOCK_N, GROUP_M)
            _patch_dw_tile(pid_m, pid_n, work // tiles, dout_ptr, pix_ptr, dw_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
                           stride_gb, stride_gn, stride_gd, stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,
                           stride_dws, stride_dwd, stride_dwk, TOKEN_CHUNK, T, P, RUN, PIX_ALIGN, INPUT_PRECISION,
                           ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA)


@triton.jit
def _patch_dw_tile(
    pid_m, pid_n, split, dout_ptr, pix_ptr, dw_ptr, M, D, K, GRID_F, GRID_H, GRID_W,
    stride_gb, stride_gn, stride_gd, stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, stride_xw,
    stride_dws, stride_dwd, stride_dwk, TOKEN_CHUNK,
    T: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, PIX_ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``patch_embed_dw_kernel``, over split ``split``'s tokens."""
    offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_K)

    N_TOK = GRID_F * GRID_H * GRID_W
    stride_xb, stride_xc, stride_xf, stride_xh = _aligned(stride_xb_q, stride_xc_q, stride_xf_q, stride_xh_q, PIX_ALIGN)
    g_cols = (offs_d % D) * stride_gd
    # Columns past K are masked, not wrapped with % K: a runtime modulo hides the runs' contiguity
    # from the compiler, and the pixel loads were not pipelined again (Triton 3.9 TTGIR).
    j = offs_n % RUN
    col_ok = (j < P) & (offs_n < K)
    x_cols = _run_offsets(offs_n // RUN, stride_xc, stride_xf, stride_xh, T, P) + j * stride_xw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for m0 in range(split * TOKEN_CHUNK, tl.minimum(M, split * TOKEN_CHUNK + TOKEN_CHUNK), BLOCK_K):
        m = m0 + offs_t
        if not TMA:
            g_ptrs = dout_ptr + g_cols[:, None] + _token_rows(m, M, N_TOK, stride_gb, stride_gn)[None, :]
        x_rows = _token_offsets(m, M, GRID_F, GRID_H, GRID_W, stride_xb, stride_xf, stride_xh, stride_xw, T, P)
        x_ptrs = pix_ptr + x_rows[:, None] + x_cols[None, :]
        if TMA:  # dOut (M, D) rows m0.., columns of this tile's D block, transposed in registers;
            g = dout_ptr.load([m0, pid_m * BLOCK_M]).T  # zero-filled past M and D
        elif EVEN_K:
            g = tl.load(g_ptrs)
        else:
            g = tl.load(g_ptrs, mask=m[None, :] < M, other=0.0)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=(m < M)[:, None] & col_ok[None, :], other=0.0)
        acc = mma(g, x, acc, INPUT_PRECISION, ACC_DTYPE)

    # Column n = run*RUN + j is column run*P + j of dW's flattened (C, T, P, P) order.
    cols = (offs_n // RUN) * P + offs_n % RUN
    mask = (offs_d < D)[:, None] & col_ok[None, :]
    dw_ptrs = dw_ptr + split * stride_dws + offs_d[:, None] * stride_dwd + cols[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dw_combine_kernel(
    part_ptr, dw_ptr, SPLITS, D, K,
    stride_ps, stride_pd, stride_pk, stride_dwd, stride_dwk,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW = sum_s partial[s], splits added in order in fp32 (fp64 for fp64): the split-K sum,
    deterministic."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_d < D)[:, None] & (offs_k < K)[None, :]
    p_ptrs = part_ptr + offs_d[:, None] * stride_pd + offs_k[None, :] * stride_pk
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=ACC_DTYPE)
    for s in range(0, SPLITS):
        acc += tl.load(p_ptrs + s * stride_ps, mask=mask, other=0.0)
    tl.store(dw_ptr + offs_d[:, None] * stride_dwd + offs_k[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def batch_sum_kernel(
    g_ptr, out_ptr, colsum_ptr, B, N, D, FIRST_ROW,
    stride_gb, stride_gn, stride_gd, stride_on, stride_od,
    COL_SUMS: tl.constexpr,     # colsum[pid_n, d] = sum over rows n >= FIRST_ROW of this block of out[n, d]
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n, d] = sum_b g[b, n, d], b in order (the gradient of a batch-broadcast pos_embed). With
    COL_SUMS also this block's column sums of those fp32 sums over its rows n >= FIRST_ROW (the patch
    tokens, past a class token): summed over the blocks they give db = sum_{b, n} g in fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    g_ptrs = g_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    for _ in range(0, B):
        acc += tl.load(g_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        g_ptrs += stride_gb
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if COL_SUMS:  # rows past N loaded zeros; contiguous (cdiv(N, BLOCK_N), D) partials
        patch_rows = (offs_n >= FIRST_ROW)[:, None]
        tl.store(colsum_ptr + tl.program_id(0) * D + offs_d, tl.sum(tl.where(patch_rows, acc, 0.0), axis=0),
                 mask=offs_d < D)


# ----------------------------------------------------------------------------------------------
# Configs and tile choice
# ----------------------------------------------------------------------------------------------
#: (BLOCK_M, BLOCK_N, BLOCK_K for 2-byte dtypes, num_warps, num_stages); 4-byte dtypes halve
#: BLOCK_K. Per GEMM, the tiles that compile without spills on sm_80 and sm_90 (bench/NOTES.md):
#: the forward's 64x128 (4 warps) spills in its bias+pos epilogue (64 accumulators and 64 gathered
#: pos/out addresses per thread), dW's 128-row tiles spill on sm_80 (two gathered operands), and its
#: 64x128 takes 4 stages: at 3 it spilled 8-16 B on sm_80 (Triton 3.6) once its pixel loads pipelined.
#: Wave-efficiency pruning picks among them per shape.
TILES = {
    "fwd": ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3)),
    "dx": ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3)),
    "dw": ((64, 128, 64, 8, 4), (64, 64, 64, 4, 3)),
}
#: Tiles of the Hopper core (``on_tma``), by operand bytes (2: fp16 / bf16, 4: fp32 with TF32) and GEMM:
#: every pointer tile but those that spill on sm_90 with both operands by TMA in the persistent loop
#: (dpixels, whose pointer twins do not): in 16 bits 64x128 w4 (80 B, Triton 3.6, 255 registers), in
#: TF32 128x128 w8 (48 B, Triton 3.7.1) and, since the operands are rounded to TF32 first (``mma``),
#: 128x64 w4 (16 B, Triton 3.7.1).
TMA_TILES = {elem: {gemm: tuple(t for t in tiles if not (gemm == "dx" and t[:2] in spilled))
                    for gemm, tiles in TILES.items()}
             for elem, spilled in ((2, ((64, 128),)), (4, ((128, 128), (128, 64))))}
GROUP_M = 8
#: The single config used under the interpreter: small, so odd test sizes span several tiles.
INTERPRETER_TILE = (32, 32, 32, 4, 1)
BATCH_SUM_BLOCK = (32, 64)
#: dW's split-K: token chunks are whole blocks of SPLIT_ALIGN tokens (a multiple of every BLOCK_K of
#: dW, interpreter included), at most MAX_DW_SPLITS of them; the combine's tile.
SPLIT_ALIGN = 64
MAX_DW_SPLITS = 16
COMBINE_BLOCK = (32, 128)


@functools.lru_cache(maxsize=4096)  # a pure function of its ints, asked on every launch
def candidate_tiles(gemm: str, rows: int, cols: int, sms: int, tma: bool = False, elem: int = 2) -> tuple:
    """Tiles of ``gemm`` (on the Hopper core with ``tma``, for ``elem``-byte operands) with wave
    efficiency >= MIN_WAVE_EFFICIENCY at (rows, cols), or the best two."""
    scored = [(wave_efficiency(rows, cols, t[0], t[1], sms), t) for t in (TMA_TILES[elem] if tma else TILES)[gemm]]
    keep = [t for e, t in scored if e >= MIN_WAVE_EFFICIENCY]
    return tuple(keep or [t for _, t in sorted(scored, key=lambda s: -s[0])[:2]])


#: One entry point per GEMM; every launch passes its tile (kernels/_tuning.py decides which on a GPU).
_kernels = {"fwd": patch_embed_fwd_kernel, "dx": patch_embed_dx_kernel, "dw": patch_embed_dw_kernel}
_KERNEL_NAMES = {name: fn.__name__ for name, fn in _kernels.items()}
#: Where each GEMM's reduction length sits among its arguments (EVEN_K: it divides BLOCK_K).
_REDUCTION_ARG = {name: fn.arg_names.index(red) for (name, fn), red in zip(_kernels.items(), ("K", "D", "M"))}
#: Tile choice on a GPU: the wave model's pick, or timed once per octave of the token count.
TUNERS = {name: TileChooser(f"patch_embed/{fn}") for name, fn in _KERNEL_NAMES.items()}


def _launch(name, rows, cols, args, flags, elem_bytes, tile=None, *, red, key=(), splits=1, tma=None):
    """``rows`` x ``cols`` output tiles over a reduction of ``red``; ``key``: what else changes the tile;
    ``splits``: grid axis 1 (dW's split-K over tokens). ``tma``: on the Hopper core (``on_tma``), the
    operands to pass as TMA descriptors, [(index in ``args``, 2-D tensor, (bm, bn, bk) -> its block)];
    the programs are then persistent, one per SM, walking every tile (and split)."""

    def launch(tile, gpu_tile=True):
        bm, bn, bk, warps, stages = tile
        if gpu_tile:  # a GPU tile: BLOCK_K as the GPU takes it (halved for 4-byte dtypes)
            bk = block_k_for(bk, elem_bytes)
        # The packed weight is padded for these block sizes only (its loads are not masked).
        assert name != "fwd" or PACK_ALIGN % bk == 0, "fwd: BLOCK_K must divide PACK_ALIGN"
        assert name != "dx" or PACK_ALIGN % bn == 0, "dx: BLOCK_N must divide PACK_ALIGN"
        grid, run_args, hopper = (cdiv(rows, bm) * cdiv(cols, bn), splits), args, dict(TMA=False, NUM_PROGRAMS=0)
        if tma:
            from mmfuse.kernels import linear as KL

            programs = KL.TMA_PROGRAMS or num_sms(args[0].device)
            run_args = list(args)
            for i, t, block in tma:
                run_args[i] = KL._tma_operand(t, *block(bm, bn, bk), False)
            grid, hopper = (min(grid[0] * splits, programs), 1), dict(TMA=True, NUM_PROGRAMS=programs)
        # EVEN_K from here, not ``triton.heuristics`` (its wrapper costs host time on every launch).
        launch_kernel(_kernels[name], grid, *run_args, **flags, **hopper, EVEN_K=args[_REDUCTION_ARG[name]] % bk == 0,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages,
                      **LAUNCH_OPTIONS)

    if tile is None:  # a GPU tile chosen by the tests (gpu_config), else None
        tile = forced_tile(_KERNEL_NAMES[name])
    if tile is not None:
        launch(tile)
    elif INTERPRET and not gpu_config_on():  # (under gpu_config: the GPU's choice, which is also faster here)
        launch(INTERPRETER_TILE, gpu_tile=False)
    else:
        device = args[0].device
        # Not PIX_ALIGN: it follows the image width, which dynamic resolutions change every step, and
        # re-timing per width would undo the once-per-octave tuning (tests/test_tuning.py).
        tune_key = (elem_bytes, device, *key, bool(tma),
                    *(v for f, v in flags.items() if f != "PIX_ALIGN"))
        launch(TUNERS[name].choose((rows, cols, red), tune_key,
                                   candidate_tiles(name, rows, cols, num_sms(device), bool(tma), elem_bytes),
                                   launch))


# ----------------------------------------------------------------------------------------------
# Launchers: 5-D views in (images as (B, C, 1, H, W) with weight (D, C, 1, P, P)), tensors out.
# ----------------------------------------------------------------------------------------------
def _check_span(**tensors):
    for name, t in tensors.items():
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)
        if span >= 2**31:
            raise ValueError(f"{name}: spans {span + 1} elements; the patch-embedding kernels use 32-bit "
                             "offsets (split the batch)")


def _geometry(pixel_shape, weight_shape):
    """From the 5-D shapes: (B, D, K, grid frames, rows, cols, T, P)."""
    B, C, F, H, W = pixel_shape
    D, _, T, P, _ = weight_shape
    return B, D, C * T * P * P, F // T, H // P, W // P, T, P


def _strides5(t):
    """Strides of a 5-D view; a dim of size 1 gets stride 0 (never stepped, keeps offsets small)."""
    return [s if n > 1 else 0 for n, s in zip(t.shape, t.stride())]


def _pixel_strides(t) -> tuple[list, int]:
    """(the kernels' pixel stride arguments, PIX_ALIGN): batch, channel, frame and row strides divided
    by their largest common power of two up to 16 (``_aligned`` multiplies back), the column stride."""
    sb, sc, sf, sh, sw = _strides5(t)
    align = pix_align(sb, sc, sf, sh)
    return [sb // align, sc // align, sf // align, sh // align, sw], align


#: The packed weight's rows hold a multiple of this many columns (the largest BLOCK_K of the forward
#: and BLOCK_N of dpixels), zeros past K: neither kernel masks or wraps its weight loads.
PACK_ALIGN = 128


def pack_weight_cols(weight5) -> int:
    """K of ``pack_weight(weight5)``: the forward's reduction length, C*T*P*next_pow2(P)."""
    D, C, T, P, _ = weight5.shape
    return C * T * P * next_pow2(P)


def pack_weight(weight5):
    """(W_runs (D, KP), K): the weight in the forward's reduction order, patch rows padded to
    RUN = next_pow2(P) with zeros, rows padded to KP = a multiple of PACK_ALIGN (16-byte aligned).
    A view of the weight when that is already its layout (P a power of two, K % PACK_ALIGN == 0)."""
    D, C, T, P, _ = weight5.shape
    run = next_pow2(P)
    rows = C * T * P
    K = rows * run
    if run == P and K % PACK_ALIGN == 0:
        w = weight5.reshape(D, K)
        if w.stride(1) == 1 and w.stride(0) % 8 == 0:
            return w, K
    KP = cdiv(K, PACK_ALIGN) * PACK_ALIGN
    # One pass (a single pad kernel): each row of P padded to RUN with zeros, then (KP - K) / RUN rows of
    # zeros (RUN divides PACK_ALIGN, or PACK_ALIGN divides RUN and K == KP).
    packed = torch.nn.functional.pad(weight5.reshape(D, rows, P), (0, run - P, 0, (KP - K) // run))
    return packed.reshape(D, KP), K


def patch_embed_fwd(pixels5, weight5, bias=None, pos=None, out=None, packed=None, tile=None):
    """out (B, N, D) = patches(pixels5) @ weight5.flatten(1)^T + bias + pos.

    ``pos``: None or a (B, N, D) view (stride 0 where broadcast). ``out``: None (allocated) or a
    (B, N, D) view to write into (any strides). ``packed``: ``pack_weight(weight5)`` if the caller
    keeps it (modules cache it while the weight is unchanged), else packed here."""
    B, D, _, GF, GH, GW, T, P = _geometry(pixels5.shape, weight5.shape)
    M = B * GF * GH * GW
    if out is None:
        out = empty((B, GF * GH * GW, D), dtype=pixels5.dtype, device=pixels5.device)
    if M == 0 or D == 0:
        return out
    pos_t = pos if pos is not None else out
    w_runs, K = packed if packed is not None else pack_weight(weight5)
    _check_span(pixels=pixels5, weight=w_runs, pos_embed=pos_t, out=out)
    pix, align = _pixel_strides(pixels5)
    args = (pixels5, w_runs, bias if bias is not None else out, pos_t, out, M, D, K, GF, GH, GW,
            *pix, w_runs.stride(0), bias.stride(0) if bias is not None else 0, *pos_t.stride(),
            *out.stride())
    flags = dict(T=T, P=P, RUN=next_pow2(P), PIX_ALIGN=align, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                 INPUT_PRECISION=dot_precision(pixels5.dtype), ACC_DTYPE=acc_dtype(pixels5.dtype))
    tma = [(1, w_runs, lambda bm, bn, bk: (bn, bk))] if on_tma(pixels5, w_runs) else None
    _launch("fwd", M, D, args, flags, pixels5.element_size(), tile, red=K, tma=tma)
    return out


def on_tma(x, *operands) -> bool:
    """Whether a patch GEMM runs on the Hopper core (``operands``, 2-D, by TMA; persistent programs):
    only with ``MMFUSE_TMA=always`` ("auto" keeps the pointer kernels: not yet timed on a GPU,
    bench/NOTES.md), 16-bit inputs or fp32 under torch's TF32 switch (``_wants_tma``; IEEE fp32 stays
    on pointers), and operands whose rows TMA can read (None: no such view)."""
    from mmfuse.kernels import linear as KL

    return (KL._wants_tma(x) and KL.TMA == "always"
            and all(t is not None and KL._tma_layout(t) is False for t in operands))


def _token_matrix(g):
    """dOut (B, N, D) as the (M, D) matrix its tokens form, when one row stride covers them (the
    batch folds into the rows), else None."""
    B, N, D = g.shape
    if g.stride(2) != 1 or (B > 1 and g.stride(0) != N * g.stride(1)):
        return None
    return g.as_strided((B * N, D), (g.stride(1), 1))


def patch_embed_dx(dout, weight5, pixel_shape, packed=None, tile=None):
    """dpixels (contiguous, ``pixel_shape`` 5-D) from dOut (B, N, D): a permutation of dOut @ W.
    ``packed``: the forward's ``pack_weight(weight5)`` if kept, else packed here."""
    dpix = empty(pixel_shape, dtype=dout.dtype, device=dout.device)
    B, D, _, GF, GH, GW, T, P = _geometry(dpix.shape, weight5.shape)
    M = B * GF * GH * GW
    if dpix.numel() == 0:
        return dpix
    if M == 0 or D == 0:
        return dpix.zero_()
    w_runs, K = packed if packed is not None else pack_weight(weight5)
    _check_span(grad_output=dout, weight=w_runs, pixels=dpix)
    pix, align = _pixel_strides(dpix)
    args = (dout, w_runs, dpix, M, D, K, GF, GH, GW, *dout.stride(), w_runs.stride(0), *pix)
    flags = dict(T=T, P=P, RUN=next_pow2(P), PIX_ALIGN=align, INPUT_PRECISION=dot_precision(dout.dtype),
                 ACC_DTYPE=acc_dtype(dout.dtype))
    g2 = _token_matrix(dout)
    tma = [(0, g2, lambda bm, bn, bk: (bm, bk)), (1, w_runs, lambda bm, bn, bk: (bk, bn))] \
        if on_tma(dout, g2, w_runs) else None
    _launch("dx", M, K, args, flags, dout.element_size(), tile, red=D, tma=tma)
    return dpix


def dw_split_efficiency(D: int, K: int, M: int, tile, splits: int, sms: int) -> float:
    """Useful MACs of dW over the MACs the occupied waves could do, with its token loop split
    ``splits`` ways into chunks of whole SPLIT_ALIGN-token blocks (edge tiles and the last wave count)."""
    bm, bn = tile[0], tile[1]
    chunk = dw_token_chunk(M, splits)
    programs = cdiv(D, bm) * cdiv(K, bn) * cdiv(M, chunk)
    return D * K * M / (cdiv(programs, sms) * sms * bm * bn * chunk)


def dw_token_chunk(M: int, splits: int) -> int:
    """Tokens per split: whole SPLIT_ALIGN blocks (a multiple of every dW BLOCK_K)."""
    return cdiv(cdiv(M, SPLIT_ALIGN), max(1, splits)) * SPLIT_ALIGN


def dw_modelled_us(D: int, K: int, M: int, tile, splits: int, elem: int, sms: int) -> float:
    """Roofline of dW (and its split-K combine): max(FLOPs / (peak x SMs busy), bytes / bandwidth)
    + one launch, plus with splits the fp32 partials written and read back and the combine launch."""
    splits = cdiv(M, dw_token_chunk(M, splits))
    flops = 2 * D * K * M
    gemm = max(flops / (PEAK_FLOPS * dw_split_efficiency(D, K, M, tile, splits, sms)),
               (D * M + M * K) * elem / PEAK_BYTES) * 1e6 + LAUNCH_US
    if splits == 1:
        return gemm + D * K * elem / PEAK_BYTES * 1e6
    partials = splits * D * K * 4
    return gemm + partials / PEAK_BYTES * 1e6 + (partials + D * K * elem) / PEAK_BYTES * 1e6 + LAUNCH_US


@functools.lru_cache(maxsize=4096)  # up to 16 roofline evaluations, asked on every backward
def dw_splits(D: int, K: int, M: int, tile, elem: int, sms: int) -> int:
    """Split count of dW's token loop minimising ``dw_modelled_us`` (fewer splits on ties): more splits
    fill idle SMs (D x K is small: 80 tiles for CLIP-L) but cost fp32 partials and a combine launch."""
    best, best_us = 1, dw_modelled_us(D, K, M, tile, 1, elem, sms)
    for s in range(2, min(MAX_DW_SPLITS, cdiv(M, SPLIT_ALIGN)) + 1):
        us = dw_modelled_us(D, K, M, tile, s, elem, sms)
        if us < best_us * (1 - 1e-9):
            best, best_us = s, us
    return cdiv(M, dw_token_chunk(M, best))


def bias_grad(dout):
    """db = sum over every token of dOut (B, N, D): one torch reduction in fp32 (fp64 for fp64), one
    rounding; deterministic (no atomics in torch's sum). For when no batch sum runs (``batch_sum``)."""
    acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
    return dout.sum((0, 1), dtype=acc).to(dout.dtype)


def patch_embed_dw(dout, pixels5, weight_shape, with_bias: bool, tile=None, splits=None):
    """(dW (D, K) contiguous, db (D,) or None): dOut^T @ patches(pixels5), one GEMM; db by
    ``bias_grad`` beside it (a read of dOut; ``batch_sum`` gives it without one when it runs).
    ``splits``: ways the token loop is split (fp32 partials summed in split order by
    ``dw_combine_kernel``); default ``dw_splits`` on the launcher's tile (1 in the interpreter)."""
    D = weight_shape[0]
    dw = empty((D, weight_shape[1] * weight_shape[2] * weight_shape[3] * weight_shape[4]), dtype=dout.dtype,
               device=dout.device)
    db = bias_grad(dout) if with_bias else None
    _, _, K, GF, GH, GW, T, P = _geometry(pixels5.shape, weight_shape)
    M = pixels5.shape[0] * GF * GH * GW
    if dw.numel() == 0:
        return dw, db
    if M == 0:  # no tokens: the sum is empty
        return dw.zero_(), db
    _check_span(grad_output=dout, pixels=pixels5)
    RUN = next_pow2(P)
    KR = K // P * RUN  # the kernel's columns: the forward's padded run order (dW itself stays (D, K))
    if splits is None:
        sms = num_sms(dout.device)
        splits = 1 if INTERPRET and not gpu_config_on() else \
            dw_splits(D, KR, M, largest_tile(candidate_tiles("dw", D, KR, sms)), dout.element_size(), sms)
    chunk = dw_token_chunk(M, splits)
    splits = cdiv(M, chunk)
    acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
    if splits > 1:  # fp32 partials, one per split, summed below in split order
        part = empty((splits, *dw.shape), dtype=acc, device=dout.device)
        dw_t, (sws, dwd, dwk) = part, part.stride()
    else:
        dw_t, (sws, (dwd, dwk)) = dw, (0, dw.stride())
    pix, align = _pixel_strides(pixels5)
    args = (dout, pixels5, dw_t, M, D, KR, GF, GH, GW, *dout.stride(), *pix, sws, dwd, dwk, chunk)
    flags = dict(T=T, P=P, RUN=RUN, PIX_ALIGN=align, INPUT_PRECISION=dot_precision(dout.dtype),
                 ACC_DTYPE=acc_dtype(dout.dtype))
    g2 = _token_matrix(dout)
    tma = [(0, g2, lambda bm, bn, bk: (bk, bm))] if on_tma(dout, g2) else None  # dOut^T by TMA
    _launch("dw", D, KR, args, flags, dout.element_size(), tile, red=M, splits=splits, tma=tma)
    if splits > 1:
        bd, bk = COMBINE_BLOCK
        launch_kernel(dw_combine_kernel, (cdiv(D, bd), cdiv(K, bk)),
            part, dw, splits, D, K, *part.stride(), *dw.stride(), ACC_DTYPE=acc_dtype(dout.dtype), BLOCK_D=bd,
            BLOCK_K=bk, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)  # as compiled by the compile check (aot_specs)
    return dw, db


def batch_sum(g, bias_from=None):
    """(dpos, db): dpos = sum_b g[b] for g (B, N, D), accumulated in fp32 (fp64) in batch order; with
    ``bias_from`` (the first patch row: 1 past a class token, else 0) also db = sum_{b, n >= bias_from}
    g[b, n], else None.

    db comes from the kernel's fp32 sums, not from the rounded dpos (``dpos[bias_from:].sum(0)`` would
    add N roundings to the gradient dtype, ~sqrt(N) ulps at bf16 against the one of a fp32 sum): each
    program stores its block's column sums (cdiv(N, BLOCK_N) x D fp32, 74 KB for CLIP-L), and one torch
    sum adds them in fp32 and rounds once. Everything is summed in fp32 exactly as a direct sum of dOut
    would be, in another fixed order: deterministic, and it saves that sum's read of dOut (B*N*D)."""
    B, N, D = g.shape
    out = empty((N, D), dtype=g.dtype, device=g.device)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    if out.numel() == 0:
        return out, (torch.zeros(D, dtype=g.dtype, device=g.device) if bias_from is not None else None)
    bn, bd = BATCH_SUM_BLOCK
    colsum = empty((cdiv(N, bn), D), dtype=acc, device=g.device) if bias_from is not None else out
    launch_kernel(batch_sum_kernel, (cdiv(N, bn), cdiv(D, bd)),
        g, out, colsum, B, N, D, bias_from or 0, *g.stride(), *out.stride(), COL_SUMS=bias_from is not None,
        ACC_DTYPE=acc_dtype(g.dtype), BLOCK_N=bn, BLOCK_D=bd,
        num_warps=4, num_stages=1, **LAUNCH_OPTIONS)  # as compiled by the compile check (aot_specs)
    return out, (colsum.sum(0).to(g.dtype) if bias_from is not None else None)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_aot.py, `mmfuse report`)
# ----------------------------------------------------------------------------------------------
#: Representative launch: CLIP-L/14-336 (C=3, 336x336, P=14, D=1024), 4 images, NCHW contiguous.
AOT_BATCH = 4


def pix_align(stride_b, stride_c, stride_f, stride_h) -> int:
    """The largest power of two up to 16 dividing the pixel strides other than the row's own."""
    g = 16
    for s in (stride_b, stride_c, stride_f, stride_h):
        while s % g:
            g //= 2
    return g


def _aot_launches(shape: str = "clip-l-14-336"):
    from mmfuse.bench.shapes import by_name

    s = by_name(shape)
    B, C, (H, W), P, D, T, F = AOT_BATCH, s.channels, s.image, s.patch, s.dim, s.temporal, s.frames
    GH, GW = H // P, W // P
    M, K = B * (F // T) * GH * GW, C * T * P * P
    geo = dict(M=M, D=D, K=K, GRID_F=F // T, GRID_H=GH, GRID_W=GW)
    # Images get a zero frame stride from the launcher (a size-1 dim).
    strides = (C * F * H * W, F * H * W, H * W if F > 1 else 0, W)
    align = pix_align(*strides)
    x = dict(zip(("stride_xb_q", "stride_xc_q", "stride_xf_q", "stride_xh_q"), (s // align for s in strides)),
             stride_xw=1)
    N = M // B
    g = dict(stride_gb=N * D, stride_gn=D, stride_gd=1)
    run = next_pow2(P)
    k_runs = C * T * P * run
    fwd_ints = dict(geo, K=k_runs, **x, stride_wd=cdiv(k_runs, PACK_ALIGN) * PACK_ALIGN, stride_bias=1, stride_pb=0,
                    stride_pn=D,
                    stride_pd=1, stride_ob=N * D, stride_on=D, stride_od=1)
    fwd = (patch_embed_fwd_kernel, "fwd bias+pos", ("M", "D", "K"), fwd_ints,
           dict(RUN=run, PIX_ALIGN=align, HAS_BIAS=True, HAS_POS=True, TMA=False, NUM_PROGRAMS=0),
           ("pix_ptr", "w_ptr", "bias_ptr", "pos_ptr", "out_ptr"))
    dx = (patch_embed_dx_kernel, "dpixels", ("M", "K", "D"),
          dict(geo, K=k_runs, **g, stride_wd=cdiv(k_runs, PACK_ALIGN) * PACK_ALIGN, **x),
          dict(RUN=run, PIX_ALIGN=align, TMA=False, NUM_PROGRAMS=0),
          ("dout_ptr", "w_ptr", "dpix_ptr"))
    dw = (patch_embed_dw_kernel, "dW", ("D", "K", "M"),
          dict(geo, K=k_runs, **g, **x, stride_dws=0, stride_dwd=K, stride_dwk=1, TOKEN_CHUNK=M),
          dict(RUN=run, PIX_ALIGN=align, TMA=False, NUM_PROGRAMS=0), ("dout_ptr", "pix_ptr", "dw_ptr"))
    return dict(T=T, P=P), {"fwd": fwd, "dx": dx, "dw": dw}


def _spec(shape_cx, launch, tile, dtype, ptr, precision, label=""):
    from mmfuse._aot import CompileSpec

    fn, variant, (_, _, red), ints, flags, ptrs = launch
    bm, bn, bk, warps, stages = tile
    block_k = block_k_for(bk, 4 if ptr == "*fp32" else 2)
    cx = dict(shape_cx, **flags, INPUT_PRECISION=precision, ACC_DTYPE=tl.float32, BLOCK_M=bm, BLOCK_N=bn,
              BLOCK_K=block_k, GROUP_M=GROUP_M, EVEN_K=ints[red] % block_k == 0)
    return CompileSpec(
        kernel=f"patch_embed/{fn.fn.__name__}", variant=variant + label, dtype=dtype,
        config=f"{bm}x{bn}x{block_k} w{warps} s{stages}", fn=fn,
        args=tuple(dict({p: ptr for p in ptrs}, **ints).items()), constexprs=tuple(cx.items()),
        num_warps=warps, num_stages=stages, tensor_cores=precision == "tf32" or ptr != "*fp32")


def aot_specs():
    from mmfuse._aot import CompileSpec

    shape_cx, launches = _aot_launches()
    # Every tile of every GEMM: the forward in each dtype, the backward GEMMs in fp16 (their
    # epilogues carry no dtype logic); fp32 without TF32 (CUDA-core FMA) at one tile.
    plans = [("fwd", "fp16", "*fp16", "ieee"), ("fwd", "bf16", "*bf16", "ieee"),
             ("fwd", "fp32-tf32", "*fp32", "tf32"), ("dx", "fp16", "*fp16", "ieee"), ("dw", "fp16", "*fp16", "ieee")]
    specs = [_spec(shape_cx, launches[gemm], tile, dtype, ptr, precision)
             for gemm, dtype, ptr, precision in plans for tile in TILES[gemm]]
    specs.append(_spec(shape_cx, launches["fwd"], TILES["fwd"][-1], "fp32", "*fp32", "ieee"))
    # The Hopper core (sm_90 only; ``on_tma``): the forward's packed weight by TMA, 132 persistent
    # programs, every forward tile in fp16 and bf16; the backward GEMMs and all three in TF32 below.
    import dataclasses

    def core(gemm, tile, dtype, ty, precision, descs, label):
        """The Hopper core's spec of one GEMM and tile: the ``descs`` operands as TMA descriptors of
        their (rows, cols) blocks of (BLOCK_M, BLOCK_N, BLOCK_K), 132 persistent programs, sm_90."""
        sp = _spec(shape_cx, launches[gemm], tile, dtype, f"*{ty}", precision)
        t = (tile[0], tile[1], dict(sp.constexprs)["BLOCK_K"])
        args = dict(sp.args, **{a: f"tensordesc<{ty}[{r}, {c}]>" for a, block in descs.items() for r, c in [block(t)]})
        cx = dict(sp.constexprs, TMA=True, NUM_PROGRAMS=132)
        return dataclasses.replace(sp, variant=label, args=tuple(args.items()), constexprs=tuple(cx.items()),
                                   archs=(90,))

    fwd_desc = {"w_ptr": lambda t: (t[1], t[2])}
    for dtype, ty in (("fp16", "fp16"), ("bf16", "bf16")):
        specs += [core("fwd", tile, dtype, ty, "ieee", fwd_desc, "fwd bias+pos (TMA weight, persistent)")
                  for tile in TMA_TILES[2]["fwd"]]
    # dpixels (dOut and the packed weight by TMA) and dW (dOut^T by TMA) on the same core, fp16 (as their
    # pointer twins: no dtype logic in their epilogues), every tile; and all three GEMMs in TF32.
    backward = (("dx", {"dout_ptr": lambda t: (t[0], t[2]), "w_ptr": lambda t: (t[2], t[1])},
                 "dpixels (TMA dOut and weight, persistent)"),
                ("dw", {"dout_ptr": lambda t: (t[2], t[0])}, "dW (TMA dOut^T, persistent)"))
    for gemm, descs, label in backward:
        specs += [core(gemm, tile, "fp16", "fp16", "ieee", descs, label) for tile in TMA_TILES[2][gemm]]
    for gemm, descs, label in (("fwd", fwd_desc, "fwd bias+pos (TMA weight, persistent)"), *backward):
        specs += [core(gemm, tile, "fp32-tf32", "fp32", "tf32", descs, label) for tile in TMA_TILES[4][gemm]]
    # The other patch geometries of bench/shapes.py (P = 30; T = 2) specialise the index arithmetic
    # differently: their forward in fp16 at the largest tile.
    for name in ("fuyu-8b", "qwen2-vl"):
        other_cx, other = _aot_launches(name)
        specs.append(_spec(other_cx, other["fwd"], TILES["fwd"][0], "fp16", "*fp16", "ieee", f" {name}"))
    # dW split over tokens (fp32 partials), as the launcher runs it at 64 images: every dW tile, and the
    # combine that sums the partials (and db's) in split order.
    ints = launches["dw"][3]
    # The kernel's columns KR (padded run order) decide the grid and the split; dW's own are K.
    D, KR, K, M = ints["D"], ints["K"], ints["stride_dwd"], 64 * ints["M"] // AOT_BATCH
    splits = dw_splits(D, KR, M, largest_tile(TILES["dw"]), 2, 132)
    for tile in TILES["dw"]:
        sp = _spec(shape_cx, launches["dw"], tile, "fp16", "*fp16", "ieee")
        args = dict(sp.args, dw_ptr="*fp32", M=M, stride_dws=D * K,
                    TOKEN_CHUNK=dw_token_chunk(M, splits), stride_gb=(M // 64) * D)
        specs.append(dataclasses.replace(sp, variant=f"dW, split {splits} (fp32 partials)",
                                         args=tuple(args.items())))
        if tile == TMA_TILES[2]["dw"][0]:  # the Hopper dW walks (tile, split) pairs: its split form, once
            bm, bn, bk = tile[:3]
            cx = dict(sp.constexprs, TMA=True, NUM_PROGRAMS=132)
            specs.append(dataclasses.replace(
                sp, variant=f"dW, split {splits} (fp32 partials; TMA dOut^T, persistent)", archs=(90,),
                args=tuple(dict(args, dout_ptr=f"tensordesc<fp16[{bk}, {bm}]>").items()),
                constexprs=tuple(cx.items())))
    bd, bk = COMBINE_BLOCK
    args = dict(part_ptr="*fp32", dw_ptr="*fp16", SPLITS=splits, D=D, K=K,
                stride_ps=D * K, stride_pd=K, stride_pk=1, stride_dwd=K, stride_dwk=1)
    specs.append(CompileSpec(
        kernel="patch_embed/dw_combine_kernel", variant="dW = sum of split partials", dtype="fp16",
        config=f"{bd}x{bk} w4", fn=dw_combine_kernel, args=tuple(args.items()),
        constexprs=(("ACC_DTYPE", tl.float32), ("BLOCK_D", bd), ("BLOCK_K", bk)), num_warps=4,
        num_stages=1, tensor_cores=False))
    ints = launches["fwd"][3]
    bn, bd = BATCH_SUM_BLOCK
    n = ints["M"] // AOT_BATCH
    # With db's column sums (bias and pos both trained), past CLIP's class token (FIRST_ROW = 1).
    args = dict(g_ptr="*fp16", out_ptr="*fp16", colsum_ptr="*fp32", B=AOT_BATCH, N=n, D=ints["D"], FIRST_ROW=1,
                stride_gb=n * ints["D"], stride_gn=ints["D"], stride_gd=1, stride_on=ints["D"], stride_od=1)
    specs.append(CompileSpec(
        kernel="patch_embed/batch_sum_kernel", variant="dpos = sum_b dOut, db's column sums", dtype="fp16",
        config=f"{bn}x{bd} w4", fn=batch_sum_kernel, args=tuple(args.items()),
        constexprs=(("COL_SUMS", True), ("ACC_DTYPE", tl.float32), ("BLOCK_N", bn), ("BLOCK_D", bd)),
        num_warps=4, num_stages=1,
        tensor_cores=False))
    return specs
