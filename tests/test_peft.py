"""PEFT's LoRA and mmfuse.patch, in both orders (tiny transformers modules built from configs).

LoRA after patch: where the swapped module's forward computes through the wrapped layer (a plain GEMM
swap), the adapter applies; where it reads the layer's weight into a fused op, or fuses the activation
after it, the forward raises naming the layer (it would otherwise skip the adapter, or add its update
after the activation). LoRA before patch: the adapted modules are left alone, with the reason."""

import copy

import pytest
import torch
import torch.nn as nn

import mmfuse

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class _Parent(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, pixels):
        return self.projector(self.tower(pixel_values=pixels).last_hidden_state)


def _llava_parts(projector_cls="llava"):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, PaliGemmaConfig
    from transformers.models.gemma import GemmaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector
    from transformers.models.siglip import SiglipVisionConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    if projector_cls == "llava":
        cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(
            hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
        projector = LlavaMultiModalProjector(cfg)
    else:  # PaliGemma's projector: one Linear (a plain GEMM: swapped only with MMFUSE_PLAIN_GEMMS=mmfuse)
        cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(hidden_size=16, projection_dim=24),
                              text_config=GemmaConfig(hidden_size=24, num_hidden_layers=1, vocab_size=64))
        projector = PaliGemmaMultiModalProjector(cfg)
    return _Parent(tower=CLIPVisionModel(vision), projector=projector).eval()


def _lora(model, targets):
    torch.manual_seed(1)  # the same LoRA weights for the patched model and the reference
    cfg = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    return peft.inject_adapter_in_model(cfg, model)


def test_lora_after_patch_on_fused_forwards_raises_naming_the_layer():
    pixels = torch.randn(1, 3, 28, 28)
    for targets, vision_tower, layer in [(["linear_1", "linear_2"], False, "linear_1"),  # the fused MLP reads W
                                         (["fc1", "fc2"], True, "fc1")]:  # quick_gelu fused after fc1
        model = _llava_parts()
        mmfuse.patch(model, vision_tower=vision_tower)
        _lora(model, targets)
        with torch.no_grad(), pytest.raises(RuntimeError, match=rf"\.{layer}: expected the .*Linear that mmfuse built "
                                                               r"this module with, got peft\.tuners\.lora"):
            model(pixels)


def test_lora_after_patch_on_a_plain_gemm_swap_applies(monkeypatch):
    from mmfuse import registry

    pixels = torch.randn(1, 3, 28, 28)
    reference = _lora(_llava_parts("paligemma"), ["linear"])
    monkeypatch.setattr(registry._dispatch, "PLAIN_GEMMS", "pytorch")  # the default, whatever the environment
    model = _llava_parts("paligemma")  # its one Linear, nothing to fuse, is left as PyTorch's
    assert ("projector", registry.NOTHING_TO_FUSE) in [(n, why) for n, _, why in mmfuse.patch(model).left_alone]
    monkeypatch.setattr(registry._dispatch, "PLAIN_GEMMS", "mmfuse")  # MMFUSE_PLAIN_GEMMS=mmfuse: swapped as a plain GEMM
    model = _llava_parts("paligemma")
    report = mmfuse.patch(model)
    assert "projector" in [name for name, _, _ in report.swapped], str(report)
    _lora(model, ["linear"])
    assert type(model.projector.linear).__module__.startswith("peft.")
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(pixels), rtol=1e-5, atol=1e-5)


def test_lora_before_patch_leaves_the_adapted_modules_alone():
    pixels = torch.randn(1, 3, 28, 28)
    model = _lora(_llava_parts(), ["linear_1", "linear_2", "fc1", "fc2"])
    reference = copy.deepcopy(model)
    report = mmfuse.patch(model, vision_tower=True)
    left = {name: why for name, _, why in report.left_alone}
    [mlp] = [name for name in left if name.endswith("encoder.layers.0.mlp")]
    assert "peft" in left["projector"] and "peft" in left[mlp], str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(pixels), rtol=1e-5, atol=1e-5)
