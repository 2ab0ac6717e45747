"""The model registry against the installed transformers.

* Enumeration: every projector-like class of a vision-language model module is covered by a family
  or declined with a reason; no stale entries. A new class in a future transformers fails here.
* Per family: the real class built from a tiny config (no download), inside a parent module,
  ``mmfuse.patch``-ed: swapped, Triton kernels ran in its forward, and output, input gradient and
  parameter gradients match the original in fp64 under the error rule (fp32 run vs fp64 reference,
  with PyTorch's own fp32 error as the yardstick).
"""

import copy

import pytest
import torch
import torch.nn as nn

import mmfuse
from mmfuse import registry
from mmfuse.testing import OpNames, assert_close
from _adapters import AdapterStandIn

transformers = pytest.importorskip("transformers")
from _transformers_versions import (Models, merged_output, off_pin_skip_on_error, on_pinned,  # noqa: E402
                                    pinned_only)

M = Models()  # transformers.models; on another version, what it lacks skips the tests that use it
if not on_pinned():
    from _transformers_versions import eager_attention_when_unset
    eager_attention_when_unset()


@pinned_only
def test_every_projector_like_class_is_covered_or_declined():
    found = registry.projector_like_classes()
    covered = {(f.module, c) for f in registry.FAMILIES  # model-level families are whole models
               if not f.tower and not registry.is_model_level(f) for c in f.classes}
    unknown = sorted(set(found) - covered - set(registry.DECLINED))
    assert not unknown, f"classes neither covered nor declined (decide, then list them): {unknown}"
    stale = sorted((covered | set(registry.DECLINED)) - set(found) - registry.NOT_ENUMERATED)
    assert not stale, f"registry entries for classes the installed transformers lacks: {stale}"
    assert all(registry.DECLINED[k] for k in registry.DECLINED), "every declined class needs a reason"
    assert not covered & set(registry.DECLINED)


def test_each_class_belongs_to_one_family():
    """One family per class, tower or not: ``patch`` picks the family by class, and unpickling a patched
    module makes its class again the same way (with every family in view)."""
    import collections

    counts = collections.Counter((f.module, c) for f in registry.FAMILIES for c in f.classes)
    assert not [key for key, n in counts.items() if n > 1]


@pinned_only
def test_every_family_names_a_known_recipe_and_real_class():
    import importlib

    for fam in registry.FAMILIES:
        assert fam.recipe in registry.RECIPES, fam
        for cls in fam.classes:
            mod = importlib.import_module(f"transformers.models.{fam.module}.modeling_{fam.module}")
            assert isinstance(getattr(mod, cls), type), (fam.name, cls)


# ----------------------------------------------------------------------------------------------
# Tiny real modules, one per covered class
# ----------------------------------------------------------------------------------------------
V, T = 16, 24  # vision and text hidden sizes (no multiple of the interpreter's 32-wide tiles)


def _clip_vision(**kw):
    return M.clip.CLIPVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=28, patch_size=14, **kw)


def _llama_text():
    return M.llama.LlamaConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, vocab_size=64)


def _tokens(n, d, batch=None):
    shape = (n, d) if batch is None else (batch, n, d)
    return [torch.randn(*shape)]


def _llava_like(cfg_cls, proj_cls, **kw):
    def make():
        cfg = cfg_cls(vision_config=_clip_vision(), text_config=_llama_text(), **kw)
        return proj_cls(cfg), _tokens(7, V, batch=2)
    return make


def _qwen_tower(mod, tower, vision_config, **kw):
    """The merger / patch embed of a 1-layer vision tower built from a tiny vision config."""
    def make(part):
        cfg = getattr(getattr(M, mod), vision_config)(**kw)
        return getattr(_mod(mod, tower)._from_config(cfg), part), cfg
    return make


def _merger(build, dim):
    def make():
        module, cfg = build("merger")
        return module, [torch.randn(4 * 3, dim)]
    return make


def _patch_embed(build):
    def make():
        module, cfg = build("patch_embed")
        k = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        return module, [torch.randn(5, k)]
    return make


_QW2 = dict(depth=1, embed_dim=V, hidden_size=T, num_heads=2, mlp_ratio=2, patch_size=2, temporal_patch_size=2,
            in_channels=3, spatial_merge_size=2)
_QW25 = dict(depth=1, hidden_size=V, intermediate_size=32, num_heads=2, out_hidden_size=T, patch_size=2,
             temporal_patch_size=2, in_channels=3, spatial_merge_size=2, fullatt_block_indexes=[0])
_QW3 = dict(depth=1, hidden_size=V, intermediate_size=32, num_heads=2, out_hidden_size=T, patch_size=2,
            temporal_patch_size=2, in_channels=3, spatial_merge_size=2, num_position_embeddings=16,
            deepstack_visual_indexes=[])
_GLM = dict(depth=1, hidden_size=V, intermediate_size=32, num_heads=2, out_hidden_size=T, patch_size=2,
            temporal_patch_size=2, in_channels=3, spatial_merge_size=2, image_size=8)


def _gemma3():
    vcfg = M.siglip.SiglipVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=4)
    tcfg = M.gemma3.Gemma3TextConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, vocab_size=64)
    cfg = M.gemma3.Gemma3Config(vision_config=vcfg, text_config=tcfg, mm_tokens_per_image=4)
    proj = M.gemma3.modeling_gemma3.Gemma3MultiModalProjector(cfg)
    with torch.no_grad():
        proj.mm_input_projection_weight.normal_()
        proj.mm_soft_emb_norm.weight.normal_(0, 0.3)  # (zeros at init: the 1 + weight scale would go untested)
    return proj, [torch.randn(2, 16, V)]


def _pixel_shuffle(cfg_mod, cfg_cls, proj_cls, vcfg_cls, **kw):
    def make():
        vcfg = vcfg_cls(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        cfg = cfg_cls(vision_config=vcfg, text_config=_llama_text(), **kw)
        return proj_cls(cfg), [torch.randn(2, 16, V)]
    return make


def _mistral3(mod, cfg_cls, proj_name):
    def make():
        vcfg = M.pixtral.PixtralVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, patch_size=2, image_size=8, head_dim=8)
        tcfg = M.mistral.MistralConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
        cfg = cfg_cls(vision_config=vcfg, text_config=tcfg, spatial_merge_size=2)
        proj = _mod(mod, proj_name)(cfg)
        sizes = torch.tensor([[8, 8], [4, 8]])  # 16 + 8 patches
        return proj, [torch.randn(24, V), sizes]
    return make


def _connector(mod, cfg_cls, proj, vcfg_cls, **kw):
    """Pixel-shuffle connectors (Idefics3, SmolVLM, Aya Vision): 16 tokens = a 4x4 grid."""
    def make():
        vcfg = vcfg_cls(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        cfg = cfg_cls(vision_config=vcfg, text_config=_llama_text(), **kw)
        return _mod(mod, proj)(cfg), [torch.randn(2, 16, V)]
    return make


def _llama4():
    cfg = M.llama4.Llama4Config(vision_config=dict(hidden_size=V, vision_output_dim=V, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32),
                                text_config=_TINY_TEXT)
    return _mod("llama4", "Llama4MultiModalProjector")(cfg), _tokens(7, V, batch=2)


def _llama4_adapter():
    """Llama 4's vision adapter: pixel shuffle (ratio 0.5) of a 4x4 patch grid, fc1 -> GELU -> fc2 -> GELU."""
    vcfg = M.llama4.Llama4VisionConfig(hidden_size=V, intermediate_size=4 * V, num_hidden_layers=1,
                                       num_attention_heads=2, pixel_shuffle_ratio=0.5, projector_input_dim=20,
                                       projector_output_dim=20, vision_output_dim=V)
    return _mod("llama4", "Llama4VisionPixelShuffleMLP")(vcfg), [torch.randn(2, 16, V)]


def _lfm2():
    vcfg = M.siglip2.Siglip2VisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2)
    tcfg = M.lfm2.Lfm2Config(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64)
    cfg = M.lfm2_vl.Lfm2VlConfig(vision_config=vcfg, text_config=tcfg, downsample_factor=2, projector_hidden_size=20)
    return M.lfm2_vl.modeling_lfm2_vl.Lfm2VlMultiModalProjector(cfg), [torch.randn(2, 4, 6, V)]


def _paddle():
    cfg = M.paddleocr_vl.PaddleOCRVLConfig(vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, spatial_merge_size=2),
                                           text_config=dict(hidden_size=T, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, num_key_value_heads=2,
                                                            vocab_size=64))
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    return M.paddleocr_vl.modeling_paddleocr_vl.PaddleOCRProjector(cfg), [torch.randn(24, V), grid]


def _clip_embeddings(mod, cls, cfg_cls):
    def make():
        cfg = getattr(getattr(M, mod), cfg_cls)(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14)
        return getattr(getattr(getattr(M, mod), f"modeling_{mod}"), cls)(cfg), [torch.randn(2, 3, 28, 28)]
    return make


def _vision_embeddings(mod, cls, cfg_cls, extra_inputs=(), **kw):
    """A patch embedding built from a tiny vision config of its own: 8x8 images of 4x4 patches."""
    def make():
        cfg = getattr(getattr(M, mod), cfg_cls)(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=8, patch_size=4, **kw)
        return _mod(mod, cls)(cfg), [torch.randn(2, 3, 8, 8), *extra_inputs]
    return make


def _siglip2_embeddings():
    cfg = M.siglip2.Siglip2VisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, patch_size=2, num_patches=16)
    shapes = torch.tensor([[4, 4], [2, 6]])
    pixels = torch.randn(2, 16, 3 * 2 * 2)  # NaFlex: patches cut by the processor, padded to 16
    return _mod("siglip2", "Siglip2VisionEmbeddings")(cfg), [pixels, shapes]


_PATCH_MASK = torch.ones(2, 2, 2, dtype=torch.bool)


def _idefics2_attention():
    cfg = M.idefics2.Idefics2Config(perceiver_config=dict(hidden_size=V, resampler_n_latents=3, resampler_depth=1,
                                                          resampler_n_heads=2, resampler_head_dim=8,
                                                          num_key_value_heads=1),
                                    text_config=dict(hidden_size=V, num_hidden_layers=1, vocab_size=64,
                                                     num_attention_heads=2, num_key_value_heads=2))
    attn = M.idefics2.modeling_idefics2.Idefics2PerceiverAttention(cfg.perceiver_config)
    return attn, [torch.randn(2, 3, V), torch.randn(2, 5, V)]


def _mod(mod, cls):
    return getattr(getattr(getattr(M, mod), f"modeling_{mod}"), cls)


def _merge_projector(mod, cfg_name, proj_name):
    """A projector after a 2x2 spatial merge, configured from plain vision / text dicts (LFM3-VL,
    MiniMax-M3-VL): 12 tokens of V features in."""
    def make():
        cfg = getattr(getattr(M, mod), cfg_name)(
            vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               spatial_merge_size=2),
            text_config=dict(hidden_size=T, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                             vocab_size=64), projector_hidden_size=20)
        return _mod(mod, proj_name)(cfg), [torch.randn(12, V)]
    return make


_QWEN2_TOWER = _qwen_tower("qwen2_vl", "Qwen2VisionTransformerPretrainedModel", "Qwen2VLVisionConfig", **_QW2)
_QWEN25_TOWER = _qwen_tower("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig",
                            **_QW25)
_QWEN3_TOWER = _qwen_tower("qwen3_vl", "Qwen3VLVisionModel", "Qwen3VLVisionConfig", **_QW3)
_QWEN35_TOWER = _qwen_tower("qwen3_5", "Qwen3_5VisionModel", "Qwen3_5VisionConfig", **_QW3)
_GLM_TOWER = _qwen_tower("glm4v", "Glm4vVisionModel", "Glm4vVisionConfig", **_GLM)

class _Builders(dict):
    """key -> builder of (module, inputs). Off the pinned transformers a builder whose tiny config that
    version rejects (or whose class it lacks) skips its test instead of failing it."""

    def __getitem__(self, key):
        make = super().__getitem__(key)
        return lambda: off_pin_skip_on_error(make, f"building the tiny {key[1]}")


