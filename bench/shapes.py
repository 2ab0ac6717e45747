"""The one table of real model shapes. Benchmarks, the static report and model-shaped tests read it.

Sources: the models' published configs (hidden sizes, patch sizes, heads). Token counts are per image
(or per video clip for Qwen2-VL) at the listed resolution.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MLPShape:
    """An MLP projector: tokens per image, then layer widths (in, hidden..., out)."""
    name: str
    tokens: int
    widths: tuple[int, ...]
    activation: str = "gelu"


@dataclasses.dataclass(frozen=True)
class GatedShape:
    """A gated MLP, down(act(gate(x)) * up(x)): tokens per image, in -> hidden -> out."""
    name: str
    tokens: int
    features: int
    hidden: int
    out: int
    bias: bool = True
    activation: str = "silu"


@dataclasses.dataclass(frozen=True)
class MergedShape:
    """A projector whose first GEMM reads a token merge and a norm (``mmfuse.merged_mlp``): source tokens
    per image of ``channels``, ``group`` tokens per merged row, the MLP's widths after it."""
    name: str
    tokens: int
    channels: int
    group: int
    widths: tuple[int, ...]
    norm: str | None
    norm_after_merge: bool = False
    table: bool = False     # a pixel shuffle (a token table; eager copies), or Qwen's free view merge
    gated: bool = False     # widths (N, D): SwiGLU on one chunked (2N, K) weight ([up | gate]), then down
    pool: bool = False      # average pooling of the group's tokens (C wide rows), the norm after it
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class PatchShape:
    """A patch embedding: Conv2d(C, D, P, stride=P) on (H, W) images, or Conv3d with temporal T."""
    name: str
    channels: int
    image: tuple[int, int]
    patch: int
    dim: int
    temporal: int = 1
    frames: int = 1

    @property
    def tokens(self) -> int:
        return (self.frames // self.temporal) * (self.image[0] // self.patch) * (self.image[1] // self.patch)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Resampler cross-attention: Lq learnable queries over Lk keys (context [+ latents])."""
    name: str
    queries: int
    keys: int
    heads: int
    kv_heads: int
    head_dim: int


MLP_SHAPES = (
    MLPShape("llava-1.5-7b", 576, (1024, 4096, 4096)),
    MLPShape("llava-1.5-13b", 576, (1024, 5120, 5120)),
    MLPShape("llava-next-7b", 2880, (1024, 4096, 4096)),
    # Qwen2-VL merger: 2x2 patches of 1280 merged to 5120 -> 5120 -> 3584 (7B LLM); an 896x896
    # image is 64x64 patches of 14, merged to 1024 tokens.
    MLPShape("qwen2-vl-merger", 1024, (5120, 5120, 3584)),
    # InternVL2-8B mlp1: LayerNorm(4096) -> Linear(4096, 4096) -> GELU -> Linear(4096, 4096);
    # 4096 = 1024 (InternViT-300M) * 4 after pixel shuffle; 256 tokens per 448px tile.
    MLPShape("internvl2-8b-mlp1", 256, (4096, 4096, 4096)),
    # Qwen2.5-VL-7B merger: RMSNorm(1280), 2x2 merge to 5120 -> 5120 -> 3584 (the norm differs from
    # Qwen2-VL's LayerNorm; the GEMMs are the same sizes); 1024 merged tokens per 896px image.
    MLPShape("qwen2.5-vl-7b-merger", 1024, (5120, 5120, 3584)),
    # Mistral-Small-3.1-24B (Mistral3 / Pixtral vision): after the 2x2 unfold merge (a Linear
    # 4096 -> 1024), Linear(1024, 5120) -> GELU -> Linear(5120, 5120); a 1036px image is 74x74
    # patches of 14, merged to 37x37 = 1369 tokens.
    MLPShape("mistral3-24b-projector", 1369, (1024, 5120, 5120)),
    # SigLIP-so400m/14 at 384px, each of its 27 ViT blocks' MLP (issue 12's tower MLP): fc1 1152 -> 4304,
    # GELU (tanh), fc2 4304 -> 1152, on 27x27 = 729 patches per image (the published
    # google/siglip-so400m-patch14-384 config: hidden_size 1152, intermediate_size 4304).
    MLPShape("siglip-so400m-tower-mlp", 729, (1152, 4304, 1152), activation="gelu_tanh"),
    # Session 8's rows for families the registry covers. "transformers' default": the sizes equal the
    # default config of transformers 5.23, whose docstring names that checkpoint (checked offline);
    # "public copy": checked (session 9) against a public copy of the published config.json or the
    # conversion script that wrote it, named in the row's comment (no download here).
    # LLaVA-OneVision (Qwen2-7B): SigLIP-so400m 384px, 27x27 = 729 tokens per crop, 1152 -> 3584 -> 3584
    # (public copy: transformers' convert_llava_onevision_weights_to_hf.py maps lmms-lab/llava-onevision-
    # qwen2-7b-ov to Qwen2-7B-Instruct, hidden 3584, and SigLIP 1152 at 384px; transformers' default pairs
    # the tower with a 4096 LLM).
    MLPShape("llava-onevision-qwen2-7b", 729, (1152, 3584, 3584)),
    # VipLLaVA-7B: five CLIP-L/14-336 layers concatenated (5 x 1024), its LayerNorm (PyTorch in the
    # norm+mlp recipe), then 5120 -> 4096 -> 4096 on 576 tokens (transformers' default).
    MLPShape("vipllava-7b", 576, (5120, 4096, 4096)),
    # Video-LLaVA-7B: LanguageBind's CLIP-L/14 at 224px, 256 tokens per image or frame, 1024 -> 4096 -> 4096
    # (transformers' default).
    MLPShape("video-llava-7b", 256, (1024, 4096, 4096)),
    # PaliGemma-3B-224: one Linear, SigLIP-so400m's 1152 -> Gemma-2B's 2048 on 256 tokens
    # (transformers' default).
    MLPShape("paligemma-3b-224", 256, (1152, 2048)),
    # Session 9's rows, each checked against a public source (no download here).
    # Pixtral-12B (LLaVA-style projector): vision 1024 wide, patch 16, 1024px images: 64x64 = 4096 patches;
    # 1024 -> 5120 -> 5120, GELU (candle's pixtral_12b_2409 config; transformers' convert_pixtral script,
    # text hidden 5120; projector_hidden_act the LlavaConfig default "gelu").
    MLPShape("pixtral-12b-projector", 4096, (1024, 5120, 5120)),
    # FastVLM-7B: FastViTHD's 3072 channels, 256 tokens per 1024px image (transformers'
    # convert_fastvlm_weights_to_hf: image_seq_length 256), mlp2x_gelu to Qwen2-7B's 3584 (FastVlmConfig's
    # default, "the same configuration as FastVLM-7B").
    MLPShape("fastvlm-7b-projector", 256, (3072, 3584, 3584)),
    # PaddleOCR-VL: LayerNorm(1152) per token and the 2x2 merge in PyTorch ("merge+mlp"), then 4608 ->
    # 4608 -> 1024 on mmfuse GEMMs; an 896px page: 64x64 patches of 14, 1024 merged rows (candle's
    # paddleocr_vl config defaults and transformers' PaddleOCRProjector).
    MLPShape("paddleocr-vl-projector", 1024, (4608, 4608, 1024)),
    # Session 12's rows, each from two public copies of the published config (no download here): MaxText's
    # configs/models/llama4-17b-16e.yml and base.yml (vision hidden 1408, intermediate 5632, 336px tiles,
    # patch 14, pixel_shuffle_ratio 0.5, projector dims 4096, text 5120) and ai-dynamo/aiconfigurator's
    # bundled Llama-4-Scout / Maverick config.json test (the same vision_config for both; projector dims
    # (5632, 4096), (4096, 4096), (4096, 5120); 577 tower tokens per tile, 144 out).
    # Llama 4 Scout / Maverick's projector: one bias-free Linear 4096 -> 5120 on the adapter's 144 rows
    # per tile (the byte model gives it a bias: 10 KB).
    MLPShape("llama4-projector", 144, (4096, 5120)),
    # Llama 4's vision-tower MLP (each of its 34 blocks): fc1 1408 -> 5632, GELU (erf), fc2 -> 1408, on
    # 576 patches + the class token per tile.
    MLPShape("llama4-tower-mlp", 577, (1408, 5632, 1408)),
    # Janus-Pro-7B's aligner (JanusVisionAlignerMLP, depth 2): SigLIP-L/16 at 384px, 24x24 = 576 tokens,
    # 1024 -> 4096 -> 4096, GELU (a config-parser test's assertions on the checkpoint's config: projector_type
    # "mlp_gelu", input_dim 1024, n_embed 4096, depth 2, siglip_large_patch16_384).
    MLPShape("janus-pro-7b-aligner", 576, (1024, 4096, 4096)),
    # Session 13's rows: public copies of the checkpoints' config.json on the Hugging Face Hub (file pages
    # read through the search corpus; no download here). None of these projectors has a bias, which the
    # MLP rows model (a vector per layer: a rounding error of the bytes).
    # Florence-2: image_projection, one Linear from DaViT's last stage to the projection width, on 577
    # rows (a 768px image: 24x24 stage-4 tokens plus their spatial mean). Base: dim_embed [.., 1024],
    # projection_dim 768 (microsoft/Florence-2-base config.json @53f3fb41 and a copy's); large: [.., 2048],
    # 1024 (a copy of microsoft/Florence-2-large's, thomas-roth/Florence-2-large @d163573c).
    MLPShape("florence-2-base-projection", 577, (1024, 768)),
    MLPShape("florence-2-large-projection", 577, (2048, 1024)),
    # Aria: the projector's feed-forward after its cross-attention, 1152 -> 2560 -> 2560, gelu_new (tanh),
    # on the 256 queries of a 980px image (rhymes-ai/Aria config.json: projector_patch_to_query_dict
    # {1225: 128, 4900: 256}, text hidden 2560; vision 1152, 16 heads; processor size_conversion {490: 128,
    # 980: 256}). Its cross-attention is a GEMM swap around nn.MultiheadAttention: no attention row.
    MLPShape("aria-projector-ffn", 256, (1152, 2560, 2560), activation="gelu_tanh"),
    # VideoLLaMA3-2B: readout Linear(1152 -> 1536), GELU, Linear(1536 -> 1536) (DAMO-NLP-SG/VideoLLaMA3-2B
    # config.json @6fde53bf: hidden_size 1536, mm_projector_type mlp2x_gelu; its SigLIP-NaViT encoder 1152
    # wide, patch 14, in a fork's copy of the config). Images are not merged: a 448px image, 32x32 = 1024
    # tokens (the size is ours).
    MLPShape("videollama3-2b-projector", 1024, (1152, 1536, 1536)),
    # LightOnOCR-0.9B-16k-1025 (lightonai's config.json): Pixtral vision 1024 wide, patch 14, image_size
    # 1540, spatial_merge_size 2, text hidden 1024, projector GELU without bias; after the 2x2 unfold merge
    # (a Linear 4096 -> 1024, as Mistral3's row above leaves out), 1024 -> 1024 -> 1024 on a 1540px page:
    # 110x110 patches merged to 55x55 = 3025 rows.
    MLPShape("lightonocr-0.9b-projector", 3025, (1024, 1024, 1024)),
    # PerceptionLM-1B: linear_1 1024 -> 2048, GELU, linear_2 2048 -> 2048, then 2x2 average pooling in
    # PyTorch, on PE-core-L/14 at 336px: 24x24 = 576 tokens (a re-upload's config.json: text hidden 2048,
    # projector_pooling_ratio 2, vision "vit_pe_core_large_patch14_336", which transformers' conversion
    # script maps to width 1024). Less certain than the rows above: not the publisher's own file.
    MLPShape("perception-lm-1b-projector", 576, (1024, 2048, 2048)),
    # Session 15's rows (issue 11 item 5: the families that had none). No download here: public copies read
    # through the search corpus, each named; what is ours is said.
    # ERNIE-4.5-VL-28B-A3B's resampler (Ernie4_5_VLMoeVariableResolutionResamplerModel): the DFN vision tower
    # is 1280 wide, patch 14, spatial and temporal merge 2 (NVIDIA Megatron-Bridge's ERNIE-4.5-VL vision
    # constants "from the HF DFNRope config"; mlx-vlm's ernie4_5_moe_vl config defaults; transformers'
    # Ernie4_5_VLMoeVisionConfig default), so after the 2x2 merge spatial_linear is fc1 5120 -> 5120, GELU,
    # fc2 5120 -> 5120, and for an image (its frame duplicated) temporal_linear is fc1 10240 -> 5120, GELU,
    # fc2 5120 -> 5120, each with LayerNorm after (PyTorch); on the 1024 merged rows of a 896px image (the
    # size is ours). The last Linear (5120 -> the text width, 2560 for 28B-A3B by third-party copies only)
    # has nothing to fuse and stays PyTorch, so it has no row.
    MLPShape("ernie-4.5-vl-28b-spatial-mlp", 1024, (5120, 5120, 5120)),
    MLPShape("ernie-4.5-vl-28b-temporal-mlp", 1024, (10240, 5120, 5120)),
    # MiniCPM-V 4.6's downsample MLP (MiniCPMV4_6DownsampleMLP): SigLIP-so400m (1152, patch 14) merged 2x2
    # by the window-attention merger inside the tower and 2x2 again here: LayerNorm(4608) (PyTorch), linear_1
    # 4608 -> 4608, GELU, linear_2 4608 -> 1024 (openbmb/MiniCPM-V-4.6 config.json: vision hidden 1152,
    # patch 14, text hidden 1024); a 448px slice, 32x32 patches, is 64 rows here ("16x" mode, the default).
    # MiniCPM-V 4.7 (1B, 35B-A3B) has the same classes and a 27-layer SigLIP tower of patch 14 (OpenBMB's
    # MiniCPM-V CookBook, v4.7 overview: so400m's depth, so 1152 wide), so its fused GEMM (linear_1, GELU)
    # is this row's 4608 -> 4608; only linear_2's output (the text width, not found in any copy) differs,
    # and that Linear has nothing to fuse: PyTorch's.
    MLPShape("minicpm-v-4.6-downsample-mlp", 64, (4608, 4608, 1024)),
    # HunyuanOCR's merger (HunYuanVLVisionPatchMerger): Conv2d(1152, 2304, k=s=2) -- a GEMM on 2x2-merged
    # rows of 4608 --, GELU, the 1x1 Conv2d 2304 -> 4608, then Linear(4608 -> 1024) on the rows plus a
    # newline token per row of the grid (nothing to fuse: PyTorch, no row). Tower 1152 wide, patch 16
    # (a printout of the loaded checkpoint's merger in a published write-up; tencent/HunyuanOCR's
    # preprocessor_config patch 16, merge 2; a conversion copy of its config.json, text hidden 1024). A
    # 1024px page: 64x64 patches, 32x32 = 1024 merged rows (the size is ours).
    MLPShape("hunyuan-ocr-merger-convs", 1024, (4608, 2304, 4608)),
    # Qwen3-Omni-30B-A3B's merger (Qwen3OmniMoeVisionPatchMerger; LayerNorm(1152) and the 2x2 merge in
    # PyTorch): 4608 -> 4608, GELU, -> 2048 (out_hidden_size 2048, not transformers' default 3584: a printout
    # of the loaded Qwen3-Omni-30B-A3B-Instruct and a copy of its config.json); a 768px image (its
    # image_size): 48x48 patches of 16, 576 merged rows.
    MLPShape("qwen3-omni-30b-a3b-merger", 576, (4608, 4608, 2048)),
    # MiniMax-M3-VL (minimax_m3_vl, "merge+mlp"): an MLP per patch, linear_1 1280 -> 6144, act, linear_2
    # 6144 -> 6144, the 2x2 merge as a reshape, then merge_linear_1 24576 -> 6144, act, merge_linear_2 -> 6144
    # (third-party only, three of them: a write-up reading the release's safetensors headers, an inference
    # engine's config defaults, and a test whose values are "from nvidia/MiniMax-M3-NVFP4"); a 896px image,
    # 64x64 patches of 14, 1024 merged rows (the size is ours).
    MLPShape("minimax-m3-vl-patch-mlp", 4096, (1280, 6144, 6144)),
    MLPShape("minimax-m3-vl-merge-mlp", 1024, (24576, 6144, 6144)),
    # Muse Glimmer 30B's vision adapter: fc1 6144 -> 4096, act, fc2 4096 -> 4096, act, no biases (several
    # third-party mirrors of meta-models/Muse-Glimmer-30B's config.json; the second act is not in the byte
    # model); 1024 rows (the size is ours).
    MLPShape("muse-glimmer-30b-adapter", 1024, (6144, 4096, 4096)),
    # DeepSeek-VL 1.3B's aligner (mlp_gelu): SigLIP-L at 384px, patch 16, 576 tokens; 1024 -> 2048 -> 2048
    # (two test configs' projector input_dim 1024, n_embed 2048; a mirrored model card: SigLIP-L and
    # DeepSeek-LLM-1.3B).
    MLPShape("deepseek-vl-1.3b-aligner", 576, (1024, 2048, 2048)),
)

GATED_SHAPES = (
    # Qwen2.5-VL-7B's vision-tower MLP (every one of its 32 blocks): SwiGLU 1280 -> 3420 -> 1280 with
    # biases, on the tower's tokens before the merge: 64x64 = 4096 patches of a 896px image.
    GatedShape("qwen2.5-vl-7b-tower-mlp", 4096, 1280, 3420, 1280),
    # Idefics2-8B's connector modality projection (Idefics2MLP, no biases): SigLIP's 1152 -> the
    # Mistral-7B intermediate 14336 -> 4096, on 70x70 = 4900 tokens of a 980px image.
    GatedShape("idefics2-8b-connector-mlp", 4900, 1152, 14336, 4096, bias=False),
    # GLM-4.1V-9B's patch merger after its 2x2 downsample conv (1536 -> out_hidden_size 4096): proj
    # Linear + LayerNorm + GELU (glue), then SwiGLU 4096 -> 13696 -> 4096 without biases, on the 12x12 =
    # 144 merged tokens of a 336px image (image_size 336, patch 14: GLM-4.1V-9B-Thinking presets / mlxcel
    # test; Glm4vVisionPatchMerger(dim=out_hidden_size, context_dim=intermediate_size) in transformers).
    GatedShape("glm-4.1v-9b-merger", 144, 4096, 13696, 4096, bias=False),
    # GLM-4.5V (glm4v_moe): the same merger with a 10944-wide SwiGLU (a public model-info report of the
    # GLM-4.5V checkpoint: its config, vision intermediate_size 10944, out_hidden_size 4096, and its weight
    # list, merger.gate_proj [10944, 4096]; transformers' Glm4vMoeVisionConfig default says 13696, 4.1V's).
    GatedShape("glm-4.5v-merger", 144, 4096, 10944, 4096, bias=False),
    # Molmo2-4B's image projector (Molmo2ImageProjectorMLP): SwiGLU 1152 -> 9728 -> 2560, no biases (a mirrored
    # Molmo2-4B config.json in albud1978/CV: adapter hidden 1152, intermediate 9728, text_hidden_size 2560,
    # hidden_act silu; mlp_bias the config's default False). 196 rows: 2x2 attention pooling of the 27x27
    # patches of a 378px crop, rounded up (our reading of the pooling, not a published figure).
    GatedShape("molmo2-4b-projector", 196, 1152, 9728, 2560, bias=False),
    # GLM-OCR's merger (GlmOcrVisionPatchMerger, the GLM-4V form): proj 1536 -> 1536 + LayerNorm + GELU
    # (glue), then SwiGLU 1536 -> 4608 -> 1536 without biases (three public dumps of the GLM-OCR config.json:
    # vision 1024 wide, patch 14, merge 2, out_hidden_size 1536, text 1536); a 896px page: 64x64 patches,
    # 1024 merged rows (the size is ours).
    GatedShape("glm-ocr-merger", 1024, 1536, 4608, 1536, bias=False),
)

MERGED_SHAPES = (
    # Qwen2.5-VL-7B's merger: RMSNorm(1280) per token, 2x2 merge (a view), 5120 -> 5120 -> 3584; the
    # 4096 patches of a 896px image.
    MergedShape("qwen2.5-vl-7b-merger", 4096, 1280, 4, (5120, 3584), "rms"),
    # Qwen2-VL-7B's: the same with LayerNorm.
    MergedShape("qwen2-vl-7b-merger", 4096, 1280, 4, (5120, 3584), "layer"),
    # InternVL2-8B: InternViT-300M's 1024 tokens of 1024 per 448px tile, pixel shuffle (0.5) to 256 rows
    # of 4096, LayerNorm(4096), 4096 -> 4096 -> 4096 (the shuffle runs in InternVLModel, the rest in
    # its projector).
    MergedShape("internvl2-8b-mlp1", 1024, 1024, 4, (4096, 4096), "layer", norm_after_merge=True, table=True),
    # Aya Vision 8B: SigLIP2-so400m (1152) at 364px: 26x26 = 676 patches of 14 per tile, pixel shuffle
    # (downsample 2) to 169 rows of 4608, LayerNorm(4608), linear_1 4608 -> 28672 chunked into up and
    # gate halves of 14336, SiLU(gate) * up, linear_2 14336 -> 4096 (Command R7B). Public copy: the
    # aya-vision-8b config.json as mirrored by mlx-community/aya-vision-8b-8bit (image_size 364, patch 14,
    # vision hidden 1152, downsample_factor 2, alignment_intermediate_size 28672, text hidden 4096).
    # Qwen3-VL-8B's merger: LayerNorm(1152) per token, 2x2 merge to 4608 -> 4608 -> 4096 (Qwen3-8B), on the
    # 64x64 = 4096 patches of 16 of a 1024px image (tower 1152 wide, patch 16: transformers' default;
    # out_hidden_size 4096: public copies of Qwen3-VL-8B-Instruct's vision_config and its Ollama metadata).
    MergedShape("qwen3-vl-8b-merger", 4096, 1152, 4, (4608, 4096), "layer"),
    # Qwen3-VL-30B-A3B (qwen3_vl_moe): the same tower, out_hidden_size 2048 (MaxText's
    # configs/models/qwen3-vl-30b-a3b.yml: hidden 1152, intermediate 4304, patch 16, merge 2, out 2048,
    # text 2048). Qwen3.5-397B-A17B's merger has the 8B's sizes (MaxText's qwen3.5-397b-a17b.yml and
    # aiconfigurator's config copy: 1152 -> out_hidden_size 4096), so the row above stands for it; Qwen2.5-Omni-
    # 7B's vision is Qwen2.5-VL-7B's (1280 -> 3584: a config-validator fixture and transformers' default).
    MergedShape("qwen3-vl-30b-a3b-merger", 4096, 1152, 4, (4608, 2048), "layer"),
    # Qwen4-Exp: the Qwen3-VL merger form, tower 1152 wide, patch 16, merge 2, out_hidden_size 2560 (three
    # third-party copies: two GGUF converters' expected vision_config and a full vision_config dump); its
    # Conv3d 3x2x16x16 -> 1152 is the "qwen3-vl" row's. A 1024px image, 64x64 patches (the size is ours).
    MergedShape("qwen4-exp-merger", 4096, 1152, 4, (4608, 2560), "layer"),
    # Kimi K2.5's projector: LayerNorm(1152) per token, the 2x2 merge (a view) to 4608 -> 4608, GELU, -> 7168
    # (aiconfigurator's moonshotai--Kimi-K2.5 config.json: vt_hidden_size 1152, patch 14, merge_kernel_size
    # [2, 2], text hidden 7168; vLLM's and mlx-vlm's projector code: in 4 x 1152, out the text hidden); a
    # 896px image, 64x64 patches (native resolution: the size is ours).
    MergedShape("kimi-k2.5-projector", 4096, 1152, 4, (4608, 7168), "layer"),
    # Llama 4's vision adapter: the 576 patches of a 336px tile (class token dropped), pixel shuffle 0.5 to
    # 144 rows of 5632, fc1 5632 -> 4096, GELU, fc2 4096 -> 4096, GELU, no biases, no norm (sources: the
    # Llama 4 rows above). The GELU after fc2 is not in the byte model (in the epilogue for mmfuse; one
    # saved pre-activation in training, 1.2 MB per tile, and one more eager elementwise pass).
    MergedShape("llama4-vision-adapter", 576, 1408, 4, (4096, 4096), None, table=True, bias=False),
    # InternVL3-8B: InternViT-300M (1024) per 448px tile, pixel shuffle to 256 rows of 4096,
    # LayerNorm(4096), 4096 -> 3584 -> 3584 (Qwen2.5-7B; public copy: MindSpeed-MM's InternVL3 8B config,
    # downsample_ratio 0.5, LLM hidden 3584; InternViT-300M-448px's config, hidden 1024 at 448px / 14).
    MergedShape("internvl3-8b-mlp1", 1024, 1024, 4, (3584, 3584), "layer", norm_after_merge=True, table=True),
    # SmolVLM-256M: SigLIP-B/16 at 512px (768 wide, 32x32 = 1024 patches), pixel shuffle (scale 4) to 64
    # rows of 12288, one Linear to SmolLM2-135M's 576, no bias (public copy of a fine-tune's config naming
    # SmolVLM-256M-Instruct: scale_factor 4, text 576; the model card: siglip-base-patch16-512, 64 tokens).
    MergedShape("smolvlm-256m-connector", 1024, 768, 16, (576,), None, table=True, bias=False),
    # Idefics3-8B (Llama 3): SigLIP-so400m (1152) at 364px: 26x26 = 676 patches, pixel shuffle
    # (scale_factor 2) to 169 rows of 4608, one Linear 4608 -> 4096, no bias, no norm (public copy: the
    # Idefics3-8B-Llama3 config.json, scale_factor 2, text 4096; its model card: 169 tokens per 364px image).
    MergedShape("idefics3-8b-connector", 676, 1152, 4, (4096,), None, table=True, bias=False),
    # SmolVLM-Instruct (2B): SigLIP-so400m (1152) per 384px tile, 27x27 = 729 patches, pixel shuffle
    # (scale_factor 3) to 81 rows of 10368, one Linear 10368 -> 2048 (SmolLM2-1.7B), no bias (public
    # copies of the config.json: scale_factor 3, image_seq_len 81, text hidden 2048).
    MergedShape("smolvlm-2b-connector", 729, 1152, 9, (2048,), None, table=True, bias=False),
    # LFM2-VL-450M: SigLIP2-base (768) per 512px tile, 32x32 = 1024 patches of 16, pixel unshuffle 2 to 256
    # rows of 3072, LayerNorm(3072), 3072 -> 2560 (GELU) -> 1024, with biases (a public copy of the
    # config.json: projector_hidden_size 2560, downsample_factor 2, max_image_tokens 256, text 1024).
    MergedShape("lfm2-vl-450m-projector", 1024, 768, 4, (2560, 1024), "layer", norm_after_merge=True, table=True),
    # LFM2-VL-1.6B: the same with SigLIP2 so400m-shaped (1152) and LFM2-1.2B's 2048 (secondary sources:
    # a snapshot note of the HF config and a fixture "matching the checkpoint geometry"; 2560 is also
    # Lfm2VlConfig's default).
    MergedShape("lfm2-vl-1.6b-projector", 1024, 1152, 4, (2560, 2048), "layer", norm_after_merge=True, table=True),
    MergedShape("aya-vision-8b-projector", 676, 1152, 4, (14336, 4096), "layer", norm_after_merge=True, table=True,
                gated=True),
    # Command A Vision (CohereLabs/command-a-vision-07-2025; Cohere2VisionConfig's defaults, whose docstring
    # names it): SigLIP2 1152 wide at 512px, patch 16: 32x32 = 1024 patches per tile, pixel shuffle 2 to 256
    # rows of 4608, no norm, linear_1 4608 -> 36864 chunked into halves of 18432, SiLU(gate) * x, linear_2
    # 18432 -> 12288 (Command A's width: a third-party hard-coded copy of the config and a copy of the
    # sibling Command A Translate's config.json, hidden 12288, intermediate 36864).
    MergedShape("command-a-vision-projector", 1024, 1152, 4, (18432, 12288), None, table=True, gated=True),
    # Gemma 3 4B: SigLIP-so400m (1152) at 896px: 64x64 = 4096 patches of 14, AvgPool2d(4) to 256 tokens,
    # Gemma3RMSNorm(1152) (scaled by 1 + weight), @ W (1152, 2560), no bias (the published
    # google/gemma-3-4b-it config: image_size 896, mm_tokens_per_image 256, text hidden_size 2560).
    MergedShape("gemma3-4b-projector", 4096, 1152, 16, (2560,), "rms", norm_after_merge=True, table=True, pool=True,
                bias=False),
    # T5Gemma 2 270M-270M: Gemma 3's projector form with SigLIP-so400m (1152) at 896px, pooled 16 to 256 tokens,
    # onto its 640-wide model (a printout of the loaded checkpoint, mm_input_projection 1152 x 640, and its
    # docs: 896px; transformers' default tower, 768 wide at 224px, is not the checkpoint's).
    MergedShape("t5gemma2-270m-projector", 4096, 1152, 16, (640,), "rms", norm_after_merge=True, table=True, pool=True,
                bias=False),
)

PATCH_SHAPES = (
    PatchShape("clip-l-14-336", 3, (336, 336), 14, 1024),
    PatchShape("siglip-so400m-14-384", 3, (384, 384), 14, 1152),
    # Fuyu-8B: 30x30 patches, flattened and projected by a Linear(2700, 4096); 1080x1920 max input.
    PatchShape("fuyu-8b", 3, (1080, 1920), 30, 4096),
    PatchShape("qwen2-vl", 3, (392, 392), 14, 1280, temporal=2, frames=2),
    # Qwen2.5-VL-7B: Conv3d 3x2x14x14 -> 1280 (no bias) on pre-cut rows; a 2-frame 896px clip.
    PatchShape("qwen2.5-vl-7b", 3, (896, 896), 14, 1280, temporal=2, frames=2),
    # Qwen3-VL: Conv3d 3x2x16x16 -> 1152 on pre-cut rows; a 2-frame 1024px clip (transformers' default).
    PatchShape("qwen3-vl", 3, (1024, 1024), 16, 1152, temporal=2, frames=2),
    # InternViT-300M (InternVL): Conv2d 14 -> 1024 on a 448px tile (transformers' default).
    PatchShape("internvit-300m-448", 3, (448, 448), 14, 1024),
    # BLIP-2 / InstructBLIP's EVA ViT-g: Conv2d 14 -> 1408 at 224px (transformers' default).
    PatchShape("blip2-eva-vit-g", 3, (224, 224), 14, 1408),
    # HY-V4-VL (tencent/Hy4): Conv2d 16 -> 1536 on pre-cut patch rows (transformers 5.24's default
    # HYV4VLVisionConfig, whose docstring names that checkpoint); a 1024px image, 64x64 patches.
    PatchShape("hy-v4-vl", 3, (1024, 1024), 16, 1536),
    # Llama 4 (Llama4UnfoldConvolution): unfold 14 + a bias-free Linear(588, 1408) on a 336px tile (the
    # Llama 4 rows above; the byte model gives it a bias and a position add).
    PatchShape("llama4", 3, (336, 336), 14, 1408),
    # GLM-4.1V / GLM-4.5V: Conv3d 3x2x14x14 -> 1536 on pre-cut rows, 336px (the GLM-4.5V report's weight
    # list, patch_embed.proj [1536, 3, 2, 14, 14], image_size 336; Glm4vVisionConfig's defaults for 4.1V); a
    # 2-frame clip.
    PatchShape("glm-4.5v", 3, (336, 336), 14, 1536, temporal=2, frames=2),
    # GLM-OCR: Conv3d 3x2x14x14 -> 1024 on pre-cut rows (the GLM-OCR config dumps above); a 2-frame 896px clip.
    PatchShape("glm-ocr", 3, (896, 896), 14, 1024, temporal=2, frames=2),
    # GOT-OCR2's SAM-B patch embedding: Conv2d 16 -> 768 at 1024px (the publisher's vary_b.py encoder; copies of
    # its code); DeepSeek-OCR 2's SAM patch embedding has the same sizes (two third-party ports).
    PatchShape("got-ocr2-sam-b", 3, (1024, 1024), 16, 768),
    # AIMv2-large/14 at 224px: Conv2d 14 -> 1024 (apple/ml-aim's AIMv2 model code: large 1024, huge 1536).
    PatchShape("aimv2-large-14-224", 3, (224, 224), 14, 1024),
    # Ovis2-4B / 8B: AIMv2-huge (1536) at 448px: Conv2d 14 -> 1536 (a mirror of the Ovis2-4B model card;
    # ml-aim's widths).
    PatchShape("ovis2-aimv2-huge-448", 3, (448, 448), 14, 1536),
)

ATTENTION_SHAPES = (
    # Idefics2: 64 latents, 16 heads, 4 KV heads, head dim 96; keys = context + latents, the
    # context being SigLIP at 980px / 14 = 70x70 = 4900 tokens per image.
    AttentionShape("idefics2-resampler", 64, 4900 + 64, 16, 4, 96),
    # OpenFlamingo: 64 latents, 8 heads of 64; context = CLIP-L/14 at 224px: 256 tokens (+1 CLS).
    AttentionShape("openflamingo-resampler", 64, 257 + 64, 8, 8, 64),
    # BLIP-2 Q-Former cross-attention: 32 queries, 12 heads of 64, 257 EVA-CLIP tokens.
    AttentionShape("blip2-qformer-xattn", 32, 257, 12, 12, 64),
)


def by_name(name: str):
    for table in (MLP_SHAPES, GATED_SHAPES, MERGED_SHAPES, PATCH_SHAPES, ATTENTION_SHAPES):
        for s in table:
            if s.name == name:
                return s
    raise KeyError(name)


# Which rows stand for each family the registry covers (``mmfuse.registry.FAMILIES``, its modules swapped
# by default; the opt-in tower MLPs have the representative rows "siglip-so400m-tower-mlp",
# "qwen2.5-vl-7b-tower-mlp" and "llama4-tower-mlp"), or why none does. A row "stands for" a family when
# its GEMM widths are that family's checkpoint's (the token count may differ: rows are per image at one
# resolution). tests/test_bench.py checks that every family is here and every row named exists.
_NOTHING = "no row needed: nothing of it runs on mmfuse by default (its GEMMs have nothing to fuse)"
_NO_CONFIG = "no row: no public copy of the checkpoint's config was found offline (transformers' defaults only)"
FAMILY_ROWS: dict[str, tuple[str, ...] | str] = {
    "LLaVA-1.5": ("llava-1.5-7b", "llava-1.5-13b", "clip-l-14-336"),
    "LLaVA (original code)": ("llava-1.5-7b", "llava-1.5-13b"),
    "LLaVA-NeXT": ("llava-next-7b", "clip-l-14-336"),
    "LLaVA-NeXT-Video": ("llava-next-7b",),  # LLaVA-NeXT-Video-7B: the same CLIP-L/14-336 -> 4096 projector
    "LLaVA-OneVision": ("llava-onevision-qwen2-7b", "siglip-so400m-14-384"),
    "Video-LLaVA": ("video-llava-7b",),
    "VipLLaVA": ("vipllava-7b",),
    "FastVLM": ("fastvlm-7b-projector",),
    "Janus": ("janus-pro-7b-aligner",),
    "VideoLLaMA3": ("videollama3-2b-projector",),
    "PaddleOCR-VL": ("paddleocr-vl-projector",),
    "PerceptionLM": ("perception-lm-1b-projector",),
    "Aria": ("aria-projector-ffn",),
    "LightOnOCR": ("lightonocr-0.9b-projector",),
    "Mistral3 / Pixtral": ("mistral3-24b-projector", "pixtral-12b-projector"),
    "PaliGemma": ("paligemma-3b-224",),
    "Florence-2": ("florence-2-base-projection", "florence-2-large-projection"),
    "Llama 4": ("llama4-projector", "llama4"),
    "Llama 4 (vision adapter)": ("llama4-vision-adapter",),
    "Gemma 3": ("gemma3-4b-projector",),
    "Qwen2-VL": ("qwen2-vl-merger", "qwen2-vl-7b-merger", "qwen2-vl"),
    "Qwen2.5-VL": ("qwen2.5-vl-7b-merger", "qwen2.5-vl-7b"),
    "Qwen2.5-Omni": ("qwen2.5-vl-7b-merger", "qwen2.5-vl-7b"),  # its vision is Qwen2.5-VL-7B's (the row's comment)
    "Qwen3-VL": ("qwen3-vl-8b-merger", "qwen3-vl"),
    "Qwen3-VL-MoE": ("qwen3-vl-30b-a3b-merger", "qwen3-vl"),
    "Qwen3.5": ("qwen3-vl-8b-merger", "qwen3-vl"),  # Qwen3.5-397B-A17B's merger has the 8B's sizes
    "Qwen3.5-MoE": ("qwen3-vl-8b-merger", "qwen3-vl"),
    "Kimi K2.5": ("kimi-k2.5-projector",),
    "InternVL": ("internvl2-8b-mlp1", "internvl3-8b-mlp1", "internvit-300m-448"),
    "Idefics2": ("idefics2-8b-connector-mlp", "idefics2-resampler"),
    "Idefics3": ("idefics3-8b-connector",),
    "SmolVLM": ("smolvlm-256m-connector", "smolvlm-2b-connector"),
    "LFM2-VL": ("lfm2-vl-450m-projector", "lfm2-vl-1.6b-projector"),
    "Aya Vision": ("aya-vision-8b-projector",),
    "Command A Vision": ("command-a-vision-projector",),
    "GLM-4V": ("glm-4.1v-9b-merger", "glm-4.5v"),
    "GLM-4V-MoE": ("glm-4.5v-merger", "glm-4.5v"),
    "Molmo2": ("molmo2-4b-projector",),
    "BLIP-2": ("blip2-eva-vit-g", "blip2-qformer-xattn"),
    # InstructBLIP keeps BLIP-2's EVA ViT-g and Q-Former sizes (32 queries, 12 heads of 64, 1408-wide keys).
    "InstructBLIP": ("blip2-eva-vit-g", "blip2-qformer-xattn"),
    "InstructBLIP-Video": ("blip2-eva-vit-g", "blip2-qformer-xattn"),
    "CLIP": ("clip-l-14-336",),
    "SigLIP": ("siglip-so400m-14-384",),
    "Ernie-4.5-VL": ("ernie-4.5-vl-28b-spatial-mlp", "ernie-4.5-vl-28b-temporal-mlp"),
    "MiniCPM-V 4.6": ("minicpm-v-4.6-downsample-mlp",),
    "MiniCPM-V 4.7": ("minicpm-v-4.6-downsample-mlp",),  # the same tower, so the same fused GEMM (its comment)
    "HunYuan-VL": ("hunyuan-ocr-merger-convs",),
    "HY-V4-VL": ("hy-v4-vl",),
    "Qwen3-Omni-MoE": ("qwen3-omni-30b-a3b-merger", "qwen3-vl"),  # its Conv3d (2, 16, 16) -> 1152 is Qwen3-VL's
    "GLM-OCR": ("glm-ocr-merger", "glm-ocr"),
    "T5Gemma 2": ("t5gemma2-270m-projector",),
    "GOT-OCR2": ("got-ocr2-sam-b",),
    "DeepSeek-OCR 2": ("got-ocr2-sam-b",),
    "AIMv2": ("aimv2-large-14-224",),
    "Ovis2": ("ovis2-aimv2-huge-448",),
    "Qwen4-Exp": ("qwen4-exp-merger", "qwen3-vl"),
    # MiniMax-M3-VL's Conv3d (2, 14, 14) -> 1280 is the "qwen2.5-vl-7b" patch row's
    "MiniMax-M3-VL": ("minimax-m3-vl-patch-mlp", "minimax-m3-vl-merge-mlp", "qwen2.5-vl-7b"),
    "Muse Glimmer": ("muse-glimmer-30b-adapter",),
    "DeepSeek-VL": ("deepseek-vl-1.3b-aligner",),
    "DeepSeek-VL (hybrid)": "no row: two Linears (1024 -> 2048 each: SigLIP-L and SAM-B's features; GELU after their "
                            "concatenation) and 4096 -> 4096 (transformers' conversion script, the publisher's "
                            "projector code): no row type expresses the concatenation",
    # Families whose default swap runs nothing on mmfuse.
    "Kosmos-2.5": _NOTHING, "GLM-5-Next": _NOTHING,
    "UltraVBERT": _NOTHING, "SigLIP 2": _NOTHING, "Gemma 4": _NOTHING, "Pix2Struct": _NOTHING,
    # Copies of CLIP's / SigLIP's embeddings whose checkpoints' widths are another size; the CLIP-L row is
    # the same code at one width.
    "AltCLIP": "no row: CLIP's patch embedding code (the clip-l-14-336 row's GEMM) at its checkpoint's width, "
               "not read offline",
    "Chinese-CLIP": "no row: CLIP's patch embedding code (the clip-l-14-336 row's GEMM) at its checkpoints' "
                    "widths (ViT-B/16 to ViT-H/14), not read offline",
    "MetaCLIP 2": "no row: CLIP's patch embedding code (the clip-l-14-336 row's GEMM) at its checkpoints' widths, "
                  "not read offline",
    "BridgeTower": "no row: CLIP's patch embedding code at its checkpoint's width, not read offline",
    "CLIPSeg": "no row: CLIP's patch embedding code at its checkpoint's width (ViT-B/16), not read offline",
    "OWL-ViT": "no row: CLIP's patch embedding code at its checkpoints' widths, not read offline",
    "OWLv2": "no row: CLIP's patch embedding code at its checkpoints' widths, not read offline",
    "GroupViT": "no row: a ViT patch embedding (Conv2d k = s) at its checkpoint's width, not read offline",
    "Kosmos-2": "no row: CLIP's patch embedding code at its checkpoint's width, not read offline (its "
                "projection has nothing to fuse)",
    "X-CLIP": "no row: CLIP's patch embedding code at its checkpoints' widths, not read offline (its "
              "cross-attention Linears have nothing to fuse)",
    "BLIP": "no row: BLIP-2's patch embedding code (the blip2-eva-vit-g row's GEMM) at BLIP's ViT widths, "
            "not read offline",
    "Granite-Docling": "no row: its DeepStack mergers are granite-for-docling-500m's, whose sizes (SigLIP2-B 768 "
                       "wide; 12288 -> 1024 -> 1024 and 3072 -> 1024) were found only in code of transformers' own "
                       "lineage, not in an independent copy of the config",
}
for _name in ("Cohere Compass", "Cosmos 3 Edge", "dots.3 note", "EXAONE 4.5", "GLM-Image", "Inkling 2", "LFM3-VL",
              "MiniCPM-o OCR", "MistralLarge4", "ModernVBERT", "Muse Spark", "Nemotron Omni", "PP-FormulaNet",
              "Qianfan-OCR", "Step3.7", "TIPSv2", "Unlimited-OCR"):
    FAMILY_ROWS.setdefault(_name, _NO_CONFIG)
