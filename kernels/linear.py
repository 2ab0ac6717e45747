"""Fused GEMM for Linear -> bias -> activation, forward and backward.

One kernel, ``fused_gemm_kernel``, computes ``C = A @ B`` over arbitrary strides with an fp32 (fp64
for fp64 inputs) accumulator and three optional epilogues/side-outputs chosen by constexpr flags:

* forward   ``y = act(x @ W^T + b)``; with ``STORE_AUX`` the pre-activation ``h`` is written from
  the same registers (one extra store, no extra kernel: cuBLASLt's GELU_AUX_BIAS).
* MLP dX    ``dH_prev = (dH @ W) * act'(h_prev)``: the next layer's input gradient is multiplied by
  the activation derivative in the epilogue, which already holds the tile (``ACT_GRAD``).
* dW        ``dW = dH^T @ X``, and ``db = sum_m dH`` by one reduction beside it. (Summing the dH^T
  tiles inside dW's K loop looked free but pulled A out of shared memory into registers every
  step: 128 TFLOP/s against 633 without it, on an H200 with Triton 3.6, bench/NOTES.md.)

plus ``act_grad_kernel`` (``dH = dY * act'(h)`` in one pass) for a standalone Linear+activation, and
``tma_gemm_kernel``: the same GEMM and epilogues (``gemm_epilogue``, shared) for Hopper, operands by
TMA descriptors in a persistent grid. ``MMFUSE_TMA=auto`` takes it only where it was measured faster
(``tma_preferred``: the forward's layout); both kernels are compiled and executed by the tests.

Layout (pointer kernel): A (M, K), B (K, N), C (M, N), any strides (the launcher folds leading dims into M).
Tile order is grouped (GROUP_M rows of tiles share B in L2). Loads along M and N are clamped with
``% M`` / ``% N`` instead of masked (the wrapped rows are never stored); the K tail is masked only
when ``K % BLOCK_K != 0`` (EVEN_K, set by the launcher). No atomics anywhere: every output element is written
by exactly one program, so results are bitwise reproducible.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from mmfuse.kernels._common import (
    ACTIVATIONS,
    INTERPRET,
    LAUNCH_OPTIONS,
    acc_dtype,
    activation_grad,
    apply_activation,
    cdiv,
    dot_precision,
    empty,
    forced_tile,
    gpu_config_on,
    grouped_tile,
    grouped_tile_of,
    mma,
    num_sms,
)
from mmfuse.kernels._launch import launch_kernel
from mmfuse.kernels._tuning import TileChooser


@triton.jit
def gemm_epilogue(
    acc, pid_m, pid_n, M, N,
    c_ptr, bias_ptr, aux_ptr,
    stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, ACT_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Bias, aux, activation (or act'), one rounding to the output dtype, the store; shared by both
    GEMM kernels. All in the accumulator type."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    # 64-bit offset of the tile corner once, 32-bit offsets inside it: per-element 64-bit addresses
    # in the MMA layout cost ~2 registers per accumulator element and made the dX epilogue spill.
    rm = tl.arange(0, BLOCK_M)[:, None]
    rn = tl.arange(0, BLOCK_N)[None, :]
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    aux_ptrs = aux_ptr + (row0 * stride_auxm + col0 * stride_auxn) + (rm * stride_auxm + rn * stride_auxn)
    c_ptrs = c_ptr + (row0 * stride_cm + col0 * stride_cn) + (rm * stride_cm + rn * stride_cn)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)  # any view, stride 0 too
        acc += bias[None, :].to(ACC_DTYPE)
    if STORE_AUX:
        tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
    if ACT_GRAD:
        h = tl.load(aux_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        acc = acc * activation_grad(h, ACTIVATION)
    else:
        acc = apply_activation(acc, ACTIVATION)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_epilogue(
    acc, acc_up, pid_m, pid_n, M, N,
    c_ptr, c2_ptr, bias_ptr, bias2_ptr, aux_ptr, aux2_ptr,
    stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, GATE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The gated MLP's two epilogues. Forward (``acc`` = x @ Wg^T, ``acc_up`` = x @ Wu^T): g and u
    get their biases, are saved to aux / aux2 for backward, and C = act(g) * u, one rounding. Backward
    (GATE_GRAD, ``acc`` = dH = dY @ Wd): with g, u read back from aux / aux2, dG = dH * u * act'(g) goes
    to C and dU = dH * act(g) to C2. C2 / aux2 share C's / aux's strides (the launcher passes views
    of one (M, 2N) buffer)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rm = tl.arange(0, BLOCK_M)[:, None]
    rn = tl.arange(0, BLOCK_N)[None, :]
    aux_off = ((pid_m * BLOCK_M).to(tl.int64) * stride_auxm + (pid_n * BLOCK_N).to(tl.int64) * stride_auxn
               + (rm * stride_auxm + rn * stride_auxn))
    c_off = ((pid_m * BLOCK_M).to(tl.int64) * stride_cm + (pid_n * BLOCK_N).to(tl.int64) * stride_cn
             + (rm * stride_cm + rn * stride_cn))
    if GATE_GRAD:
        g = tl.load(aux_ptr + aux_off, mask=mask, other=0.0).to(ACC_DTYPE)
        u = tl.load(aux2_ptr + aux_off, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(c2_ptr + c_off, (acc * apply_activation(g, ACTIVATION)).to(c2_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + c_off, (acc * u * activation_grad(g, ACTIVATION)).to(c_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)[None, :].to(ACC_DTYPE)
            acc_up += tl.load(bias2_ptr + offs_n * stride_bias2, mask=mask_n, other=0.0)[None, :].to(ACC_DTYPE)
        if STORE_AUX:
            tl.store(aux_ptr + aux_off, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            tl.store(aux2_ptr + aux_off, acc_up.to(aux2_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + c_off, (apply_activation(acc, ACTIVATION) * acc_up).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def k_loop(acc, a_ptrs, b_ptrs, K, stride_ak, stride_bk, offs_k,
           INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += A @ B over K in BLOCK_K steps (the K tail masked only when K % BLOCK_K != 0)."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def fused_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr,
    a2_ptr, b2_ptr, c2_ptr, bias2_ptr, aux2_ptr,  # second operands/outputs (GATED, GATE_GRAD, TWO_K_SOURCES)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_auxm, stride_auxn,
    stride_bias, stride_bias2,
    ACTIVATION: tl.constexpr,   # _common.ACTIVATIONS: 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu, 4 silu, 5 relu, 6 relu2
    HAS_BIAS: tl.constexpr,     # C += bias[None, :]
    STORE_AUX: tl.constexpr,    # write the pre-activation to aux (forward, for backward)
    ACT_GRAD: tl.constexpr,     # C *= act'(aux) instead of C = act(C)  (MLP backward)
    GATED: tl.constexpr,        # C = act(A @ B + bias) * (A @ B2 + bias2): one A tile, two B tiles
    GATE_GRAD: tl.constexpr,    # C = dG, C2 = dU of the gate product, from g, u in aux, aux2
    TWO_K_SOURCES: tl.constexpr,  # C = A @ B + A2 @ B2 (the reduction runs over two K-concatenated sources)
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap instead of mask: rows/cols past the edge re-read valid memory and are never stored.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    a_off = offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if GATED:
        # Gate and up tiles from the same A tile: A is read once for both products.
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        a_ptrs = a_ptr + a_off
        b_ptrs = b_ptr + b_off
        b2_ptrs = b2_ptr + b_off
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
                b2 = tl.load(b2_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                b2 = tl.load(b2_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)
            acc_up = mma(a, b2, acc_up, INPUT_PRECISION, ACC_DTYPE)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
            b2_ptrs += BLOCK_K * stride_bk
        gated_epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, c2_ptr, bias_ptr, bias2_ptr, aux_ptr, aux2_ptr,
                       stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                       ACTIVATION, HAS_BIAS, STORE_AUX, False, ACC_DTYPE, BLOCK_M, BLOCK_N)
    else:
        acc = k_loop(acc, a_ptr + a_off, b_ptr + b_off, K, stride_ak, stride_bk, offs_k,
                     INPUT_PRECISION, ACC_DTYPE, BLOCK_K, EVEN_K)
        if TWO_K_SOURCES:  # the gated MLP's dX = dG @ Wg + dU @ Wu, one accumulator, no concatenation
            acc = k_loop(acc, a2_ptr + a_off, b2_ptr + b_off, K, stride_ak, stride_bk, offs_k,
                         INPUT_PRECISION, ACC_DTYPE, BLOCK_K, EVEN_K)
        if GATE_GRAD:
            gated_epilogue(acc, acc, pid_m, pid_n, M, N, c_ptr, c2_ptr, bias_ptr, bias2_ptr, aux_ptr, aux2_ptr,
                           stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                           ACTIVATION, False, False, True, ACC_DTYPE, BLOCK_M, BLOCK_N)
        else:
            gemm_epilogue(acc, pid_m, pid_n, M, N, c_ptr, bias_ptr, aux_ptr,
                          stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
                          ACTIVATION, HAS_BIAS, STORE_AUX, ACT_GRAD, ACC_DTYPE, BLOCK_M, BLOCK_N)


@triton.jit
def _tma_tile(desc, off_rows, off_k, TRANS: tl.constexpr, K_FIRST: tl.constexpr):
    """An A tile (rows, BLOCK_K) (``K_FIRST`` False) or a B tile (BLOCK_K, cols) (``K_FIRST``) through a
    descriptor over the operand, or over its transpose (``TRANS``: the tile is transposed back)."""
    if K_FIRST != TRANS:  # the descriptor's rows run along K
        t = desc.load([off_k, off_rows])
    else:
        t = desc.load([off_rows, off_k])
    return t.T if TRANS else t


@triton.jit
def tma_k_loop(acc, a_desc, b_desc, off_m, off_n, k_steps, A_TRANS: tl.constexpr, B_TRANS: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A @ B over k_steps BLOCK_K steps, both operands by TMA."""
    for ks in range(k_steps):
        a = _tma_tile(a_desc, off_m, ks * BLOCK_K, A_TRANS, False)
        b = _tma_tile(b_desc, off_n, ks * BLOCK_K, B_TRANS, True)
        acc = mma(a, b, acc, INPUT_PRECISION, ACC_DTYPE)
    return acc