BUILDERS = _Builders({
    ("llava", "LlavaMultiModalProjector"): _llava_like(M.llava.LlavaConfig, _mod("llava", "LlavaMultiModalProjector")),
    ("llava_next", "LlavaNextMultiModalProjector"): _llava_like(
        M.llava_next.LlavaNextConfig, _mod("llava_next", "LlavaNextMultiModalProjector")),
    ("llava_next_video", "LlavaNextVideoMultiModalProjector"): _llava_like(
        M.llava_next_video.LlavaNextVideoConfig, _mod("llava_next_video", "LlavaNextVideoMultiModalProjector")),
    ("llava_onevision", "LlavaOnevisionMultiModalProjector"): _llava_like(
        M.llava_onevision.LlavaOnevisionConfig, _mod("llava_onevision", "LlavaOnevisionMultiModalProjector")),
    ("video_llava", "VideoLlavaMultiModalProjector"): _llava_like(
        M.video_llava.VideoLlavaConfig, _mod("video_llava", "VideoLlavaMultiModalProjector")),
    ("fast_vlm", "FastVlmMultiModalProjector"): _llava_like(
        M.fast_vlm.FastVlmConfig, _mod("fast_vlm", "FastVlmMultiModalProjector"), projector_hidden_act="gelu"),
    ("vipllava", "VipLlavaMultiModalProjector"): _llava_like(
        M.vipllava.VipLlavaConfig, _mod("vipllava", "VipLlavaMultiModalProjector"), vision_feature_layers=-1),
    ("paligemma", "PaliGemmaMultiModalProjector"): lambda: (
        _mod("paligemma", "PaliGemmaMultiModalProjector")(M.paligemma.PaliGemmaConfig(
            vision_config=M.siglip.SiglipVisionConfig(hidden_size=V, projection_dim=T),
            text_config=M.gemma.GemmaConfig(hidden_size=T, num_hidden_layers=1, vocab_size=64))),
        _tokens(7, V, batch=2)),
    ("gemma3", "Gemma3MultiModalProjector"): _gemma3,
    ("qwen2_vl", "PatchMerger"): _merger(_QWEN2_TOWER, V),
    ("qwen2_vl", "PatchEmbed"): _patch_embed(_QWEN2_TOWER),
    ("qwen2_5_vl", "Qwen2_5_VLPatchMerger"): _merger(_QWEN25_TOWER, V),
    ("qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"): _patch_embed(_QWEN25_TOWER),
    ("qwen3_vl", "Qwen3VLVisionPatchMerger"): _merger(_QWEN3_TOWER, V),
    ("qwen3_vl", "Qwen3VLVisionPatchEmbed"): _patch_embed(_QWEN3_TOWER),
    ("qwen3_5", "Qwen3_5VisionPatchMerger"): _merger(_QWEN35_TOWER, V),
    ("qwen3_5", "Qwen3_5VisionPatchEmbed"): _patch_embed(_QWEN35_TOWER),
    ("glm4v", "Glm4vVisionPatchMerger"): _merger(_GLM_TOWER, T),
    ("glm4v", "Glm4vVisionPatchEmbed"): _patch_embed(_GLM_TOWER),
    ("mistral3", "Mistral3MultiModalProjector"): _mistral3("mistral3", M.mistral3.Mistral3Config,
                                                           "Mistral3MultiModalProjector"),
    ("lfm2_vl", "Lfm2VlMultiModalProjector"): _lfm2,
    ("lighton_ocr", "LightOnOcrMultiModalProjector"): _mistral3("lighton_ocr", M.lighton_ocr.LightOnOcrConfig,
                                                                "LightOnOcrMultiModalProjector"),
    ("idefics3", "Idefics3Connector"): _connector("idefics3", M.idefics3.Idefics3Config, "Idefics3Connector",
                                                  M.idefics3.Idefics3VisionConfig, scale_factor=2),
    ("smolvlm", "SmolVLMConnector"): _connector("smolvlm", M.smolvlm.SmolVLMConfig, "SmolVLMConnector",
                                                M.smolvlm.SmolVLMVisionConfig, scale_factor=2),
    ("aya_vision", "AyaVisionMultiModalProjector"): _connector(
        "aya_vision", M.aya_vision.AyaVisionConfig, "AyaVisionMultiModalProjector", M.siglip.SiglipVisionConfig,
        downsample_factor=2, alignment_intermediate_size=20),
    ("llama4", "Llama4MultiModalProjector"): _llama4,
    ("llama4", "Llama4VisionPixelShuffleMLP"): _llama4_adapter,
    ("idefics2", "Idefics2VisionEmbeddings"): _vision_embeddings(
        "idefics2", "Idefics2VisionEmbeddings", "Idefics2VisionConfig", [_PATCH_MASK]),
    ("idefics3", "Idefics3VisionEmbeddings"): _vision_embeddings(
        "idefics3", "Idefics3VisionEmbeddings", "Idefics3VisionConfig", [_PATCH_MASK]),
    ("smolvlm", "SmolVLMVisionEmbeddings"): _vision_embeddings(
        "smolvlm", "SmolVLMVisionEmbeddings", "SmolVLMVisionConfig", [_PATCH_MASK]),
    ("internvl", "InternVLVisionPatchEmbeddings"): _vision_embeddings(
        "internvl", "InternVLVisionPatchEmbeddings", "InternVLVisionConfig"),
    ("blip_2", "Blip2VisionEmbeddings"): _vision_embeddings("blip_2", "Blip2VisionEmbeddings", "Blip2VisionConfig"),
    ("instructblip", "InstructBlipVisionEmbeddings"): _vision_embeddings(
        "instructblip", "InstructBlipVisionEmbeddings", "InstructBlipVisionConfig"),
    ("instructblipvideo", "InstructBlipVideoVisionEmbeddings"): _vision_embeddings(
        "instructblipvideo", "InstructBlipVideoVisionEmbeddings", "InstructBlipVideoVisionConfig"),
    ("siglip2", "Siglip2VisionEmbeddings"): _siglip2_embeddings,
    ("cohere2_vision", "Cohere2VisionMultiModalProjector"): lambda: (
        _mod("cohere2_vision", "Cohere2VisionMultiModalProjector")(M.cohere2_vision.Cohere2VisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=V, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2),
            text_config=dict(model_type="cohere2", hidden_size=T, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64),
            downsample_factor=2, alignment_intermediate_size=20)), [torch.randn(2, 16, V)]),
    ("lfm3_vl", "Lfm3VlMultiModalProjector"): _merge_projector("lfm3_vl", "Lfm3VlConfig",
                                                                "Lfm3VlMultiModalProjector"),
    ("minimax_m3_vl", "MiniMaxM3VLMultiModalProjector"): _merge_projector("minimax_m3_vl", "MiniMaxM3VLConfig",
                                                                          "MiniMaxM3VLMultiModalProjector"),
    ("idefics2", "Idefics2MLP"): lambda: (_mod("idefics2", "Idefics2MLP")(hidden_size=V, intermediate_size=20,
                                                                         output_size=T, hidden_act="silu"),
                                         _tokens(7, V, batch=2)),
    ("qwen3_omni_moe", "Qwen3OmniMoeVisionPatchMerger"): lambda: (
        _mod("qwen3_omni_moe", "Qwen3OmniMoeVisionPatchMerger")(
            M.qwen3_omni_moe.Qwen3OmniMoeVisionEncoderConfig(**_QW3)), [torch.randn(12, V)]),
    ("internvl", "InternVLMultiModalProjector"): lambda: (
        _mod("internvl", "InternVLMultiModalProjector")(M.internvl.InternVLConfig(
            vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            text_config=_llama_text().to_dict(), downsample_ratio=0.5)), [torch.randn(2, 5, 4 * V)]),
    ("video_llama_3", "VideoLlama3Projector"): lambda: (_mod("video_llama_3", "VideoLlama3Projector")(
        M.video_llama_3.VideoLlama3Config(vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2),
                                            text_config=_llama_text().to_dict())),
        _tokens(7, V)),
    ("paddleocr_vl", "PaddleOCRProjector"): _paddle,
    ("clip", "CLIPVisionEmbeddings"): _clip_embeddings("clip", "CLIPVisionEmbeddings", "CLIPVisionConfig"),
    ("altclip", "AltCLIPVisionEmbeddings"): _clip_embeddings("altclip", "AltCLIPVisionEmbeddings",
                                                             "AltCLIPVisionConfig"),
    ("metaclip_2", "MetaClip2VisionEmbeddings"): _clip_embeddings("metaclip_2", "MetaClip2VisionEmbeddings",
                                                                  "MetaClip2VisionConfig"),
    ("siglip", "SiglipVisionEmbeddings"): _clip_embeddings("siglip", "SiglipVisionEmbeddings", "SiglipVisionConfig"),
    ("idefics2", "Idefics2PerceiverAttention"): _idefics2_attention,
})


# ----------------------------------------------------------------------------------------------
# Builders for the families examined in the second pass (issue 11's follow-up)
# ----------------------------------------------------------------------------------------------
def _cfg(mod, cfg_cls, **kw):
    return getattr(getattr(M, mod), cfg_cls)(**kw)


def _own_config(mod, cls, cfg_cls, inputs, **kw):
    """``cls(config)`` from a tiny config of its own module; ``inputs`` makes the inputs."""
    def make():
        return _mod(mod, cls)(_cfg(mod, cfg_cls, **kw)), inputs()
    return make


_TINY_VIT = dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
_TINY_TEXT = dict(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=64)
_GRID = torch.tensor([[1, 4, 4], [1, 2, 4]])  # 16 + 8 patches


def _pixels(batch=2, size=8):
    return lambda: [torch.randn(batch, 3, size, size)]


def _rows(n, k, *extra):
    return lambda: [torch.randn(n, k), *extra]


def _flattened_patches(n_rows=4, n_cols=4, k=12, batch=2):
    """Pix2Struct / Kosmos-2.5 inputs: (row, column) ids in the first two features, then the patch."""
    def make():
        rows = torch.arange(n_rows).repeat_interleave(n_cols).float()
        cols = torch.arange(n_cols).repeat(n_rows).float()
        ids = torch.stack([rows, cols], -1).expand(batch, -1, -1)
        return [torch.cat([ids, torch.randn(batch, n_rows * n_cols, k)], -1)]
    return make


def _init_(module, *names):
    with torch.no_grad():
        for name in names:
            module.get_parameter(name).normal_()
    return module


def _hunyuan_merger():
    cfg = _cfg("hunyuan_vl", "HunYuanVLVisionConfig", **_TINY_VIT, text_hidden_size=T, spatial_merge_size=2)
    merger = _init_(_mod("hunyuan_vl", "HunYuanVLVisionPatchMerger")(cfg), "image_newline", "image_begin",
                    "image_end", "image_sep")
    return merger, [torch.randn(2, 4 * 6, V), (4, 6)]


def _hy_v4_merger():
    cfg = _cfg("hy_v4_vl", "HYV4VLVisionConfig", **_TINY_VIT, out_hidden_size=T, spatial_merge_size=2)
    merger = _init_(_mod("hy_v4_vl", "HYV4VLVisionPatchMerger")(cfg), "image_newline")
    return merger, [torch.randn(1, 2 * 4 * 6, V), (4, 6)]  # two frames, each merged on its own


def _ernie_resampler(cls):
    def make():
        cfg = M.ernie4_5_vl_moe.Ernie4_5_VLMoeConfig(
            vision_config=dict(hidden_size=V, spatial_merge_size=2, temporal_merge_size=2),
            text_config=_TINY_TEXT)
        grid = torch.tensor([[1, 4, 4], [2, 2, 4]])  # an image (4 tokens) and a 2-frame video (2 x 2 tokens)
        return _mod("ernie4_5_vl_moe", cls)(cfg), [torch.randn(32, V), grid]
    return make


def _florence2():
    cfg = M.florence2.Florence2Config(vision_config=dict(embed_dim=[8, V], projection_dim=T, depths=[1, 1],
                                                         num_heads=[1, 2], num_groups=[1, 2],
                                                         max_position_embeddings=8, max_temporal_embeddings=4),
                                      text_config=dict(d_model=T, vocab_size=64))
    return _mod("florence2", "Florence2MultiModalProjector")(cfg), [torch.randn(2, V, 3, 4)]


def _perception_lm():
    cfg = M.perception_lm.PerceptionLMConfig(
        vision_config=dict(model_args=dict(embed_dim=V)), text_config=_llama_text().to_dict(),
        projector_pooling_ratio=2)
    return _mod("perception_lm", "PerceptionLMMultiModalProjector")(cfg), [torch.randn(2, 16, V)]


def _vbert(mod, cfg_cls, cls):
    def make():
        cfg = _cfg(mod, cfg_cls, vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2),
                   text_config=dict(hidden_size=T, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, vocab_size=64), pixel_shuffle_factor=2)
        return _mod(mod, cls)(cfg), [torch.randn(2, 16, V)]
    return make


def _gemma4_patches():
    cfg = _cfg("gemma4", "Gemma4VisionConfig", **_TINY_VIT, patch_size=2, position_embedding_size=8)
    embedder = _init_(_mod("gemma4", "Gemma4VisionPatchEmbedder")(cfg), "position_embedding_table")
    ids = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
    ids = torch.cat([ids, torch.full((1, 1, 2), -1)], 1).expand(2, -1, -1)  # 6 patches and 1 padding slot
    return embedder, [torch.rand(2, 7, 3 * 2 * 2), ids, ids[..., 0] < 0]


def _interp_patches(mod, cls, cfg_cls, **kw):
    def make():
        cfg = _cfg(mod, cfg_cls, **_TINY_VIT, patch_size=2, pos_emb_height=4, pos_emb_width=4, **kw)
        return _mod(mod, cls)(cfg), [torch.randn(24, 3 * 2 * 2 * cfg.patch_temporal), _GRID]
    return make


def _kimi_patches():
    cfg = _cfg("kimi_k25", "Kimi_K25VisionConfig", **_TINY_VIT, patch_size=2, pos_emb_height=4, pos_emb_width=4,
               pos_emb_time=2)
    embed = _init_(_mod("kimi_k25", "Kimi_K25VisionPatchEmbed")(cfg), "pos_emb.position_embeddings")
    return embed, [torch.randn(24, 3, 2, 2), _GRID]


def _hunyuan_patches():
    cfg = _cfg("hunyuan_vl", "HunYuanVLVisionConfig", **_TINY_VIT, patch_size=2, max_image_size=8)
    return _mod("hunyuan_vl", "HunYuanVLVisionPatchEmbed")(cfg), [torch.randn(24, 3 * 2 * 2), [[1, 4, 4], [1, 2, 4]]]


def _hy_v4_patches():
    cfg = _cfg("hy_v4_vl", "HYV4VLVisionConfig", **_TINY_VIT, patch_size=2, max_image_size=8)
    return _mod("hy_v4_vl", "HYV4VLVisionPatchEmbed")(cfg), [torch.randn(24, 3 * 2 * 2), [[1, 4, 4], [1, 2, 4]]]


def _paddle_patches():
    cfg = _cfg("paddleocr_vl", "PaddleOCRVisionConfig", **_TINY_VIT, image_size=8, patch_size=2)
    return _mod("paddleocr_vl", "PaddleOCRVisionEmbeddings")(cfg), [torch.randn(1, 24, 3, 2, 2), _GRID]


def _video_llama3_patches():
    cfg = _cfg("video_llama_3", "VideoLlama3VisionConfig", **_TINY_VIT, patch_size=2)
    return _mod("video_llama_3", "VideoLlama3VisionEmbeddings")(cfg), [torch.randn(24, 3 * 2 * 2)]


def _minicpm_patches():
    cfg = _cfg("minicpm_ocr", "MiniCPMOcrVisionConfig", **_TINY_VIT, image_size=8, patch_size=2)
    return _mod("minicpm_ocr", "MiniCPMOcrVisionEmbeddings")(cfg), [torch.randn(1, 3, 2, 2 * 24), _GRID[:, 1:]]


