"""mmfuse.nn.MultiheadAttention (from nn.MultiheadAttention), CrossAttention (GQA) and the
OpenFlamingo-layout PerceiverResampler: outputs and gradients against PyTorch within the error rule."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmfuse
from mmfuse.nn import CrossAttention, Idefics2PerceiverAttention, MultiheadAttention, PerceiverResampler
from mmfuse.testing import assert_close
from _adapters import AdapterStandIn


def _run(fn, params, inputs):
    for p in params:
        p.grad = None
    inputs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    return out.detach(), [t.grad for t in inputs if t.is_floating_point()] + [p.grad.clone() for p in params]


def _compare(module, fused_fn, ref_fn, inputs):
    """fused_fn(module) vs ref_fn on a float64 copy and on the module itself (same precision)."""
    ref32 = _run(lambda *x: ref_fn(module, *x), list(module.parameters()), inputs)
    m64 = copy.deepcopy(module).double()
    ref64 = _run(lambda *x: ref_fn(m64, *x), list(m64.parameters()),
                 [t.double() if t.is_floating_point() else t for t in inputs])
    out = _run(lambda *x: fused_fn(module, *x), list(module.parameters()), inputs)
    assert_close("out", out[0], ref64[0], ref32[0])
    assert len(out[1]) == len(ref32[1])
    for i, (g, g64, g32) in enumerate(zip(out[1], ref64[1], ref32[1])):
        assert_close(f"grad {i}", g, g64, g32)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
def test_multihead_attention_from_module(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
    fused = MultiheadAttention.from_module(mha)
    assert list(fused.state_dict()) == list(mha.state_dict())  # same checkpoint layout
    kv_dim = kdim or 32
    q = torch.randn(2, 7, 32)
    kv = torch.randn(2, 13, kv_dim)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 9:] = True  # True = ignore, nn.MultiheadAttention's convention
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    _compare(mha,
             lambda m, q, kv: MultiheadAttention.from_module(m)(q, kv, kv, key_padding_mask=pad)[0],
             lambda m, q, kv: m(q, kv, kv, key_padding_mask=pad, need_weights=False)[0], [q, kv])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_unbatched_inputs_like_nn(batch_first):
    """nn.MultiheadAttention takes unbatched (L, E) inputs (with either batch_first): so does the drop-in."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    q, kv = torch.randn(7, 32), torch.randn(13, 32)
    pad = torch.zeros(13, dtype=torch.bool)
    pad[9:] = True
    _compare(mha,
             lambda m, q, kv: MultiheadAttention.from_module(m)(q, kv, kv, key_padding_mask=pad)[0],
             lambda m, q, kv: m(q, kv, kv, key_padding_mask=pad, need_weights=False)[0], [q, kv])
    with pytest.raises(ValueError, match="key / value: expected 2-D"):
        MultiheadAttention.from_module(mha)(q, kv[None], kv[None])


def test_multihead_attention_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention.from_module(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    fused = MultiheadAttention.from_module(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="need_weights"):
        fused(x, x, x, need_weights=True)


def _cross_attention_reference(m, x, ctx):
    q = F.linear(x, m.to_q.weight).unflatten(-1, (m.heads, -1)).transpose(1, 2)
    k = F.linear(ctx, m.to_k.weight).unflatten(-1, (m.kv_heads, -1)).transpose(1, 2)
    v = F.linear(ctx, m.to_v.weight).unflatten(-1, (m.kv_heads, -1)).transpose(1, 2)
    out = mmfuse.cross_attention_reference(q, k, v)
    return F.linear(out.transpose(1, 2).flatten(2), m.to_out.weight)


def test_cross_attention_gqa_with_broadcast_queries():
    torch.manual_seed(0)
    m = CrossAttention(32, heads=4, dim_head=8, kv_dim=20, kv_heads=2)
    queries = torch.randn(1, 6, 32)  # learnable queries, shared by the batch
    ctx = torch.randn(3, 15, 20)
    _compare(m, lambda m, x, c: m(x, c), _cross_attention_reference, [queries, ctx])


def _openflamingo_reference(m, x):
    """OpenFlamingo's resampler written out with an explicit softmax (media tokens (B, N, D))."""
    latents = m.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
    for attn, ff in m.layers:
        media, lat = attn.norm_media(x), attn.norm_latents(latents)
        h = attn.heads
        q = F.linear(lat, attn.to_q.weight).unflatten(-1, (h, -1)).transpose(1, 2)
        kv = F.linear(torch.cat([media, lat], dim=1), attn.to_kv.weight)
        k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        out = (sim - sim.amax(-1, keepdim=True)).softmax(-1) @ v
        latents = F.linear(out.transpose(1, 2).flatten(2), attn.to_out.weight) + latents
        latents = ff(latents) + latents
    return m.norm(latents)


def test_perceiver_resampler_matches_openflamingo():
    torch.manual_seed(0)
    m = PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, ff_mult=2)
    keys = set(m.state_dict())
    assert {"latents", "layers.0.0.norm_media.weight", "layers.0.0.to_q.weight", "layers.0.0.to_kv.weight",
            "layers.0.0.to_out.weight", "layers.1.1.0.weight", "layers.1.1.1.weight", "layers.1.1.3.weight",
            "norm.weight"} <= keys
    _compare(m, lambda m, x: m(x), _openflamingo_reference, [torch.randn(2, 11, 32)])


