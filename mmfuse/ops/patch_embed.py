"""Patch embedding (Conv2d/Conv3d with kernel_size == stride, flattened token-major, plus a position
table): reference, autograd Function, functional API.

Forward: one kernel (im2col in the A loads, bias and pos_embed in the epilogue, output (B, N, D)).
With a class token (CLIP) the patches are written straight into rows 1..N of the (B, N+1, D)
output and row 0 is ``class_embedding + pos_embed[0]`` (one small torch op).

Saved for backward: pixels and weight only (the patch matrix is never materialised).
Backward, given dOut (B, N, D):
  dpixels = scatter(dOut @ W)          one GEMM; the scatter is a permutation (kernel == stride)
  dW      = dOut^T @ patches            one GEMM gathering the patches again
  dpos    = dOut summed over the dims pos_embed was broadcast over (batch: one fixed-order kernel)
  db      = dOut summed over tokens     from the batch sum's fp32 sums when it runs, else one reduction
Nothing uses atomics: gradients are bitwise reproducible.

Dtypes: pixels, weight, bias, pos_embed (and class_embedding) must share one dtype, as
``nn.Conv2d`` requires of its input and weight (it raises on fp32 pixels with a half weight); the
output has that dtype. transformers' embeddings cast the pixels to the weight dtype first, and so
do the fused modules in ``mmfuse.nn.patch_embed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfuse._checks import check_like, check_tensor
from mmfuse._dispatch import REFERENCE, autocast_inputs, backend_for, call_op, custom_op, register_autograd
from mmfuse.kernels import patch_embed as K


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def _conv_tokens(pixels, weight, bias):
    if pixels.dim() == 4:
        y = F.conv2d(pixels, weight, bias, stride=tuple(weight.shape[-2:]))
    else:
        y = F.conv3d(pixels, weight, bias, stride=tuple(weight.shape[-3:]))
    return y.flatten(2).transpose(1, 2)


def patch_embed_reference(pixels, weight, bias=None, pos_embed=None):
    """``conv(pixels, weight, bias, stride=kernel).flatten(2).transpose(1, 2) + pos_embed``."""
    y = _conv_tokens(pixels, weight, bias)
    return y + pos_embed if pos_embed is not None else y


def patch_embed_with_class_reference(pixels, weight, bias, pos_embed, class_embedding):
    """CLIPVisionEmbeddings: ``cat([class_embedding, patch tokens]) + pos_embed``."""
    y = _conv_tokens(pixels, weight, bias)
    y = torch.cat([class_embedding.expand(y.shape[0], 1, -1), y], dim=1)
    return y + pos_embed if pos_embed is not None else y


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _check(pixels, weight, bias, pos_embed, class_embedding=None):
    """Validate and return the number of output rows per sample (tokens, + 1 with a class token)."""
    check_tensor("pixels", pixels)
    if pixels.dim() not in (4, 5):
        raise ValueError(f"pixels: expected a 4-D (B, C, H, W) or 5-D (B, C, F, H, W) tensor, got "
                         f"{pixels.dim()}-D with shape {tuple(pixels.shape)}")
    video = pixels.dim() == 5
    layout = "(D, C, T, P, P) for 5-D pixels" if video else "(D, C, P, P) for 4-D pixels"
    check_tensor("weight", weight)
    if weight.dim() != pixels.dim():
        raise ValueError(f"weight: expected a {pixels.dim()}-D tensor {layout}, got {weight.dim()}-D with shape "
                         f"{tuple(weight.shape)}")
    check_like("weight", weight, "pixels", pixels)
    D, C, P = weight.shape[0], weight.shape[1], weight.shape[-1]
    if weight.shape[-2] != P:
        raise ValueError(f"weight: expected square patch dims (P, P) in the last two dims, got "
                         f"{tuple(weight.shape[-2:])} (weight shape {tuple(weight.shape)})")
    if P == 0 or D == 0 or (video and weight.shape[2] == 0):
        raise ValueError(f"weight: expected non-empty patch and output dims, got shape {tuple(weight.shape)}")
    if pixels.shape[1] != C:
        raise ValueError(f"weight: expected shape[1] (in_channels) == {pixels.shape[1]} (the channels of "
                         f"pixels, shape {tuple(pixels.shape)}), got {C}")
    H, W = pixels.shape[-2:]
    if H % P or W % P:
        raise ValueError(f"pixels: expected height and width multiples of the patch size {P}, got {H}x{W}")
    frames = 1
    if video:
        T = weight.shape[2]
        if pixels.shape[2] % T:
            raise ValueError(f"pixels: expected frames (dim 2) a multiple of the temporal patch size {T}, "
                             f"got {pixels.shape[2]}")
        frames = pixels.shape[2] // T
    rows = frames * (H // P) * (W // P) + (class_embedding is not None)
    if bias is not None:
        check_tensor("bias", bias)
        check_like("bias", bias, "pixels", pixels)
        if tuple(bias.shape) != (D,):
            raise ValueError(f"bias: expected shape ({D},) (out_channels of weight), got {tuple(bias.shape)}")
    if class_embedding is not None:
        check_tensor("class_embedding", class_embedding)
        check_like("class_embedding", class_embedding, "pixels", pixels)
        if tuple(class_embedding.shape) != (D,):
            raise ValueError(f"class_embedding: expected shape ({D},), got {tuple(class_embedding.shape)}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed)
        check_like("pos_embed", pos_embed, "pixels", pixels)
        target = (pixels.shape[0], rows, D)
        shape = tuple(pos_embed.shape)
        if len(shape) > 3 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ValueError(f"pos_embed: expected a shape broadcastable to (B, N, D) = {target} "
                             f"(N = {rows} rows: patches of the image"
                             f"{' + the class token' if class_embedding is not None else ''}), got {shape}")
    return rows


# ----------------------------------------------------------------------------------------------
# Custom operators
# ----------------------------------------------------------------------------------------------
def _as5d(t):
    return t if t.dim() == 5 else t.unsqueeze(2)


def _acc_sum(t, dims):
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(dims, dtype=acc).to(t.dtype)


def _pos_grad(g, pos_shape, bias_from=None):
    """(dpos, db): dOut (B, L, D) summed down to ``pos_shape`` (broadcastable to it); db (rows
    ``bias_from``.. summed over the batch and tokens) only where the batch sum gives it, else None."""
    shape3 = (1,) * (3 - len(pos_shape)) + tuple(pos_shape)
    if shape3[1] == 1 or shape3[2] == 1:  # rare: broadcast over tokens or features too
        # One sum over every broadcast dim in the accumulator type, one rounding (not the batch
        # kernel's rounded sums summed again).
        dims = tuple(i for i in range(3) if shape3[i] == 1 and g.shape[i] != 1)
        s = _acc_sum(g, dims).reshape(shape3) if dims else g.clone(memory_format=torch.contiguous_format)
    elif shape3[0] == 1:
        s, db = K.batch_sum(g, bias_from)
        return s.unsqueeze(0).reshape(pos_shape), db
    else:
        s = g.clone(memory_format=torch.contiguous_format)
    return s.reshape(pos_shape), None


def _rows(pixels, weight, prefix):
    x5, w5 = _as5d(pixels), _as5d(weight)
    return (x5.shape[2] // w5.shape[2]) * (x5.shape[3] // w5.shape[3]) * (x5.shape[4] // w5.shape[4]) + prefix


# Custom operators with autograd (opaque to torch.compile, with fake implementations), as in
# mmfuse/ops/linear.py. Inputs are checked by the caller. ``packed`` is the forward's packed weight
# when a module's cache holds one (it may be a view of the weight, so it is an input, never an output).
@custom_op("mmfuse::patch_embed_fwd", mutates_args=())
def patch_embed_fwd_op(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       pos_embed: torch.Tensor | None, class_embedding: torch.Tensor | None,
                       packed: torch.Tensor | None) -> torch.Tensor:
    """(pixels, weight, bias, pos_embed, class_embedding) -> (B, [1 +] N, D)."""
    x5, w5 = _as5d(pixels), _as5d(weight)
    B, D = pixels.shape[0], weight.shape[0]
    prefix = int(class_embedding is not None)
    L = _rows(pixels, weight, prefix)
    pos = pos_embed.expand(B, L, D) if pos_embed is not None else None
    packed = K.pack_weight(w5) if packed is None else (packed, K.pack_weight_cols(w5))
    if not prefix:
        return K.patch_embed_fwd(x5, w5, bias, pos, packed=packed)
    out = K.empty((B, L, D), dtype=pixels.dtype, device=pixels.device)
    K.patch_embed_fwd(x5, w5, bias, pos[:, 1:] if pos is not None else None, out=out[:, 1:], packed=packed)
    out[:, 0] = class_embedding + pos[:, 0] if pos is not None else class_embedding
    return out


@patch_embed_fwd_op.register_fake
def _(pixels, weight, bias, pos_embed, class_embedding, packed):
    L = _rows(pixels, weight, int(class_embedding is not None))
    return pixels.new_empty(pixels.shape[0], L, weight.shape[0])


@custom_op("mmfuse::patch_embed_bwd", mutates_args=())
def patch_embed_bwd_op(g: torch.Tensor, pixels: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                       prefix: int, pos_shape: list[int], need_x: bool, need_w: bool, need_b: bool, need_p: bool,
                       need_c: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dpixels, dW, db, dpos, dclass); empty tensors for gradients not asked for."""
    x5, w5 = _as5d(pixels), _as5d(weight)
    g_patch = g[:, prefix:]
    def nothing():  # one fresh empty tensor per missing gradient: op outputs may not alias
        return pixels.new_empty(0)

    dx, dw, db, dpos, dcls = (nothing() for _ in range(5))
    db_sum = None
    if need_p:  # first: a batch sum also gives db (no separate read of dOut)
        dpos, db_sum = _pos_grad(g, tuple(pos_shape), prefix if need_b else None)
    if need_x:
        packed_k = (packed, K.pack_weight_cols(w5)) if packed is not None else None
        dx = K.patch_embed_dx(g_patch, w5, tuple(x5.shape), packed=packed_k).view(pixels.shape)
    if need_w:
        dw = K.patch_embed_dw(g_patch, x5, tuple(w5.shape), with_bias=False)[0].view(weight.shape)
    if need_b:
        db = db_sum if db_sum is not None else K.bias_grad(g_patch)
    if need_c:
        dcls = _acc_sum(g[:, 0], 0)
    return dx, dw, db, dpos, dcls