@triton.jit
def tma_gemm_kernel(
    a_desc, b_desc, c_ptr, bias_ptr, aux_ptr,
    a2_desc, b2_desc, c2_ptr, bias2_ptr, aux2_ptr,  # second operands/outputs (GATED, GATE_GRAD, TWO_K_SOURCES)
    M, N, K,
    stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, ACT_GRAD: tl.constexpr,
    GATED: tl.constexpr, GATE_GRAD: tl.constexpr, TWO_K_SOURCES: tl.constexpr,  # as fused_gemm_kernel's
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    A_TRANS: tl.constexpr,      # a_desc holds A^T (K, M): A is contiguous along M (dW's dH^T)
    B_TRANS: tl.constexpr,      # b_desc holds B^T (N, K): B is contiguous along K (the forward's W^T)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    FLATTEN: tl.constexpr,      # one flattened tile x K loop (epilogue overlapped with the next loads)
    EPILOGUE_SPLIT: tl.constexpr,  # 2: the epilogue runs on two (BLOCK_M, BLOCK_N / 2) halves in turn
):
    """The same GEMMs and epilogues for Hopper: operands arrive by TMA (descriptor loads: no address
    arithmetic, edges zero-filled by the copy engine, so no masks and no EVEN_K), and the kernel is
    persistent: NUM_PROGRAMS programs (one per SM) walk the output tiles in grouped order; with
    FLATTEN the tile x K loop nest is one pipelined loop, so the next tile's loads are issued during
    this tile's epilogue (those registers stay live across the epilogue, hence not with act').
    EPILOGUE_SPLIT = 2 subtiles the epilogue: the accumulator's two column halves get their bias, aux
    read (act''s h) and store one after the other, so only half of the aux tile and of act''s
    temporaries are live at once (the dX * act' epilogue at 128x128 spilled without it). The gated
    MLP's GEMMs as in ``fused_gemm_kernel``: GATED (gate and up from one A tile, b2 the up weight's
    descriptor), GATE_GRAD ([dG | dU] in the epilogue), TWO_K_SOURCES (A @ B, then A2 @ B2, into one
    accumulator: the pointer kernel's order). 16-bit inputs only (the launcher checks TMA's rules)."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        if GATED:  # gate and up tiles from the same A tile: A is read once for both products
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for ks in range(k_steps):
                a = _tma_tile(a_desc, off_m, ks * BLOCK_K, A_TRANS, False)
                acc = mma(a, _tma_tile(b_desc, off_n, ks * BLOCK_K, B_TRANS, True), acc,
                          INPUT_PRECISION, ACC_DTYPE)
                acc_up = mma(a, _tma_tile(b2_desc, off_n, ks * BLOCK_K, B_TRANS, True), acc_up,
                             INPUT_PRECISION, ACC_DTYPE)
            gated_epilogue(acc, acc_up, pid_m, pid_n, M, N, c_ptr, c2_ptr, bias_ptr, bias2_ptr, aux_ptr, aux2_ptr,
                           stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                           ACTIVATION, HAS_BIAS, STORE_AUX, False, ACC_DTYPE, BLOCK_M, BLOCK_N)
        else:
            acc = tma_k_loop(acc, a_desc, b_desc, off_m, off_n, k_steps, A_TRANS, B_TRANS, INPUT_PRECISION,
                             ACC_DTYPE, BLOCK_K)
            if TWO_K_SOURCES:  # the gated MLP's dX = dG @ Wg + dU @ Wu, one accumulator, no concatenation
                acc = tma_k_loop(acc, a2_desc, b2_desc, off_m, off_n, k_steps, A_TRANS, B_TRANS, INPUT_PRECISION,
                                 ACC_DTYPE, BLOCK_K)
            if GATE_GRAD:
                gated_epilogue(acc, acc, pid_m, pid_n, M, N, c_ptr, c2_ptr, bias_ptr, bias2_ptr, aux_ptr,
                               aux2_ptr, stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias, stride_bias2,
                               ACTIVATION, False, False, True, ACC_DTYPE, BLOCK_M, BLOCK_N)
            elif EPILOGUE_SPLIT == 2:  # columns [0, BLOCK_N/2), [BLOCK_N/2, BLOCK_N): half-tiles 2*pid_n, 2*pid_n+1
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                gemm_epilogue(left, pid_m, 2 * pid_n, M, N, c_ptr, bias_ptr, aux_ptr,
                              stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
                              ACTIVATION, HAS_BIAS, STORE_AUX, ACT_GRAD, ACC_DTYPE, BLOCK_M, BLOCK_N // 2)
                gemm_epilogue(right, pid_m, 2 * pid_n + 1, M, N, c_ptr, bias_ptr, aux_ptr,
                              stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
                              ACTIVATION, HAS_BIAS, STORE_AUX, ACT_GRAD, ACC_DTYPE, BLOCK_M, BLOCK_N // 2)
            else:
                gemm_epilogue(acc, pid_m, pid_n, M, N, c_ptr, bias_ptr, aux_ptr,
                              stride_cm, stride_cn, stride_auxm, stride_auxn, stride_bias,
                              ACTIVATION, HAS_BIAS, STORE_AUX, ACT_GRAD, ACC_DTYPE, BLOCK_M, BLOCK_N)


@triton.jit
def act_grad_kernel(
    dy_ptr, h_ptr, dh_ptr,
    M, N,
    stride_dym, stride_dyn, stride_hm, stride_hn, stride_dhm, stride_dhn,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dH = dY * act'(h), one read of each input and one write."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :]
    dy = tl.load(dy_ptr + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0).to(ACC_DTYPE)
    h = tl.load(h_ptr + rows * stride_hm + cols * stride_hn, mask=mask, other=0.0).to(ACC_DTYPE)
    dh = dy * activation_grad(h, ACTIVATION)
    tl.store(dh_ptr + rows * stride_dhm + cols * stride_dhn, dh.to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs and tile choice
# ----------------------------------------------------------------------------------------------
#: (BLOCK_M, BLOCK_N, BLOCK_K for 2-byte dtypes, num_warps, num_stages). 4-byte dtypes halve
#: BLOCK_K so every config fits the 164 KB of an A100 SM (and the 228 KB of an H100 one).
#: 128x256x64 (8 warps) is absent: with the GELU+aux epilogue it spills on sm_80 and sm_90
#: (bench/NOTES.md).
GEMM_TILES = (
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
)
GROUP_M = 8
#: fp64 (gradcheck, not speed) takes one tile: with fp64 accumulators and an fp64 GELU epilogue the
#: larger tiles spill on sm_90 (1.7 KB at 128x128); 64x64 compiles clean on sm_80 and sm_90.
FP64_TILE = (64, 64, 64, 8, 3)
#: Tiles whose wave efficiency is below this are dropped before the choice (see bench/NOTES.md).
MIN_WAVE_EFFICIENCY = 0.70

#: The single config used under the interpreter: small, so odd test sizes span several tiles.
INTERPRETER_TILE = (32, 32, 32, 4, 1)

#: dH = dY * act'(h)'s block by element size: fp64 takes half the rows (at 64x64 its fp64 act' spilled
#: 8 B on sm_90 with Triton 3.6).
ACT_GRAD_BLOCKS = {2: (64, 64), 4: (64, 64), 8: (32, 64)}


def block_k_for(block_k: int, elem_bytes: int) -> int:
    """BLOCK_K for this element size: the table's value for 2-byte dtypes, halved for 4-byte and
    quartered for 8-byte ones, so a stage of A and B tiles holds the same bytes (fp64's 128x128x32
    tile at 4 stages needed 256 KB of shared memory: gradcheck failed to launch on the H100)."""
    return block_k // max(1, elem_bytes // 2)


def wave_efficiency(M: int, N: int, block_m: int, block_n: int, sms: int) -> float:
    """Useful MACs over MACs the occupied waves could do (one CTA of this size per SM).

    Counts both the wave tail (the last wave leaves SMs idle) and the ragged edge tiles.
    """
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    waves = cdiv(tiles, sms)
    return (M * N) / (waves * sms * block_m * block_n)


@functools.lru_cache(maxsize=4096)  # a pure function of its ints (and a tile tuple), asked on every launch
def candidate_tiles(M: int, N: int, sms: int, tiles: tuple = GEMM_TILES) -> tuple:
    """Tiles worth autotuning at (M, N): those with wave efficiency >= MIN_WAVE_EFFICIENCY,
    or the best two when none reaches it (tiny problems)."""
    scored = [(wave_efficiency(M, N, t[0], t[1], sms), t) for t in tiles]
    keep = [t for e, t in scored if e >= MIN_WAVE_EFFICIENCY]
    if not keep:
        keep = [t for _, t in sorted(scored, key=lambda s: -s[0])[:2]]
    return tuple(keep)


#: Tile choice on a GPU: the wave model's pick, or timed once per octave of M with MMFUSE_AUTOTUNE=1.
TUNER = TileChooser("linear/fused_gemm_kernel")


#: The Hopper path (``tma_gemm_kernel``): "auto" takes it for 16-bit operands on compute capability
#: 9.x whose layouts TMA can read; "never" keeps every GEMM on ``fused_gemm_kernel``; "always" takes
#: it wherever the layouts allow, also under the interpreter (the tests). ``MMFUSE_TMA`` sets it.
TMA = os.environ.get("MMFUSE_TMA", "auto")
TMA_MODES = ("auto", "never", "always")
#: Persistent programs of the TMA kernel: the device's SM count, or this (tests: a few, so each
#: interpreted program walks several tiles).
TMA_PROGRAMS: int | None = None
TMA_TUNER = TileChooser("linear/tma_gemm_kernel")


def tma_tiles(act_grad: bool, elem_bytes: int = 2):
    """Tiles the TMA kernel takes (BLOCK_K for 2-byte operands; ``block_k_for`` halves it for fp32):
    all of them, but fp32's dX * act' at 128x64 (TF32: 255 registers and 16 B of spills on sm_90,
    Triton 3.9). The 16-bit dX * act' epilogue at 128x128 spilled 8-16 bytes in the persistent kernel
    (255 registers), flattened or not, until it was subtiled (``tma_epilogue_split``: 172 registers, no
    spills, Triton 3.9; TF32: 191)."""
    if act_grad and elem_bytes == 4:
        return tuple(t for t in GEMM_TILES if t[:2] != (128, 64))
    return GEMM_TILES


#: Tiles of the gated MLP's GEMMs on the TMA kernel (MMFUSE_TMA=always), by GEMM; chosen by the
#: compile check (sm_90, Triton 3.6-3.9; bench/NOTES.md "Gated MLP on the TMA core").
TMA_GATED_TILES = {
    "gated": ((128, 64, 64, 8, 4), (64, 64, 64, 4, 4)),
    "gate_grad": ((128, 64, 64, 8, 4), (64, 64, 64, 4, 4)),
    "two_k": ((64, 128, 64, 8, 4), (64, 64, 64, 4, 4)),
}


#: fp32's (TF32) [dG | dU] epilogue on the TMA kernel: the 16-bit tiles spilled (24 and 56 B on sm_90,
#: Triton 3.9), as did 64x64 w4 and 128x64 w8 at BLOCK_K 16-32 (16-64 B on 3.6 / 3.9); the pointer
#: kernel's fp32 tile, 64x64 w8 s4, compiles clean on Triton 3.6-3.9 (112-116 registers).
TMA_GATE_GRAD_TF32_TILES = ((64, 64, 64, 8, 4),)


def tma_gated_tiles(kind: str, elem_bytes: int = 2) -> tuple:
    """The gated GEMM's tiles on the TMA kernel (fp32's [dG | dU]: ``TMA_GATE_GRAD_TF32_TILES``)."""
    return TMA_GATE_GRAD_TF32_TILES if (kind == "gate_grad" and elem_bytes == 4) else TMA_GATED_TILES[kind]


@functools.lru_cache(maxsize=64)  # as ``candidate_tiles``
def pointer_tiles(act_grad: bool, elem_bytes: int, ieee: bool = False, a_trans: bool = False) -> tuple:
    """Tiles the pointer kernel takes (fp64 takes FP64_TILE). fp32's dX * act' spills on the 128-row
    tiles: 8 B at 128x128 w8 (TF32, sm_90, Triton 3.6 and 3.9), 32 B at 128x64 w4; that GEMM keeps the
    64-row ones. IEEE fp32 (FMA, no tensor cores) drops two more that spill on sm_90: dW's (``a_trans``:
    A read M-major) 128x64 w4 (24 B, Triton 3.7.1) and dX * act' at 64x64 w4 (8 B, Triton 3.9.0)."""
    def spills(t):
        if elem_bytes != 4:
            return False
        if act_grad and (t[0] == 128 or (ieee and t[:2] == (64, 64))):
            return True
        return ieee and a_trans and t[:2] == (128, 64)
    return tuple(t for t in GEMM_TILES if not spills(t))


