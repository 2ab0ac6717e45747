"""No host synchronisation and no layout copy in the forward of patched attention (issue 13): the ops
PyTorch dispatches around mmfuse's kernels are recorded by a TorchDispatchMode (a custom op is one
entry; what runs inside it is the kernel launcher), and the patched Idefics2 resampler compiles with
``fullgraph=True``."""

from __future__ import annotations

import pytest
import torch

import mmfuse
from mmfuse.testing import OpNames

pytest.importorskip("transformers")

#: A GPU->CPU read (``item``, ``bool(t)``), or a copy whose only purpose is a layout or a join.
FORBIDDEN = ("_local_scalar_dense", "item", "cat", "clone", "contiguous", "copy_", "_to_copy")


class OpLog(OpNames):
    def forbidden(self):
        return [op for op in self.names if op in FORBIDDEN]


def _resampler(attn="sdpa"):
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    cfg = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                                  resampler_head_dim=8, num_key_value_heads=2, intermediate_size=64)
    if attn == "mmfuse":  # transformers validates the name when the model is built: register it first
        mmfuse.register_transformers_attention()
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Idefics2PerceiverResampler._from_config(cfg)


def _masks(B=2, N=11, Lq=5, attn="sdpa"):
    """The 4-D mask the resampler hands its attention layers under ``attn``, and the 2-D padding."""
    from transformers.masking_utils import create_bidirectional_mask

    mmfuse.register_transformers_attention()
    pad = torch.ones(B, N, dtype=torch.long)
    pad[1, 6:] = 0
    full = torch.cat([pad, torch.ones(B, Lq, dtype=torch.long)], dim=-1)
    cfg = _resampler(attn).config
    return create_bidirectional_mask(config=cfg, inputs_embeds=torch.zeros(B, Lq, 32), attention_mask=full), pad


@pytest.mark.parametrize("attn", ["sdpa", "eager", "mmfuse"])
def test_patched_idefics2_attention_forward_has_no_sync_and_no_copy(attn):
    model = _resampler(attn)
    mmfuse.patch(model)
    layer = model.layers[0].self_attn
    mask, _ = _masks(attn=attn)
    latents, ctx = torch.randn(2, 5, 32), torch.randn(2, 11, 32)
    with OpLog() as log:
        out, _ = layer(latents, ctx, attention_mask=mask)
    assert log.forbidden() == [], log.names
    assert "cross_attention_fwd" in log.names
    # Same numbers as the unpatched layer under SDPA.
    ref_model = _resampler("sdpa")
    ref_mask, _ = _masks(attn="sdpa")
    ref, _ = ref_model.layers[0].self_attn(latents, ctx, attention_mask=ref_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_interface_forward_has_no_sync_and_no_copy():
    """attn_implementation="mmfuse": our mask builder hands a (B, 1, 1, Lk) padding mask, routed by its
    shape; the output goes back in transformers' (B, Lq, H, D) layout without a copy."""
    from mmfuse.integrations import mmfuse_attention_forward

    mask, _ = _masks(attn="mmfuse")
    assert mask.shape == (2, 1, 1, 16) and mask.dtype == torch.bool
    module = torch.nn.Module()
    module.is_causal, module.training = False, False
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    with OpLog() as log:
        out, _ = mmfuse_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert log.forbidden() == [] and "cross_attention_fwd" in log.names, log.names
    assert out.shape == (2, 5, 4, 8) and out.is_contiguous()


def test_patched_idefics2_resampler_compiles_fullgraph():
    model = _resampler("sdpa")
    mmfuse.patch(model)
    _, pad = _masks()
    ctx = torch.randn(2, 11, 32)
    eager = model(ctx, pad)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # raises on any graph break
    torch.testing.assert_close(compiled(ctx, pad), eager, rtol=0, atol=0)


def test_mask_route_is_decided_by_structure_only():
    from mmfuse.integrations import _key_mask

    pad = torch.tensor([[True, True, False]])
    ok, km = _key_mask(pad[:, None, None, :], 1, 3)
    assert ok and torch.equal(km, pad)
    assert _key_mask(None, 2, 3) == (True, None)
    # One row per query, or a float mask: could be causal or a real bias; telling would mean reading
    # the values, so these go to SDPA whatever they hold.
    assert _key_mask(pad[:, None, None, :].expand(1, 1, 4, 3), 1, 3)[0] is False
    assert _key_mask(torch.zeros(1, 1, 1, 3), 1, 3)[0] is False


def test_openflamingo_perceiver_attention_never_concatenates():
    from mmfuse.nn.attention import PerceiverAttention

    torch.manual_seed(0)
    layer = PerceiverAttention(dim=16, dim_head=8, heads=2)
    media, latents = torch.randn(2, 9, 16), torch.randn(2, 3, 16)
    media_mask = torch.rand(2, 9) > 0.3
    with OpLog() as log:
        out = layer(media, latents, media_mask)
    assert log.forbidden() == [] and "cross_attention_fwd" in log.names, log.names
    # Against the concatenation done by hand in PyTorch.
    m, lat = layer.norm_media(media), layer.norm_latents(latents)
    kv = torch.cat([m, lat], 1) @ layer.to_kv.weight.t()
    k, v = (t.view(2, 12, 2, 8).transpose(1, 2) for t in kv.chunk(2, -1))
    q = (lat @ layer.to_q.weight.t()).view(2, 3, 2, 8).transpose(1, 2)
    mask = torch.cat([media_mask, torch.ones(2, 3, dtype=torch.bool)], 1)[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = ref.transpose(1, 2).reshape(2, 3, 16) @ layer.to_out.weight.t()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_drop_in_forward_has_no_sync_and_no_copy(batch_first):
    """Sequence-first inputs are projected in their own layout and viewed as heads: no transposed copy."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=12, vdim=12)
    layer = mmfuse.nn.MultiheadAttention.from_module(mha)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 7, 12)
    if not batch_first:
        q, k = q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous()
    pad = torch.rand(2, 7) > 0.7
    with OpLog() as log:
        out, _ = layer(q, k, k, key_padding_mask=pad)
    assert log.forbidden() == [], log.names
    torch.testing.assert_close(out, mha(q, k, k, key_padding_mask=pad)[0], rtol=1e-5, atol=1e-5)
