"""mmfuse: fused Triton kernels for the projector layers of multimodal LLMs.

Functional API (differentiable, fp16 / bf16 / fp32):
    mmfuse.linear(x, weight, bias=None, activation=None)
    mmfuse.mlp(x, weights, biases=None, activation="gelu")
    mmfuse.gated_mlp(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation="silu")
    mmfuse.merged_mlp(x, weights, biases=None, activation="gelu", *, group, token_map=None, norm=None, ...)
    mmfuse.patch_embed(pixels, weight, bias=None, pos_embed=None)
    mmfuse.cross_attention(q, k, v, *, kv_lens=None, key_mask=None, scale=None)
Dispatch: ``mmfuse.backend_for(tensor)`` says which path a call takes (see ``mmfuse._dispatch``).
"""

from mmfuse._dispatch import INTERPRET, INTERPRETER, REFERENCE, TRITON, backend_for  # noqa: I001  (first)
from mmfuse.ops.linear import gated_mlp, gated_mlp_reference, linear, linear_reference, mlp, mlp_reference
from mmfuse.ops.merged import merged_mlp, merged_mlp_reference
from mmfuse.ops.patch_embed import patch_embed, patch_embed_reference
from mmfuse.ops.cross_attention import cross_attention, cross_attention_reference
from mmfuse.integrations import register_transformers_attention
from mmfuse import nn  # noqa: E402  (registers the patch rules)
from mmfuse._patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "INTERPRET", "TRITON", "INTERPRETER", "REFERENCE", "backend_for",
    "linear", "linear_reference", "mlp", "mlp_reference", "gated_mlp", "gated_mlp_reference",
    "merged_mlp", "merged_mlp_reference", "nn", "patch", "unpatch",
    "patch_embed", "patch_embed_reference", "cross_attention", "cross_attention_reference",
    "register_transformers_attention",
]