@patch_embed_bwd_op.register_fake
def _(g, pixels, weight, packed, prefix, pos_shape, need_x, need_w, need_b, need_p, need_c):
    def maybe(flag, shape):
        return pixels.new_empty(shape) if flag else pixels.new_empty(0)

    D = weight.shape[0]
    return (maybe(need_x, pixels.shape), maybe(need_w, weight.shape), maybe(need_b, (D,)),
            maybe(need_p, tuple(pos_shape)), maybe(need_c, (D,)))


def _setup(ctx, inputs, output):
    pixels, weight, bias, pos_embed, class_embedding, packed = inputs
    ctx.needs = (pixels.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                 pos_embed is not None and pos_embed.requires_grad,
                 class_embedding is not None and class_embedding.requires_grad)
    ctx.prefix = int(class_embedding is not None)
    ctx.pos_shape = list(pos_embed.shape) if pos_embed is not None else []
    ctx.save_for_backward(pixels, weight, packed if pixels.requires_grad else None)


def _backward(ctx, g):
    pixels, weight, packed = ctx.saved_tensors
    grads = call_op(patch_embed_bwd_op, g, pixels, weight, packed, ctx.prefix, ctx.pos_shape, *ctx.needs)
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs)) + (None,)


register_autograd(patch_embed_fwd_op, _backward, _setup)


