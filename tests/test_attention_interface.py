"""attn_implementation="mmfuse": non-causal attention with padding masks runs mmfuse.cross_attention,
everything else SDPA; outputs and gradients equal the SDPA model's within the error rule."""

import copy

import pytest
import torch

import mmfuse
from mmfuse.testing import assert_close

pytest.importorskip("transformers")
from _transformers_versions import on_pinned  # noqa: E402




def _idefics2_resampler():
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    cfg = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                                  resampler_head_dim=8, num_key_value_heads=2, intermediate_size=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Idefics2PerceiverResampler._from_config(cfg)


def _run(model, ctx, mask):
    model.zero_grad(set_to_none=True)
    ctx = ctx.detach().clone().requires_grad_()
    out = model(ctx, mask)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    return out.detach(), [ctx.grad] + [p.grad for p in model.parameters()]


def test_idefics2_resampler_routes_to_mmfuse_with_padding(launches):
    assert mmfuse.register_transformers_attention() == "mmfuse"
    model = _idefics2_resampler()
    ctx = torch.randn(2, 11, 32)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0  # the second sample's context is padded
    ref32 = _run(model, ctx, mask)
    ref64 = _run(copy.deepcopy(model).double(), ctx.double(), mask)
    model.config._attn_implementation = "mmfuse"
    launches.clear()
    out = _run(model, ctx, mask)
    # (transformers 4.x and early 5.x build this mask as a float (B, 1, Lq, Lk) table: SDPA runs there,
    # its values never read to prove it pads keys only; mmfuse.patch's drop-in covers those versions)
    if on_pinned():
        assert "attn_fwd_kernel" in launches and "attn_bwd_dq_kernel" in launches
    assert_close("out", out[0], ref64[0], ref32[0])
    for i, (g, g64, g32) in enumerate(zip(out[1], ref64[1], ref32[1])):
        assert_close(f"grad {i}", g, g64, g32)


def test_causal_attention_falls_back_to_sdpa(launches):
    from transformers import LlamaConfig, LlamaModel

    mmfuse.register_transformers_attention()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    sdpa = LlamaModel(cfg).eval()
    cfg2 = copy.deepcopy(cfg)
    cfg2._attn_implementation = "mmfuse"
    fused = LlamaModel(cfg2).eval()
    fused.load_state_dict(sdpa.state_dict())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    launches.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).last_hidden_state, sdpa(ids).last_hidden_state)
    assert not any(name.startswith("attn_") for name in launches)  # causal: SDPA, not mmfuse