def _cosmos_patches():
    cfg = _cfg("cosmos3_edge", "Cosmos3EdgeVisionConfig", **_TINY_VIT, patch_size=2, num_patches=16,
               spatial_merge_size=2)
    return _mod("cosmos3_edge", "Cosmos3EdgeVisionEmbeddings")(cfg), [torch.randn(24, 3 * 2 * 2), _GRID]


def _inkling_patches():
    cfg = _cfg("inkling2", "Inkling2VisionConfig", **_TINY_VIT, patch_size=2, spatial_merge_size=2,
               posemb_grid_size=4)
    grid = torch.tensor([[1, 4, 4]])
    index = torch.arange(1, 17)  # the class token first, then 16 patches
    return _mod("inkling2", "Inkling2VisionEmbeddings")(cfg), [torch.randn(16 * 2 * 2, 3), grid, index]


BUILDERS.update({
    ("aria", "AriaProjectorMLP"): lambda: (_mod("aria", "AriaProjectorMLP")(V, 20, T), _tokens(7, V, batch=2)),
    ("inkling2", "Inkling2VisionMerger"): _own_config("inkling2", "Inkling2VisionMerger", "Inkling2VisionConfig",
                                                      _rows(7, 4 * V), **_TINY_VIT, spatial_merge_size=2,
                                                      projection_hidden_dim=20, text_hidden_size=T),
    ("muse_glimmer", "MuseGlimmerVisionAdapter"): _own_config(
        "muse_glimmer", "MuseGlimmerVisionAdapter", "MuseGlimmerConfig", _rows(7, V),
        vision_config=dict(_TINY_VIT), text_config=dict(_TINY_TEXT), out_hidden_size=V, projector_hidden_size=20),
    ("perception_lm", "PerceptionLMMultiModalProjector"): _perception_lm,
    ("granite_docling", "GraniteDoclingDeepStackMerger"): lambda: (
        _mod("granite_docling", "GraniteDoclingDeepStackMerger")(
            _cfg("granite_docling", "GraniteDoclingVisionConfig", **_TINY_VIT, out_hidden_size=T), 2),
        _tokens(5, 4 * V, batch=2)),
    ("minicpm_ocr", "MiniCPMOcrDownsampleMLP"): lambda: (_mod("minicpm_ocr", "MiniCPMOcrDownsampleMLP")(V // 4 + 1, T),
                                                         _tokens(7, 4 * (V // 4 + 1))),
    ("cosmos3_edge", "Cosmos3EdgePatchMerger"): _own_config(
        "cosmos3_edge", "Cosmos3EdgePatchMerger", "Cosmos3EdgeConfig", _rows(12, V),
        vision_config=dict(**_TINY_VIT, spatial_merge_size=2), text_config=_TINY_TEXT,
        projector_hidden_size=20),
    ("dots3_note", "Dots3NoteVisionMerger"): lambda: (_mod("dots3_note", "Dots3NoteVisionMerger")(T, V, 2),
                                                      [torch.randn(12, V)]),
    ("modernvbert", "ModernVBertConnector"): _vbert("modernvbert", "ModernVBertConfig", "ModernVBertConnector"),
    ("ultravbert", "UltraVBertConnector"): _vbert("ultravbert", "UltraVBertConfig", "UltraVBertConnector"),
    ("ernie4_5_vl_moe", "Ernie4_5_VLMoeVariableResolutionResamplerModel"): _ernie_resampler(
        "Ernie4_5_VLMoeVariableResolutionResamplerModel"),
    ("ernie4_5_vl_moe", "Ernie4_5_VL_MoeVariableResolutionResamplerModel"): _ernie_resampler(
        "Ernie4_5_VL_MoeVariableResolutionResamplerModel"),
    ("molmo2", "Molmo2ImageProjectorMLP"): _own_config("molmo2", "Molmo2ImageProjectorMLP", "Molmo2AdapterConfig",
                                                       _rows(7, V), hidden_size=V, intermediate_size=20,
                                                       text_hidden_size=T, mlp_bias=True),
    ("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3MultiModalProjector"): lambda: (
        _mod("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3MultiModalProjector")(V, 20, T, bias=True),
        _tokens(7, V, batch=2)),
    ("glm5_next", "Glm5NextVisionPatchMerger"): lambda: (
        _mod("glm5_next", "Glm5NextVisionPatchMerger")(V, 20, "silu", swiglu_limit=0.5, bias=True), _tokens(7, V)),
    ("florence2", "Florence2MultiModalProjector"): _florence2,
    ("hunyuan_vl", "HunYuanVLVisionPatchMerger"): _hunyuan_merger,
    ("hy_v4_vl", "HYV4VLVisionPatchMerger"): _hy_v4_merger,
    # patch embeddings
    ("aimv2", "Aimv2VisionEmbeddings"): _vision_embeddings("aimv2", "Aimv2VisionEmbeddings", "Aimv2VisionConfig"),
    ("clipseg", "CLIPSegVisionEmbeddings"): _vision_embeddings("clipseg", "CLIPSegVisionEmbeddings",
                                                               "CLIPSegVisionConfig"),
    ("janus", "JanusVisionEmbeddings"): _vision_embeddings("janus", "JanusVisionEmbeddings", "JanusVisionConfig"),
    ("ovis2", "Ovis2VisionEmbeddings"): _vision_embeddings("ovis2", "Ovis2VisionEmbeddings", "Ovis2VisionConfig"),
    ("owlvit", "OwlViTVisionEmbeddings"): _vision_embeddings("owlvit", "OwlViTVisionEmbeddings", "OwlViTVisionConfig"),
    ("step3p7", "Step3p7VisionEmbeddings"): _vision_embeddings("step3p7", "Step3p7VisionEmbeddings",
                                                               "Step3p7VisionConfig"),
    ("got_ocr2", "GotOcr2PatchEmbeddings"): _vision_embeddings("got_ocr2", "GotOcr2PatchEmbeddings",
                                                               "GotOcr2VisionConfig"),
    ("deepseek_ocr2", "DeepseekOcr2SamPatchEmbeddings"): _vision_embeddings(
        "deepseek_ocr2", "DeepseekOcr2SamPatchEmbeddings", "DeepseekOcr2SamVisionConfig"),
    ("tipsv2", "Tipsv2VisionPatchEmbeddings"): _vision_embeddings("tipsv2", "Tipsv2VisionPatchEmbeddings",
                                                                  "Tipsv2VisionConfig"),
    ("groupvit", "GroupViTPatchEmbeddings"): lambda: (
        _mod("groupvit", "GroupViTPatchEmbeddings")(image_size=8, patch_size=4, num_channels=3, embed_dim=V),
        _pixels()()),
    ("minicpm_ocr", "MiniCPMOcrVisionEmbeddings"): _minicpm_patches,
    ("dots3_note", "Dots3NoteVisionPatchEmbed"): _own_config("dots3_note", "Dots3NoteVisionPatchEmbed",
                                                             "Dots3NoteVisionConfig", _rows(5, 12), hidden_size=V,
                                                             num_attention_heads=2, adapter_in_dim=V, patch_size=2),
    ("glm_image", "GlmImageVisionPatchEmbed"): _own_config("glm_image", "GlmImageVisionPatchEmbed",
                                                           "GlmImageVisionConfig", _rows(5, 12), **_TINY_VIT,
                                                           patch_size=2),
    ("kimi_k25", "Kimi_K25VisionPatchEmbed"): _kimi_patches,
    ("hunyuan_vl", "HunYuanVLVisionPatchEmbed"): _hunyuan_patches,
    ("hy_v4_vl", "HYV4VLVisionPatchEmbed"): _hy_v4_patches,
    ("paddleocr_vl", "PaddleOCRVisionEmbeddings"): _paddle_patches,
    ("video_llama_3", "VideoLlama3VisionEmbeddings"): _video_llama3_patches,
    ("minimax_m3_vl", "MiniMaxM3VLVisionEmbeddings"): _own_config(
        "minimax_m3_vl", "MiniMaxM3VLVisionEmbeddings", "MiniMaxM3VLVisionConfig", _rows(5, 3 * 2 * 2 * 2),
        **_TINY_VIT, patch_size=2, temporal_patch_size=2),
    ("ernie4_5_vl_moe", "Ernie4_5_VLMoePatchEmbed"): lambda: (
        _mod("ernie4_5_vl_moe", "Ernie4_5_VLMoePatchEmbed")(patch_size=2, in_channels=3, embed_dim=V),
        [torch.randn(5, 12)]),
    ("gemma4", "Gemma4VisionPatchEmbedder"): _gemma4_patches,
    ("cosmos3_edge", "Cosmos3EdgeVisionEmbeddings"): _cosmos_patches,
    ("inkling2", "Inkling2VisionEmbeddings"): _inkling_patches,
    ("kosmos2_5", "Kosmos2_5VisionEmbeddings"): _own_config(
        "kosmos2_5", "Kosmos2_5VisionEmbeddings", "Kosmos2_5VisionConfig", _flattened_patches(), hidden_size=V,
        patch_embed_hidden_size=12, max_num_patches=16),
    ("pix2struct", "Pix2StructVisionEmbeddings"): _own_config(
        "pix2struct", "Pix2StructVisionEmbeddings", "Pix2StructVisionConfig", _flattened_patches(), hidden_size=V,
        patch_embed_hidden_size=12, seq_len=16),
    ("muse_glimmer", "MuseGlimmerVisionPatchEmbedder"): _interp_patches(
        "muse_glimmer", "MuseGlimmerVisionPatchEmbedder", "MuseGlimmerVisionConfig"),
    ("muse_spark", "MuseSparkVisionPatchEmbedder"): _interp_patches(
        "muse_spark", "MuseSparkVisionPatchEmbedder", "MuseSparkVisionConfig"),
})


def _window_merger(mod, cls, cfg_cls):
    def make():
        cfg = _cfg(mod, cfg_cls, hidden_size=V, intermediate_size=10, num_hidden_layers=1, num_attention_heads=2,
                   image_size=8, patch_size=2)
        return _mod(mod, cls)(cfg), [torch.randn(1, 24, V), _GRID[:, 1:]]
    return make


def _aria_cross_attention():
    # (copies: transformers 4.x writes a model_type into the vision dict, and reads the text dict as a
    # config only with one)
    cfg = M.aria.AriaConfig(vision_config=dict(_TINY_VIT),
                            text_config=dict(_TINY_TEXT, moe_num_experts=2, moe_topk=1, model_type="aria_text"))
    return _mod("aria", "AriaCrossAttention")(cfg), [torch.randn(2, 5, V), torch.randn(2, 3, V)]


def _qformer_config(**kw):
    """A tiny Q-Former without dropout (the checkpoints' 0.1 makes the class's own forward run in training:
    ``test_qformer_attention_routes_by_structure``)."""
    return M.blip_2.Blip2QFormerConfig(**dict(dict(hidden_size=V, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, encoder_hidden_size=12,
                                                   attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0), **kw))


def _qformer_cross_attention():
    attn = _mod("blip_2", "Blip2QFormerMultiHeadAttention")(_qformer_config(), is_cross_attention=True)
    return attn, [torch.randn(2, 5, V), None, torch.randn(2, 9, 12)]


def _forward_4x(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_value=None, output_attentions=False):
    raise AssertionError("not called")


def _qformer_as_of(version: str, real: type) -> type:
    """The real class made to look like another transformers version's (on the pinned one)."""
    if version == "4.x":  # head_mask and past_key_value in the signature
        return type(real.__name__, (real,), {"forward": _forward_4x, "__module__": real.__module__})

    def init(self, config, is_cross_attention=False):  # 5.0 - 5.12: no scaling, eager-only forward
        real.__init__(self, config, is_cross_attention)
        del self.scaling
    return type(real.__name__, (real,), {"__init__": init, "__module__": real.__module__})


@pytest.mark.parametrize("version,expected", [("4.x", "head_mask"), ("5.12", "no scaling")])
def test_qformer_of_another_version_is_left_alone(version, expected):
    """A Q-Former attention of another transformers version is left alone with the reason. 4.x's
    forward takes ``head_mask`` and ``past_key_value``: the drop-in, called as the class's callers call
    it (positionally too), would read arguments from the wrong places. 5.0 - 5.12's has no ``scaling``
    (its forward is eager-only, handed float masks). On the pinned transformers subclasses stand in for
    those versions' classes; on another version the installed class is checked as it is."""
    for mod, cls_name, cfg_name in [("blip_2", "Blip2QFormerMultiHeadAttention", "Blip2QFormerConfig"),
                                    ("instructblip", "InstructBlipQFormerMultiHeadAttention", "InstructBlipQFormerConfig"),
                                    ("instructblipvideo", "InstructBlipVideoQFormerMultiHeadAttention",
                                     "InstructBlipVideoQFormerConfig")]:
        real = _mod(mod, cls_name)
        cfg = getattr(getattr(M, mod), cfg_name)(hidden_size=V, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, encoder_hidden_size=12)
        report = mmfuse.patch(_Parent((_qformer_as_of(version, real) if on_pinned() else real)(
            cfg, is_cross_attention=True)))
        if not on_pinned() and report.swapped:  # this version's class is the pinned one's (its family test ran)
            pytest.skip(f"transformers {transformers.__version__}: {cls_name} is the pinned version's")
        assert not report.swapped, str(report)
        [(name, seen, why)] = report.left_alone
        assert (name, seen) == ("target", cls_name) and "another transformers" in why, why
        assert expected in why or not on_pinned(), why


BUILDERS.update({
    ("blip_2", "Blip2QFormerMultiHeadAttention"): _qformer_cross_attention,
    ("aria", "AriaCrossAttention"): _aria_cross_attention,
    ("x_clip", "XCLIPCrossAttention"): lambda: (
        _mod("x_clip", "XCLIPCrossAttention")(M.x_clip.XCLIPConfig(projection_dim=V, prompt_num_attention_heads=2)),
        [torch.randn(2, 3, V), torch.randn(2, 5, V), torch.randn(2, 5, V)]),
    **{(mod, cls): _window_merger(mod, cls, cfg) for mod, cls, cfg in [
        ("minicpm_ocr", "MiniCPMOcrViTWindowAttentionMerger", "MiniCPMOcrVisionConfig"),
        ("minicpmv4_6", "MiniCPMV4_6ViTWindowAttentionMerger", "MiniCPMV4_6VisionConfig"),
        ("minicpmv4_7", "MiniCPMV4_7ViTWindowAttentionMerger", "MiniCPMV4_7VisionConfig")]},
})


def _deepseek_hybrid():
    cfg = M.deepseek_vl_hybrid.DeepseekVLHybridConfig(
        vision_config=dict(model_type="siglip_vision_model", **_TINY_VIT),
        high_res_vision_config=dict(output_channels=6), text_config=_llama_text())
    aligner = _mod("deepseek_vl_hybrid", "DeepseekVLHybridAligner")(cfg)  # T // 2 wide halves, 4 * 6 high-res in
    return aligner, [torch.randn(2, 7, V), torch.randn(2, 7, 24)]


def _janus(cls, **kw):
    def make():
        cfg = _cfg("janus", "JanusVisionConfig" if "Vision" in cls else "JanusVQVAEConfig", projection_dim=T, **kw)
        return _mod("janus", cls)(cfg), _tokens(7, V, batch=2)
    return make


def _kimi_projection():
    cfg = M.kimi_k25.Kimi_K25Config(vision_config=dict(**_TINY_VIT, merge_kernel_size=(2, 2)),
                                    text_config=_TINY_TEXT, projection_hidden_size=V)
    return _mod("kimi_k25", "Kimi_K25MultimodalProjection")(cfg), [torch.randn(6, 4, V)]  # 6 merged rows


def _kosmos(mod, cfg_cls, cls):
    def make():
        cfg = _cfg(mod, cfg_cls, vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2),
                   text_config=dict(embed_dim=T, attention_heads=2, layers=1, ffn_dim=32, vocab_size=64,
                                    attention_dropout=0.0, dropout=0.0),
                   latent_query_num=3)
        return _mod(mod, cls)(cfg), _tokens(7, V, batch=2)
    return make


BUILDERS.update({
    ("deepseek_vl", "DeepseekVLAligner"): lambda: (_mod("deepseek_vl", "DeepseekVLAligner")(
        M.deepseek_vl.DeepseekVLConfig(vision_config=dict(model_type="siglip_vision_model", **_TINY_VIT),
                                       text_config=_llama_text())), _tokens(7, V, batch=2)),
    ("deepseek_vl_hybrid", "DeepseekVLHybridAligner"): _deepseek_hybrid,
    ("janus", "JanusVisionAlignerMLP"): _janus("JanusVisionAlignerMLP", depth=3, hidden_size=V),  # fc1 + 2 hidden
    # (its depth is num_hidden_layers: fc1 + 1 hidden Linear)
    ("janus", "JanusVQVAEAlignerMLP"): _janus("JanusVQVAEAlignerMLP", num_hidden_layers=2, embed_dim=V),
    ("kimi_k25", "Kimi_K25MultimodalProjection"): _kimi_projection,
    ("kosmos2", "Kosmos2ImageToTextProjection"): _kosmos("kosmos2", "Kosmos2Config", "Kosmos2ImageToTextProjection"),
    ("kosmos2_5", "Kosmos2_5ImageToTextProjection"): _kosmos("kosmos2_5", "Kosmos2_5Config",
                                                             "Kosmos2_5ImageToTextProjection"),
    ("llama4", "Llama4UnfoldConvolution"): lambda: (
        _mod("llama4", "Llama4UnfoldConvolution")(M.llama4.Llama4VisionConfig(**_TINY_VIT, patch_size=3)),
        [torch.randn(2, 3, 10, 7)]),  # 3x2 patches of 3; the last row and column dropped, as unfold drops them
})


class _Parent(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, *args):
        out = self.target(*args)
        return out[0] if isinstance(out, tuple) else out


def _is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _run(model, inputs):
    inputs = [t.clone().requires_grad_() if _is_float(t) else t for t in inputs]
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    grads = {f"input {i}": t.grad for i, t in enumerate(inputs) if _is_float(t)}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _swapped_target(report):
    """Whether ``patch`` swapped the test's target; off the pinned transformers, leaving it alone with
    a reason (a class of another shape than the registry's) is a skip naming that reason."""
    left = [why for name, _, why in report.left_alone if name == "target"]
    if left and not on_pinned() and "another transformers version's class" in left[0]:
        pytest.skip(f"transformers {transformers.__version__}: left alone: {left[0]}")  # (mmfuse's own check)
    assert [name for name, _, _ in report.swapped] == ["target"], str(report)


def _opt_in_to_plain_gemms(module, monkeypatch) -> None:
    """A family with nothing to fuse is left alone by default (``mmfuse._dispatch.PLAIN_GEMMS``; its default is
    tested in ``check_family``); the tests of what a swap keeps (meta loading, adapters, pickling) run it
    with ``MMFUSE_PLAIN_GEMMS=mmfuse``, which still swaps it."""
    family = registry.family_for(module, vision_tower=True)
    if family is not None and registry.plain_gemms_only(family):
        monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", "mmfuse")


def check_family(key, launches, builders=BUILDERS, vision_tower=False):
    torch.manual_seed(0)
    module, inputs = builders[key]()
    family = registry.family_for(module, vision_tower=True)
    if family is not None and registry.plain_gemms_only(family) and mmfuse._dispatch.PLAIN_GEMMS == "pytorch":
        # Nothing to fuse: left alone by default, with the reason; then swapped on request, so that the
        # swap stays tested for MMFUSE_PLAIN_GEMMS=mmfuse.
        model = _Parent(module)
        report = mmfuse.patch(model, vision_tower=vision_tower)
        assert not report.swapped and [(n, why) for n, _, why in report.left_alone] == [
            ("target", registry.NOTHING_TO_FUSE)], str(report)
        assert model.target is module
        mmfuse._dispatch.PLAIN_GEMMS = "mmfuse"
        try:
            return check_family(key, launches, builders, vision_tower)
        finally:
            mmfuse._dispatch.PLAIN_GEMMS = "pytorch"
    model = _Parent(module).float().train()
    ref32 = off_pin_skip_on_error(lambda: _run(model, inputs), f"calling the original {key[1]} the test's way")
    ref64 = _run(copy.deepcopy(model).double(), [t.double() if _is_float(t) else t for t in inputs])
    before = [(n, type(m)) for n, m in module.named_modules()]
    report = mmfuse.patch(model, vision_tower=vision_tower)
    _swapped_target(report)
    assert model.target is not module
    assert [(n, type(m)) for n, m in module.named_modules()] == before  # the original is untouched
    assert model.state_dict().keys() == _Parent(module).state_dict().keys()
    launches.clear()
    out, grads = _run(model, inputs)
    # (a Conv3d on pre-cut rows becomes one GEMM with nothing to fuse: PyTorch's unless MMFUSE_PLAIN_GEMMS=mmfuse)
    plain_rows = family is not None and family.recipe == "patch embed (pre-cut rows)"
    assert launches or (plain_rows and mmfuse._dispatch.PLAIN_GEMMS == "pytorch"), \
        f"{key}: no Triton kernel ran in the patched forward"
    assert_close("out", out, ref64[0], ref32[0])
    assert grads.keys() == ref32[1].keys()
    for name in grads:
        assert_close(f"grad {name}", grads[name], ref64[1][name], ref32[1][name])
    assert mmfuse.unpatch(model) == ["target"] and model.target is module
    return model


@pytest.mark.parametrize("key", sorted(BUILDERS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_family_patched_matches_original(key, launches):
    check_family(key, launches)


def _class_body(mod, cls):
    """The class's source without its name line, docstrings and comments, its own name prefix and
    config type hints normalised: equal bodies compute the same thing."""
    import importlib
    import inspect
    import re

    body = inspect.getsource(getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls))
    body = re.sub(r'"""[\s\S]*?"""', "", body.split("\n", 1)[1])
    stem = re.sub(r"(VisionEmbeddings|MultiModalProjector|VisionPatchMerger|PatchMerger|VisionPatchEmbed|PatchEmbed)$",
                  "", cls)
    body = re.sub(r":\s*\w+Config\b", ": Config", body.replace(stem, "X"))
    return "\n".join(line.rstrip() for line in re.sub(r"#.*", "", body).splitlines() if line.strip())


@pinned_only
def test_every_covered_class_has_a_builder_or_a_checked_sibling():
    """Classes without a builder here are transformers copies of a tested class: same body, and the
    registry gives them the same recipe and options."""
    by_class = {(f.module, c): f for f in registry.FAMILIES
                if not f.tower and not registry.is_model_level(f) for c in f.classes}
    untested = set(by_class) - set(BUILDERS)
    assert untested <= set(registry.TESTED_BY_SIBLING), sorted(untested - set(registry.TESTED_BY_SIBLING))
    for key, sibling in registry.TESTED_BY_SIBLING.items():
        assert sibling in BUILDERS, (key, sibling)
        assert _class_body(*key) == _class_body(*sibling), f"{key} is no longer a copy of {sibling}"
        assert (by_class[key].recipe, by_class[key].options) == (by_class[sibling].recipe, by_class[sibling].options)


@pytest.mark.parametrize("key", sorted(BUILDERS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_family_patches_on_meta_and_loads_after(key, monkeypatch):
    """Patch before the weights exist (meta), then to_empty + load_state_dict: equals the original.
    (tests/test_compile_autocast_distributed.py runs the same flow under FSDP2 with two processes.)"""
    check_meta_patch(key, monkeypatch)


def check_meta_patch(key, monkeypatch, builders=BUILDERS, vision_tower=False):
    torch.manual_seed(0)
    real, inputs = builders[key]()
    _opt_in_to_plain_gemms(real, monkeypatch)
    if not on_pinned():
        off_pin_skip_on_error(lambda: _Parent(real)(*inputs), f"calling the original {key[1]} the test's way")
    with torch.device("meta"):
        torch.manual_seed(0)
        module, _ = builders[key]()
    model = _Parent(module)
    report = mmfuse.patch(model, vision_tower=vision_tower)
    _swapped_target(report)
    model.to_empty(device="cpu")
    model.target.load_state_dict(real.state_dict())
    with torch.no_grad():  # non-persistent buffers are re-created, as transformers' _init_weights does
        for name, buf in real.named_buffers():
            model.target.get_buffer(name).copy_(buf)
    torch.testing.assert_close(model(*inputs), _Parent(real)(*inputs), rtol=1e-5, atol=1e-5)


@pinned_only
def test_readme_supported_models_block_is_generated():
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start, end = readme.index(registry.MODELS_START), readme.index(registry.MODELS_END) + len(registry.MODELS_END)
    assert readme[start:end] == registry.readme_block(), \
        "README's supported-models table is stale: run `mmfuse models --readme README.md`"


def test_counts_only_families_the_installed_transformers_has(monkeypatch, tmp_path):
    """A family newer than the installed transformers is not counted; without transformers (an optional
    dependency) ``mmfuse models`` still counts the registry."""
    import sys
    import types

    every, pinned = registry.counts(), on_pinned()
    fake = types.ModuleType("transformers")
    (tmp_path / "models" / "clip").mkdir(parents=True)
    fake.__file__ = str(tmp_path / "__init__.py")
    monkeypatch.setitem(sys.modules, "transformers", fake)
    only_clip = registry.counts()
    assert sum(only_clip.values()) == sum(len(f.classes) for f in registry.FAMILIES if f.module == "clip") > 0
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert sum(registry.counts().values()) == sum(len(f.classes) for f in registry.FAMILIES)
    if pinned:  # (an older transformers lacks the newer families)
        assert sum(every.values()) == sum(len(f.classes) for f in registry.FAMILIES)


def test_models_cli_prints_the_table(capsys):
    from mmfuse import cli

    assert cli.main(["models"]) == 0
    assert "Qwen2.5-VL" in capsys.readouterr().out
    assert cli.main(["models", "--declined"]) == 0
    assert "Blip2QFormerAttention" in capsys.readouterr().out


def test_what_stays_pytorch_is_the_familys_own():
    # The gated recipe leaves nothing to PyTorch unless the family runs glue before it (GLM-4V's merger).
    fam = {c: f for f in registry.FAMILIES for c in f.classes if not f.tower}
    assert registry.stays_pytorch(fam["Idefics2MLP"]) == "nothing"
    assert "LayerNorm + GELU" in registry.stays_pytorch(fam["Glm4vVisionPatchMerger"])


def test_patch_report_names_declined_modules():
    cfg = M.blip_2.Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, encoder_hidden_size=16)
    model = _Parent(M.blip_2.modeling_blip_2.Blip2QFormerModel(cfg))
    report = mmfuse.patch(model)
    assert any(cls == "Blip2QFormerAttention" and why == registry._WRAPPER for _, cls, why in report.left_alone)
    assert "left alone" in str(report)
    # its children (the Q-Former's self- and cross-attention) are swapped; another transformers' (4.x,
    # 5.0 - 5.12) are left alone as such (test_qformer_of_another_version_is_left_alone)
    children = report.swapped + ([] if on_pinned() else [x for x in report.left_alone if "another transformers" in x[2]])
    assert sorted(name.rsplit(".", 2)[-2] for name, *_ in children) == ["attention", "crossattention"], str(report)


# ----------------------------------------------------------------------------------------------
# Whole tiny models, one per recipe not already run end to end in tests/test_hf_integration.py
# (there: LLaVA = fused-chain MLP + CLIP embeddings, Qwen2-VL tower = merge+mlp + pre-cut patch
# embed, InternVL = norm+mlp): logits / tower outputs and one training step
# ----------------------------------------------------------------------------------------------
class _TowerCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels, grid):
        return self.model(pixels, grid_thw=grid)


def _tower(mod, tower, vision_config, **kw):
    def make():
        torch.manual_seed(0)
        cfg = getattr(getattr(M, mod), vision_config)(**kw)
        return _TowerCall(_mod(mod, tower)._from_config(cfg))
    return make


def _tower_inputs():
    grid = torch.tensor([[1, 4, 6]])  # 24 patches of 3x2x2x2, merged 2x2 into 6 tokens
    return [torch.randn(24, 3 * 2 * 2 * 2), grid]


def _pooled(out):
    return merged_output(out)


class _VLMCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, pixels):
        image = (ids == self.model.config.image_token_id).long()
        return self.model(input_ids=ids, pixel_values=pixels, token_type_ids=image)


def _gemma3_model():
    torch.manual_seed(0)
    vcfg = M.siglip.SiglipVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=4)
    tcfg = M.gemma3.Gemma3TextConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, vocab_size=64)
    cfg = M.gemma3.Gemma3Config(vision_config=vcfg, text_config=tcfg, mm_tokens_per_image=4, image_token_id=60)
    model = M.gemma3.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    return _VLMCall(model)


def _paligemma_model():
    torch.manual_seed(0)
    vcfg = M.siglip.SiglipVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8, projection_dim=T)
    tcfg = M.gemma.GemmaConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=8, vocab_size=64)
    cfg = M.paligemma.PaliGemmaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=60, projection_dim=T)
    return _VLMCall(M.paligemma.PaliGemmaForConditionalGeneration(cfg))