#: Tiles of the gated MLP's GEMMs (pointer kernel), by GEMM and operand size; 8-byte operands take
#: FP64_TILE. Chosen by the compile check (sm_80 / sm_90, Triton 3.9; bench/NOTES.md "Gated MLP"):
#: the forward holds two accumulators (gate, up) and the [dG | dU] epilogue three tiles (dH, g, u),
#: so the 4-warp 128-row tiles and 128x128 spill (24-312 B); 128x64 with 8 warps does not. The
#: two-source dX GEMM spilled 8 B at 128x64 w8 (sm_80) and fp32-IEEE's forward at every tile but
#: 64x64 w8.
GATED_TILES = {
    ("gated", 2): ((128, 64, 64, 8, 4), (64, 64, 64, 4, 4)),
    ("gate_grad", 2): ((128, 64, 64, 8, 4), (64, 64, 64, 4, 4)),
    ("two_k", 2): ((64, 128, 64, 8, 4), (64, 64, 64, 4, 4)),
    ("gated", 4): ((64, 64, 64, 8, 4),),
    ("gate_grad", 4): ((64, 64, 64, 8, 4),),
    ("two_k", 4): ((64, 64, 64, 4, 4),),
}


def gated_kind(gated: bool, gate_grad: bool) -> str:
    return "gated" if gated else "gate_grad" if gate_grad else "two_k"


