"""transformers' attention interface: ``attn_implementation="mmfuse"``.

``register_transformers_attention()`` registers an attention function under the name ``"mmfuse"``
(and SDPA's mask builder under the same name, so models hand it the boolean masks they build for
SDPA). It routes to ``mmfuse.cross_attention`` every call it can compute exactly:

* not causal, no dropout in effect, no softcap / position bias / sliding window / sinks;
* head dim <= 256, the same for values;
* a mask that only pads keys *by its structure*: ``None`` or a boolean mask of shape ``(B or 1, 1, 1,
  Lk)`` (one row for every query). The route is chosen from shapes and dtypes, never from the mask's
  values: no GPU->CPU synchronisation and no data-dependent branch (``torch.compile`` keeps one graph).
  The mask builder registered under the same name (``key_padding_mask``) hands exactly that shape to
  every bidirectional padding mask a model builds (``create_bidirectional_mask``), and SDPA's
  ``(B, 1, Lq, Lk)`` mask for every other pattern (causal, sliding, packed), which then goes to SDPA.

Everything else (additive float masks included: a float mask may be a real bias, and telling would
mean reading it) goes to transformers' SDPA implementation, unchanged. The output is written in the
``(B, Lq, H, D)`` layout transformers expects (the kernels store through strides): no copy. Rows with no valid key give
zeros here (SDPA gives NaN): the one documented difference of ``mmfuse.cross_attention``.
"""

from __future__ import annotations

import torch

NAME = "mmfuse"


def _key_mask(attention_mask: torch.Tensor | None, batch: int, keys: int) -> tuple[bool, torch.Tensor | None]:
    """(usable, key_mask (B, Lk) bool with True = attend) from a transformers 4-D mask, by its shape and
    dtype alone: a boolean (B or 1, 1, 1, Lk) mask is a key-padding mask; anything else is not taken."""
    if attention_mask is None:
        return True, None
    m = attention_mask
    if (m.dtype != torch.bool or m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[-1] != keys
            or m.shape[0] not in (1, batch)):
        return False, None
    return True, m[:, 0, 0, :].expand(batch, keys)


def key_padding_mask(mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask builder: a bidirectional padding mask as one boolean row per sample,
    ``(B, 1, 1, Lk)`` (None without padding), without looking at its values; SDPA's builder for
    every other pattern. SDPA broadcasts the one-row form too, so a fallback call still works.
    transformers calls builders by keyword, with its version's arguments (5.x: ``q_length``; 4.x:
    ``cache_position``, and no bidirectional builder): they pass through to its own SDPA builder."""
    from transformers import masking_utils

    bidirectional = getattr(masking_utils, "bidirectional_mask_function", None)
    if mask_function is not None and mask_function is bidirectional and kwargs.get("local_size") is None:
        if attention_mask is None:
            return None
        kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)
        pad = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if pad.dtype != torch.bool:
            pad = pad != 0
        return pad.to(kwargs.get("device", pad.device))[:, None, None, :]
    return masking_utils.sdpa_mask(mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def mmfuse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mmfuse.ops.cross_attention import cross_attention

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = causal and query.shape[2] > 1
    dropout_on = dropout > 0.0 and getattr(module, "training", False)
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sliding_window", "s_aux", "sinks"))
    usable = (not causal and not dropout_on and not extras and query.shape[-1] <= 256
              and value.shape[-1] == query.shape[-1] and query.shape[1] % key.shape[1] == 0)
    if usable:
        usable, key_mask = _key_mask(attention_mask, key.shape[0], key.shape[2])
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = cross_attention(query, key, value, key_mask=key_mask, scale=scaling)
    return out.transpose(1, 2), None  # (B, Lq, H, D): the kernel's storage order already


def register_transformers_attention() -> str:
    """Make ``attn_implementation="mmfuse"`` available to transformers models; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, mmfuse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, key_padding_mask)
    return NAME
