"""Drop-in Linear (+ activation) and MLP projector layers on the fused GEMM kernels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mmfuse._checks import check_choice
from mmfuse._dispatch import plain_gemm
from mmfuse._patch import check_replaceable
from mmfuse.nn._activations import activation_name, exact_linears, plain_linear
from mmfuse.ops.linear import ACTIVATION_NAMES, gated_mlp, linear, mlp


class Linear(nn.Linear):
    """``nn.Linear`` with an optional fused activation; same parameters and state_dict keys. Without an
    activation it is a plain GEMM (``_dispatch.plain_gemm``: PyTorch's unless ``MMFUSE_PLAIN_GEMMS=mmfuse``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_choice("activation", activation, ACTIVATION_NAMES)  # now, not at the first forward
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is None:  # nothing to fuse: PyTorch's GEMM unless MMFUSE_PLAIN_GEMMS=mmfuse
            return plain_gemm(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"

    @classmethod
    def from_module(cls, module: nn.Linear, activation: str | None = None) -> "Linear":
        """Wrap an ``nn.Linear``, sharing its parameters (no copy)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module: expected nn.Linear, got {type(module).__name__}")
        plain_linear(module)
        check_replaceable(module)  # a parametrized weight (weight_norm) would be held as one evaluation
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        check_choice("activation", activation, ACTIVATION_NAMES)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight = module.weight
        new.bias = module.bias
        new.activation = activation
        return new


class MLPProjector(nn.Module):
    """``Linear -> act -> Linear -> ...`` (LLaVA's ``mlp{n}x_gelu``) as one fused autograd op.

    The Linear layers are registered under the names of the module replaced, so state_dicts load
    unchanged: ``"0", "2", "4", ...`` for an ``nn.Sequential(Linear, GELU, Linear, ...)`` (LLaVA's own
    code) or ``"linear_1", "linear_2"`` for transformers' ``LlavaMultiModalProjector``.
    """

    def __init__(self, widths: Sequence[int], activation: str | None = "gelu", bias: bool = True,
                 names: Sequence[str] | None = None, device=None, dtype=None):
        super().__init__()
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"widths: expected at least 2 entries (in, out), got {widths}")
        n = len(widths) - 1
        names = list(names) if names is not None else [str(2 * i) for i in range(n)]
        if len(names) != n:
            raise ValueError(f"names: expected {n} names (one per Linear), got {len(names)}")
        if len(set(names)) != n:
            raise ValueError(f"names: expected {n} distinct names, got {names}")
        self.activation = activation
        self._layer_names = names
        for name, k, m in zip(names, widths[:-1], widths[1:]):
            self.add_module(name, nn.Linear(k, m, bias=bias, device=device, dtype=dtype))

    @property
    def layers(self) -> list[nn.Linear]:
        return [getattr(self, name) for name in self._layer_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = exact_linears(self, *self._layer_names)
        return mlp(x, [lin.weight for lin in layers], [lin.bias for lin in layers], self.activation)

    @classmethod
    def _from_layers(cls, names, layers, activation) -> "MLPProjector":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.activation = activation
        new._layer_names = list(names)
        for name, lin in zip(names, layers):
            new.add_module(name, plain_linear(lin, f"module.{name}"))  # shares the parameters
        return new

    @classmethod
    def from_module(cls, module: nn.Module) -> "MLPProjector":
        """From ``nn.Sequential(Linear, GELU, Linear, ...)`` or a ``LlavaMultiModalProjector``."""
        check_replaceable(module)  # hooks anywhere in it, a parametrized weight: not carried over
        if isinstance(module, nn.Sequential):
            return cls._from_sequential(module)
        if type(module).__name__ == "LlavaMultiModalProjector":
            return cls._from_layers(["linear_1", "linear_2"], [module.linear_1, module.linear_2],
                                    activation_name(module.act))
        raise TypeError(f"module: expected nn.Sequential(Linear, GELU, Linear, ...) or "
                        f"LlavaMultiModalProjector, got {type(module).__name__}")

    @classmethod
    def _from_sequential(cls, seq: nn.Sequential) -> "MLPProjector":
        items = list(seq.named_children())
        names, layers, acts = [], [], set()
        for i, (name, m) in enumerate(items):
            if i % 2 == 0:
                if not isinstance(m, nn.Linear):
                    raise TypeError(f"module[{i}]: expected nn.Linear, got {type(m).__name__}")
                plain_linear(m, f"module[{i}]")
                names.append(name)
                layers.append(m)
            else:
                acts.add(activation_name(m))
        if len(items) % 2 == 0:
            raise TypeError(f"module: expected an odd number of children ending in nn.Linear, got {len(items)}")
        if len(acts) > 1:
            raise ValueError(f"module: expected one activation between all layers, got {sorted(map(str, acts))}")
        return cls._from_layers(names, layers, acts.pop() if acts else None)


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU with ``"silu"``, GeGLU with ``"gelu"``):
    gate and up as one fused GEMM (act(g) * u in its epilogue), down as a second. Children and
    state_dict keys are those of transformers' gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 activation: str = "silu", device=None, dtype=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(in_features, hidden_features, **kw)
        self.up_proj = nn.Linear(in_features, hidden_features, **kw)
        self.down_proj = nn.Linear(hidden_features, out_features, **kw)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = exact_linears(self, "gate_proj", "up_proj", "down_proj")
        return gated_mlp(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    @classmethod
    def from_module(cls, module: nn.Module) -> "GatedMLP":
        """From a module with ``gate_proj``, ``up_proj``, ``down_proj`` Linears and an ``act_fn`` (Idefics2,
        Qwen2.5-VL's vision MLP, Pixtral, GLM-4V, Llama-style MLPs), sharing its parameters."""
        names = ("gate_proj", "up_proj", "down_proj")
        if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            raise TypeError(f"module: expected gate_proj, up_proj and down_proj nn.Linear children, "
                            f"got {type(module).__name__}")
        for n in names:
            plain_linear(getattr(module, n), f"module.{n}")
        check_replaceable(module)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for n in names:
            new.add_module(n, getattr(module, n))
        act_fn = getattr(module, "act_fn", None)
        new.activation = activation_name(act_fn)
        if new.activation is None:
            raise ValueError(f"module.act_fn: expected a gate activation, got {type(act_fn).__name__}")
        return new
