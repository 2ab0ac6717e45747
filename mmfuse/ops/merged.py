"""Merged projector: a norm and a token merge read inside the first GEMM, then an MLP chain.

``merged_mlp(x, weights, ...)`` = ``mlp(norm_merge(x), weights, biases, activation)`` where x (T, C)
holds the vision tower's tokens and norm_merge (kernels/merged_gemm.py) gathers G tokens per merged
row (a (M, G) token table, or G adjacent rows without one) and normalises (LayerNorm / RMSNorm) each
source token (pre-merge) or each merged row (post-merge). Below the sizes named next the forward does
not materialise the merged, normalised operand: the first GEMM reads x through the table and
normalises in its loads (an RMSNorm from FOLD_MIN_ROWS merged rows: its gamma folded into the first
weight, rstd on the accumulator). Large GEMMs (``KM.written_forward_applies``: the Qwen2.5-VL merger,
InternVL's mlp1 at batch 8) instead write the normalised operand once and run the first GEMM unmapped,
which an H100 measured faster.

Launches: forward 1 (norm statistics; with the written operand the same launch writes it, except a norm
per token through a table: 2) + one GEMM per layer; backward per layer dW, db (a reduction),
dX (act' in its epilogue), the first layer's dW reading x through the table again (with a norm, from
FOLD_MIN_ROWS merged rows: the normalised operand written once by one row-wise launch, then an unmapped
GEMM), its dX stored back through the table (a permutation store), and one row-wise norm backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mmfuse._checks import check_choice, check_like, check_size, check_tensor
from mmfuse._dispatch import REFERENCE, autocast_inputs, backend_for, call_op, custom_op, register_autograd
from mmfuse.kernels import linear as KL
from mmfuse.kernels import merged_gemm as KM
from mmfuse.ops.linear import (ACTIVATION_NAMES, GATE_ACTIVATIONS, _acc_sum_rows, _check_layer, _needs_grad, _nothing,
                               apply_activation_reference, mlp, mlp_reference)

NORM_NAMES = (None, "layer", "rms")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _norm_reference(x, norm, weight, bias, eps, weight_offset=0.0):
    if weight_offset:  # Gemma 3's RMSNorm: (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, cast once
        x32 = x.float() if x.dtype != torch.float64 else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) if norm == "rms" else \
            F.layer_norm(x32, x.shape[-1:], None, None, eps)
        y = y * (weight_offset + weight.to(x32.dtype))
        return (y + bias.to(x32.dtype) if norm == "layer" else y).to(x.dtype)
    if norm == "layer":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    # RMSNorm as transformers writes it (Qwen2RMSNorm / T5LayerNorm), in the input's dtype at the end
    x32 = x.float() if x.dtype != torch.float64 else x
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def norm_merge_reference(x, group, token_map=None, norm=None, norm_weight=None, norm_bias=None, eps=1e-6,
                         norm_after_merge=False, pool=False, norm_weight_offset=0.0):
    """The merged operand in plain PyTorch: (M, group * C), or (M, C) pooled."""
    C = x.shape[-1]
    if pool:  # AvgPool2d's result: an fp32 mean rounded to x's dtype, then the norm over it
        rows = x[token_map.long()] if token_map is not None else x.reshape(-1, group, C)
        acc = rows.double() if x.dtype == torch.float64 else rows.float()
        pooled = acc.mean(1).to(x.dtype)
        return _norm_reference(pooled, norm, norm_weight, norm_bias, eps, norm_weight_offset) if norm else pooled
    if norm is not None and not norm_after_merge:
        x = _norm_reference(x, norm, norm_weight, norm_bias, eps)
    merged = (x[token_map.long()] if token_map is not None else x.reshape(-1, group, C)).reshape(-1, group * C)
    if norm is not None and norm_after_merge:
        merged = _norm_reference(merged, norm, norm_weight, norm_bias, eps)
    return merged


def merged_mlp_reference(x, weights, biases=None, activation="gelu", *, group, token_map=None, norm=None,
                         norm_weight=None, norm_bias=None, eps=1e-6, norm_after_merge=False, gate_half=None,
                         pool=False, norm_weight_offset=0.0, final_activation=False):
    a = norm_merge_reference(x, group, token_map, norm, norm_weight, norm_bias, eps, norm_after_merge, pool,
                             norm_weight_offset)
    if gate_half is None:
        y = mlp_reference(a, weights, biases, activation)
        return apply_activation_reference(y, activation) if final_activation else y
    # Aya Vision's SwiGLU on one chunked weight: `x, gate = linear_1(a).chunk(2)` is gate_half 1.
    biases = biases if biases is not None else [None, None]
    halves = F.linear(a, weights[0], biases[0]).chunk(2, dim=-1)
    h = apply_activation_reference(halves[gate_half], activation) * halves[1 - gate_half]
    return F.linear(h, weights[1], biases[1])


# ----------------------------------------------------------------------------------------------
# Custom operators
# ----------------------------------------------------------------------------------------------
@custom_op("mmfuse::merged_mlp_fwd", mutates_args=())
def merged_mlp_fwd_op(x: torch.Tensor, token_map: torch.Tensor, has_map: bool, group: int, norm: str | None,
                      gamma: torch.Tensor, beta: torch.Tensor, eps: float, post: bool, weights: list[torch.Tensor],
                      biases: list[torch.Tensor], has_bias: list[bool], activation: str | None, save: bool,
                      gate_half: int, final_act: bool,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(y, stats, hidden, preacts): stats the norm's (mean, rstd) per normalised row (empty without a
    norm); hidden / preacts as ``mlp_fwd_op`` saves them (empty lists when not saving). gate_half >= 0:
    the first layer is gated (two weights; its preact is [g | u] in the weight's row order). final_act:
    the activation follows the last layer too (in its epilogue; its preact saved as well)."""
    merge = KM.Merge(x, group, token_map if has_map else None, norm, post, gamma if norm else None,
                     beta if norm == "layer" else None, eps)
    # Large GEMMs: the merged, normalised operand written once, the first GEMM unmapped (measured faster).
    written = KM.written_forward_applies(merge, weights[0].shape[0], gated=gate_half >= 0)
    rows_stats = written and KM.rows_take_stats(merge)  # statistics and operand in one launch
    if norm is not None and not rows_stats:
        # An RMSNorm's gamma folded into the first weight in the same launch, where that is faster.
        fold = not written and KM.fold_applies(merge, gated=gate_half >= 0)
        KM.norm_stats(merge, fold=weights[0] if fold else None)
    n = len(weights)
    biases = [b if hb else None for b, hb in zip(biases, has_bias)]
    act0 = activation if n > 1 or final_act else None
    if written:
        y, h = KL.linear_fwd(KM.normalised_rows(merge, stats=rows_stats), weights[0], biases[0], act0,
                             store_preact=save)
    elif gate_half >= 0:
        y, h = KM.mapped_gated_fwd(merge, weights[0], gate_half, biases[0], KL.ACTIVATIONS[act0],
                                   store_preact=save)
    else:
        y, h = KM.mapped_fwd(merge, weights[0], biases[0], KL.ACTIVATIONS[act0], store_preact=save)
    inputs, preacts = [y], [h if h is not None else _nothing(x)]
    for i in range(1, n):
        act = activation if (i < n - 1 or final_act) and gate_half < 0 else None
        y, h = KL.linear_fwd(inputs[-1], weights[i], biases[i], act, store_preact=save)
        inputs.append(y)
        preacts.append(h if h is not None else _nothing(x))
    stats = merge.stats if merge.stats is not None else _nothing(x)
    if not save:
        return inputs[-1], stats, [], []
    return inputs[-1], stats, inputs[:-1], preacts if final_act else preacts[:-1]


