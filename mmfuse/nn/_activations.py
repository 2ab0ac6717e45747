"""Map activation modules (torch and transformers) to the names the kernels take."""

from __future__ import annotations

import torch.nn as nn

from mmfuse._patch import Unsupported

# transformers' classes, by name (no import needed): exact erf GELU, and the tanh approximation
# (GELUTanh/PytorchGELUTanh call F.gelu(approximate="tanh"); NewGELU writes the same formula out).
_EXACT = {"GELUActivation"}
_TANH = {"GELUTanh", "PytorchGELUTanh", "NewGELUActivation"}


def activation_name(module: nn.Module | None) -> str | None:
    """"gelu", "gelu_tanh" or None (identity); ValueError for anything the kernels do not compute."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = type(module).__name__
    if name in _EXACT:  # also with use_gelu_python: the same erf formula written out
        return "gelu"
    if name in _TANH:
        return "gelu_tanh"
    raise Unsupported(f"activation: expected nn.GELU, nn.Identity or a transformers GELU/GELUTanh, "
                     f"got {name}")