def tma_preferred(a_trans: bool, b_trans: bool, act_grad: bool) -> bool:
    """Where "auto" takes the TMA kernel: the GEMMs it was measured faster on. On an H200 (Triton 3.6,
    bf16, M = 4608, K = 1024, N = 4096; bench/NOTES.md "First GPU measurements"): the forward's layout
    (x @ W^T, W read through its transpose) 391 TFLOP/s against the pointer kernel's 338; dX * act'
    553 only at 128x128, the tile it spills at (the clean 128x64: 318, the pointer kernel: 497); dW
    (A = dH^T) 628 against 633. Unmeasured layouts stay on the pointer kernel."""
    return b_trans and not a_trans and not act_grad


def tma_epilogue_split(act_grad: bool, block_n: int, gate_path: bool = False) -> int:
    """EPILOGUE_SPLIT of the TMA kernel: the dX * act' epilogue on two column halves at 128-wide tiles
    (it reads the aux tile and evaluates act'; whole, it spilled at 128x128), else one pass (the gated
    epilogues have their own code, not split)."""
    return 2 if act_grad and block_n == 128 and not gate_path else 1


def tma_flatten(act_grad: bool, gate_path: bool = False, tf32: bool = False) -> bool:
    """FLATTEN for a GEMM: not in 16 bits, by measurement (session 14's H100 tile sweep, bench/NOTES.md
    "Session 15"): flattened, the forward and dW at LLaVA-1.5 with one image ran 82 and 35 µs at 128x128
    against 31 and 18 µs unflattened (one or two tiles per persistent program), and at 8 images and
    Qwen2.5-VL's merger sizes flattening was 5% slower to 2% faster. TF32 (not in the sweep) keeps
    flattening every GEMM without act', as before: unflattened, its 64x128 forward spilled 8 B on Triton
    3.9. Never with act'
    (flattening holds the next tile's load state live across the epilogue: 255 registers and 8 B of
    spills at 128x64) nor in the gated GEMMs (two accumulators, or two K loops). ``kernel_profile``'s
    sweep times both forms, to be measured again."""
    return tf32 and not act_grad and not gate_path


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _tma_layout(t: torch.Tensor):
    """How TMA reads a 2-D operand view (R, C): False over the view itself (rows contiguous), True over
    its transpose (columns contiguous), None when it cannot (no unit stride, or a base or stride off
    16-byte alignment)."""
    es = t.element_size()
    if t.data_ptr() % 16:
        return None
    if t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0:
        return False
    if t.stride(0) == 1 and (t.stride(1) * es) % 16 == 0:
        return True
    return None