@merged_mlp_fwd_op.register_fake
def _(x, token_map, has_map, group, norm, gamma, beta, eps, post, weights, biases, has_bias, activation, save,
      gate_half, final_act):
    M = token_map.shape[0] if has_map else x.shape[0] // group
    y = x.new_empty(M, weights[-1].shape[0])
    rows = M if post else x.shape[0]
    stats = x.new_empty(rows, 2, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) if norm \
        else x.new_empty(0)
    if not save:
        return y, stats, [], []
    if gate_half >= 0:
        return y, stats, [x.new_empty(M, weights[0].shape[0] // 2)], [x.new_empty(M, weights[0].shape[0])]
    return y, stats, [x.new_empty(M, w.shape[0]) for w in weights[:-1]], \
        [x.new_empty(M, w.shape[0]) if activation else x.new_empty(0) for w in (weights if final_act else weights[:-1])]


@custom_op("mmfuse::merged_mlp_bwd", mutates_args=())
def merged_mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, token_map: torch.Tensor, has_map: bool, group: int,
                      norm: str | None, gamma: torch.Tensor, beta: torch.Tensor, eps: float, post: bool,
                      stats: torch.Tensor, hidden: list[torch.Tensor], weights: list[torch.Tensor],
                      preacts: list[torch.Tensor], activation: str | None, need_x: bool, need_gamma: bool,
                      need_beta: bool, need_w: list[bool], need_b: list[bool], gate_half: int, final_act: bool,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, dgamma, dbeta, dW_i, db_i). Gated (gate_half >= 0): the down layer's dH becomes [dG | dU] in
    the first weight's row order (one GEMM, the gate product's derivative in its epilogue), which the
    first layer's dW, db and dA GEMMs read as one (M, 2N) operand."""
    merge = KM.Merge(x, group, token_map if has_map else None, norm, post, gamma if norm else None,
                     beta if norm == "layer" else None, eps)
    merge.stats = stats if norm else None
    n = len(weights)
    dws, dbs = [_nothing(x) for _ in range(n)], [_nothing(x) for _ in range(n)]
    dh = KL.act_grad(dy, preacts[n - 1], activation) if final_act else dy
    for i in reversed(range(1, n)):
        if need_w[i]:
            dws[i], db = KL.weight_grad(dh, hidden[i - 1], with_bias=need_b[i])
            dbs[i] = db if need_b[i] else dbs[i]
        elif need_b[i]:
            dbs[i] = _acc_sum_rows(dh)
        if gate_half >= 0:
            dh = KL.gate_grad(dh, weights[i], preacts[0], activation, gate_half)
        elif activation is None:
            dh = KL.input_grad(dh, weights[i])
        else:
            dh = KL.input_grad(dh, weights[i], h_prev=preacts[i - 1], activation_prev=activation)
    if need_w[0]:
        if KM.materialise_applies(merge):  # the normalised operand written once: dW unmapped
            dws[0], _ = KL.weight_grad(dh, KM.normalised_rows(merge), with_bias=False)
        else:
            dws[0] = KM.mapped_weight_grad(dh, merge)
    if need_b[0]:
        dbs[0] = _acc_sum_rows(dh)
    dx, dgamma, dbeta = _nothing(x), _nothing(x), _nothing(x)
    if need_x or need_gamma or need_beta:
        da = KM.mapped_input_grad(dh, weights[0], merge)
        if norm is None:
            dx = da
        else:
            dx_n, dgamma_n, dbeta_n = KM.norm_bwd(da, merge)
            dx = dx_n if need_x else dx
            dgamma = dgamma_n if need_gamma else dgamma
            dbeta = dbeta_n if (need_beta and dbeta_n is not None) else dbeta
    return dx, dgamma, dbeta, dws, dbs


