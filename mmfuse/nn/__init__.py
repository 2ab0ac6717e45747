"""Drop-in ``nn.Module``s: same state_dict keys and shapes as the modules they replace, each with a
``from_module`` that builds it from that module (sharing the parameters)."""

from mmfuse.nn.attention import (
    CrossAttention,
    Idefics2PerceiverAttention,
    MultiheadAttention,
    PerceiverAttention,
    PerceiverResampler,
)
from mmfuse.nn.hf import NormMLPProjector, PatchMerger, Qwen2VLPatchEmbed
from mmfuse.nn.linear import GatedMLP, Linear, MLPProjector
from mmfuse.nn.patch_embed import CLIPVisionEmbeddings, PatchEmbed, PatchEmbed3d, SiglipVisionEmbeddings

__all__ = ["Linear", "MLPProjector", "GatedMLP", "NormMLPProjector", "PatchMerger", "Qwen2VLPatchEmbed",
           "PatchEmbed", "PatchEmbed3d", "CLIPVisionEmbeddings", "SiglipVisionEmbeddings",
           "CrossAttention", "MultiheadAttention", "PerceiverAttention", "PerceiverResampler",
           "Idefics2PerceiverAttention"]