def _tma_operand(t: torch.Tensor, rows_block: int, cols_block: int, transposed: bool):
    """The descriptor of operand view t (R, C) read in (rows_block, cols_block) tiles, over t or, with
    ``transposed`` (``_tma_layout``), over its transpose."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    R, C = t.shape
    if transposed:
        return TensorDescriptor(t, [C, R], [t.stride(1), 1], [cols_block, rows_block])
    return TensorDescriptor(t, [R, C], [t.stride(0), 1], [rows_block, cols_block])


def _wants_tma(a: torch.Tensor) -> bool:
    """16-bit operands, and fp32 with TF32 (wgmma's TF32 form; IEEE fp32 would multiply on CUDA cores
    from shared memory, which spilled 320-5880 B at every tile on sm_90) under MMFUSE_TMA=always only:
    "auto" keeps fp32 on the pointer kernel until a GPU has timed it."""
    if TMA not in TMA_MODES:
        raise ValueError(f"MMFUSE_TMA: expected one of {TMA_MODES}, got {TMA!r}")
    if TMA == "never":
        return False
    if a.element_size() == 4:
        return TMA == "always" and dot_precision(a.dtype) == "tf32"
    if a.element_size() != 2:
        return False
    if TMA == "always":
        return True
    # Compute capability 9.x only: the path is compiled and checked for sm_90, not yet for sm_100.
    return not INTERPRET and a.is_cuda and _capability(a.device)[0] == 9


def _launch_gemm(a, b, c, *, bias=None, aux=None, activation=0,
                 store_aux=False, act_grad=False, a2=None, b2=None, c2=None, bias2=None, aux2=None,
                 gated=False, gate_grad=False):
    """C = epilogue(A @ B) for 2-D views A (M, K), B (K, N), C (M, N). The gated MLP's GEMMs pass
    second operands with the first's strides: ``gated`` (B2, bias2, aux2: C = act(g) * u),
    ``gate_grad`` (aux2, C2: dG and dU), or A2 and B2 alone (C = A @ B + A2 @ B2)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    dummy = c  # never dereferenced when its flag is off
    aux_t = aux if aux is not None else dummy
    two_k = a2 is not None
    outs = (c, bias if bias is not None else dummy, aux_t,
            a2 if two_k else dummy, b2 if b2 is not None else dummy, c2 if c2 is not None else dummy,
            bias2 if bias2 is not None else dummy, aux2 if aux2 is not None else dummy)
    out_strides = (c.stride(0), c.stride(1), aux_t.stride(0), aux_t.stride(1),
                   bias.stride(0) if bias is not None else 0, bias2.stride(0) if bias2 is not None else 0)
    epilogue = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_AUX=store_aux, ACT_GRAD=act_grad,
                    ACC_DTYPE=acc_dtype(a.dtype))
    gate_flags = dict(GATED=gated, GATE_GRAD=gate_grad, TWO_K_SOURCES=two_k)
    flags = dict(epilogue, **gate_flags, INPUT_PRECISION=dot_precision(a.dtype))
    gate_path = gated or gate_grad or two_k  # on TMA only with MMFUSE_TMA=always (not measured there)
    # The pointer kernel's tile set depends on these (``pointer_tiles``); A read M-major is dW's layout
    # (and that of a K <= 1 input, strides (1, 1): it then merely loses IEEE fp32's 128x64).
    ieee, a_m_major = flags["INPUT_PRECISION"] == "ieee", a.stride(0) == 1

    def launch(tile, gpu_tile=True):
        bm, bn, bk, warps, stages = tile
        if gpu_tile:  # a GPU tile: BLOCK_K as the GPU takes it (halved for 4-byte dtypes)
            bk = block_k_for(bk, a.element_size())
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        # EVEN_K from here, not ``triton.heuristics`` (its wrapper costs host time on every launch).
        launch_kernel(fused_gemm_kernel, grid, a, b, *outs, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                      b.stride(1), *out_strides, **flags, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=GROUP_M, num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS)

    # Whether TMA can read every operand, and how (alignment does not depend on the tile); a second
    # operand must be read as its first is (the kernel has one A_TRANS and one B_TRANS).
    layouts_tma = (None, None)
    gate_tiles = tma_gated_tiles(gated_kind(gated, gate_grad), a.element_size()) if gate_path else None
    if K > 0 and _wants_tma(a) and (not gate_path or (TMA == "always" and gate_tiles)):
        layouts_tma = (_tma_layout(a), _tma_layout(b))
        if (two_k and _tma_layout(a2) != layouts_tma[0]) or (b2 is not None and _tma_layout(b2) != layouts_tma[1]):
            layouts_tma = (None, None)
    tma_ok = None not in layouts_tma

    def launch_tma(tile, gpu_tile=True):
        bm, bn, bk, warps, stages = tile
        if gpu_tile:  # as ``launch``: BLOCK_K halved for fp32
            bk = block_k_for(bk, a.element_size())
        a_trans, b_trans = layouts_tma
        programs = TMA_PROGRAMS or num_sms(a.device)
        a_desc, b_desc = _tma_operand(a, bm, bk, a_trans), _tma_operand(b, bk, bn, b_trans)
        a2_desc = _tma_operand(a2, bm, bk, a_trans) if two_k else a_desc  # (the same when unused)
        b2_desc = _tma_operand(b2, bk, bn, b_trans) if b2 is not None else b_desc
        launch_kernel(tma_gemm_kernel, (min(programs, cdiv(M, bm) * cdiv(N, bn)),),
            a_desc, b_desc, *outs[:3], a2_desc, b2_desc, *outs[5:], M, N, K, *out_strides,
            **epilogue, **gate_flags, INPUT_PRECISION=flags["INPUT_PRECISION"], A_TRANS=a_trans, B_TRANS=b_trans,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, NUM_PROGRAMS=programs,
            FLATTEN=tma_flatten(act_grad, gate_path, flags["INPUT_PRECISION"] == "tf32"),
            EPILOGUE_SPLIT=tma_epilogue_split(act_grad, bn, gate_path),
            num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS)

    tma_forced, forced = forced_tile("tma_gemm_kernel"), forced_tile("fused_gemm_kernel")  # tests' GPU tiles
    if tma_forced is not None or forced is not None:
        launch_tma(tma_forced) if tma_forced is not None and tma_ok else launch(tma_forced or forced)
    elif INTERPRET and not gpu_config_on():  # (under gpu_config: the GPU's choice, which is also faster here)
        launch_tma(INTERPRETER_TILE, gpu_tile=False) if tma_ok else launch(INTERPRETER_TILE, gpu_tile=False)
    elif a.element_size() == 8:
        launch(FP64_TILE)
    elif K == 0:
        # An empty reduction (a layer of width 0): the loop runs zero times and the epilogue writes
        # act(bias) or 0 * act'(h), as torch does. Nothing to choose.
        launch(GATED_TILES[gated_kind(gated, gate_grad), a.element_size()][-1] if gate_path else
               pointer_tiles(act_grad, a.element_size(), ieee, a_m_major)[-1])
    else:
        layouts = (a.stride(1) == 1, b.stride(1) == 1, c.stride(1) == 1)
        key = (a.dtype, a.device, *flags.values(), *layouts, a_m_major)
        sms = num_sms(a.device)
        if tma_ok and (TMA == "always" or tma_preferred(*layouts_tma, act_grad)):
            tma_candidates = candidate_tiles(M, N, sms, gate_tiles if gate_path else
                                             tma_tiles(act_grad, a.element_size()))
            launch_tma(TMA_TUNER.choose((M, N, K), key, tma_candidates, launch_tma))
        else:
            tiles = GATED_TILES[gated_kind(gated, gate_grad), a.element_size()] if gate_path else \
                pointer_tiles(act_grad, a.element_size(), ieee, a_m_major)
            candidates = candidate_tiles(M, N, sms, tiles)
            launch(TUNER.choose((M, N, K), key, candidates, launch))