@merged_mlp_bwd_op.register_fake
def _(dy, x, token_map, has_map, group, norm, gamma, beta, eps, post, stats, hidden, weights, preacts, activation,
      need_x, need_gamma, need_beta, need_w, need_b, gate_half, final_act):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), gamma.new_empty(gamma.shape) if need_gamma
            else x.new_empty(0), beta.new_empty(beta.shape) if need_beta else x.new_empty(0),
            [w.new_empty(w.shape) if nw else x.new_empty(0) for w, nw in zip(weights, need_w)],
            [w.new_empty(w.shape[:1]) if nb else x.new_empty(0) for w, nb in zip(weights, need_b)])


def _merged_setup(ctx, inputs, output):
    (x, token_map, has_map, group, norm, gamma, beta, eps, post, weights, biases, has_bias, activation, _, gate_half,
     final_act) = inputs
    ctx.set_materialize_grads(False)
    ctx.meta = (has_map, group, norm, eps, post, activation, len(weights), gate_half, final_act)
    ctx.needs = (x.requires_grad, norm is not None and gamma.requires_grad,
                 norm == "layer" and beta.requires_grad, [w.requires_grad for w in weights],
                 [hb and b.requires_grad for b, hb in zip(biases, has_bias)])
    _, stats, hidden, preacts = output
    ctx.save_for_backward(x, token_map, gamma, beta, stats, *hidden, *weights, *preacts)


