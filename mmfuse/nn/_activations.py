"""Map activation modules (torch and transformers) to the names the kernels take."""

from __future__ import annotations

import functools

import torch.nn as nn

from mmfuse._patch import Unsupported, exact_child

# transformers' classes, by name (no import needed). Each computes exactly the kernel's formula:
# GELUActivation is erf GELU (also with use_gelu_python: the same formula written out);
# GELUTanh (alias PytorchGELUTanh) calls F.gelu(approximate="tanh"), NewGELU and FastGELU write the
# same tanh formula out (FastGELU's constant 0.7978845608 is sqrt(2/pi) to 3e-12 relative);
# QuickGELUActivation is x * sigmoid(1.702 x) (CLIP's); SiLUActivation calls F.silu;
# ReLUSquaredActivation is square(relu(x)) (Nemotron's);
# LinearActivation is the identity.
_BY_CLASS_NAME = {
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "ReLUSquaredActivation": "relu2",
    "LinearActivation": None,
}


def activation_name(module: nn.Module | None) -> str | None:
    """The kernels' activation name for ``module`` ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu",
    or None for the identity); ``Unsupported`` (a ValueError) for anything the kernels do not compute."""
    if module is None or type(module) is nn.Identity:
        return None
    if type(module) is nn.GELU:  # exact types: a subclass may override forward with another formula
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.ReLU:  # not ReLU6 or a subclass with another formula
        return "relu"
    name = type(module).__name__
    if name in _BY_CLASS_NAME and type(module).__module__.startswith("transformers"):
        return _BY_CLASS_NAME[name]
    raise Unsupported(f"activation: expected nn.GELU, nn.SiLU, nn.ReLU, nn.Identity (exactly) or a transformers "
                      f"GELU/GELUTanh/QuickGELU/SiLU activation, got {name}")


@functools.lru_cache(maxsize=None)
def plain_linear_types() -> tuple[type, type]:
    """The classes that compute exactly F.linear on their weight: ``nn.Linear`` and mmfuse's drop-in
    (without a fused activation: ``plain_linear`` refuses one with)."""
    from mmfuse.nn.linear import Linear

    return nn.Linear, Linear


def exact_linears(owner: nn.Module, *names: str, cls=None) -> tuple[nn.Linear, ...]:
    """The Linear children a forward reads the weights of, each checked on this call to be one it was built
    with (``plain_linear_types()``, or ``cls``) and still without hooks (``exact_child``: an adapter or a
    hook put there since would otherwise be skipped)."""
    allowed = cls or plain_linear_types()
    return tuple(exact_child(owner, name, allowed) for name in names)


def plain_linear(module, name: str = "module") -> nn.Linear:
    """``module`` if it is exactly an ``nn.Linear`` (or mmfuse's drop-in without a fused activation), else
    ``Unsupported``: a subclass (a quantized Linear, one with its own forward) does not compute F.linear on
    its weight, and a recipe reading the weight would drop a fused activation."""
    if type(module) not in plain_linear_types():
        cls = type(module)  # its module too: PEFT's LoRA layer and bitsandbytes' are also called "Linear..."
        where = "" if cls.__module__.startswith("torch.") else f"{cls.__module__}."
        raise Unsupported(f"{name}: expected nn.Linear, got {where}{cls.__qualname__}")
    if getattr(module, "activation", None) is not None:
        raise Unsupported(f"{name}: expected a plain Linear, got mmfuse's Linear with activation "
                          f"{module.activation!r} fused into it")
    return module