class PackedWeight:
    """The forward's packed weight (``kernels.patch_embed.pack_weight``), kept while the weight is
    the same tensor, at the same version and address: modules hold one so a frozen or unchanged
    weight is repacked once, not on every call (an optimizer step or load_state_dict bumps the
    version and triggers one repack). Not part of any state_dict."""

    def __init__(self):
        self._key = None
        self._packed = None

    def get(self, weight: torch.Tensor, owner: torch.Tensor | None = None):
        """``owner``: the tensor ``weight`` is a fresh view of on every call (a Linear's weight viewed as a
        conv weight), whose identity, version and address then key the cache."""
        owner = weight if owner is None else owner
        key = (owner._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
        if self._key is None or self._key[0] is not owner or self._key[1:] != key:
            with torch.no_grad():
                w5 = _as5d(weight.detach())
                self._packed = K.pack_weight(w5)[0]
            self._key = (owner, *key)
        return self._packed


def fused_patch_embed(pixels, weight, bias=None, pos_embed=None, class_embedding=None, cache=None, cache_owner=None):
    """``patch_embed`` (``patch_embed_with_class`` when ``class_embedding`` is given) with an optional
    ``PackedWeight`` cache: the entry point of the modules in ``mmfuse.nn.patch_embed``
    (``cache_owner``: see ``PackedWeight.get``)."""
    given = weight
    reference = backend_for(pixels) == REFERENCE  # autocast below keeps the device
    if not reference:
        pixels, weight, bias, pos_embed, class_embedding = autocast_inputs(
            pixels, weight, bias, pos_embed, class_embedding)
    _check(pixels, weight, bias, pos_embed, class_embedding)
    if reference:
        if class_embedding is None:
            return patch_embed_reference(pixels, weight, bias, pos_embed)
        return patch_embed_with_class_reference(pixels, weight, bias, pos_embed, class_embedding)
    packed = cache.get(weight, cache_owner) if cache is not None and weight is given else None  # not an autocast copy
    return call_op(patch_embed_fwd_op, pixels, weight, bias, pos_embed, class_embedding, packed)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed`` in one kernel.

    pixels (B, C, H, W) with weight (D, C, P, P), or video pixels (B, C, F, H, W) with weight
    (D, C, T, P, P); bias (D,) or None; pos_embed None or broadcastable to (B, N, D). Returns
    (B, N, D), tokens in row-major patch order (frame, row, column).
    """
    return fused_patch_embed(pixels, weight, bias, pos_embed)


def patch_embed_with_class(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           pos_embed: torch.Tensor | None, class_embedding: torch.Tensor) -> torch.Tensor:
    """CLIP's embeddings: ``cat([class_embedding, patch tokens], 1) + pos_embed`` -> (B, N + 1, D);
    the patch tokens are written in place into rows 1..N (no concatenation copy)."""
    return fused_patch_embed(pixels, weight, bias, pos_embed, class_embedding)


# ----------------------------------------------------------------------------------------------
# mmfuse verify
# ----------------------------------------------------------------------------------------------
def verify_checks():
    from mmfuse.testing import compare_with_reference
    from mmfuse.verify import Check

    def check(dtype, B, C, image, P, D, T=None):
        shape = f"B={B} C={C} {'x'.join(map(str, image))} P={P}{f' T={T}' if T else ''} D={D}"

        def run(device):
            x = torch.randn(B, C, *image, device=device, dtype=dtype)
            kernel = (T, P, P) if T else (P, P)
            w = torch.randn(D, C, *kernel, device=device, dtype=dtype) / (C * P * P * (T or 1)) ** 0.5
            b = torch.randn(D, device=device, dtype=dtype)
            n = (image[0] // T if T else 1) * (image[-2] // P) * (image[-1] // P)
            pos = torch.randn(n, D, device=device, dtype=dtype)
            return compare_with_reference(patch_embed, patch_embed_reference, [x, w, b, pos],
                                          ["pixels", "weight", "bias", "pos_embed"])
        return Check("patch_embed" + (" video" if T else ""), dtype, shape, run)

    checks = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        checks.append(check(dtype, 2, 3, (42, 28), 14, 40))
        checks.append(check(dtype, 1, 3, (4, 28, 28), 14, 24, T=2))
    return checks