def test_perceiver_resampler_media_mask():
    torch.manual_seed(0)
    m = PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, ff_mult=1)
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    short = m(x[1:, :5])  # the padded sample equals the same media without the padding
    torch.testing.assert_close(m(x, mask)[1:], short, rtol=1e-5, atol=1e-5)


def _tiny_idefics2_resampler(hidden, latents, depth, heads, head_dim, kv_heads):
    """transformers' Idefics2PerceiverResampler from a tiny config (no download), on SDPA."""
    pytest.importorskip("transformers")
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    cfg = Idefics2PerceiverConfig(hidden_size=hidden, resampler_n_latents=latents, resampler_depth=depth,
                                  resampler_n_heads=heads, resampler_head_dim=head_dim,
                                  num_key_value_heads=kv_heads, intermediate_size=2 * hidden)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Idefics2PerceiverResampler._from_config(cfg)


def test_idefics2_resampler_patched_matches_with_padding():
    hf = _tiny_idefics2_resampler(32, latents=5, depth=2, heads=4, head_dim=8, kv_heads=2)
    keys = list(hf.state_dict())
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    ctx = torch.randn(2, 11, 32)
    patched = copy.deepcopy(hf)
    report = mmfuse.patch(patched)
    # the perceiver layers' gated MLPs are swapped too (registry family "Idefics2", gated mlp)
    assert [new for _, _, new in report.swapped] == ["Idefics2PerceiverAttention", "FusedIdefics2MLP"] * 2
    assert isinstance(patched.layers[0].self_attn, Idefics2PerceiverAttention)
    assert list(patched.state_dict()) == keys  # the checkpoint layout is unchanged

    def fused(m, c):  # runs last in _compare: patch hf itself (parameters shared) and call it
        if not isinstance(m.layers[0].self_attn, Idefics2PerceiverAttention):
            mmfuse.patch(m)
        return m(c, mask)

    _compare(hf, fused, lambda m, c: m(c, mask), [ctx])
    assert isinstance(hf.layers[1].self_attn, Idefics2PerceiverAttention)


def test_perceiver_resampler_from_idefics2_shares_parameters():
    hf = _tiny_idefics2_resampler(16, latents=3, depth=1, heads=4, head_dim=4, kv_heads=1)
    fused = PerceiverResampler.from_module(hf)
    assert isinstance(fused.layers[0].self_attn, Idefics2PerceiverAttention)
    assert type(hf.layers[0].self_attn).__name__ == "Idefics2PerceiverAttention" and hf.layers[0].self_attn is not \
        fused.layers[0].self_attn  # the original is untouched
    assert {id(p) for p in fused.parameters()} == {id(p) for p in hf.parameters()}
    assert list(fused.state_dict()) == list(hf.state_dict())
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    _compare(hf, lambda m, c: PerceiverResampler.from_module(m)(c, mask), lambda m, c: m(c, mask),
             [torch.randn(2, 7, 16)])


def test_cross_attention_from_module_builds_the_mha_drop_in():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    assert isinstance(CrossAttention.from_module(mha), MultiheadAttention)


@pytest.mark.parametrize("make,path,args", [
    (lambda: CrossAttention(dim=16, heads=2, dim_head=8), "to_k", lambda: (torch.randn(2, 3, 16), torch.randn(2, 5, 16))),
    (lambda: PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, ff_mult=1), "layers.0.0.to_kv",
     lambda: (torch.randn(2, 5, 16),)),
    (lambda: PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, ff_mult=1), "layers.0.1.3",
     lambda: (torch.randn(2, 5, 16),)),
    (lambda: MultiheadAttention.from_module(nn.MultiheadAttention(16, 2, batch_first=True)), "out_proj",
     lambda: (torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))),
], ids=["cross-attention", "perceiver attention", "perceiver feed-forward", "multihead attention"])
@pytest.mark.parametrize("plain", ["pytorch", "mmfuse"])
def test_a_layer_wrapped_after_construction_is_applied_or_refused(make, path, args, plain, monkeypatch):
    """A Linear wrapped afterwards (an adapter): a projection, a plain GEMM, is the child called (its
    update applied, as by the original) unless MMFUSE_PLAIN_GEMMS=mmfuse, where its weight is read by
    mmfuse's GEMM; the feed-forward's Linears are read by the fused MLP. Where a weight is read, the
    adapter would be skipped, so the forward raises naming it."""
    monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", plain)
    torch.manual_seed(0)
    m = make()
    inputs = args()
    parent, _, leaf = path.rpartition(".")
    owner = m.get_submodule(parent) if parent else m
    plain_layer = not path.startswith("layers.0.1")
    expected = None
    if plain_layer and plain == "pytorch":  # the same module computed with the update added by hand
        reference = copy.deepcopy(m)
        shifted = reference.get_submodule(path)
        shifted.register_forward_hook(lambda mod, a, out: out + 0.25)
        expected = reference(*inputs)
    owner._modules[leaf] = AdapterStandIn(owner._modules[leaf])
    if expected is not None:
        torch.testing.assert_close(m(*inputs), expected)
        return
    with pytest.raises(RuntimeError, match=rf"{leaf}: expected the .*Linear that mmfuse built this module with, got "
                                           r".*AdapterStandIn.*apply adapters before mmfuse.patch"):
        m(*inputs)