# ----------------------------------------------------------------------------------------------
# Launchers (2-D in, 2-D out)
# ----------------------------------------------------------------------------------------------
def linear_fwd(x, weight, bias=None, activation=None, store_preact=False):
    """y = act(x @ weight^T + bias) for x (M, K), weight (N, K). Returns (y, h or None)."""
    act = ACTIVATIONS[activation]
    M, N = x.shape[0], weight.shape[0]
    y = empty((M, N), dtype=x.dtype, device=x.device)
    h = empty((M, N), dtype=x.dtype, device=x.device) if (store_preact and act) else None
    _launch_gemm(x, weight.t(), y, bias=bias, aux=h, activation=act, store_aux=h is not None)
    return y, h


def act_grad(dy, h, activation):
    """dH = dY * act'(h) (one elementwise pass)."""
    M, N = dy.shape
    dh = empty((M, N), dtype=dy.dtype, device=dy.device)
    if dh.numel():
        bm, bn = ACT_GRAD_BLOCKS[dy.element_size()]
        launch_kernel(act_grad_kernel, (cdiv(M, bm), cdiv(N, bn)),
            dy, h, dh, M, N,
            dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), dh.stride(0), dh.stride(1),
            ACTIVATION=ACTIVATIONS[activation], ACC_DTYPE=acc_dtype(dy.dtype), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=4, num_stages=1, **LAUNCH_OPTIONS,  # as compiled by the compile check (aot_specs)
        )
    return dh


def input_grad(dh, weight, h_prev=None, activation_prev=None):
    """dX = dH @ W; with ``h_prev``, returns the previous layer's dH_prev = dX * act'(h_prev)."""
    M, K = dh.shape[0], weight.shape[1]
    dx = empty((M, K), dtype=dh.dtype, device=dh.device)
    if h_prev is not None:
        _launch_gemm(dh, weight, dx, aux=h_prev, activation=ACTIVATIONS[activation_prev], act_grad=True)
    else:
        _launch_gemm(dh, weight, dx)
    return dx


def weight_grad(dh, x, with_bias: bool):
    """dW = dH^T @ X (one GEMM) and, with ``with_bias``, db = the column sums of dH (one reduction in
    the accumulator type: deterministic, and a read of dH that costs ~1/5 of the GEMM at M = 4608)."""
    N, K = dh.shape[1], x.shape[1]
    dw = empty((N, K), dtype=dh.dtype, device=dh.device)
    if dh.shape[0] == 0:  # no tokens: the sums are empty
        dw.zero_()
    elif K > 0:  # (no input features, a hidden width of 0: dW is empty)
        _launch_gemm(dh.t(), x, dw)
    db = dh.sum(0, dtype=torch.float64 if dh.dtype == torch.float64 else torch.float32).to(dh.dtype) \
        if with_bias else None
    return dw, db


def gated_fwd(x, w_gate, w_up, bias_gate=None, bias_up=None, activation="silu", store_preact=False):
    """h = act(x @ w_gate^T + b_gate) * (x @ w_up^T + b_up) in one GEMM launch (x (M, K), w_* (N, K);
    the biases both given or both None).
    Returns (h, gu): gu (M, 2N) = [g | u], the two pre-activations, when saved for backward."""
    M, N = x.shape[0], w_gate.shape[0]
    if w_up.stride() != w_gate.stride():  # the kernel reads both weights with one set of strides
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    h = empty((M, N), dtype=x.dtype, device=x.device)
    gu = empty((M, 2 * N), dtype=x.dtype, device=x.device) if store_preact else None
    _launch_gemm(x, w_gate.t(), h, bias=bias_gate, b2=w_up.t(), bias2=bias_up,
                 aux=gu[:, :N] if gu is not None else None, aux2=gu[:, N:] if gu is not None else None,
                 activation=ACTIVATIONS[activation], store_aux=gu is not None, gated=True)
    return h, gu


def gate_grad(dy, w_down, gu, activation, gate_half=0):
    """dGU (M, 2N) = [dG | dU] of h = act(g) * u, from dH = dY @ W_down in one GEMM launch. gu and dGU
    hold the gate's columns in half ``gate_half`` (1: [dU | dG], a chunked weight's row order)."""
    M, N = dy.shape[0], w_down.shape[1]
    dgu = empty((M, 2 * N), dtype=dy.dtype, device=dy.device)
    gate, up = (slice(0, N), slice(N, 2 * N)) if gate_half == 0 else (slice(N, 2 * N), slice(0, N))
    _launch_gemm(dy, w_down, dgu[:, gate], c2=dgu[:, up], aux=gu[:, gate], aux2=gu[:, up],
                 activation=ACTIVATIONS[activation], gate_grad=True)
    return dgu


def gated_input_grad(dgu, w_gate, w_up):
    """dX = dG @ W_gate + dU @ W_up: one GEMM over both sources (no concatenated weight)."""
    N = w_gate.shape[0]
    M, K = dgu.shape[0], w_gate.shape[1]
    if w_up.stride() != w_gate.stride():
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    dx = empty((M, K), dtype=dgu.dtype, device=dgu.device)
    _launch_gemm(dgu[:, :N], w_gate, dx, a2=dgu[:, N:], b2=w_up)
    return dx


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_aot.py, `mmfuse report`)
# ----------------------------------------------------------------------------------------------
#: Representative launch: LLaVA-1.5-7B projector, 4 images (M = 4 * 576, K = 1024, N = 4096).
AOT_SHAPE = (4 * 576, 1024, 4096)


