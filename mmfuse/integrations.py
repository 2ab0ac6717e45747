"""transformers' attention interface: ``attn_implementation="mmfuse"``.

``register_transformers_attention()`` registers an attention function under the name ``"mmfuse"``
(and SDPA's mask builder under the same name, so models hand it the boolean masks they build for
SDPA). It routes to ``mmfuse.cross_attention`` every call it can compute exactly:

* not causal, no dropout in effect, no softcap / position bias / sliding window / sinks;
* head dim <= 256, the same for values;
* a mask that only pads keys: ``None`` or a boolean / additive (0 or min) mask of shape
  ``(B, 1, 1 or Lq, Lk)`` whose rows are all the same (checked).

Everything else goes to transformers' SDPA implementation, unchanged. Rows with no valid key give
zeros here (SDPA gives NaN): the one documented difference of ``mmfuse.cross_attention``.
"""

from __future__ import annotations

import torch

NAME = "mmfuse"


def _key_mask(attention_mask: torch.Tensor | None, batch: int, keys: int) -> tuple[bool, torch.Tensor | None]:
    """(usable, key_mask (B, Lk) bool with True = attend) from a transformers 4-D mask."""
    if attention_mask is None:
        return True, None
    m = attention_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[-1] != keys or m.shape[0] not in (1, batch):
        return False, None
    if m.dtype != torch.bool:
        allowed = m == 0
        if not bool(((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()):
            return False, None  # a real additive bias, not a padding mask
        m = allowed
    rows = m[:, 0]
    if rows.shape[1] > 1 and not bool((rows == rows[:, :1]).all()):
        return False, None  # differs per query row: causal or other structure
    return True, rows[:, 0].expand(batch, keys)


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
    return out.transpose(1, 2).contiguous(), None


def register_transformers_attention() -> str:
    """Make ``attn_implementation="mmfuse"`` available to transformers models; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, mmfuse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