def _merged_backward(ctx, dy, _stats, _hidden, _preacts):
    has_map, group, norm, eps, post, activation, n, gate_half, final_act = ctx.meta
    if dy is None:  # no gradient reaches y: none for any input (a list per list input)
        return (None,) * 9 + ([None] * n, [None] * n) + (None,) * 5
    saved = ctx.saved_tensors
    x, token_map, gamma, beta, stats = saved[:5]
    rest = saved[5:]
    hidden, weights, preacts = list(rest[:n - 1]), list(rest[n - 1:2 * n - 1]), list(rest[2 * n - 1:])
    need_x, need_gamma, need_beta, need_w, need_b = ctx.needs
    dx, dgamma, dbeta, dws, dbs = call_op(
        merged_mlp_bwd_op, dy, x, token_map, has_map, group, norm, gamma, beta, eps, post, stats, hidden, weights,
        preacts, activation, need_x, need_gamma, need_beta, need_w, need_b, gate_half, final_act)
    return (dx if need_x else None, None, None, None, None, dgamma if need_gamma else None,
            dbeta if need_beta else None, None, None, [g if nw else None for g, nw in zip(dws, need_w)],
            [g if nb else None for g, nb in zip(dbs, need_b)], None, None, None, None, None)


register_autograd(merged_mlp_fwd_op, _merged_backward, _merged_setup)


# Average pooling (Gemma 3): a row-wise kernel, then the MLP's GEMMs on its (M, C) output
@custom_op("mmfuse::pool_norm_fwd", mutates_args=())
def pool_norm_fwd_op(x: torch.Tensor, token_map: torch.Tensor, group: int, norm: str | None, gamma: torch.Tensor,
                     beta: torch.Tensor, eps: float, gamma_shift: float, save: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pooled, stats): pooled and stats for the backward (empty without a norm or ``save``)."""
    out, pooled, stats = KM.pool_norm_fwd(x, token_map, group, norm, gamma if norm else None,
                                          beta if norm == "layer" else None, eps, gamma_shift, save)
    return out, pooled if pooled is not None else _nothing(x), stats if (stats is not None and save) else _nothing(x)


@pool_norm_fwd_op.register_fake
def _(x, token_map, group, norm, gamma, beta, eps, gamma_shift, save):
    M, C = token_map.shape[0], x.shape[1]
    keep = norm is not None and save
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(M, C), x.new_empty(M, C) if keep else x.new_empty(0), \
        x.new_empty(M, 2, dtype=acc) if keep else x.new_empty(0)


@custom_op("mmfuse::pool_norm_bwd", mutates_args=())
def pool_norm_bwd_op(da: torch.Tensor, token_map: torch.Tensor, tokens: int, group: int, norm: str | None,
                     gamma: torch.Tensor, pooled: torch.Tensor, stats: torch.Tensor, gamma_shift: float,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta): dgamma / dbeta empty where the norm has none."""
    dx, dgamma, dbeta = KM.pool_norm_bwd(da, tokens, token_map, group, norm, gamma if norm else None,
                                         pooled, stats, gamma_shift)
    return dx, dgamma if dgamma is not None else _nothing(da), dbeta if dbeta is not None else _nothing(da)


@pool_norm_bwd_op.register_fake
def _(da, token_map, tokens, group, norm, gamma, pooled, stats, gamma_shift):
    return (da.new_empty(tokens, da.shape[1]), gamma.new_empty(gamma.shape) if norm else da.new_empty(0),
            gamma.new_empty(gamma.shape) if norm == "layer" else da.new_empty(0))


def _pool_setup(ctx, inputs, output):
    x, token_map, group, norm, gamma, beta, eps, gamma_shift, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.meta = (x.shape[0], group, norm, gamma_shift)
    ctx.needs = (x.requires_grad, norm is not None and gamma.requires_grad, norm == "layer" and beta.requires_grad)
    _, pooled, stats = output
    ctx.save_for_backward(token_map, gamma, pooled, stats)