class _KeywordCall(nn.Module):
    """A model called with positional inputs passed on as these keywords (the checks call model(*inputs))."""
    def __init__(self, model, keywords):
        super().__init__()
        self.model, self.keywords = model, keywords

    def forward(self, *inputs):
        return self.model(**dict(zip(self.keywords, inputs)))


def _qformer_model():
    torch.manual_seed(0)
    return _KeywordCall(M.blip_2.modeling_blip_2.Blip2QFormerModel(_qformer_config(num_hidden_layers=2)),
                        ("query_embeds", "encoder_hidden_states"))


def _llama4_vision_model():
    """Llama 4's vision model: the unfold patch embedding and the pixel-shuffle adapter (4x4 patches of 3;
    the adapter's fc1 reads intermediate_size = 4 * hidden wide rows, as the checkpoints' 5632 = 4 * 1408)."""
    torch.manual_seed(0)
    cfg = M.llama4.Llama4VisionConfig(**dict(_TINY_VIT, intermediate_size=4 * V), image_size=12, patch_size=3,
                                      pixel_shuffle_ratio=0.5, projector_input_dim=T, projector_output_dim=T,
                                      vision_output_dim=T)
    return M.llama4.modeling_llama4.Llama4VisionModel(cfg)


E2E = {
    "llama 4 vision model (unfold + linear patch embed; merged mlp adapter)": (
        _llama4_vision_model, lambda: [torch.randn(2, 3, 12, 12)], lambda o: o.last_hidden_state),
    "blip-2 q-former (cross-attention: self and cross)": (
        _qformer_model, lambda: [torch.randn(2, 6, V), torch.randn(2, 11, 12)], lambda o: o.last_hidden_state),
    "qwen2.5-vl tower (merge+mlp, RMSNorm; Conv3d patch embed)": (
        _tower("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig", **_QW25),
        _tower_inputs, _pooled),
    "glm-4v tower (gated mlp; Conv3d patch embed)": (
        _tower("glm4v", "Glm4vVisionModel", "Glm4vVisionConfig", **_GLM), _tower_inputs, _pooled),
    "gemma 3 (pool+norm+matmul; SigLIP embeddings)": (
        _gemma3_model, lambda: [torch.tensor([[1, 60, 60, 60, 60, 5, 6]]), torch.randn(1, 3, 16, 16)],
        lambda o: o.logits),
    "paligemma (SigLIP embeddings; the Linear projector left as PyTorch)": (
        _paligemma_model, lambda: [torch.tensor([[60, 60, 60, 60, 5, 6]]), torch.randn(1, 3, 16, 16)],
        lambda o: o.logits),
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_whole_model_patched_matches_and_trains(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name("test_hf_integration.py")
    spec = importlib.util.spec_from_file_location("_hf_checks", path)
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)
    check_patch_equivalence, check_training_step = hf.check_patch_equivalence, hf.check_training_step
    make, inputs, select = E2E[name]
    inputs = inputs()
    model, report = check_patch_equivalence(make(), inputs, select, [])
    if not on_pinned() and len(report.swapped) < 2 and any("another transformers version's class" in why
                                                           for _, _, why in report.left_alone):
        pytest.skip(f"transformers {transformers.__version__}: {report}")  # (equal to the original: checked above)
    # (a projector with nothing to fuse counts as recognised: left alone for that reason, mmfuse._dispatch.PLAIN_GEMMS)
    plain = [name for name, _, why in report.left_alone if why == registry.NOTHING_TO_FUSE]
    assert report.swapped and len(report.swapped) + len(plain) >= 2, str(report)
    check_training_step(make, inputs, select)


@pinned_only  # (another transformers' Q-Former is left alone: test_qformer_of_another_version_is_left_alone)
def test_qformer_attention_routes_by_structure(launches):
    """The kernel where it computes what the class computes; the class's own forward otherwise (attention
    dropout in training, weights asked for, a mask with a row per query): chosen from flags, shapes and
    dtypes, never from values."""
    torch.manual_seed(0)
    attn = _mod("blip_2", "Blip2QFormerMultiHeadAttention")(_qformer_config(attention_probs_dropout_prob=0.1))
    x = torch.randn(2, 5, V)
    model = _Parent(attn)
    mmfuse.patch(model)
    new = model.target
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    for train, mask, kernel in ((False, None, True), (False, pad[:, None, None, :], True),
                                (False, pad[:, None, None, :].expand(2, 1, 5, 5), False), (True, None, False)):
        new.train(train), attn.train(train)
        launches.clear()
        torch.manual_seed(1)
        got = new(x, mask)[0]
        assert ("attn_fwd_kernel" in launches) == kernel, (train, None if mask is None else mask.shape)
        if kernel:  # the original, given the same mask in its (eager) additive form
            additive = None if mask is None else (~mask).float() * torch.finfo(torch.float32).min
            torch.testing.assert_close(got, attn(x, additive)[0])
        else:  # the original's own code on the same arguments (and dropout draws)
            torch.manual_seed(1)
            assert torch.equal(got, attn(x, mask)[0])
    new.eval()
    launches.clear()
    new(x, output_attentions=True)
    assert "attn_fwd_kernel" not in launches


@pinned_only  # (another transformers' Q-Former is left alone: test_qformer_of_another_version_is_left_alone)
def test_qformer_model_attends_on_the_kernel_with_a_single_pass_backward(launches):
    # The whole tiny Q-Former (E2E above checks values and a training step): each of its three attentions
    # (two self, one cross) runs the forward kernel, and its backward in one launch (no head groups,
    # every query in one block): no delta, no dK/dV kernel.
    model = _qformer_model()
    mmfuse.patch(model)
    launches.clear()
    model(torch.randn(2, 6, V), torch.randn(2, 11, 12)).last_hidden_state.sum().backward()
    assert launches.count("attn_fwd_kernel") == 3 and launches.count("attn_bwd_dq_kernel") == 3
    assert "attn_bwd_dkdv_kernel" not in launches and "attn_delta_kernel" not in launches


# ----------------------------------------------------------------------------------------------
# The vision tower's MLPs: patch(model, vision_tower=True) only
# ----------------------------------------------------------------------------------------------
def _tower_block(mod, cls, cfg_cls, **kw):
    """A ViT block's MLP built from a tiny vision config of its module (``kw`` sets the activation)."""
    def make():
        cfg = getattr(getattr(M, mod), cfg_cls)(hidden_size=V, intermediate_size=32, num_attention_heads=2, **kw)
        return _mod(mod, cls)(cfg), _tokens(7, V, batch=2)
    return make


TOWER_BUILDERS = _Builders({  # activations: quick_gelu (CLIP, Qwen2-VL), gelu_tanh (SigLIP, Idefics, Qwen3-VL), gelu, silu
    ("clip", "CLIPMLP"): _tower_block("clip", "CLIPMLP", "CLIPVisionConfig"),
    ("siglip", "SiglipMLP"): _tower_block("siglip", "SiglipMLP", "SiglipVisionConfig"),
    ("siglip2", "Siglip2MLP"): _tower_block("siglip2", "Siglip2MLP", "Siglip2VisionConfig"),
    ("idefics2", "Idefics2VisionMLP"): _tower_block("idefics2", "Idefics2VisionMLP", "Idefics2VisionConfig"),
    ("idefics3", "Idefics3VisionMLP"): _tower_block("idefics3", "Idefics3VisionMLP", "Idefics3VisionConfig"),
    ("smolvlm", "SmolVLMVisionMLP"): _tower_block("smolvlm", "SmolVLMVisionMLP", "SmolVLMVisionConfig"),
    ("internvl", "InternVLVisionMLP"): _tower_block("internvl", "InternVLVisionMLP", "InternVLVisionConfig"),
    ("qwen2_vl", "VisionMlp"): lambda: (_mod("qwen2_vl", "VisionMlp")(dim=V, hidden_dim=32, hidden_act="quick_gelu"),
                                        _tokens(7, V)),
    ("qwen3_vl", "Qwen3VLVisionMLP"): _tower_block("qwen3_vl", "Qwen3VLVisionMLP", "Qwen3VLVisionConfig"),
    ("llama4", "Llama4VisionMLP"): _tower_block("llama4", "Llama4VisionMLP", "Llama4VisionConfig"),
    ("paddleocr_vl", "PaddleOCRVisionMLP"): _tower_block("paddleocr_vl", "PaddleOCRVisionMLP", "PaddleOCRVisionConfig"),
    ("video_llama_3", "VideoLlama3VisionMLP"): _tower_block("video_llama_3", "VideoLlama3VisionMLP",
                                                            "VideoLlama3VisionConfig"),
    ("hunyuan_vl", "HunYuanVLVisionMLP"): _tower_block("hunyuan_vl", "HunYuanVLVisionMLP", "HunYuanVLVisionConfig"),
    ("hy_v4_vl", "HYV4VLVisionMLP"): _tower_block("hy_v4_vl", "HYV4VLVisionMLP", "HYV4VLVisionConfig"),
    ("qwen2_5_vl", "Qwen2_5_VLMLP"): lambda: (_mod("qwen2_5_vl", "Qwen2_5_VLMLP")(
        M.qwen2_5_vl.Qwen2_5_VLVisionConfig(hidden_size=V, intermediate_size=32), bias=True), _tokens(7, V)),
    ("pixtral", "PixtralMLP"): _tower_block("pixtral", "PixtralMLP", "PixtralVisionConfig", hidden_act="silu"),
    ("glm4v", "Glm4VisionMlp"): lambda: (_mod("glm4v", "Glm4VisionMlp")(
        M.glm4v.Glm4vVisionConfig(hidden_size=V, out_hidden_size=20)), _tokens(7, V)),
})


def _dim_mlp(mod, cls):
    """A tower MLP built as cls(dim, hidden_dim, hidden_act) (Ernie, Kimi K2.5, Muse)."""
    return lambda: (_mod(mod, cls)(V, 32, "gelu_pytorch_tanh"), _tokens(7, V))


_TOWER_CONFIGS = (  # (module, tower MLP class, the vision config class it is built from)
    ("altclip", "AltCLIPMLP", "AltCLIPVisionConfig"),
    ("chinese_clip", "ChineseCLIPVisionMLP", "ChineseCLIPVisionConfig"),
    ("clipseg", "CLIPSegMLP", "CLIPSegVisionConfig"),
    ("git", "GitVisionMLP", "GitVisionConfig"),
    ("glm_image", "GlmImageVisionMLP", "GlmImageVisionConfig"),
    ("granite_docling", "GraniteDoclingVisionMLP", "GraniteDoclingVisionConfig"),
    ("groupvit", "GroupViTMLP", "GroupViTVisionConfig"),
    ("inkling2", "Inkling2VisionMLP", "Inkling2VisionConfig"),
    ("kosmos2", "Kosmos2VisionMLP", "Kosmos2VisionConfig"),
    ("metaclip_2", "MetaClip2MLP", "MetaClip2VisionConfig"),
    ("minicpm_ocr", "MiniCPMOcrVisionMLP", "MiniCPMOcrVisionConfig"),
    ("minicpmv4_6", "MiniCPMV4_6VisionMLP", "MiniCPMV4_6VisionConfig"),
    ("minicpmv4_7", "MiniCPMV4_7VisionMLP", "MiniCPMV4_7VisionConfig"),
    ("minimax_m3_vl", "MiniMaxM3VLVisionMLP", "MiniMaxM3VLVisionConfig"),
    ("mllama", "MllamaVisionMLP", "MllamaVisionConfig"),
    ("molmo2", "Molmo2VisionMLP", "Molmo2VisionConfig"),
    ("owlvit", "OwlViTMLP", "OwlViTVisionConfig"),
    ("phi4_multimodal", "Phi4MultimodalVisionMLP", "Phi4MultimodalVisionConfig"),
    ("qianfan_ocr", "QianfanOCRVisionMLP", "QianfanOCRVisionConfig"),
    ("step3p7", "Step3p7VisionMLP", "Step3p7VisionConfig"),
    ("x_clip", "XCLIPMLP", "XCLIPVisionConfig"),
    ("qwen3_5", "Qwen3_5VisionMLP", "Qwen3_5VisionConfig"),
    ("qwen3_5_moe", "Qwen3_5MoeVisionMLP", "Qwen3_5MoeVisionConfig"),
    ("qwen3_omni_moe", "Qwen3OmniMoeVisionMLP", "Qwen3OmniMoeVisionEncoderConfig"),
    ("qwen3_vl_moe", "Qwen3VLMoeVisionMLP", "Qwen3VLMoeVisionConfig"),
    ("qwen4_exp", "Qwen4ExpVisionMLP", "Qwen4ExpVisionConfig"),
    ("cohere_compass", "CohereCompassVisionMLP", "CohereCompassVisionConfig"),
    ("deepseek_ocr2", "DeepseekOcr2VisionMLP", "DeepseekOcr2VisionEncoderConfig"),
    ("glm_ocr", "GlmOcrVisionMlp", "GlmOcrVisionConfig"),
    ("ovis2", "Ovis2VisionMLP", "Ovis2VisionConfig"),
    ("tipsv2", "Tipsv2VisionSwiGLUFFN", "Tipsv2VisionConfig"),
    ("lfm3_vl", "Lfm3VlVisionMLP", "Lfm3VlVisionConfig"),
    ("glm5_next", "Glm5NextVisionMLP", "Glm5NextVisionConfig"),
    ("kosmos2_5", "Kosmos2_5VisionMlp", "Kosmos2_5VisionConfig"),
    ("pix2struct", "Pix2StructVisionMlp", "Pix2StructVisionConfig"),
    ("blip", "BlipMLP", "BlipVisionConfig"),
    ("blip_2", "Blip2MLP", "Blip2VisionConfig"),
    ("instructblip", "InstructBlipMLP", "InstructBlipVisionConfig"),
    ("instructblipvideo", "InstructBlipVideoMLP", "InstructBlipVideoVisionConfig"),
    ("owlv2", "Owlv2MLP", "Owlv2VisionConfig"),
    ("cosmos3_edge", "Cosmos3EdgeMLP", "Cosmos3EdgeVisionConfig"),
    ("unlimited_ocr", "UnlimitedOcrMLP", "UnlimitedOcrVisionEncoderConfig"),
    ("videoprism", "VideoPrismMLP", "VideoPrismVisionConfig"),
    ("glm4v_moe", "Glm4vMoeisionMlp", "Glm4vMoeVisionConfig"),
    ("aimv2", "Aimv2MLP", "Aimv2VisionConfig"),
    ("ovis2", "Ovis2MLP", "Ovis2VisionConfig"),
    ("pe_video", "PeVideoEncoderMLP", "PeVideoEncoderConfig"),
)


TOWER_BUILDERS.update({
    **{(mod, cls): _tower_block(mod, cls, cfg) for mod, cls, cfg in _TOWER_CONFIGS},


    **{(mod, cls): _tower_block(mod, cls, cfg, mlp_dim=32) for mod, cls, cfg in (
        ("deepseek_ocr2", "DeepseekOcr2SamMLPBlock", "DeepseekOcr2SamVisionConfig"),
        ("got_ocr2", "GotOcr2MLPBlock", "GotOcr2VisionConfig"),
        ("pp_formulanet", "PPFormulaNetMLPBlock", "PPFormulaNetVisionConfig"),
        ("unlimited_ocr", "UnlimitedOcrSamMLPBlock", "UnlimitedOcrSamVisionConfig"))},
    ("qwen2_5_omni", "Qwen2_5OmniMLP"): lambda: (_mod("qwen2_5_omni", "Qwen2_5OmniMLP")(
        M.qwen2_5_omni.Qwen2_5OmniVisionEncoderConfig(hidden_size=V, intermediate_size=32), bias=True), _tokens(7, V)),
    ("florence2", "Florence2VisionMLP"): lambda: (_mod("florence2", "Florence2VisionMLP")(
        M.florence2.Florence2VisionConfig(embed_dim=[8, V], mlp_ratio=2.0), 1), _tokens(7, V, batch=2)),
    ("janus", "JanusVisionMLP"): _tower_block("janus", "JanusVisionMLP", "JanusVisionConfig", mlp_ratio=2.0),
    ("dots3_note", "Dots3NoteVisionMLP"): _tower_block("dots3_note", "Dots3NoteVisionMLP", "Dots3NoteVisionConfig",
                                                       adapter_in_dim=V),
    # the token-mixing MLP: over the 7 tokens of (2, 7, V) inputs (its forward transposes them)
    ("groupvit", "GroupViTMixerMLP"): lambda: (_mod("groupvit", "GroupViTMixerMLP")(
        M.groupvit.GroupViTVisionConfig(hidden_size=V, intermediate_size=32, num_attention_heads=2), 7, 20, 7),
        _tokens(7, V, batch=2)),
    ("tipsv2", "Tipsv2VisionMLP"): _tower_block("tipsv2", "Tipsv2VisionMLP", "Tipsv2VisionConfig", mlp_ratio=2.0),
    **{(mod, cls): _dim_mlp(mod, cls) for mod, cls in (
        ("ernie4_5_vl_moe", "Ernie4_5VLVisionMLP"), ("kimi_k25", "Kimi_K25VisionMLP"),
        ("muse_glimmer", "MuseGlimmerVisionMLP"), ("muse_spark", "MuseSparkVisionMLP"))},
})


@pinned_only
def test_every_tower_mlp_like_class_is_covered_or_declined():
    """The tower's side of the enumeration: every vision-tower-MLP-like class of the installed transformers'
    vision-language modules is swapped by ``vision_tower=True`` (or covered as a projector) or declined with
    its reason; a new class in a future transformers fails here until someone decides."""
    found = set(registry.tower_mlp_like_classes())
    covered = {(f.module, c) for f in registry.FAMILIES for c in f.classes}
    unknown = sorted(found - covered - set(registry.TOWER_DECLINED))
    assert not unknown, f"tower MLP classes neither covered nor declined (decide, then list them): {unknown}"
    assert not sorted(set(registry.TOWER_DECLINED) - found), "stale TOWER_DECLINED entries"
    assert all(registry.TOWER_DECLINED.values()) and not covered & set(registry.TOWER_DECLINED)


@pinned_only
def test_every_tower_family_class_has_a_builder():
    tower = {(f.module, c) for f in registry.FAMILIES if f.tower for c in f.classes}
    assert tower == set(TOWER_BUILDERS)
    assert not tower & set(BUILDERS) and not tower & set(registry.DECLINED)


@pytest.mark.parametrize("key", sorted(TOWER_BUILDERS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_tower_mlp_patched_matches_original(key, launches):
    module, _ = TOWER_BUILDERS[key]()
    model = _Parent(module)
    assert not mmfuse.patch(model).swapped and model.target is module  # opt-in: untouched by default
    check_family(key, launches, builders=TOWER_BUILDERS, vision_tower=True)
    family = registry.family_for(module, vision_tower=True)
    assert family.tower and family.recipe in ("mlp", "gated mlp", "gemm swap")


@pytest.mark.parametrize("key", sorted(TOWER_BUILDERS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_tower_mlp_patches_on_meta_and_loads_after(key, monkeypatch):
    check_meta_patch(key, monkeypatch, builders=TOWER_BUILDERS, vision_tower=True)


def test_whole_vision_tower_patched_with_and_without_vision_tower():
    """A tiny CLIPVisionModel (LLaVA's tower): the default patch leaves its MLPs alone; vision_tower=True
    swaps every block's MLP (quick_gelu fused in fc1's epilogue), the output and gradients match the rule
    and one training step moves the same parameters equally."""
    hf = _hf_checks()

    def make():
        torch.manual_seed(0)
        return M.clip.CLIPVisionModel(M.clip.CLIPVisionConfig(hidden_size=V, intermediate_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, image_size=28, patch_size=14))

    inputs, select = [torch.randn(2, 3, 28, 28)], (lambda o: o.last_hidden_state)
    _, default = hf.check_patch_equivalence(make(), inputs, select, [])
    assert not any(old == "CLIPMLP" for _, old, _ in default.swapped), str(default)
    model, report = hf.check_patch_equivalence(make(), inputs, select, ["FusedCLIPMLP"] * 2, vision_tower=True)
    tower = getattr(model, "vision_model", model)  # (transformers 4.x wraps the tower one level deeper)
    prefix = "vision_model." if tower is not model else ""
    mlps = [name for name, old, _ in report.swapped if old == "CLIPMLP"]
    assert mlps == [f"{prefix}encoder.layers.{i}.mlp" for i in range(2)], str(report)
    assert tower.encoder.layers[0].mlp.fc1.activation == "quick_gelu"
    hf.check_training_step(make, inputs, select, vision_tower=True)
    assert mmfuse.unpatch(model) and type(tower.encoder.layers[0].mlp).__name__ == "CLIPMLP"


@pytest.mark.parametrize("name", ["qwen2.5-vl tower (merge+mlp, RMSNorm; Conv3d patch embed)",
                                  "glm-4v tower (gated mlp; Conv3d patch embed)"])
def test_whole_tower_with_gated_mlps_patched_with_vision_tower(name):
    """The gated recipe inside a real tower: every block's SwiGLU MLP swapped too, outputs, gradients
    and a training step as the unpatched tower's."""
    hf = _hf_checks()
    make, inputs, select = E2E[name]
    inputs = inputs()
    _, report = hf.check_patch_equivalence(make(), inputs, select, [], vision_tower=True)
    assert any(name.endswith("blocks.0.mlp") for name, _, _ in report.swapped), str(report)
    hf.check_training_step(make, inputs, select, vision_tower=True)


_TOWER_E2E = {
    # deepstack mergers too (post-shuffle LayerNorm), and the linear_fc1 / fc2 tower MLPs
    "qwen3.5 tower (merged mlp, deepstack mergers; Conv3d patch embed; tower MLPs)": (
        _tower("qwen3_5", "Qwen3_5VisionModel", "Qwen3_5VisionConfig", **dict(_QW3, deepstack_visual_indexes=[0])),
        _tower_inputs, _pooled, ["FusedQwen3_5VisionMLP", "FusedQwen3_5VisionPatchMerger"]),
    "llama 4 vision model (unfold patch embed, adapter, tower MLPs)": (
        _llama4_vision_model, lambda: [torch.randn(2, 3, 12, 12)], lambda o: o.last_hidden_state,
        ["FusedLlama4VisionMLP", "FusedLlama4UnfoldConvolution", "FusedLlama4VisionPixelShuffleMLP"]),
}


@pytest.mark.parametrize("name", sorted(_TOWER_E2E))
def test_whole_modern_tower_patched_with_vision_tower(name):
    """Every part of a 2025-26 tower at once with vision_tower=True (patch embedding, block MLPs, mergers):
    outputs, gradients and a training step as the unpatched tower's."""
    hf = _hf_checks()
    make, inputs, select, expected = _TOWER_E2E[name]
    inputs = inputs()
    hf.check_patch_equivalence(make(), inputs, select, expected, vision_tower=True)
    hf.check_training_step(make, inputs, select, vision_tower=True)


def _hf_checks():
    """tests/test_hf_integration.py's check_patch_equivalence / check_training_step."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("_hf_checks",
                                                  pathlib.Path(__file__).with_name("test_hf_integration.py"))
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)
    return hf


def test_vision_tower_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="vision_tower"):
        mmfuse.patch(nn.Sequential(nn.Linear(2, 2)), vision_tower="yes")


def _embeddings_source(mod, cls):
    import importlib
    import inspect

    c = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls)
    return (inspect.getsource(c.__init__) + inspect.getsource(c.forward)).replace(cls[:-len("VisionEmbeddings")], "X")


def test_vision_embeddings_families_are_source_copies_of_clip_or_siglip():
    """The fused drop-in is faithful to a copy only if the copy computes what CLIP / SigLIP do (in every
    transformers: an older one's copies are checked too)."""
    ref = {"clip": _embeddings_source("clip", "CLIPVisionEmbeddings"),
           "siglip": _embeddings_source("siglip", "SiglipVisionEmbeddings")}
    for fam in registry.FAMILIES:
        if fam.recipe == "vision embeddings":
            for cls in fam.classes:
                if not on_pinned() and not isinstance(getattr(getattr(M, fam.module), cls), type):
                    continue  # a family newer than this transformers
                assert _embeddings_source(fam.module, cls) == ref[fam.opt("layout")], (fam.name, cls)


def _gated_keys():
    gated = {(f.module, c, f.tower) for f in registry.FAMILIES if f.recipe == "gated mlp" for c in f.classes}
    return sorted([(k, False) for k in BUILDERS if (*k, False) in gated]
                  + [(k, True) for k in TOWER_BUILDERS if (*k, True) in gated])


@pytest.mark.parametrize("key,tower", _gated_keys(), ids=lambda k: f"{k[0]}.{k[1]}" if isinstance(k, tuple) else "")
def test_gated_families_run_gate_and_up_as_one_gemm(key, tower, monkeypatch):
    """A patched gated MLP runs the gate product inside the GEMM: one gated launch, no PyTorch product."""
    from mmfuse.kernels import linear as KL

    calls = []
    real = KL.gated_fwd
    monkeypatch.setattr(KL, "gated_fwd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    module, inputs = (TOWER_BUILDERS if tower else BUILDERS)[key]()
    model = _Parent(module)
    mmfuse.patch(model, vision_tower=tower)
    model(*inputs)
    assert len(calls) == 1, calls


def _merged_keys():
    merged = {(f.module, c) for f in registry.FAMILIES if f.recipe == "merged mlp" for c in f.classes}
    return sorted(k for k in BUILDERS if k in merged)


@pytest.mark.parametrize("key", _merged_keys(), ids=lambda k: f"{k[0]}.{k[1]}")
def test_merged_families_read_norm_and_merge_inside_the_gemm(key, launches):
    """A patched merger / pixel-shuffle connector runs no norm, no merge copy and no permute in PyTorch:
    only the norm statistics, the mapped GEMM and the rest of the MLP (a second call: the first may
    probe the pixel shuffle's token table)."""
    module, inputs = BUILDERS[key]()
    model = _Parent(module)
    mmfuse.patch(model)
    with torch.no_grad():
        model(*inputs)
        launches.clear()
        with OpNames() as ops:
            model(*inputs)
    assert "mapped_gemm_kernel" in launches and launches.count("mapped_gemm_kernel") == 1, launches
    norm_like = {"native_layer_norm", "layer_norm", "rsqrt", "pow", "mean", "clone", "permute", "_to_copy", "copy_"}
    assert "merged_mlp_fwd" in {n.split(".")[0] for n in ops.names}, ops.names
    assert not norm_like & {n.split(".")[0] for n in ops.names}, ops.names


@pytest.mark.parametrize("key", sorted(k for k in BUILDERS if k in {(f.module, c) for f in registry.FAMILIES
                                                                     if f.recipe == "pool+norm+matmul"
                                                                     for c in f.classes}),
                         ids=lambda k: f"{k[0]}.{k[1]}")
def test_pooling_families_pool_and_normalise_in_one_kernel(key, launches):
    """Gemma 3's projector patched: the average pool and the RMSNorm in one kernel, then one GEMM: no
    pooling, norm, transpose copy or fp32 pass in PyTorch."""
    module, inputs = BUILDERS[key]()
    model = _Parent(module)
    mmfuse.patch(model)
    with torch.no_grad():
        model(*inputs)  # the first call builds the pooling table (kept per shape)
        launches.clear()
        with OpNames() as ops:
            model(*inputs)
    assert launches == ["pool_norm_fwd_kernel", "fused_gemm_kernel"], launches
    glue = {"avg_pool2d", "rsqrt", "pow", "mean", "clone", "_to_copy", "copy_", "matmul", "mm", "bmm"}
    assert "pool_norm_fwd" in ops.names and not glue & set(ops.names), ops.names


@pytest.mark.parametrize("key", sorted(k for k in BUILDERS if k in {(f.module, c) for f in registry.FAMILIES
                                                                     if f.recipe == "unfold merged mlp"
                                                                     for c in f.classes}),
                         ids=lambda k: f"{k[0]}.{k[1]}")
def test_unfold_families_merge_inside_the_gemm_on_ragged_grids(key, launches):
    """Mistral3's per-image unfold merge read through a token table: images whose patch grids the merge
    does not divide (3x4 and 4x3 patches: unfold drops a row or a column), against the original under
    the project's rule (values and every gradient); the forward runs the norm statistics, the mapped GEMM and the MLP's two
    GEMMs, and no norm, unfold, permute or cat in PyTorch."""
    module, (x, _) = BUILDERS[key]()
    with torch.no_grad():
        module.norm.weight.normal_(1, 0.3)
    sizes = torch.tensor([[6, 8], [8, 6]])  # patch 2: 3x4 and 4x3 grids, 24 tokens, 2 + 2 merged rows
    inputs = [torch.randn(24, x.shape[-1]), sizes]
    model = _Parent(module).float()
    ref32 = _run(model, inputs)
    ref64 = _run(copy.deepcopy(model).double(), [inputs[0].double(), sizes])
    patched = copy.deepcopy(model)
    mmfuse.patch(patched)
    launches.clear()
    out, grads = _run(patched, inputs)
    assert launches[:4] == ["norm_stats_kernel", "mapped_gemm_kernel", "fused_gemm_kernel", "fused_gemm_kernel"]
    assert out.shape == (4, ref32[0].shape[1])
    assert_close("out", out, ref64[0], ref32[0])
    assert grads.keys() == ref32[1].keys()
    for name in grads:
        assert_close(f"grad {name}", grads[name], ref64[1][name], ref32[1][name])
    x = inputs[0]
    with torch.no_grad(), OpNames() as ops:
        patched(x, sizes)
    glue = {"im2col", "rsqrt", "pow", "mean", "cat", "permute", "_to_copy", "copy_", "mm", "addmm"}
    assert not glue & set(ops.names), ops.names
    assert ops.names.count("clone") == 1, ops.names  # the merging weight's columns, permuted (not activations)


def test_llama4_adapter_with_dropout_trains_through_the_original_forward(launches):
    """Llama 4's adapter drops out between fc1 and fc2 while training (projector_dropout > 0): the patched
    module then runs the original forward (same random mask, no kernel); in eval, the fused one."""
    module, (x,) = _llama4_adapter()
    module.mlp.dropout = 0.5
    model = _Parent(module)
    patched = copy.deepcopy(model)
    mmfuse.patch(patched)
    model.train(), patched.train()
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    launches.clear()
    assert torch.equal(patched(x), ref) and not launches
    model.eval(), patched.eval()
    out = patched(x)
    assert "mapped_gemm_kernel" in launches
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", [("gemma3", "Gemma3MultiModalProjector"), ("aya_vision", "AyaVisionMultiModalProjector"),
                                 ("mistral3", "Mistral3MultiModalProjector")], ids=lambda k: k[0])
def test_token_tables_built_under_inference_mode_still_train(key):
    """The token tables are cached per shape and saved for backward: a first call under
    torch.inference_mode() (generation) must not leave an inference tensor that breaks training later."""
    registry._TABLES.clear()
    registry._unfold_table.cache_clear()
    module, inputs = BUILDERS[key]()
    model = _Parent(module)
    mmfuse.patch(model)
    with torch.inference_mode():
        model(*inputs)
    x = inputs[0].clone().requires_grad_()
    model(x, *inputs[1:]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# Model-level merges: InternVL's pixel shuffle runs in InternVLModel.get_image_features, handed to
# the projector's first GEMM by the model's copy
# ----------------------------------------------------------------------------------------------
def _internvl_vlm(mod="internvl", cfg_name="InternVLConfig", cls="InternVLForConditionalGeneration", side=56):
    def make():
        torch.manual_seed(0)
        cfg = getattr(getattr(M, mod), cfg_name)(
            vision_config=dict(hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=[side, side], patch_size=[14, 14]),
            text_config=_llama_text().to_dict(), downsample_ratio=0.5, image_token_id=60)
        return _hf_checks()._LlavaCall(getattr(getattr(M, mod), cls)(cfg))  # model(input_ids=, pixel_values=)
    return make


def _internvl_inputs(images=2, side=56):
    tokens = (side // 14 // 2) ** 2  # per image, after the shuffle
    ids = torch.tensor([[1] + [60] * (tokens * images) + [5, 6]])
    return [ids, torch.randn(images, 3, side, side)]


MODEL_LEVEL = {"internvl": _internvl_vlm(),
               "qianfan_ocr": _internvl_vlm("qianfan_ocr", "QianfanOCRConfig", "QianfanOCRForConditionalGeneration")}


def test_every_model_level_family_is_tested():
    assert {f.module for f in registry.FAMILIES if registry.is_model_level(f)} == set(MODEL_LEVEL)


@pytest.mark.parametrize("mod", sorted(MODEL_LEVEL))
def test_model_level_pixel_shuffle_read_by_the_projector_matches_and_trains(mod, launches):
    """The whole model (tower, shuffle, projector, LLM): logits and every parameter gradient against the
    original in fp64; the projector's first GEMM read the shuffle (one mapped GEMM, 4 tokens a row); one
    training step; unpatch puts the original model back."""
    hf = _hf_checks()
    make, inputs = MODEL_LEVEL[mod], _internvl_inputs()
    launches.clear()
    model, report = hf.check_patch_equivalence(make(), inputs, lambda o: o.logits, [])
    names = {name: new for name, _, new in report.swapped}
    assert names["model.model"].startswith("Fused") and "model.model.multi_modal_projector" in names, str(report)
    assert launches.count("mapped_gemm_kernel") == 3, launches  # forward, dW, dA through the shuffle's table
    hf.check_training_step(make, inputs, lambda o: o.logits)
    original = model.model.model.__dict__["_mmfuse_original"]
    restored = mmfuse.unpatch(model)
    assert model.model.model is original and "model.model" in restored
    assert "model.model.multi_modal_projector" in restored
    assert not any(type(m).__module__.startswith("mmfuse") for m in model.modules())


def test_internvl_shuffle_is_never_materialised(monkeypatch):
    """Beyond the tower's own ops, get_image_features runs the mmfuse op and nothing that copies,
    permutes or normalises: the model's pixel_shuffle runs only once, on token ids (the table's probe),
    and the projector's rows are the tower's hidden state itself (class token rows skipped, no copy)."""
    from transformers.models.internvl import modeling_internvl as mi

    calls = []
    real_shuffle = mi.InternVLModel.pixel_shuffle

    def counting(self, x, *args, **kwargs):
        calls.append(x.dtype)
        return real_shuffle(self, x, *args, **kwargs)

    monkeypatch.setattr(mi.InternVLModel, "pixel_shuffle", counting)
    registry._TABLES.clear()
    model = MODEL_LEVEL["internvl"]().model
    mmfuse.patch(model)
    _, pixels = _internvl_inputs()
    seen = {}
    real_take = registry._DeferredMerge.take

    def take(self):
        rows, table = real_take(self)
        seen.update(rows=rows, table=table)
        return rows, table

    monkeypatch.setattr(registry._DeferredMerge, "take", take)
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixels, return_dict=True)
        assert calls == [torch.long]  # the probe, on ids
        with OpNames() as tower_ops:
            hidden = model.model.vision_tower(pixel_values=pixels, return_dict=True).last_hidden_state
        with OpNames() as ops:
            out = merged_output(model.model.get_image_features(pixel_values=pixels, return_dict=True))
    assert calls == [torch.long]
    import collections

    extra = collections.Counter(n.split(".")[0] for n in ops.names)
    extra.subtract(collections.Counter(n.split(".")[0] for n in tower_ops.names))
    extra = {n for n, c in extra.items() if c > 0}
    assert "merged_mlp_fwd" in extra, extra
    assert not extra & {"clone", "permute", "_to_copy", "copy_", "native_layer_norm", "layer_norm", "contiguous"}, extra
    rows = seen["rows"]
    assert rows.shape[0] == hidden.shape[0] * hidden.shape[1] - 1 and rows.stride() == (V, 1)
    # the view starts at image 0's first patch token: image i's class token is row i * (1 + 16) - 1
    assert not ((seen["table"] + 1) % hidden.shape[1] == 0).any() and seen["table"].unique().numel() == 32
    assert out.shape == (2, 4, 24) and torch.isfinite(out).all()


def test_internvl_merge_outside_get_image_features_is_the_real_one():
    model = MODEL_LEVEL["internvl"]().model
    original = copy.deepcopy(model)
    mmfuse.patch(model)
    x = torch.randn(2, 4, 4, V)
    torch.testing.assert_close(model.model.pixel_shuffle(x, scale_factor=0.5),
                               original.model.pixel_shuffle(x, scale_factor=0.5), rtol=0, atol=0)


def test_internvl_stand_in_that_misses_the_projector_raises(monkeypatch):
    """Should the model's code ever reorder the merge's output or not pass it to the projector, the
    stand-in (a meta tensor: no data) is never read as features: the call raises, it returns nothing."""
    from transformers.models.internvl import modeling_internvl as mi

    pixels = _internvl_inputs()[1]
    real = mi.InternVLModel.get_image_features

    def transposing(self, pixel_values, **kw):  # a future version transposing the shuffled grid
        shuffle = self.pixel_shuffle
        self.pixel_shuffle = lambda x, **k: shuffle(x, **k).transpose(1, 2)
        try:
            return real(self, pixel_values=pixel_values, **kw)
        finally:
            del self.pixel_shuffle

    monkeypatch.setattr(mi.InternVLModel, "get_image_features", transposing)
    model = MODEL_LEVEL["internvl"]().model
    mmfuse.patch(model)
    with pytest.raises(RuntimeError, match="reordered or copied"):
        model.model.get_image_features(pixel_values=pixels, return_dict=True)
    assert not registry._calls()  # nothing left in flight
    monkeypatch.setattr(mi.InternVLModel, "get_image_features", real)
    # A projector that never receives it: get_image_features raises after the call.
    model = MODEL_LEVEL["internvl"]().model
    mmfuse.patch(model)
    monkeypatch.setattr(type(model.model.multi_modal_projector), "forward", lambda self, t: t.new_zeros(()))
    with pytest.raises(RuntimeError, match="pixel_shuffle output did not reach multi_modal_projector"):
        model.model.get_image_features(pixel_values=pixels, return_dict=True)
    assert not registry._calls()


def test_merges_in_flight_are_per_thread():
    """The handoff is per call and per thread: a merge in flight on one thread is invisible to another
    thread running the same model (Triton's interpreter cannot run kernels on two threads at once, so
    this checks the mechanism, not two concurrent forwards)."""
    import threading

    model = MODEL_LEVEL["internvl"]().model
    mmfuse.patch(model)
    proj = model.model.multi_modal_projector
    call = registry._DeferredMerge(model.model, proj, stand_in=torch.empty(1, 4, device="meta"))
    registry._calls().append(call)
    try:
        seen = []
        other = threading.Thread(target=lambda: seen.append((registry._pending_merge(proj), registry._calls())))
        other.start()
        other.join()
        assert seen == [(None, [])] and registry._pending_merge(proj) is call
    finally:
        registry._calls().remove(call)


def test_internvl_merge_called_by_keyword_runs_the_models_own():
    model = MODEL_LEVEL["internvl"]().model
    original = copy.deepcopy(model)
    mmfuse.patch(model)
    x = torch.randn(2, 4, 4, V)
    torch.testing.assert_close(model.model.pixel_shuffle(vision_features=x, scale_factor=0.5),
                               original.model.pixel_shuffle(vision_features=x, scale_factor=0.5), rtol=0, atol=0)


def test_internvl_with_a_projector_left_alone_runs_its_own_shuffle():
    model, pixels = MODEL_LEVEL["internvl"]().model, _internvl_inputs()[1]
    ref = merged_output(model.model.get_image_features(pixel_values=pixels, return_dict=True))
    mmfuse.patch(model)
    proj = model.model.multi_modal_projector.__dict__["_mmfuse_original"]
    model.model.multi_modal_projector = proj  # as if the projector's recipe had declined it
    out = merged_output(model.model.get_image_features(pixel_values=pixels, return_dict=True))
    torch.testing.assert_close(out, ref)


def test_model_level_root_is_left_alone_and_its_children_patched():
    vlm = MODEL_LEVEL["internvl"]().model
    report = mmfuse.patch(vlm.model)  # the bare InternVLModel
    assert any(name == "" and "root module" in why for name, _, why in report.left_alone), str(report)
    assert "multi_modal_projector" in {name for name, _, _ in report.swapped}


@pytest.mark.parametrize("shape,index,view", [
    ((3, 5, 4, 6), (slice(None), slice(1, None)), True),              # the class token dropped: a row view
    ((3, 10, 6), (slice(None), slice(2, 7)), True),                   # a window of tokens per image
    ((2, 7, 6), (slice(None), slice(None, None, 2)), False),          # every other token: copied (the rule is
                                                                      # a sufficient one for tokens apart)
    ((4, 3, 8), (slice(None), slice(None), slice(0, 5)), True),       # a channel slice (row stride 8)
    ((2, 1, 6), "expand", False), ((5, 6), "overlap", False)])        # tokens sharing memory: copied
def test_token_rows_view_every_token_in_place(shape, index, view):
    base = torch.randn(shape)
    x = base.expand(2, 3, 6) if index == "expand" else base.as_strided((3, 4), (2, 1)) if index == "overlap" \
        else base[index]
    rows, steps = registry._token_rows(x)
    flat = x.reshape(-1, x.shape[-1])
    got = rows if steps is None else rows[registry._row_ids(x.shape[:-1], steps, x.device)]
    torch.testing.assert_close(got, flat, rtol=0, atol=0)
    shares = rows.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert shares == view


def test_model_level_patches_on_meta_and_loads_after():
    real = MODEL_LEVEL["internvl"]()
    with torch.device("meta"):
        model = MODEL_LEVEL["internvl"]()
    report = mmfuse.patch(model)
    assert "model.model" in {name for name, _, _ in report.swapped}
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    with torch.no_grad():  # non-persistent buffers are re-created, as transformers' _init_weights does
        for name, buf in real.named_buffers():
            model.get_buffer(name).copy_(buf)
    inputs = _internvl_inputs()
    torch.testing.assert_close(model(*inputs).logits, real(*inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", [dict(padding=1), dict(ceil_mode=True), dict(divisor_override=3), dict(stride=1)],
                         ids=lambda kw: next(iter(kw)))
def test_gemma3_pool_other_than_whole_windows_is_left_alone(pool):
    """The fused form pools non-overlapping kernel x kernel windows: any other AvgPool2d would be a silent
    wrong answer, so the projector is left alone, with the reason."""
    module, _ = BUILDERS[("gemma3", "Gemma3MultiModalProjector")]()
    k = module.kernel_size
    module.avg_pool = nn.AvgPool2d(**{"kernel_size": k, "stride": k, **pool})
    report = mmfuse.patch(_Parent(module))
    assert not report.swapped and "avg_pool: expected non-overlapping" in report.left_alone[0][2], str(report)


def test_gemma3_pool_under_autocast_pools_in_the_input_dtype(monkeypatch):
    """Under bf16 autocast, Gemma pools and normalises the fp32 tower output in fp32 and casts at the
    matmul; the patched projector does the same (rounding x to bf16 before the pool would add a
    rounding per token): the pool kernel gets fp32, and the error to fp64 obeys the error rule."""
    from mmfuse.ops import merged as ops_merged

    seen = []
    real = ops_merged.pool_norm_fwd_op
    monkeypatch.setattr(ops_merged, "pool_norm_fwd_op", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    module, (x,) = BUILDERS[("gemma3", "Gemma3MultiModalProjector")]()
    ref64 = copy.deepcopy(module).double()(x.double())
    patched = _Parent(copy.deepcopy(module))
    mmfuse.patch(patched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = module(x)
        out = patched(x)
    assert out.dtype == eager.dtype == torch.float32  # (type_as the input, as the original)
    assert seen == [torch.float32]
    assert_close("out", out, ref64, eager)


def test_mistral3_sees_weight_writes_through_data():
    """The token-major merging weight is made from the weight at every call: a write through
    ``weight.data`` (which bumps no version counter: PEFT's merge_adapter, EMA) is seen."""
    module, inputs = BUILDERS[("mistral3", "Mistral3MultiModalProjector")]()
    model = _Parent(module)
    mmfuse.patch(model)
    with torch.no_grad():
        model(*inputs)
        module.patch_merger.merging_layer.weight.data.mul_(-0.5)
        torch.testing.assert_close(model(*inputs), module(*inputs), rtol=1e-5, atol=1e-5)

def test_unfold_patch_embed_packs_its_weight_once_and_again_after_an_update(monkeypatch):
    """Llama 4's patch embedding views its Linear's weight as a conv weight on every call; with
    ``cache_packed_weight`` the packed weight is still cached on that Linear's weight (repacked only when
    it changes); by default it is packed on every call."""
    from mmfuse.ops import patch_embed as ops

    packs = []
    real_pack = ops.K.pack_weight
    monkeypatch.setattr(ops.K, "pack_weight", lambda w: packs.append(1) or real_pack(w))
    module, (x,) = BUILDERS[("llama4", "Llama4UnfoldConvolution")]()
    model = _Parent(module)
    mmfuse.patch(model)
    model(x)
    assert len(packs) == 1
    model(x)
    assert len(packs) == 2  # the default: a pack per call
    model.target.cache_packed_weight = True
    packs.clear()
    first = model(x)
    model(x)
    assert len(packs) == 1
    with torch.no_grad():
        module.linear.weight.mul_(2)  # an in-place update: a new version of the same tensor
    torch.testing.assert_close(model(x), 2 * first)
    assert len(packs) == 2


def test_vision_tower_patch_reports_a_declined_tower_mlp():
    """A tower MLP the registry declines is named with its reason in the report, with vision_tower=True only."""
    cfg = M.gemma4.Gemma4VisionConfig(**_TINY_VIT)
    model = _Parent(_mod("gemma4", "Gemma4VisionMLP")(cfg))
    assert not mmfuse.patch(model).left_alone
    left = {name: why for name, _, why in mmfuse.patch(model, vision_tower=True).left_alone}
    assert "Gemma4ClippableLinear" in left["target"]


def test_vision_tower_patch_does_not_list_the_language_models_mlps():
    """The enumeration declines the language model's MLPs (Qwen2MLP, ...), but they are not tower candidates:
    the vision_tower report has no line for each decoder layer's MLP."""
    cfg = M.qwen2_vl.Qwen2VLTextConfig(hidden_size=T, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    model = _Parent(_mod("qwen2_vl", "Qwen2MLP")(cfg))
    assert registry.TOWER_DECLINED[("qwen2_vl", "Qwen2MLP")]  # declined, with its reason...
    assert not mmfuse.patch(model, vision_tower=True).left_alone  # ...and not reported


# ----------------------------------------------------------------------------------------------
# Adapters added after patch: applied or refused, never silently ignored
# ----------------------------------------------------------------------------------------------
_ADAPTED = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _adaptable(m: nn.Module) -> bool:
    """The layers PEFT wraps: LoRA's Linears, convs and embeddings; LN tuning's norms."""
    return isinstance(m, _ADAPTED) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


def _adapt(root: nn.Module, paths) -> None:
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        owner._modules[leaf] = AdapterStandIn(owner._modules[leaf])


def _one_builder_per_recipe():
    keys = {}
    for fam in registry.FAMILIES:
        for cls in fam.classes:
            key = (fam.module, cls)
            if key in (TOWER_BUILDERS if fam.tower else BUILDERS):
                # each attention class has a drop-in of its own; CLIP's and SigLIP's embeddings differ
                group = (fam.recipe, fam.tower, fam.opt("fuse") is not None, fam.opt("layout"),
                         cls if fam.recipe == "cross-attention" else None)
                keys.setdefault(group, (key, fam.tower))
    return sorted(keys.values())


@pytest.mark.parametrize("key,tower", _one_builder_per_recipe(), ids=lambda k: f"{k[0]}.{k[1]}" if isinstance(k, tuple) else "")
def test_an_adapter_added_after_patch_is_applied_or_refused(key, tower, monkeypatch):
    """Every layer a swapped module holds (Linears, convs, embeddings, norms: what PEFT wraps), wrapped by
    an adapter after ``patch``: the forward either computes what the adapted original computes, or raises
    naming the layer (a fused forward reading the layer's weight would otherwise skip the adapter, and a
    fused activation would put the update after it). One family per recipe."""
    torch.manual_seed(0)
    module, inputs = (TOWER_BUILDERS if tower else BUILDERS)[key]()
    _opt_in_to_plain_gemms(module, monkeypatch)
    model = _Parent(module).float().eval()
    reference = copy.deepcopy(model)
    _swapped_target(mmfuse.patch(model, vision_tower=tower))
    paths = [name for name, m in model.named_modules() if _adaptable(m) and name]
    assert paths, "no layer to adapt"
    outcomes = {}
    for path in paths:  # one layer at a time: every check of a forward is reached, not only its first
        adapted, expected_model = copy.deepcopy(model), copy.deepcopy(reference)
        _adapt(adapted, [path])
        _adapt(expected_model, [path] if _adaptable(expected_model.get_submodule(path)) else [])
        with torch.no_grad():
            expected = expected_model(*inputs)
            try:
                out = adapted(*inputs)
            except RuntimeError as e:
                assert f"{path.rsplit('.', 1)[-1]}: expected the" in str(e) and "apply adapters before" in str(e), e
                outcomes[path] = "refused"
                continue
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"{path}: adapter skipped")
        outcomes[path] = "applied"
    assert outcomes.keys() == set(paths)


@pytest.mark.parametrize("key,tower", _one_builder_per_recipe(), ids=lambda k: f"{k[0]}.{k[1]}" if isinstance(k, tuple) else "")
def test_a_patched_module_pickles_and_deep_copies(key, tower, monkeypatch):
    """``torch.save(model)`` / pickle (multiprocessing) and ``copy.deepcopy`` of a patched model: the
    registry's classes are made per family, so pickle could not name them (it raised); the copy has the
    same classes, shares nothing with the original, computes the same, and still unpatches."""
    import io

    torch.manual_seed(0)
    module, inputs = (TOWER_BUILDERS if tower else BUILDERS)[key]()
    _opt_in_to_plain_gemms(module, monkeypatch)
    model = _Parent(module).float().eval()
    _swapped_target(mmfuse.patch(model, vision_tower=tower))
    with torch.no_grad():
        expected = model(*inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert [type(m).__name__ for m in copied.modules()] == [type(m).__name__ for m in model.modules()]
        assert not {id(p) for p in copied.parameters()} & {id(p) for p in model.parameters()}
        with torch.no_grad():
            torch.testing.assert_close(copied(*inputs), expected, rtol=0, atol=0)
        assert mmfuse.unpatch(copied) == ["target"] and type(copied.target) is type(module)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_whole_tower_patched_trains_under_gradient_checkpointing(reentrant):
    """transformers' gradient checkpointing (each vision block recomputed in backward) over a patched
    Qwen2.5-VL tower (merger, gated tower MLPs): the recompute runs mmfuse's ops again, and the output and
    every parameter gradient match the unpatched tower without checkpointing."""
    make = _tower("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig", **_QW25)
    inputs = _tower_inputs()

    def step(model):
        model.train().zero_grad(set_to_none=True)
        out = _pooled(model(*inputs))
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step(make())
    model = make()
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    mmfuse.patch(model, vision_tower=True)
    calls = []
    # (a pre-hook: non-reentrant recompute stops inside the block's last module once its saved tensors are back)
    model.model.blocks[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # (the swapped module's)
    out, grads = step(model)
    assert len(calls) == 2, "the block was not recomputed: checkpointing is off"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_linear_with_nothing_to_fuse_stays_the_original(monkeypatch, launches):
    """``mmfuse._dispatch.PLAIN_GEMMS``: an MLP's Linear with its activation after it runs on mmfuse (act in the
    epilogue); the last Linear, with nothing to fuse, stays the original nn.Linear (cuBLAS measured
    4-6x faster as a plain GEMM, bench/NOTES.md session 14); ``MMFUSE_PLAIN_GEMMS=mmfuse`` swaps it too."""
    from mmfuse.nn.linear import Linear

    for key, builders, tower, (fused, plain) in [
            (("llava_next", "LlavaNextMultiModalProjector"), BUILDERS, False, ("linear_1", "linear_2")),
            (("clip", "CLIPMLP"), TOWER_BUILDERS, True, ("fc1", "fc2"))]:
        for setting in ("pytorch", "mmfuse"):
            monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", setting)
            torch.manual_seed(0)
            module, inputs = builders[key]()
            model = _Parent(module)
            expected = model(*inputs)
            assert [n for n, _, _ in mmfuse.patch(model, vision_tower=tower).swapped] == ["target"]
            assert type(getattr(model.target, fused)) is Linear and getattr(model.target, fused).activation
            if setting == "pytorch":
                assert getattr(model.target, plain) is getattr(module, plain)  # the original nn.Linear
            else:
                assert type(getattr(model.target, plain)) is Linear and getattr(model.target, plain).activation is None
            launches.clear()
            torch.testing.assert_close(model(*inputs), expected)
            assert launches.count("fused_gemm_kernel") == (1 if setting == "pytorch" else 2), (key, setting, launches)


def test_plain_gemms_setting_is_checked_at_import():
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMFUSE_PLAIN_GEMMS": "cublas"}
    proc = subprocess.run([sys.executable, "-c", "import mmfuse"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MMFUSE_PLAIN_GEMMS: expected 'pytorch' or 'mmfuse', got 'cublas'" in proc.stderr


def test_a_module_swapped_under_one_plain_gemms_setting_unpickles_under_the_other(monkeypatch):
    """PaliGemma's projector swapped with MMFUSE_PLAIN_GEMMS=mmfuse, saved, and loaded where the default
    ("pytorch") would leave it alone: the pickle still loads, as it was saved, and computes the same."""
    import io

    torch.manual_seed(0)
    module, inputs = BUILDERS[("paligemma", "PaliGemmaMultiModalProjector")]()
    monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", "mmfuse")
    model = _Parent(module).eval()
    _swapped_target(mmfuse.patch(model))
    with torch.no_grad():
        expected = model(*inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", "pytorch")
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.target) is type(model.target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), expected)
    assert mmfuse.unpatch(loaded) == ["target"] and type(loaded.target) is type(module)
