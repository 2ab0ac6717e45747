"""Drop-in patch embeddings on the fused patch-embedding kernel.

* ``PatchEmbed`` / ``PatchEmbed3d``: ``nn.Conv2d(C, D, P, stride=P)`` / ``nn.Conv3d(C, D, (T, P, P),
  stride=(T, P, P))`` with the same parameters and state_dict. ``forward`` returns the conv layout
  (B, D, h, w) as a free view of the token-major kernel output, so a following
  ``.flatten(2).transpose(1, 2)`` is a view again; ``tokens(x, pos_embed)`` returns (B, N, D) directly.
* ``SiglipVisionEmbeddings`` / ``CLIPVisionEmbeddings``: transformers' whole embeddings (conv +
  [class token +] position embedding) as one kernel; same submodules, parameters and state_dict.
  Registered with ``mmfuse.patch``. ``interpolate_pos_encoding=True`` and image sizes other than the
  configured one run the original class's code on the same parameters (not fused).

Where P is not a power of two the forward reads the weight packed into 16-wide patch rows: a copy made
on every call unless ``cache_packed_weight`` is set (``_packed`` says why it is off by default).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse import _patch
from mmfuse.ops.patch_embed import PackedWeight, fused_patch_embed

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


def _check_patch_conv(module: nn.Module, conv_type: type, name: str = "module") -> None:
    """Raise unless ``module`` is a ``conv_type`` that cuts non-overlapping patches (kernel == stride)."""
    if not isinstance(module, conv_type):
        raise TypeError(f"{name}: expected nn.{conv_type.__name__}, got {type(module).__name__}")
    if type(module) is not conv_type:  # a subclass may override forward (and the swap would skip it)
        raise _patch.Unsupported(f"{name}: expected nn.{conv_type.__name__} exactly, got {type(module).__name__}")
    _patch.check_replaceable(module)
    k = tuple(module.kernel_size)
    if tuple(module.stride) != k:
        raise _patch.Unsupported(f"{name}: expected stride == kernel_size {k}, got stride {tuple(module.stride)}")
    if module.padding not in ("valid", (0,) * len(k)) or any(d != 1 for d in module.dilation):
        raise _patch.Unsupported(f"{name}: expected no padding and dilation 1, got padding {module.padding}, "
                                 f"dilation {module.dilation}")
    if module.groups != 1:
        raise _patch.Unsupported(f"{name}: expected groups=1, got {module.groups}")
    if k[-1] != k[-2]:
        raise _patch.Unsupported(f"{name}: expected square patches, got kernel_size {k}")


def _is_arange(ids: torch.Tensor) -> bool:
    return torch.equal(ids.reshape(-1).cpu(), torch.arange(ids.numel()))


def _packed(module: nn.Module) -> PackedWeight | None:
    """The module's packed-weight cache (outside the module tree: no state_dict entry), or None (repack on
    every call) unless the module's ``cache_packed_weight`` is true. Off by default: the cache is keyed on
    the weight's version, which a write through ``weight.data`` (EMA updates, some loaders) does not bump,
    so a cached pack would silently keep the old weight. Turn it on for a weight nothing writes that way."""
    if not getattr(module, "cache_packed_weight", False):
        return None
    cache = module.__dict__.get("_mmfuse_packed")
    if cache is None:
        cache = module.__dict__["_mmfuse_packed"] = PackedWeight()
    return cache


def _share(cls, module: nn.Module):
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for attr in _CONV_ATTRS:
        setattr(new, attr, getattr(module, attr))
    new.weight = module.weight
    new.bias = module.bias
    return new


class PatchEmbed(nn.Conv2d):
    """``nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)`` on the fused kernel.
    ``cache_packed_weight`` (class or instance attribute, default False): keep the packed weight between
    calls (P not a power of two) while the weight's version is unchanged; see ``_packed``."""

    cache_packed_weight = False

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, embed_dim, patch_size, stride=patch_size, bias=bias, device=device, dtype=dtype)

    def tokens(self, pixels: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) = conv(pixels).flatten(2).transpose(1, 2) + pos_embed."""
        return fused_patch_embed(pixels, self.weight, self.bias, pos_embed, cache=_packed(self))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(pixels.unsqueeze(0)).squeeze(0)
        y = self.tokens(pixels)
        P = self.kernel_size[-1]
        return y.transpose(1, 2).unflatten(2, (pixels.shape[-2] // P, pixels.shape[-1] // P))

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> "PatchEmbed":
        """Wrap an ``nn.Conv2d`` with kernel_size == stride (e.g. transformers' CLIP/SigLIP
        ``patch_embedding``), sharing its parameters."""
        _check_patch_conv(module, nn.Conv2d)
        return _share(cls, module)


class PatchEmbed3d(nn.Conv3d):
    """``nn.Conv3d(in_channels, embed_dim, (T, P, P), stride=(T, P, P))`` on the fused kernel (video).
    ``cache_packed_weight``: as ``PatchEmbed``'s."""

    cache_packed_weight = False

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, temporal_patch_size: int,
                 bias: bool = True, device=None, dtype=None):
        k = (temporal_patch_size, patch_size, patch_size)
        super().__init__(in_channels, embed_dim, k, stride=k, bias=bias, device=device, dtype=dtype)

    def tokens(self, pixels: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return fused_patch_embed(pixels, self.weight, self.bias, pos_embed, cache=_packed(self))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 4:  # unbatched (C, F, H, W), as nn.Conv3d accepts
            return self.forward(pixels.unsqueeze(0)).squeeze(0)
        y = self.tokens(pixels)
        T, P = self.kernel_size[0], self.kernel_size[-1]
        return y.transpose(1, 2).unflatten(2, (pixels.shape[-3] // T, pixels.shape[-2] // P, pixels.shape[-1] // P))

    @classmethod
    def from_module(cls, module: nn.Conv3d) -> "PatchEmbed3d":
        _check_patch_conv(module, nn.Conv3d)
        return _share(cls, module)


class _FusedVisionEmbeddings(nn.Module):
    """Shared by the CLIP and SigLIP drop-ins: the original's submodules, parameters and buffers,
    and its class for the paths not fused."""

    _original_name = ""
    _extra_attrs: tuple[str, ...] = ()
    cache_packed_weight = False  # as PatchEmbed's

    def __init__(self, module: nn.Module):
        super().__init__()
        # The class itself or a transformers copy of it (AltCLIP, MetaCLIP 2, ...: same code, renamed).
        needed = ("patch_embedding", "position_embedding", "position_ids") + self._extra_attrs
        if not type(module).__name__.endswith("VisionEmbeddings") or not all(hasattr(module, a) for a in needed):
            raise TypeError(f"module: expected {self._original_name} (or a copy of it), got {type(module).__name__}")
        _check_patch_conv(module.patch_embedding, nn.Conv2d, "module.patch_embedding")
        ids = module.position_ids
        # On the meta device there are no values to check yet: the first forward checks them.
        if not ids.is_meta and not _is_arange(ids):
            raise _patch.Unsupported("module.position_ids: expected arange(num_positions)")
        self._original_class = type(module)
        if hasattr(module, "class_embedding"):  # first, as the original registers it (state_dict order)
            self.class_embedding = module.class_embedding
        for attr in ("config", "embed_dim", "image_size", "patch_size", "num_patches", "num_positions"):
            setattr(self, attr, getattr(module, attr))
        self.patch_embedding = module.patch_embedding
        self.position_embedding = module.position_embedding
        self.register_buffer("position_ids", module.position_ids, persistent=False)

    def interpolate_pos_encoding(self, embeddings, height, width):
        return self._original_class.interpolate_pos_encoding(self, embeddings, height, width)

    def _read_children(self) -> tuple[nn.Conv2d, nn.Embedding]:
        """The conv and the position table the kernel reads, as this module was built with them."""
        return (_patch.exact_child(self, "patch_embedding", nn.Conv2d),
                _patch.exact_child(self, "position_embedding", nn.Embedding))

    def _fused(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> bool:
        H, W = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and pixel_values.dim() == 4 and H == W == self.image_size:
            if not self.__dict__.get("_ids_checked"):  # patched on meta: check once the values exist
                if not _is_arange(self.position_ids):
                    raise ValueError("position_ids: expected arange(num_positions) (as the checkpoint defines "
                                     "them), got other values")
                self.__dict__["_ids_checked"] = True
            return True
        return False

    @classmethod
    def from_module(cls, module: nn.Module):
        return cls(module)


class SiglipVisionEmbeddings(_FusedVisionEmbeddings):
    """transformers' ``SiglipVisionEmbeddings``: conv + bias + position embedding in one kernel."""

    _original_name = "SiglipVisionEmbeddings"

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if not self._fused(pixel_values, interpolate_pos_encoding):
            return self._original_class.forward(self, pixel_values, interpolate_pos_encoding)
        conv, pos = self._read_children()
        return fused_patch_embed(pixel_values.to(dtype=conv.weight.dtype), conv.weight, conv.bias, pos.weight,
                                 cache=_packed(self))


class CLIPVisionEmbeddings(_FusedVisionEmbeddings):
    """transformers' ``CLIPVisionEmbeddings``: conv, class token and position embedding in one kernel
    (patch tokens written straight into rows 1..N, row 0 = class + pos[0])."""

    _original_name = "CLIPVisionEmbeddings"
    _extra_attrs = ("class_embedding",)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if not self._fused(pixel_values, interpolate_pos_encoding):
            return self._original_class.forward(self, pixel_values, interpolate_pos_encoding)
        conv, pos = self._read_children()
        return fused_patch_embed(pixel_values.to(dtype=conv.weight.dtype), conv.weight, conv.bias, pos.weight,
                                 self.class_embedding, cache=_packed(self))