def _pool_backward(ctx, dout, _pooled, _stats):
    need_x, need_gamma, need_beta = ctx.needs
    if dout is None:
        return (None,) * 9
    tokens, group, norm, gamma_shift = ctx.meta
    token_map, gamma, pooled, stats = ctx.saved_tensors
    dx, dgamma, dbeta = call_op(pool_norm_bwd_op, dout, token_map, tokens, group, norm, gamma, pooled, stats,
                                gamma_shift)
    return (dx if need_x else None, None, None, None, dgamma if need_gamma else None,
            dbeta if need_beta else None, None, None, None)


register_autograd(pool_norm_fwd_op, _pool_backward, _pool_setup)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _token_values_ok(token_map: torch.Tensor, T: int) -> torch.Tensor:
    """A 0-dim bool tensor on token_map's device: every entry in [0, T) and no token twice. Nine small
    kernels with the assert below and no host synchronisation (the previous form took 13 ATen ops: 247 µs
    of host time per call on an H100's host, bench/NOTES.md "Fifth GPU session")."""
    flat = token_map.reshape(-1)
    # counts[i + 1] counts token i. Slots 0 and T + 1 catch every index below 0 and from T on, and start at
    # 1: any stray index or repeated token then makes some count 2, so one maximum decides.
    counts = torch.zeros(T + 2, dtype=torch.int32, device=flat.device)
    counts[::T + 1].fill_(1)
    slots = (flat + 1).clamp_(0, T + 1)  # (an int32 entry of 2^31 - 1 wraps negative: slot 0, still caught)
    counts.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
    return counts.amax() <= 1


def _check_token_values(token_map: torch.Tensor, T: int) -> None:
    """Every entry in [0, T) and no token twice (the backward's permutation store writes each token's
    gradient once). On CPU a ValueError naming the fault; on a GPU a device-side assert, so the check
    never synchronises with the host."""
    if token_map.device.type == "cpu":
        flat = token_map.reshape(-1).long()
        in_range = (flat >= 0) & (flat < T)
        if not bool(in_range.all()):
            bad = flat[~in_range][0].item()
            raise ValueError(f"token_map: expected token indices in [0, {T}) (the rows of x), got {bad}")
        if flat.numel() and int(torch.bincount(flat, minlength=T).max()) > 1:
            raise ValueError("token_map: expected each token at most once, got a repeated token")
        return
    torch._assert_async(_token_values_ok(token_map, T),
                        "token_map: expected token indices in [0, T), each at most once")


