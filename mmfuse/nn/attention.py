"""Cross-attention layers on ``mmfuse.cross_attention``: a drop-in ``nn.MultiheadAttention`` for
cross-attention, a generic ``CrossAttention`` with grouped-query heads, and OpenFlamingo's
``PerceiverResampler`` (same state_dict layout).

Projections are plain GEMMs: the Linear children themselves unless ``MMFUSE_PLAIN_GEMMS=mmfuse``
(``_projections``); the attention never forms the Lq x Lk matrix.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse import _dispatch, _patch
from mmfuse._dispatch import plain_gemm
from mmfuse.nn._activations import exact_linears
from mmfuse.ops.cross_attention import cross_attention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*Dh) -> (B, H, L, Dh), a view."""
    B, L, _ = x.shape
    return x.view(B, L, heads, -1).transpose(1, 2)


def _heads_seq_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(L, B, H*Dh) -> (B, H, L, Dh), a view."""
    L, B, _ = x.shape
    return x.view(L, B, heads, -1).permute(1, 2, 0, 3)


def _projections(owner: nn.Module, *names: str, cls=None) -> tuple:
    """The Q/K/V/O projections as callables. Plain GEMMs (``_dispatch.PLAIN_GEMMS``): by default the child
    modules themselves, so an adapter or hook put on one since runs with it, as in the original forward;
    with ``MMFUSE_PLAIN_GEMMS=mmfuse``, mmfuse's GEMM on each child's weight, the child checked to be the
    one the module was built with (``_patch.exact_child``: an adapter would otherwise be skipped)."""
    if _dispatch.PLAIN_GEMMS == "pytorch":
        return tuple(owner._modules[name] for name in names)
    checked = exact_linears(owner, *names, cls=cls)
    return tuple(lambda x, lin=lin: plain_gemm(x, lin.weight, lin.bias) for lin in checked)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B, L, H*Dh)."""
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` for cross-attention, same parameters and state_dict
    (``in_proj_weight`` / ``q_proj_weight``..., ``in_proj_bias``, ``out_proj``), same call
    convention: ``forward(query, key, value, key_padding_mask=None, need_weights=False)`` returns
    ``(output, None)``; ``key_padding_mask`` True = ignore (PyTorch's convention for this module).
    Attention weights, ``attn_mask``, ``add_bias_kv``, ``add_zero_attn`` and dropout are not
    supported (``from_module`` refuses them; ``forward`` raises for the call-time ones)."""

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module: expected nn.MultiheadAttention, got {type(module).__name__}")
        if type(module) is not nn.MultiheadAttention:  # a subclass may override forward
            raise _patch.Unsupported(f"module: expected nn.MultiheadAttention exactly, got {type(module).__name__}")
        _patch.check_replaceable(module)
        if module.bias_k is not None or module.add_zero_attn:
            raise _patch.Unsupported("module: add_bias_kv / add_zero_attn are not supported")
        if module.dropout:
            raise _patch.Unsupported(f"module: expected dropout 0.0, got {module.dropout}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.batch_first = module.embed_dim, module.num_heads, module.batch_first
        new.kdim, new.vdim = module.kdim, module.vdim
        new._qkv_same_embed_dim = module._qkv_same_embed_dim
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            setattr(new, name, getattr(module, name))  # parameters or None, shared
        new.out_proj = module.out_proj
        return new

    def _weights(self):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            return w[:E], w[E:2 * E], w[2 * E:]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or attn_mask is not None or is_causal:
            raise ValueError("need_weights / attn_mask / is_causal: expected False / None / False "
                             "(mmfuse.nn.MultiheadAttention computes padded cross-attention only)")
        if query.dim() == 2:  # unbatched (L, E), as nn.MultiheadAttention accepts: a batch of one
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError(f"key / value: expected 2-D (S, E) with a 2-D query, got shapes "
                                 f"{tuple(key.shape)} / {tuple(value.shape)}")
            b = 0 if self.batch_first else 1
            mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
            out, _ = self.forward(query.unsqueeze(b), key.unsqueeze(b), value.unsqueeze(b), mask)
            return out.squeeze(b), None
        if query.dim() != 3:
            raise ValueError(f"query: expected (L, E) or a batch of them (3-D), got shape {tuple(query.shape)}")
        wq, wk, wv = self._weights()
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        H = self.num_heads
        # Projections in the caller's layout; (L, B, E) inputs become (B, H, L, D) views, not copies.
        heads = _heads if self.batch_first else _heads_seq_first
        q = heads(plain_gemm(query, wq, bq), H)
        k = heads(plain_gemm(key, wk, bk), H)
        v = heads(plain_gemm(value, wv, bv), H)
        key_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore), got "
                                f"{key_padding_mask.dtype}")
            key_mask = ~key_padding_mask
        (out_proj,) = _projections(self, "out_proj", cls=nn.modules.linear.NonDynamicallyQuantizableLinear)
        out = out_proj(_merge(cross_attention(q, k, v, key_mask=key_mask)))
        return (out if self.batch_first else out.transpose(0, 1)), None


class CrossAttention(nn.Module):
    """Queries (B or 1, Lq, dim) attend to context (B, Lk, kv_dim): ``to_q``, ``to_k``, ``to_v``,
    ``to_out`` Linears, ``heads`` query heads of ``dim_head``, ``kv_heads`` key/value heads
    (grouped-query attention when fewer). ``forward(x, context, kv_lens=None, key_mask=None)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, kv_dim: int | None = None,
                 kv_heads: int | None = None, bias: bool = False):
        super().__init__()
        kv_dim = kv_dim or dim
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_k = nn.Linear(kv_dim, kv_heads * dim_head, bias=bias)
        self.to_v = nn.Linear(kv_dim, kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """The drop-in for an ``nn.MultiheadAttention`` used as cross-attention: a
        ``mmfuse.nn.MultiheadAttention`` keeping its parameters, state_dict and call convention."""
        return MultiheadAttention.from_module(module)

    def forward(self, x, context, kv_lens=None, key_mask=None):
        to_q, to_k, to_v, to_out = _projections(self, "to_q", "to_k", "to_v", "to_out")
        q = _heads(to_q(x), self.heads)
        k = _heads(to_k(context), self.kv_heads)
        v = _heads(to_v(context), self.kv_heads)
        out = cross_attention(q, k, v, kv_lens=kv_lens, key_mask=key_mask)
        return to_out(_merge(out))


class PerceiverAttention(nn.Module):
    """OpenFlamingo's PerceiverAttention: latents attend to ``media ‖ latents`` (keys and values
    from both). Parameters ``norm_media``, ``norm_latents``, ``to_q``, ``to_kv``, ``to_out``."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents, media_mask=None):
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        to_q, to_kv, to_out = _projections(self, "to_q", "to_kv", "to_out")
        q = _heads(to_q(latents), self.heads)
        # K/V of media and of latents are projected separately and read by the kernel from both
        # tensors (two sources): neither (media ‖ latents) nor its K/V is ever built.
        k_media, v_media = (_heads(t, self.heads) for t in to_kv(media).chunk(2, dim=-1))
        k_lat, v_lat = (_heads(t, self.heads) for t in to_kv(latents).chunk(2, dim=-1))
        # True = attend, per media token; the mask covers the first source, latents always attend.
        key_mask = media_mask.expand(media.shape[0], -1) if media_mask is not None else None
        out = cross_attention(q, (k_media, k_lat), (v_media, v_lat), key_mask=key_mask)
        return to_out(_merge(out))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """OpenFlamingo's PerceiverResampler (state_dict layout ``latents``, ``layers.{i}.0.*``
    (PerceiverAttention), ``layers.{i}.1.{0,1,3}.*`` (FeedForward), ``norm.*``), for media tokens
    ``x (B, N, dim)``: ``latents = attn(x, latents) + latents; latents = ff(latents) + latents``,
    then LayerNorm. The feed-forward's Linear-GELU-Linear runs as one fused ``mmfuse.mlp``.
    (OpenFlamingo's optional media-time / frame embeddings are not included.)"""

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """From transformers' ``Idefics2PerceiverResampler``: Idefics2's resampler is not OpenFlamingo's
        (RMSNorm, SwiGLU MLP, grouped-query heads, a padding mask), so this returns a shallow copy of
        it, sharing every parameter and keeping its class and state_dict, whose attention layers are
        ``mmfuse.nn.Idefics2PerceiverAttention``: same outputs and gradients, mask included."""
        import copy

        if type(module).__name__ != "Idefics2PerceiverResampler":
            raise TypeError(f"module: expected Idefics2PerceiverResampler, got {type(module).__name__}")
        new = copy.copy(module)
        new._modules = dict(module._modules)
        new.layers = nn.ModuleList(copy.copy(layer) for layer in module.layers)
        for layer in new.layers:
            layer._modules = dict(layer._modules)
            layer.self_attn = Idefics2PerceiverAttention.from_module(layer.self_attn)
        return new

    def forward(self, x: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        from mmfuse.ops.linear import mlp

        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents, media_mask) + latents
            norm, (fc1, fc2) = ff[0], exact_linears(ff, "1", "3")
            latents = mlp(norm(latents), [fc1.weight, fc2.weight], None, "gelu") + latents
        return self.norm(latents)



class Idefics2PerceiverAttention(nn.Module):
    """transformers' ``Idefics2PerceiverAttention`` on ``mmfuse.cross_attention``: latents attend to
    ``context ‖ latents`` with grouped-query heads and the resampler's padding mask. Same
    ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (shared) and state_dict; ``mmfuse.patch``
    swaps it inside ``Idefics2PerceiverResampler``, which keeps its own class and checkpoint layout.
    K/V of the context and of the latents are projected separately and read by the attention kernel
    from both tensors: neither ``context ‖ latents`` nor its K/V is built, and the forward launches no
    copy and no host synchronisation."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "Idefics2PerceiverAttention":
        if type(module).__name__ != "Idefics2PerceiverAttention":
            raise TypeError(f"module: expected Idefics2PerceiverAttention, got {type(module).__name__}")
        if getattr(module.config, "attention_dropout", 0.0):
            raise _patch.Unsupported(f"module: expected attention_dropout 0.0, got {module.config.attention_dropout}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.config = module.config
        new.num_heads, new.head_dim = module.num_heads, module.head_dim
        new.num_key_value_heads, new.scaling = module.num_key_value_heads, module.scaling
        new.is_causal = False
        new.q_proj, new.k_proj, new.v_proj, new.o_proj = module.q_proj, module.k_proj, module.v_proj, module.o_proj
        return new

    def forward(self, latents, context, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise ValueError("past_key_values: expected None (the resampler keeps no cache)")
        B, Lq, _ = latents.shape
        Lk = context.shape[1] + Lq
        key_mask = self._key_mask(attention_mask, B, Lk)
        q_proj, k_proj, v_proj, o_proj = _projections(self, "q_proj", "k_proj", "v_proj", "o_proj")
        q = _heads(q_proj(latents), self.num_heads)
        kv_heads = self.num_key_value_heads

        def project(proj):  # K or V of (context, latents): two sources the kernel reads in place
            return tuple(_heads(proj(x), kv_heads) for x in (context, latents))

        # The mask covers the context (the latents' columns are True by construction).
        if key_mask is not None:
            key_mask = key_mask[:, :context.shape[1]]
        out = cross_attention(q, project(k_proj), project(v_proj), key_mask=key_mask, scale=self.scaling)
        return o_proj(_merge(out)), None

    @staticmethod
    def _key_mask(attention_mask, B: int, Lk: int):
        """The resampler's mask as (B, Lk) bool, True = attend, from its structure only (no values read
        on the host, no sync). What the model says: ``Idefics2PerceiverResampler`` builds it with
        ``create_bidirectional_mask`` from a 2-D padding mask, so every query row is the same and any
        one row is the key mask: boolean (SDPA's / mmfuse's builder: (B, 1, Lq or 1, Lk)), additive
        float (eager's: 0 = attend), or the 2-D mask itself (flash-attention's)."""
        if attention_mask is None:
            return None
        m = attention_mask
        if m.dim() == 4 and m.shape[1] == 1 and m.shape[-1] == Lk and m.shape[0] in (1, B):
            row = m[:, 0, 0, :]
        elif m.dim() == 2 and m.shape[-1] == Lk and m.shape[0] in (1, B):
            row = m
        else:
            raise ValueError(f"attention_mask: expected the resampler's padding mask (B, 1, Lq or 1, {Lk}) or "
                             f"(B, {Lk}), got shape {tuple(m.shape)}")
        if m.dtype != torch.bool:
            row = row == 0 if m.dim() == 4 else row != 0  # additive 4-D (0 = attend); 2-D 1/0 (1 = attend)
        return row.expand(B, Lk)



#: transformers' Q-Former attention classes (the same code in the three families).
QFORMER_CLASSES = ("Blip2QFormerMultiHeadAttention", "InstructBlipQFormerMultiHeadAttention",
                   "InstructBlipVideoQFormerMultiHeadAttention")


class QFormerAttention(nn.Module):
    """transformers' Q-Former attention (BLIP-2, InstructBLIP, InstructBLIP-Video) on plain GEMMs
    and ``mmfuse.cross_attention``: one class for the Q-Former's self-attention (queries, and text
    tokens, over themselves) and its cross-attention (queries over the image encoder's tokens). Same
    ``query`` / ``key`` / ``value`` Linears and state_dict (the output projection is the layer's
    ``...QFormerSelfOutput``, left as it is).

    The class's own forward runs instead, unchanged, where the kernel would not compute the same thing:
    attention dropout in effect (training with ``attention_probs_dropout_prob`` > 0: the checkpoints'
    default is 0.1), attention weights asked for, or a mask that is not one boolean row per sample
    (``(B or 1, 1, 1, Lk)``, what ``attn_implementation="mmfuse"``'s mask builder makes; SDPA's builder
    gives ``(B, 1, Lq, Lk)`` when there is padding and ``None`` when there is none). The choice reads
    shapes, dtypes and flags, never the mask's values: no host synchronisation."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "QFormerAttention":
        if type(module).__name__ not in QFORMER_CLASSES:
            raise TypeError(f"module: expected one of {QFORMER_CLASSES}, got {type(module).__name__}")
        # transformers 4.x's class takes head_mask / past_key_value; up to 5.12 it has no `scaling` (and
        # is handed float masks, which the kernel route does not take anyway)
        _patch.check_class_contract(
            module, forward=("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask"),
            attributes=("scaling", "is_causal", "attention_dropout"))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("config", "num_attention_heads", "attention_head_size", "all_head_size", "scaling",
                     "is_causal", "attention_dropout"):
            setattr(new, name, getattr(module, name))
        new.query, new.key, new.value = module.query, module.key, module.value
        new._original_forward = type(module).forward  # the exact fallback (a function, not bound)
        return new

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        from mmfuse.integrations import _key_mask

        cross = encoder_hidden_states is not None
        source = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        usable, key_mask = _key_mask(mask, source.shape[0], source.shape[1])
        if not usable or (self.training and self.attention_dropout > 0) or kwargs.get("output_attentions"):
            return self._original_forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                          encoder_attention_mask, **kwargs)
        H = self.num_attention_heads
        query, key, value = _projections(self, "query", "key", "value")
        q = _heads(query(hidden_states), H)
        k = _heads(key(source), H)
        v = _heads(value(source), H)
        out = cross_attention(q, k, v, key_mask=key_mask, scale=self.scaling)
        return _merge(out), None  # (B, Lq, H*D): a view of the kernel's (B, Lq, H, D) storage
