"""Drop-ins for transformers' projector modules that are more than a plain MLP.

* Qwen2-VL ``PatchMerger``: LayerNorm, then a 2x2 spatial merge, then Linear -> GELU -> Linear. The
  merge is ``view(-1, 4 * C)`` of the contiguous LayerNorm output: the four neighbours of a merged
  token are already adjacent rows, so the first GEMM's A loads read them directly as one 4C-wide row.
  No copy and no kernel for the merge: it is fused into the MLP's loads by construction.
* InternVL's ``InternVLMultiModalProjector``: LayerNorm -> Linear -> GELU -> Linear.
* Qwen2-VL's vision ``PatchEmbed``: its input rows are already cut into patches by the image
  processor (C·T·P·P values each), so ``Conv3d(k=s)`` is exactly one GEMM with the flattened weight.

The LayerNorms stay PyTorch's (one read and one write of the activations; not fused here).
``mmfuse.patch`` decides what it swaps in ``mmfuse.registry``; these classes are public drop-ins
(``from_module``) and the registry's pre-cut patch-embed recipe uses ``Qwen2VLPatchEmbed``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse import _patch
from mmfuse._dispatch import plain_gemm
from mmfuse.nn._activations import activation_name, exact_linears
from mmfuse.nn.linear import MLPProjector


class PatchMerger(nn.Module):
    """Qwen2-VL's PatchMerger: ``mlp(ln_q(x).view(-1, hidden_size))`` with the fused MLP.
    Same submodule names (``ln_q``, ``mlp.0``, ``mlp.2``) and state_dict."""

    def __init__(self, ln_q: nn.Module, mlp: MLPProjector, hidden_size: int):
        super().__init__()
        self.ln_q = ln_q
        self.mlp = mlp
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))

    @classmethod
    def from_module(cls, module: nn.Module) -> "PatchMerger":
        if not hasattr(module, "ln_q") or not isinstance(getattr(module, "mlp", None), nn.Sequential):
            raise TypeError(f"module: expected Qwen2-VL's PatchMerger, got {type(module).__name__}")
        return cls(module.ln_q, MLPProjector.from_module(module.mlp), module.hidden_size)


class NormMLPProjector(nn.Module):
    """InternVL's projector: ``linear_2(act(linear_1(layer_norm(x))))`` with the fused MLP.
    Same submodule names (``layer_norm``, ``linear_1``, ``linear_2``) and state_dict."""

    def __init__(self, layer_norm: nn.Module, linear_1: nn.Linear, linear_2: nn.Linear, activation: str | None):
        super().__init__()
        self.layer_norm = layer_norm
        self.linear_1 = linear_1
        self.linear_2 = linear_2
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mmfuse.ops.linear import mlp

        lins = exact_linears(self, "linear_1", "linear_2")
        return mlp(self.layer_norm(x), [m.weight for m in lins], [m.bias for m in lins], self.activation)

    @classmethod
    def from_module(cls, module: nn.Module) -> "NormMLPProjector":
        if type(module).__name__ != "InternVLMultiModalProjector":
            raise TypeError(f"module: expected InternVLMultiModalProjector, got {type(module).__name__}")
        return cls(module.layer_norm, module.linear_1, module.linear_2, activation_name(module.act))


class Qwen2VLPatchEmbed(nn.Module):
    """Qwen2-VL's vision PatchEmbed as one GEMM: rows of C·T·P·P pre-cut patch values times the
    flattened ``Conv3d`` weight. Same ``proj.weight`` parameter and state_dict."""

    def __init__(self, proj: nn.Conv3d, in_channels: int, temporal_patch_size: int, patch_size: int,
                 embed_dim: int):
        super().__init__()
        self.proj = proj
        self.in_channels, self.temporal_patch_size = in_channels, temporal_patch_size
        self.patch_size, self.embed_dim = patch_size, embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = _patch.exact_child(self, "proj", nn.Conv3d)
        w = proj.weight
        k = self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
        x = hidden_states.reshape(-1, k).to(w.dtype)  # the original casts to the weight dtype too
        # the rows are already cut: a GEMM with nothing to fuse (``_dispatch.plain_gemm``), and the Conv3d
        # it replaces (cuDNN's, 4-10x slower on an H100) is what this module exists to avoid
        return plain_gemm(x, w.reshape(self.embed_dim, k), proj.bias)

    @classmethod
    def from_module(cls, module: nn.Module) -> "Qwen2VLPatchEmbed":
        proj = getattr(module, "proj", None)
        if not isinstance(proj, nn.Conv3d):
            raise TypeError(f"module: expected Qwen2-VL's PatchEmbed (with a Conv3d proj), got {type(module).__name__}")
        if type(proj) is not nn.Conv3d:  # a subclass may override forward
            raise _patch.Unsupported(f"proj: expected nn.Conv3d exactly, got {type(proj).__name__}")
        _patch.check_replaceable(module)
        if tuple(proj.kernel_size) != tuple(proj.stride) or proj.padding != (0, 0, 0) or proj.groups != 1:
            raise _patch.Unsupported("proj: expected Conv3d with kernel_size == stride, no padding, groups=1")
        return cls(proj, module.in_channels, module.temporal_patch_size, module.patch_size, module.embed_dim)