def merged_mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None,
               activation: str | None = "gelu", *, group: int, token_map: torch.Tensor | None = None,
               norm: str | None = None, norm_weight: torch.Tensor | None = None,
               norm_bias: torch.Tensor | None = None, eps: float = 1e-6, norm_after_merge: bool = False,
               gate_half: int | None = None, pool: bool = False, norm_weight_offset: float = 0.0,
               final_activation: bool = False, _table_checked: bool = False) -> torch.Tensor:
    """``mlp(norm_merge(x), weights, biases, activation)`` with the merge and the norm read inside the
    first GEMM (not materialised in the forward, except where the GEMM is large enough that writing it
    once is faster: ``KM.written_forward_applies``, ``MMFUSE_MERGED_FORWARD``; the backward writes the
    normalised operand once for its dW from FOLD_MIN_ROWS merged rows).

    x (T, C): the vision tower's tokens. Merged row m is ``group`` tokens side by side (group * C =
    weights[0].shape[1]): tokens ``token_map[m, 0..group-1]`` (an (M, group) integer tensor, each token
    at most once: pixel shuffle / unshuffle orders), or without a table tokens m*group .. m*group +
    group - 1 (Qwen's 2x2 merge, T divisible by group). norm: None, "layer" (``norm_weight``,
    ``norm_bias``) or "rms" (``norm_weight``), over each token's C channels, or over the merged row's
    group * C with ``norm_after_merge``; ``eps`` as the module's. Table entries out of range or
    repeated raise (on a GPU: a device-side assert, no host synchronisation).

    ``gate_half`` (0 or 1) makes it a gated MLP on one chunked weight (Aya Vision, Command A): exactly
    two weights, weights[0] (2N, K) whose half ``gate_half`` is the gate, ``h = act(gate) * up`` in the
    first GEMM's epilogue (activation: the gate's), then ``weights[1]`` (D, N). transformers' ``x, gate
    = linear_1(a).chunk(2, dim=-1)`` is gate_half=1.

    ``pool=True``: merged row m is the *mean* of its tokens (average pooling: Gemma 3's AvgPool2d over
    the patch grid), C wide, rounded to x's dtype as AvgPool2d returns it, and the norm (if any) is over
    it (``norm_after_merge`` must then be True). This form runs as one row-wise kernel (pool and norm)
    whose (M, C) output the MLP's GEMMs read: with group tokens per row, gathering inside the GEMM would
    load every token once per output-column tile, group times the bytes of a pooled operand
    (bench/NOTES.md "Average pooling"). ``norm_weight_offset``: the norm scales by ``offset + weight``
    in fp32 (Gemma's RMSNorm: 1.0); pooled form only. ``final_activation``: ``activation`` follows the last
    Linear too (Llama 4's vision adapter), in its epilogue.
    """
    check_tensor("x", x, ndim=2)
    if isinstance(weights, torch.Tensor) or not hasattr(weights, "__iter__"):
        raise ValueError(f"weights: expected a non-empty sequence of 2-D tensors, got {type(weights).__name__}")
    weights = list(weights)  # (any iterable: a generator too)
    if not weights:
        raise ValueError("weights: expected a non-empty sequence of 2-D tensors, got one of length 0")
    final_activation = bool(final_activation) and activation is not None  # (no activation: nothing to add)
    if final_activation and (pool or gate_half is not None):
        raise ValueError("final_activation: expected False with pool=True or gate_half (not implemented there)")
    if pool:
        if gate_half is not None:
            raise ValueError("gate_half: expected None with pool=True (a pooled gated MLP is not implemented)")
        if norm is not None and not norm_after_merge:
            raise ValueError("norm_after_merge: expected True with pool=True and a norm (the norm is over the "
                             "pooled row), got False")
    elif norm_weight_offset:
        raise ValueError(f"norm_weight_offset: expected 0.0 without pool=True, got {norm_weight_offset!r}")
    if gate_half is not None:
        check_choice("gate_half", gate_half, (0, 1))
        check_choice("activation", activation, GATE_ACTIVATIONS)
        if isinstance(weights, torch.Tensor) or len(weights) != 2:
            raise ValueError("weights: expected two weights with gate_half (the chunked gate/up weight, the down "
                             f"weight), got {1 if isinstance(weights, torch.Tensor) else len(weights)}")
        if weights[0].dim() == 2 and weights[0].shape[0] % 2:
            raise ValueError("weights[0]: expected an even shape[0] with gate_half (gate and up halves), got "
                             f"{weights[0].shape[0]}")
    check_choice("activation", activation, ACTIVATION_NAMES)
    check_choice("norm", norm, NORM_NAMES)
    if norm != "layer" and norm_bias is not None:  # (an RMSNorm has no bias: silently dropping it would hide a bug)
        raise ValueError(f"norm_bias: expected None with norm={norm!r} (only a LayerNorm has a bias), got a tensor")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group: expected a positive int, got {group!r}")
    biases = list(biases) if biases is not None else [None] * len(weights)
    check_size("biases", "len(biases) (one per weight)", len(biases), len(weights))
    T, C = x.shape
    if token_map is not None:
        check_tensor("token_map", token_map, ndim=2, floating=False)
        if token_map.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token_map: expected an int32 or int64 tensor, got {token_map.dtype}")
        check_size("token_map", "shape[1] (group)", token_map.shape[1], group)
        if token_map.device != x.device:
            raise ValueError(f"token_map: expected device {x.device} (the device of x), got {token_map.device}")
        if not _table_checked:  # (the registry's tables are built from the module's own merge)
            _check_token_values(token_map, T)
    elif T % group:
        raise ValueError(f"x: expected a token count divisible by group == {group} (no token_map), got {T}")
    width = C if pool else group * C
    if norm is not None:
        norm_width = width if norm_after_merge else C
        check_tensor("norm_weight", norm_weight, ndim=1)
        check_like("norm_weight", norm_weight, "x", x)
        check_size("norm_weight", "shape[0] (the normalised width)", norm_weight.shape[0], norm_width)
        if norm == "layer":
            check_tensor("norm_bias", norm_bias, ndim=1)
            check_like("norm_bias", norm_bias, "x", x)
            check_size("norm_bias", "shape[0] (the normalised width)", norm_bias.shape[0], norm_width)
    def in_features(i, ws):
        return width if i == 0 else ws[i - 1].shape[0] // (2 if i == 1 and gate_half is not None else 1)

    if backend_for(x) == REFERENCE:
        for i, (w, b) in enumerate(zip(weights, biases)):
            _check_layer(x, w, b, in_features(i, weights), f"weights[{i}]", f"biases[{i}]")
        return merged_mlp_reference(x, weights, biases, activation, group=group, token_map=token_map, norm=norm,
                                    norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                                    norm_after_merge=norm_after_merge, gate_half=gate_half, pool=pool,
                                    norm_weight_offset=norm_weight_offset, final_activation=final_activation)
    if pool:
        return _pooled_mlp(x, weights, biases, activation, group, token_map, norm, norm_weight, norm_bias, eps,
                           norm_weight_offset)
    n = len(weights)
    x, *params = autocast_inputs(x, *weights, *biases)
    weights, biases = params[:n], params[n:]
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_layer(x, w, b, in_features(i, weights), wname=f"weights[{i}]", bname=f"biases[{i}]")
    # The kernels read the (small) table row-major: an int32, contiguous copy unless it is one already.
    tmap = token_map.to(torch.int32).contiguous() if token_map is not None \
        else x.new_empty((0, group), dtype=torch.int32)
    gamma = norm_weight if norm is not None else x.new_empty(0)
    beta = norm_bias if norm == "layer" else x.new_empty(0)
    has_bias = [b is not None for b in biases]
    placeholders = [b if b is not None else _nothing(x) for b in biases]
    y, _, _, _ = call_op(merged_mlp_fwd_op, x, tmap, token_map is not None, group, norm, gamma, beta, float(eps),
                                   norm_after_merge, weights, placeholders, has_bias, activation,
                                   _needs_grad(x, gamma if norm else None, beta if norm == "layer" else None,
                                               *weights, *biases), -1 if gate_half is None else gate_half,
                                   bool(final_activation))
    return y


