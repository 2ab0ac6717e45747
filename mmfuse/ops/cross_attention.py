"""Cross-attention of a few (learnable) queries over many keys: reference, custom ops with autograd,
functional API.

``cross_attention(q, k, v, *, kv_lens=None, key_mask=None, scale=None)``: q (Bq, Hq, Lq, D) with
Bq in {1, B}; k, v (B, Hkv, Lk, D) with Hq % Hkv == 0; D <= 256. Equal to SDPA on the expanded
inputs (q repeated over the batch, k/v over the query-head groups) with keys >= kv_lens[b] and keys
where key_mask is False left out, except that a query row with no valid key yields zeros (and zero
gradients) where SDPA yields NaN.

Saved for backward: q, k, v, the output and the base-2 log-sum-exp per row (B, Hq, Lq): never the
Lq x Lk probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmfuse._checks import check_like, check_tensor
from mmfuse._dispatch import REFERENCE, autocast_inputs, backend_for, call_op, custom_op, register_autograd
from mmfuse.kernels import cross_attention as K
from mmfuse.kernels._common import dot_precision

MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _valid_keys(B, Lk, kv_lens, key_mask, device):
    valid = torch.ones(B, Lk, dtype=torch.bool, device=device)
    if kv_lens is not None:
        valid &= torch.arange(Lk, device=device)[None, :] < kv_lens.to(device)[:, None]
    if key_mask is not None:
        valid &= key_mask
    return valid


def cross_attention_reference(q, k, v, *, kv_lens=None, key_mask=None, scale=None):
    """SDPA on the expanded inputs; rows with no valid key give zeros (and zero gradients)."""
    B, Hkv, Lk, D = k.shape
    Hq = q.shape[1]
    qe = q.expand(B, *q.shape[1:])
    ke = k.repeat_interleave(Hq // Hkv, dim=1)
    ve = v.repeat_interleave(Hq // Hkv, dim=1)
    valid = _valid_keys(B, Lk, kv_lens, key_mask, q.device)
    has_key = valid.any(-1)  # (B,)
    # A sample with no valid key attends to everything (finite), then its rows are zeroed: SDPA's
    # NaN would otherwise reach the gradients through the zeroing.
    attend = valid | ~has_key[:, None]
    out = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=attend[:, None, None, :], scale=scale)
    return torch.where(has_key[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def cross_attention_term_scales(q, k, v, do, *, scale=None):
    """The floor scales of ``mmfuse.testing``'s rule for attention's gradients, computed here in fp64:

    * dQ = scale * sum_n P (dP - delta) K_n and dK likewise with Q, where dP = dO V^T and delta cancel:
      their floor scales with scale * max|dP| * max|K| (resp. max|Q|), the terms' magnitude.
    * The backward recomputes P = 2^(s - lse) from the fp32 log-sum-exp the forward saved (as every
      flash attention does), whose rounding at |lse| is a relative error of up to 2^-24 |lse| ln 2 in P:
      invisible at ordinary logits, but at |logits| ~ 1e4 it is ~5e-4 of every gradient. And it
      recomputes s with its own tiles, so in another summation order than the forward's: s differs by
      about an ulp of max |s|, another relative error of up to 2^-23 max |s| in P (found at fp32, one
      query, logits ~27: dV 17x PyTorch's error, which forms P once; bench/NOTES.md, session 19). The
      floor covers both: each gradient's scale grows by that relative error over the dtype's 4-ulp
      floor. This loosens fp32's dV floor at long key sets too: at Idefics2's 4964 keys and ordinary
      logits (max |s| ~ 5) from ~1.7x to ~3x max |dV| (review, session 19); max |s| counts masked keys.
      (An ulp of the dot's terms, scale * sum_d |q_d| |k_d|, would bound the reordering more surely, but
      loosens it further.)"""
    B, Hkv = k.shape[:2]
    Hq, D = q.shape[1], q.shape[-1]
    if not (q.numel() and k.numel() and do.numel()):
        return {}
    scale = D ** -0.5 if scale is None else scale
    qe = q.detach().double().expand(B, *q.shape[1:])
    ke = k.detach().double().repeat_interleave(Hq // Hkv, dim=1)
    ve = v.detach().double().repeat_interleave(Hq // Hkv, dim=1)
    do64 = do.detach().double()
    s = (qe @ ke.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    dp = (do64 @ ve.transpose(-1, -2)).abs().max().item()
    terms = {"grad q": abs(scale) * dp * ke.abs().max().item(), "grad k": abs(scale) * dp * qe.abs().max().item(),
             "grad v": (p.transpose(-1, -2) @ do64.abs()).max().item()}
    # P's relative error from the saved lse (half an fp32 ulp of lse in base 2, times ln 2: 2^-24 |lse|
    # in natural units) and from s recomputed (an ulp of max |s|), in units of the output dtype's 4-ulp
    # floor. dV sums P dO; dQ and dK sum P (dP - delta) K, whose P error is at most twice their terms'
    # magnitude.
    s_max = s.abs().max().item()
    lse = s_max + math.log(max(k.shape[2], 1))
    rel = (2.0 ** -24 * lse + 2.0 ** -23 * s_max) / (4 * torch.finfo(q.dtype).eps)
    return {"grad q": terms["grad q"] * max(1.0, 2 * rel), "grad k": terms["grad k"] * max(1.0, 2 * rel),
            "grad v": terms["grad v"] * rel}


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check(q, k, v, kv_lens, key_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    B, Hkv, Lk, D = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] != D:
        raise ValueError(f"q: expected head dim (shape[3]) == {D} (the head dim of k), got {q.shape[-1]}")
    if D > MAX_HEAD_DIM or D == 0:
        raise ValueError(f"q: expected a head dim in 1..{MAX_HEAD_DIM}, got {D}")
    if q.shape[0] not in (1, B):
        raise ValueError(f"q: expected batch (shape[0]) 1 or {B} (the batch of k), got {q.shape[0]}")
    if Hkv == 0 or q.shape[1] % Hkv:
        raise ValueError(f"q: expected heads (shape[1]) a multiple of {Hkv} (the heads of k), got {q.shape[1]}")
    if kv_lens is not None:
        check_tensor("kv_lens", kv_lens, ndim=1, floating=False)
        if kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_lens: expected dtype torch.int32 or torch.int64, got {kv_lens.dtype}")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens: expected device {q.device} (the device of q), got {kv_lens.device}")
        if kv_lens.shape[0] != B:
            raise ValueError(f"kv_lens: expected shape ({B},) (one length per sample), got {tuple(kv_lens.shape)}")
        if B:  # one reduction for both bounds (a host read on a GPU: the check needs the values)
            lo, hi = (int(t) for t in torch.aminmax(kv_lens))
            if lo < 0 or hi > Lk:
                raise ValueError(f"kv_lens: expected values in [0, {Lk}] (Lk), got min {lo} and max {hi}")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, floating=False)
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask: expected dtype torch.bool (True = attend), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, Lk):
            raise ValueError(f"key_mask: expected shape ({B}, {Lk}) = (B, Lk), got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask: expected device {q.device} (the device of q), got {key_mask.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")


# ----------------------------------------------------------------------------------------------
# Custom operators with autograd (opaque to torch.compile, with fake implementations)
# ----------------------------------------------------------------------------------------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@custom_op("mmfuse::cross_attention_fwd", mutates_args=())
def cross_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
                           key_mask: torch.Tensor | None, scale: float, splits: int,
                           k2: torch.Tensor | None = None, v2: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse); ``splits`` <= 0 lets the launcher choose (the split rule of kernels/cross_attention.py).
    ``k2, v2``: a second key/value source, the keys being k ‖ k2 (read in place, never concatenated)."""
    return K.attention_fwd(q, k, v, kv_lens, key_mask, scale, splits=splits if splits > 0 else None,
                           acc=_acc(q.dtype), precision=dot_precision(q.dtype), k2=k2, v2=v2)


@cross_attention_fwd_op.register_fake
def _(q, k, v, kv_lens, key_mask, scale, splits, k2=None, v2=None):
    B, Hq, Lq = k.shape[0], q.shape[1], q.shape[2]
    # The kernel's storage order (B, Lq, Hq, D), seen as (B, Hq, Lq, D): the strides match the real op.
    return q.new_empty(B, Lq, Hq, q.shape[3]).transpose(1, 2), q.new_empty(B, Hq, Lq, dtype=_acc(q.dtype))


@custom_op("mmfuse::cross_attention_bwd", mutates_args=())
def cross_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, kv_lens: torch.Tensor | None, key_mask: torch.Tensor | None,
                           scale: float, need_q: bool, need_kv: bool,
                           k2: torch.Tensor | None = None, v2: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dk2, dv2); empty tensors for what is not computed (dk2, dv2 without a second source)."""
    dq, dk, dv = K.attention_bwd(do, q, k, v, o, lse, kv_lens, key_mask, scale, need_q=need_q, need_kv=need_kv,
                                 acc=_acc(q.dtype), precision=dot_precision(q.dtype), k2=k2, v2=v2)
    dk2 = dv2 = None
    if k2 is not None and dk is not None:
        (dk, dk2), (dv, dv2) = dk, dv
    return tuple(t if t is not None else q.new_empty(0) for t in (dq, dk, dv, dk2, dv2))


@cross_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, kv_lens, key_mask, scale, need_q, need_kv, k2=None, v2=None):
    two = k2 is not None and need_kv
    return (q.new_empty(q.shape) if need_q else q.new_empty(0), k.new_empty(k.shape) if need_kv else q.new_empty(0),
            v.new_empty(v.shape) if need_kv else q.new_empty(0), k2.new_empty(k2.shape) if two else q.new_empty(0),
            v2.new_empty(v2.shape) if two else q.new_empty(0))


def _setup(ctx, inputs, output):
    q, k, v, kv_lens, key_mask, scale, _, k2, v2 = inputs
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.need_q = q.requires_grad
    ctx.need_kv = any(t is not None and t.requires_grad for t in (k, v, k2, v2))
    ctx.two = k2 is not None
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_lens, key_mask, k2, v2)


def _backward(ctx, do, _dlse):
    if do is None:
        return (None,) * 9
    q, k, v, o, lse, kv_lens, key_mask, k2, v2 = ctx.saved_tensors
    dq, dk, dv, dk2, dv2 = call_op(cross_attention_bwd_op, do, q, k, v, o, lse, kv_lens, key_mask, ctx.scale,
                                   ctx.need_q, ctx.need_kv, k2, v2)
    kv = ctx.need_kv
    return (dq if ctx.need_q else None, dk if kv else None, dv if kv else None, None, None, None, None,
            dk2 if kv and ctx.two else None, dv2 if kv and ctx.two else None)


register_autograd(cross_attention_fwd_op, _backward, _setup)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_lens: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, scale: float | None = None,
                    _splits: int = 0) -> torch.Tensor:
    """Flash cross-attention (see the module docstring). ``k`` and ``v`` may each be a pair of tensors
    (B, Hkv, L1, D), (B, Hkv, L2, D): the keys are their concatenation along the keys, read in place by
    the kernels and never built (the perceiver's media ‖ latents); ``key_mask`` is then (B, L1) and
    masks the first source only, ``kv_lens`` counts keys of the concatenation. ``_splits`` forces the number of key
    splits (tests); 0 lets the split rule choose."""
    k, k2 = _sources("k", k)
    v, v2 = _sources("v", v)
    if (k2 is None) != (v2 is None):
        raise ValueError("k, v: expected both a pair of tensors or both a tensor, got one of each")
    for name, t in (("q", q), ("k", k), ("v", v), ("k[1]", k2), ("v[1]", v2)):
        if t is not None:
            check_tensor(name, t, ndim=4)
    reference = backend_for(q) == REFERENCE  # autocast below keeps the device
    if not reference:
        q, k, v, k2, v2 = autocast_inputs(q, k, v, k2, v2)
    if k2 is not None:
        for name, t, first in (("k[1]", k2, k), ("v[1]", v2, v)):
            check_like(name, t, "q", q)
            if t.shape[:2] != first.shape[:2] or t.shape[3] != first.shape[3]:
                raise ValueError(f"{name}: expected shape ({first.shape[0]}, {first.shape[1]}, L2, {first.shape[3]}) "
                                 f"(the batch, heads and head dim of {name[0]}[0]), got {tuple(t.shape)}")
        if k2.shape != v2.shape or k.shape != v.shape:
            raise ValueError(f"v: expected the shapes of k {tuple(k.shape)}, {tuple(k2.shape)}, got "
                             f"{tuple(v.shape)}, {tuple(v2.shape)}")
    # Checked as the concatenated keys would be (a stand-in: no data is touched or copied); with two
    # sources key_mask covers the first one, (B, L1).
    _check(q, _joined(k, k2), _joined(v, v2), kv_lens, key_mask if k2 is None else None, scale)
    if k2 is not None and key_mask is not None:
        _check(q, k, v, None, key_mask, scale)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if reference:
        k, v, key_mask = _concat(k, k2, v, v2, key_mask)
        return cross_attention_reference(q, k, v, kv_lens=kv_lens, key_mask=key_mask, scale=scale)
    o, _ = call_op(cross_attention_fwd_op, q, k, v, kv_lens, key_mask, scale, int(_splits), k2, v2)
    return o


def _concat(k, k2, v, v2, key_mask):
    """(k ‖ k2, v ‖ v2, key_mask ‖ True): the one-source equivalent of two sources (reference only)."""
    if k2 is None:
        return k, v, key_mask
    if key_mask is not None:
        key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], k2.shape[2])], dim=1)
    return torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2), key_mask


def _sources(name, t):
    if isinstance(t, (tuple, list)):
        if len(t) != 2:
            raise ValueError(f"{name}: expected a tensor or a pair of tensors, got a sequence of {len(t)}")
        return t[0], t[1]
    return t, None


def _joined(first, second):
    """A stand-in of ``cat([first, second], dim=2)`` for the checks: shape, dtype and device only (one
    element broadcast by zero strides; nothing is copied)."""
    if second is None:
        return first
    B, H, L1, D = first.shape
    return first.new_empty(()).expand(B, H, L1 + second.shape[2], D)


# ----------------------------------------------------------------------------------------------
# mmfuse verify
# ----------------------------------------------------------------------------------------------
def verify_checks():
    from mmfuse.testing import compare_with_reference
    from mmfuse.verify import Check

    def check(dtype, Bq, B, Hq, Hkv, Lq, Lk, D, padded):
        def run(device):
            q = torch.randn(Bq, Hq, Lq, D, device=device, dtype=dtype)
            k = torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype)
            v = torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype)
            lens = torch.tensor([Lk - 7 * i for i in range(B)], device=device) if padded else None
            return compare_with_reference(
                lambda q, k, v: cross_attention(q, k, v, kv_lens=lens),
                lambda q, k, v: cross_attention_reference(q, k, v, kv_lens=lens), [q, k, v], ["q", "k", "v"],
                term_scales=lambda inputs, do: cross_attention_term_scales(*inputs, do))
        shape = f"q={Bq}x{Hq}x{Lq} kv={B}x{Hkv}x{Lk} D={D}" + (" lens" if padded else "")
        return Check("cross_attention", dtype, shape, run)

    return [check(dtype, 1, 2, 4, 2, 17, 75, 96, True) for dtype in (torch.float32, torch.float16, torch.bfloat16)] + [
        check(torch.float16, 3, 3, 2, 2, 9, 40, 64, False)]