def _gemm_layouts(M, K, N, activation="gelu"):
    """(variant, GEMM dims, strides, flags) of the three GEMMs one Linear layer launches."""
    act = ACTIVATIONS[activation]
    return [
        (f"fwd {activation}+bias+aux", (M, N, K),
         dict(stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K, stride_cm=N, stride_cn=1,
              stride_auxm=N, stride_auxn=1),
         dict(ACTIVATION=act, HAS_BIAS=True, STORE_AUX=True, ACT_GRAD=False)),
        (f"dX * {activation}'(h_prev)", (M, K, N),
         dict(stride_am=N, stride_ak=1, stride_bk=K, stride_bn=1, stride_cm=K, stride_cn=1,
              stride_auxm=K, stride_auxn=1),
         dict(ACTIVATION=act, HAS_BIAS=False, STORE_AUX=False, ACT_GRAD=True)),
        ("dW", (N, K, M),
         dict(stride_am=1, stride_ak=N, stride_bk=K, stride_bn=1, stride_cm=K, stride_cn=1,
              stride_auxm=K, stride_auxn=1),
         dict(ACTIVATION=0, HAS_BIAS=False, STORE_AUX=False, ACT_GRAD=False)),
    ]


#: Activations compiled beyond GELU: each is its own constexpr epilogue, so its dX * act' GEMM (the
#: register-heaviest epilogue) and its forward (+aux) are compiled too, in bf16 (what projectors
#: train in); the other dtypes share the code path GELU's specs cover.
EXTRA_AOT_ACTIVATIONS = ("quick_gelu", "silu", "relu", "relu2")


#: The gated MLP's flags, off (every GEMM of a plain Linear / MLP).
NO_GATE = dict(GATED=False, GATE_GRAD=False, TWO_K_SOURCES=False)


def _second_operands(ptr):
    return dict(a2_ptr=ptr, b2_ptr=ptr, c2_ptr=ptr, bias2_ptr=ptr, aux2_ptr=ptr)


def _gated_layouts(M, K, N, activation="silu"):
    """(variant, GEMM dims, strides, flags) of the gated MLP's own GEMMs (x (M, K), gate / up (N, K),
    down (K, N)); its dW GEMMs are plain dW launches ([dG | dU]^T @ X, dY^T @ H)."""
    act = ACTIVATIONS[activation]
    return [
        (f"gated fwd {activation}(g)*u+bias+aux", (M, N, K),
         dict(stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K, stride_cm=N, stride_cn=1,
              stride_auxm=2 * N, stride_auxn=1),
         dict(NO_GATE, ACTIVATION=act, HAS_BIAS=True, STORE_AUX=True, ACT_GRAD=False, GATED=True)),
        (f"[dG | dU] from dY @ W_down ({activation})", (M, N, K),
         dict(stride_am=K, stride_ak=1, stride_bk=N, stride_bn=1, stride_cm=2 * N, stride_cn=1,
              stride_auxm=2 * N, stride_auxn=1),
         dict(NO_GATE, ACTIVATION=act, HAS_BIAS=False, STORE_AUX=False, ACT_GRAD=False, GATE_GRAD=True)),
        ("dX = dG @ W_gate + dU @ W_up", (M, K, N),
         dict(stride_am=2 * N, stride_ak=1, stride_bk=K, stride_bn=1, stride_cm=K, stride_cn=1,
              stride_auxm=K, stride_auxn=1),
         dict(NO_GATE, ACTIVATION=0, HAS_BIAS=False, STORE_AUX=False, ACT_GRAD=False, TWO_K_SOURCES=True)),
    ]


