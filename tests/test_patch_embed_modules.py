"""mmfuse.nn.PatchEmbed / PatchEmbed3d and the fused transformers CLIP / SigLIP vision embeddings:
state_dicts, from_module, outputs and gradients against the modules they replace (tiny configs,
no download)."""

import copy

import pytest
import torch
import torch.nn as nn

import mmfuse
from mmfuse.nn import CLIPVisionEmbeddings, PatchEmbed, PatchEmbed3d, SiglipVisionEmbeddings

transformers = pytest.importorskip("transformers")


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], dy)
    return out, grads


def _assert_same_training_step(original, fused, x, atol=2e-5):
    """Same outputs and same gradients (pixels and every parameter) through both modules."""
    out_ref = original(x)
    dy = torch.randn_like(out_ref)
    o1, g1 = _grads(original, x, dy)
    o2, g2 = _grads(fused, x, dy)
    torch.testing.assert_close(o2, o1, atol=atol, rtol=1e-4)
    assert len(g1) == len(g2)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def test_patch_embed_is_a_conv2d_drop_in():
    conv = nn.Conv2d(3, 20, 14, stride=14)
    new = PatchEmbed(3, 20, 14)
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    new.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 28, 42).contiguous(memory_format=torch.channels_last)
    _assert_same_training_step(conv, new, x)
    torch.testing.assert_close(new.tokens(x), conv(x).flatten(2).transpose(1, 2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(new(x[0]), conv(x[0]), atol=2e-5, rtol=1e-4)  # unbatched, as Conv2d takes


def test_double_backward_is_refused():
    x = torch.randn(1, 3, 28, 28, requires_grad=True)
    w = torch.randn(8, 3, 14, 14, requires_grad=True)
    (gx,) = torch.autograd.grad(mmfuse.patch_embed(x, w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_patch_embed_from_module_shares_parameters():
    conv = nn.Conv2d(4, 17, 16, stride=16, bias=False)
    new = PatchEmbed.from_module(conv)
    assert new.weight is conv.weight and new.bias is None
    assert list(new.state_dict()) == list(conv.state_dict())
    _assert_same_training_step(conv, new, torch.randn(3, 4, 16, 32))


def test_patch_embed3d_is_a_conv3d_drop_in():
    conv = nn.Conv3d(3, 24, (2, 14, 14), stride=(2, 14, 14))
    new = PatchEmbed3d.from_module(conv)
    assert isinstance(new, nn.Conv3d) and new.weight is conv.weight
    _assert_same_training_step(conv, new, torch.randn(1, 3, 4, 28, 14))
    fresh = PatchEmbed3d(3, 24, 14, 2)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}


@pytest.mark.parametrize("conv, exc", [
    (nn.Conv2d(3, 8, 14, stride=7), ValueError),
    (nn.Conv2d(3, 8, 14, stride=14, padding=1), ValueError),
    (nn.Conv2d(4, 8, 14, stride=14, groups=2), ValueError),
    (nn.Conv2d(3, 8, (14, 7), stride=(14, 7)), ValueError),
    (nn.Linear(3, 8), TypeError),
])
def test_patch_embed_from_module_refuses(conv, exc):
    with pytest.raises(exc, match="module"):
        PatchEmbed.from_module(conv)


# ----------------------------------------------------------------------------------------------
# transformers CLIP / SigLIP vision embeddings
# ----------------------------------------------------------------------------------------------
def _clip_embeddings():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as HF

    cfg = CLIPVisionConfig(hidden_size=40, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, num_channels=3)
    return HF(cfg)


def _siglip_embeddings():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as HF

    cfg = SiglipVisionConfig(hidden_size=36, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             image_size=42, patch_size=14, num_channels=3)
    return HF(cfg)


class _Holder(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x, **kw):
        return self.embeddings(x, **kw)


@pytest.mark.parametrize("make, fused_cls, image", [(_clip_embeddings, CLIPVisionEmbeddings, 28),
                                                     (_siglip_embeddings, SiglipVisionEmbeddings, 42)],
                         ids=["clip", "siglip"])
def test_hf_embeddings_swapped_by_patch(make, fused_cls, image):
    original = _Holder(make())
    model = copy.deepcopy(original)
    report = mmfuse.patch(model)
    assert [s[0] for s in report.swapped] == ["embeddings"]
    assert isinstance(model.embeddings, fused_cls)
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(3, 3, image, image)
    _assert_same_training_step(original, model, x)
    mmfuse.unpatch(model)
    assert type(model.embeddings).__name__ == type(original.embeddings).__name__


@pytest.mark.parametrize("make, fused_cls", [(_clip_embeddings, CLIPVisionEmbeddings),
                                             (_siglip_embeddings, SiglipVisionEmbeddings)], ids=["clip", "siglip"])
def test_hf_embeddings_fp16(make, fused_cls):
    """Half weights: the fused module casts fp32 pixels to the weight dtype, as the original does."""
    original = make().half()
    fused = fused_cls.from_module(original)
    x = torch.randn(2, 3, original.image_size, original.image_size)
    ref64 = copy.deepcopy(original).double()(x.double())
    out = fused(x)
    assert out.dtype == torch.float16
    mmfuse.testing.assert_close("out", out, ref64, original(x))


def test_hf_interpolate_pos_encoding_falls_back_to_the_original():
    original = _clip_embeddings()
    fused = CLIPVisionEmbeddings.from_module(original)
    x = torch.randn(2, 3, 42, 56)
    torch.testing.assert_close(fused(x, interpolate_pos_encoding=True), original(x, interpolate_pos_encoding=True))
    with pytest.raises(ValueError, match="doesn't match"):  # the original's own check, unchanged
        fused(x)


def test_hf_patch_embedding_conv_from_module():
    original = _siglip_embeddings()
    conv = original.patch_embedding
    new = PatchEmbed.from_module(conv)
    assert new.weight is conv.weight and new.bias is conv.bias
    _assert_same_training_step(conv, new, torch.randn(2, 3, 42, 28))


def test_hf_full_clip_vision_model_patched():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, num_channels=3)
    model = CLIPVisionModel(cfg).eval()
    patched = copy.deepcopy(model)
    report = mmfuse.patch(patched)
    assert any(name.endswith("embeddings") and old == "CLIPVisionEmbeddings" for name, old, _ in report.swapped)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(patched(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state,
                               atol=2e-5, rtol=1e-4)


def test_from_module_refuses_other_classes():
    with pytest.raises(TypeError, match="CLIPVisionEmbeddings"):
        CLIPVisionEmbeddings.from_module(_siglip_embeddings())


def test_packed_weight_is_not_cached_by_default_so_data_writes_are_seen():
    """A write through ``weight.data`` (EMA updates, some loaders) does not bump the weight's version: by
    default the modules repack on every call, so the output follows it."""
    conv = nn.Conv2d(3, 20, 14, stride=14)
    m = PatchEmbed.from_module(conv)
    x = torch.randn(2, 3, 28, 28)
    m.tokens(x)
    conv.weight.data.mul_(3.0)
    torch.testing.assert_close(m.tokens(x), conv(x).flatten(2).transpose(1, 2), atol=2e-5, rtol=1e-4)
    assert "_mmfuse_packed" not in m.__dict__


def test_packed_weight_cache_follows_weight_updates():
    """With ``cache_packed_weight``, modules pack the weight once and repack after any change to it that
    bumps its version (in-place step, load_state_dict, a new Parameter); a stale pack would give the old
    weight's output."""
    conv = nn.Conv2d(3, 20, 14, stride=14)
    m = PatchEmbed.from_module(conv)
    m.cache_packed_weight = True
    x = torch.randn(2, 3, 28, 28)

    def check():
        torch.testing.assert_close(m.tokens(x), conv(x).flatten(2).transpose(1, 2), atol=2e-5, rtol=1e-4)

    check()
    first = m.__dict__["_mmfuse_packed"]._packed
    check()
    assert m.__dict__["_mmfuse_packed"]._packed is first  # reused while unchanged
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # shared parameter, updated in place (an optimizer step)
    check()
    conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias.detach()})
    check()
    conv.weight = m.weight = nn.Parameter(torch.randn_like(conv.weight))
    check()