def _pooled_mlp(x, weights, biases, activation, group, token_map, norm, norm_weight, norm_bias, eps, offset):
    """merged_mlp(pool=True) on the kernels, after the shared checks: the pool-and-norm kernel, then
    ``mlp`` on its rows (which checks the later layers)."""
    _check_layer(x, weights[0], biases[0], x.shape[1], "weights[0]", "biases[0]")
    # Not autocast: pool and norm run in x's dtype, as Gemma's AvgPool2d and fp32 RMSNorm do under
    # autocast (rounding x to bf16 first would add a rounding per token); ``mlp`` casts the pooled rows.
    table = token_map.to(torch.int32).contiguous() if token_map is not None else \
        torch.arange(x.shape[0], dtype=torch.int32, device=x.device).view(-1, group)
    gamma = norm_weight if norm is not None else x.new_empty(0)
    beta = norm_bias if norm == "layer" else x.new_empty(0)
    a, _, _ = call_op(pool_norm_fwd_op, x, table, group, norm, gamma, beta, float(eps), float(offset),
                               _needs_grad(x, gamma if norm else None, beta if norm == "layer" else None))
    return mlp(a, weights, biases, activation)


# ----------------------------------------------------------------------------------------------
# mmfuse verify
# ----------------------------------------------------------------------------------------------
def verify_checks():
    from mmfuse.testing import compare_with_reference
    from mmfuse.verify import Check

    def merged_check(dtype, what, norm, post, table, T=64, C=48, G=4, widths=(72, 40), gate_half=None,
                     path=None, forward=None):
        def run(device):
            x = torch.randn(T, C, device=device, dtype=dtype)
            tmap = torch.randperm(T, device=device).view(-1, G) if table else None
            if path is not None:  # the check is for that path: fail loudly if the launcher would not take it
                merge = KM.Merge(x, G, tmap, norm, post, torch.ones(G * C if post else C, device=device, dtype=dtype))
                if not path(merge):
                    raise RuntimeError(f"{path.__name__} does not hold for this check's shapes: it would test "
                                       "another path")
            width = G * C if post else C
            n1 = widths[0] * (1 if gate_half is None else 2)
            ws = [torch.randn(n1, G * C, device=device, dtype=dtype) / (G * C) ** 0.5,
                  torch.randn(widths[1], widths[0], device=device, dtype=dtype) / widths[0] ** 0.5]
            bs = [torch.randn(n, device=device, dtype=dtype) for n in (n1, widths[1])]
            norm_params = [1 + 0.2 * torch.randn(width, device=device, dtype=dtype)]
            if norm == "layer":
                norm_params.append(torch.randn(width, device=device, dtype=dtype))

            def call(f):
                def fn(x, w1, w2, b1, b2, g, *b):
                    return f(x, [w1, w2], [b1, b2], "gelu" if gate_half is None else "silu", group=G, token_map=tmap,
                             norm=norm, norm_weight=g, norm_bias=b[0] if b else None, eps=1e-5, norm_after_merge=post,
                             gate_half=gate_half)
                return fn

            saved = KM.MERGED_FORWARD
            KM.MERGED_FORWARD = forward or saved  # ``forward``: the check's forward form, whatever the sizes
            try:
                return compare_with_reference(call(merged_mlp), call(merged_mlp_reference), [x, *ws, *bs, *norm_params],
                                              ["x", "W1", "W2", "b1", "b2", "gamma", "beta"][:5 + len(norm_params)])
            finally:
                KM.MERGED_FORWARD = saved
        return Check(f"merged_mlp {what}", dtype, f"T={T} C={C} G={G}", run)

    def pooled_check(dtype, T=80, C=40, G=16, N=24):  # Gemma 3: pool, RMSNorm (1 + weight), one matmul
        def run(device):
            x = torch.randn(T, C, device=device, dtype=dtype)
            tmap = torch.randperm(T, device=device).view(-1, G)
            w = torch.randn(N, C, device=device, dtype=dtype) / C ** 0.5
            g = 0.3 * torch.randn(C, device=device, dtype=dtype)

            def call(f):
                return lambda x, w, g: f(x, [w], None, None, group=G, token_map=tmap, pool=True, norm="rms",
                                         norm_weight=g, norm_after_merge=True, norm_weight_offset=1.0)

            return compare_with_reference(call(merged_mlp), call(merged_mlp_reference), [x, w, g], ["x", "W", "gamma"])
        return Check("merged_mlp pool+rms (gemma3)", dtype, f"T={T} C={C} G={G}", run)

    checks = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        checks.append(pooled_check(dtype))
        checks.append(merged_check(dtype, "rms per token", "rms", False, False))
        # Qwen2.5-VL's form at enough merged rows for the folded forward (gamma * W, rstd on the accumulator):
        # C = 64, a multiple of every tile's K step.
        if dtype != torch.float16:  # (fp16 is not folded: ``fold_applies``)
            checks.append(merged_check(dtype, "rms per token, folded", "rms", False, False, T=4 * KM.FOLD_MIN_ROWS,
                                       C=64, path=KM.fold_applies))
        # InternVL's form at enough rows for the backward's written operand (dW unmapped).
        checks.append(merged_check(dtype, "shuffle+ln per row, dW unmapped", "layer", True, True,
                                   T=4 * KM.FOLD_MIN_ROWS, path=KM.materialise_applies))
        checks.append(merged_check(dtype, "shuffle+ln per row", "layer", True, True))
        # The forward's operand written once, the first GEMM unmapped (``written_forward_applies``: large GEMMs).
        checks.append(merged_check(dtype, "rms per token, A written", "rms", False, False, forward="written"))
        checks.append(merged_check(dtype, "swiglu, shuffle+ln", "layer", True, True, gate_half=1))
    return checks