def aot_specs():
    from mmfuse._aot import CompileSpec

    M, K, N = AOT_SHAPE
    layouts = _gemm_layouts(M, K, N)
    # fp16 runs every layout; the other dtypes the forward (the heaviest epilogue).
    plans = [("fp16", "*fp16", "ieee", layouts), ("bf16", "*bf16", "ieee", layouts[:1]),
             ("fp32-tf32", "*fp32", "tf32", layouts[:1]), ("fp32", "*fp32", "ieee", layouts[:1]),
             ("fp64", "*fp64", "ieee", layouts)]
    extra = [_gemm_layouts(M, K, N, act)[:2] for act in EXTRA_AOT_ACTIVATIONS]
    extra_dx = ("bf16", "*bf16", "ieee", [dx for _, dx in extra])
    extra_fwd = ("bf16", "*bf16", "ieee", [fwd for fwd, _ in extra])
    specs = []
    for bm, bn, bk, warps, stages in dict.fromkeys(GEMM_TILES + (FP64_TILE,)):
        # The new activations' dX * act' on every tile (the epilogue nearest 255 registers); their
        # forward on the 128-row tiles only (the 64-row ones sit far below the limit: bench/NOTES.md).
        # The backward GEMMs of bf16 on the largest tile, the one nearest the register limit (bf16 and
        # fp16 take the same tiles and constexprs: fp16's specs cover the smaller ones). fp32 (TF32 and
        # IEEE: other instructions, other register use) on every tile the launcher takes for its dW
        # and dX * act' (``pointer_tiles``: IEEE drops the ones that spill).
        bwd_other = [("bf16", "*bf16", "ieee", layouts[1:])] if (bm, bn) == (128, 128) else []
        tile = (bm, bn, bk, warps, stages)
        bwd_other += [(name, "*fp32", prec, ([layouts[2]] if tile in pointer_tiles(False, 4, prec == "ieee", True)
                                             else []) +
                       ([layouts[1]] if tile in pointer_tiles(True, 4, prec == "ieee") else []))
                      for name, prec in (("fp32-tf32", "tf32"), ("fp32", "ieee"))]
        tile_plans = plans + bwd_other + [extra_dx] + ([extra_fwd] if bm == 128 else [])
        # fp64 on its own tile only, and that tile only for fp64
        is_fp64_tile = (bm, bn, bk, warps, stages) == FP64_TILE
        tile_plans = [p for p in tile_plans if (p[0] == "fp64") == is_fp64_tile]
        for dtype, ptr, precision, lays in tile_plans:
            elem = {"*fp32": 4, "*fp64": 8}.get(ptr, 2)
            for variant, (gm, gn, gk), strides, flags in lays:
                block_k = block_k_for(bk, elem)
                args = dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, bias_ptr=ptr, aux_ptr=ptr, **_second_operands(ptr),
                            M=gm, N=gn, K=gk, **strides, stride_bias=1, stride_bias2=1)
                cx = dict(NO_GATE, **flags, INPUT_PRECISION=precision, ACC_DTYPE=tl.float64 if elem == 8 else tl.float32,
                          BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=block_k, GROUP_M=GROUP_M, EVEN_K=gk % block_k == 0)
                specs.append(CompileSpec(
                    kernel="linear/fused_gemm_kernel", variant=variant, dtype=dtype,
                    config=f"{bm}x{bn}x{block_k} w{warps} s{stages}", fn=fused_gemm_kernel,
                    args=tuple(args.items()), constexprs=tuple(cx.items()), num_warps=warps,
                    num_stages=stages, tensor_cores=precision == "tf32" or elem != 4,
                    sm90_instr="mma.sync" if elem == 8 else "wgmma",  # fp64: DMMA, no wgmma form
                    # wgmma's TF32 form reads K-major operands only, and dW's are both MN-major (the
                    # tokens are its reduction): Triton stages them with narrow loads on sm_90. A cost
                    # of fp32 training on Hopper, found by the compile check, not yet timed.
                    wide_load_archs=(80,) if (precision == "tf32" and strides["stride_am"] == 1) else (80, 90)))
    # The Hopper kernel (sm_90 only): the three GEMMs of a layer in fp16 and in fp32 with TF32, the
    # forward in bf16, on every tile it takes (``tma_tiles``). Operand layouts as the launcher builds
    # them: the forward's B (W^T) and dW's A (dH^T) are read through descriptors over their transposes.
    tma_plans = [("fp16", "fp16", layouts), ("bf16", "bf16", layouts[:1]), ("fp32-tf32", "fp32", layouts)]
    # The gated MLP's GEMMs on the same kernel (MMFUSE_TMA=always), fp16 and TF32, on their tiles.
    tma_jobs = [(tile, dtype, ty, lay) for tile in GEMM_TILES for dtype, ty, lays in tma_plans for lay in lays
                if tile in tma_tiles(lay[3]["ACT_GRAD"], 4 if ty == "fp32" else 2)]
    tma_jobs += [(tile, dtype, ty, lay) for dtype, ty in (("fp16", "fp16"), ("fp32-tf32", "fp32"))
                 for lay, kind in zip(_gated_layouts(M, K, N), ("gated", "gate_grad", "two_k"))
                 for tile in tma_gated_tiles(kind, 4 if ty == "fp32" else 2)]
    for (bm, bn, bk, warps, stages), dtype, ty, (variant, (gm, gn, gk), strides, flags) in tma_jobs:
        bk = block_k_for(bk, 4 if ty == "fp32" else 2)
        flags = dict(NO_GATE, **flags)
        gate_path = flags["GATED"] or flags["GATE_GRAD"] or flags["TWO_K_SOURCES"]
        a_trans, b_trans = strides["stride_am"] == 1, strides["stride_bn"] != 1
        a_block = [bk, bm] if a_trans else [bm, bk]
        b_block = [bn, bk] if b_trans else [bk, bn]
        a_desc = f"tensordesc<{ty}[{a_block[0]}, {a_block[1]}]>"
        b_desc = f"tensordesc<{ty}[{b_block[0]}, {b_block[1]}]>"
        args = dict(a_desc=a_desc, b_desc=b_desc, c_ptr=f"*{ty}", bias_ptr=f"*{ty}", aux_ptr=f"*{ty}",
                    a2_desc=a_desc, b2_desc=b_desc, c2_ptr=f"*{ty}", bias2_ptr=f"*{ty}", aux2_ptr=f"*{ty}",
                    M=gm, N=gn, K=gk, stride_cm=strides["stride_cm"], stride_cn=1,
                    stride_auxm=strides["stride_auxm"], stride_auxn=1, stride_bias=1,
                    stride_bias2=1 if flags["GATED"] else 0)
        cx = dict(flags, ACC_DTYPE=tl.float32, A_TRANS=a_trans, B_TRANS=b_trans, BLOCK_M=bm,
                  BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, NUM_PROGRAMS=132,
                  FLATTEN=tma_flatten(flags["ACT_GRAD"], gate_path, ty == "fp32"),
                  EPILOGUE_SPLIT=tma_epilogue_split(flags["ACT_GRAD"], bn, gate_path))
        cx["INPUT_PRECISION"] = "tf32" if ty == "fp32" else "ieee"  # (16-bit operands ignore it)
        specs.append(CompileSpec(
            kernel="linear/tma_gemm_kernel", variant=variant, dtype=dtype,
            config=f"{bm}x{bn}x{bk} w{warps} s{stages}", fn=tma_gemm_kernel,
            args=tuple(args.items()), constexprs=tuple(cx.items()), num_warps=warps,
            num_stages=stages, archs=(90,)))
    # The gated MLP's three GEMMs on every tile they take: bf16 for the 2-byte dtypes (fp16 is the
    # same code), TF32 and IEEE fp32 for the 4-byte ones, fp64 (gradcheck) on its tile.
    for (variant, (gm, gn, gk), strides, flags), kind in zip(_gated_layouts(M, K, N), ("gated", "gate_grad", "two_k")):
        for dtype, ptr, precision in (("bf16", "*bf16", "ieee"), ("fp32-tf32", "*fp32", "tf32"),
                                      ("fp32", "*fp32", "ieee"), ("fp64", "*fp64", "ieee")):
            elem = {"*fp32": 4, "*fp64": 8}.get(ptr, 2)
            for bm, bn, bk, warps, stages in (GATED_TILES[kind, elem] if elem < 8 else (FP64_TILE,)):
                block_k = block_k_for(bk, elem)
                args = dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, bias_ptr=ptr, aux_ptr=ptr, **_second_operands(ptr),
                            M=gm, N=gn, K=gk, **strides, stride_bias=1, stride_bias2=1)
                cx = dict(flags, INPUT_PRECISION=precision, ACC_DTYPE=tl.float64 if elem == 8 else tl.float32,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=GROUP_M, EVEN_K=gk % block_k == 0)
                specs.append(CompileSpec(
                    kernel="linear/fused_gemm_kernel", variant=variant, dtype=dtype,
                    config=f"{bm}x{bn}x{block_k} w{warps} s{stages}", fn=fused_gemm_kernel,
                    args=tuple(args.items()), constexprs=tuple(cx.items()), num_warps=warps,
                    num_stages=stages, tensor_cores=precision == "tf32" or elem != 4,
                    sm90_instr="mma.sync" if elem == 8 else "wgmma"))
    for dtype, ptr, elem in (("fp16", "*fp16", 2), ("bf16", "*bf16", 2), ("fp32", "*fp32", 4), ("fp64", "*fp64", 8)):
        bm, bn = ACT_GRAD_BLOCKS[elem]
        args = dict(dy_ptr=ptr, h_ptr=ptr, dh_ptr=ptr, M=M, N=N, stride_dym=N, stride_dyn=1,
                    stride_hm=N, stride_hn=1, stride_dhm=N, stride_dhn=1)
        cx = dict(ACTIVATION=1, ACC_DTYPE=tl.float64 if elem == 8 else tl.float32, BLOCK_M=bm, BLOCK_N=bn)
        specs.append(CompileSpec(
            kernel="linear/act_grad_kernel", variant="dY * gelu'(h)", dtype=dtype, config=f"{bm}x{bn} w4",
            fn=act_grad_kernel, args=tuple(args.items()), constexprs=tuple(cx.items()), num_warps=4,
            num_stages=1, tensor_cores=False))
    return specs
