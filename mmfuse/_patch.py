"""``mmfuse.patch(model)`` / ``mmfuse.unpatch(model)``: swap recognised modules for their mmfuse
drop-ins in place, and back.

Which modules are replaced, and how, is decided in one place: the model registry
(``mmfuse.registry``: families as data, recipes as code). A recipe raises ``Unsupported(reason)`` for a
module it recognises but cannot replace faithfully (an activation the kernels do not compute, say):
``patch`` leaves that module alone and reports why; so it does for the classes the registry declines.
The replaced module is kept on its replacement
(outside the module tree, so state_dicts are unchanged) for ``unpatch``.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn


class Unsupported(ValueError):
    """Raised by a factory (``from_module``): recognised, but not replaceable; the message says why.
    A ValueError, so direct ``from_module`` callers get the usual exception type."""


_ORIGINAL = "_mmfuse_original"
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own (a loop over its dict: this runs in forwards, on every call)."""
    d = m.__dict__
    for table in _HOOK_TABLES:
        if d.get(table):
            return True
    return False


def check_replaceable(module: nn.Module, root_hooks: bool = True) -> None:
    """``Unsupported`` when replacing ``module`` would silently change what it computes: a hook on a
    submodule (or on the module itself unless ``root_hooks`` is False: ``patch`` checks afterwards that
    the replacement kept them), a ``forward`` set on an instance (accelerate's hooks: a copy would call
    the original's), or a parametrized parameter (weight_norm, spectral_norm: the replacement would hold
    one evaluation of it)."""
    from torch.nn.utils import parametrize

    for name, m in module.named_modules():
        where = f"submodule {name}" if name else "the module"
        if (name or root_hooks) and _has_hooks(m):
            raise Unsupported(f"{where} has hooks registered, which the replacement would not run")
        if "forward" in m.__dict__:
            raise Unsupported(f"{where} has its forward replaced on the instance (a hook library's wrapper), "
                              "which the replacement would not call")
        if parametrize.is_parametrized(m):
            raise Unsupported(f"{where} has parametrized parameters (e.g. weight_norm), which the replacement "
                              "would hold as one evaluation")


_READS_PARAMETERS = "its fused forward reads that module's parameters directly, so a module put there afterwards " \
                    "(an adapter) would be ignored"


def exact_child(owner: nn.Module, path: str, cls: type | tuple[type, ...], why: str = _READS_PARAMETERS) -> nn.Module:
    """The submodule at dotted ``path`` of a drop-in whose forward reads that submodule's parameters
    directly (the fused kernels take weights, not modules), checked on every call to be exactly ``cls``
    (or one of them) and still without hooks or an instance ``forward``: a module put there afterwards
    (an adapter library wrapping it: PEFT's LoRA, LN tuning), or a hook added to it (a pruning mask, the
    hook-based weight_norm, a sharding library gathering its parameters), would otherwise be skipped,
    its effect silently lost. A type compare and five dict tests per child (~0.9 us on CI's CPU)."""
    m = owner
    for part in path.split(".") if "." in path else (path,):
        m = m._modules[part] if part in m._modules else getattr(m, part)  # (the dict: ~1 us less per call)
    allowed = cls if isinstance(cls, tuple) else (cls,)
    if type(m) not in allowed:
        names = " or ".join(f"{c.__module__}.{c.__qualname__}" for c in allowed)
        raise RuntimeError(f"{type(owner).__name__}.{path}: expected the {names} that mmfuse built this module "
                           f"with, got {type(m).__module__}.{type(m).__qualname__}: {why}; apply adapters before "
                           "mmfuse.patch (it then leaves adapted modules alone) or call mmfuse.unpatch first")
    if _has_hooks(m) or "forward" in m.__dict__:
        raise RuntimeError(f"{type(owner).__name__}.{path} has hooks (or an instance forward) added since mmfuse "
                           "built this module: its fused forward reads that module's parameters without calling it, "
                           "so they would not run; add them before mmfuse.patch (it then leaves the module alone) "
                           "or call mmfuse.unpatch first")
    return m


def check_class_contract(module: nn.Module, forward: tuple[str, ...], attributes: tuple[str, ...] = ()) -> None:
    """``Unsupported`` unless ``type(module).forward`` takes exactly the parameters ``forward`` (after
    ``self``, ``**kwargs`` aside) and the module has ``attributes``: a drop-in reimplementing a
    transformers forward is called as the class's own callers call it, positionally included, and
    reads what that class's version defines; another version's class (another signature, attributes
    it lacks) would hand it arguments in the wrong places or compute something else."""
    import inspect

    name = type(module).__name__
    params = [p.name for p in inspect.signature(type(module).forward).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)][1:]
    if tuple(params) != tuple(forward):
        raise Unsupported(f"{name}.forward takes ({', '.join(params)}), the drop-in implements "
                          f"({', '.join(forward)}): another transformers version's class")
    missing = [a for a in attributes if not hasattr(module, a)]
    if missing:
        raise Unsupported(f"{name} has no {', '.join(missing)}, which the drop-in reads: another transformers "
                          "version's class")


def _kept_hooks(old: nn.Module, new: nn.Module) -> bool:
    """Whether ``new`` runs ``old``'s own hooks (a shallow copy carries its hook tables; a drop-in does not)."""
    return all(dict(getattr(new, t, None) or {}) == dict(getattr(old, t, None) or {}) for t in _HOOK_TABLES)


@dataclasses.dataclass
class PatchReport:
    swapped: list[tuple[str, str, str]]   # (qualified name, original class, replacement class)
    left_alone: list[tuple[str, str, str]]  # (qualified name, class, why)

    def __str__(self) -> str:
        lines = [f"mmfuse.patch: swapped {len(self.swapped)} module(s), left {len(self.left_alone)} alone"]
        lines += [f"  swapped {name}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  left alone {name} ({cls}): {why}" for name, cls, why in self.left_alone]
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.swapped)


def patch(model: nn.Module, vision_tower: bool = False) -> PatchReport:
    """Replace recognised submodules of ``model`` in place (an outer match wins over inner ones).
    Works on meta-device models (nothing is read from the weights until the first forward).
    ``vision_tower=True`` also swaps the vision tower's own blocks (registry families marked ``tower``:
    each ViT block's MLP); without it those are left as they are (opt-in)."""
    from mmfuse import registry

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(vision_tower, bool):
        raise TypeError(f"vision_tower: expected a bool, got {type(vision_tower).__name__}")
    report = PatchReport([], [])

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            qual = f"{prefix}.{child_name}" if prefix else child_name
            family = registry.family_for(child, vision_tower=vision_tower)
            if family is None:
                declined = registry.declined_reason(child, vision_tower)
                if declined is not None:
                    report.left_alone.append((qual, type(child).__name__, declined))
                visit(child, qual)
                continue
            try:
                if not registry.is_model_level(family):  # (a model's copy keeps its hooks; children are visited)
                    check_replaceable(child, root_hooks=False)
                new = registry.build(child, family)
                if not _kept_hooks(child, new):
                    raise Unsupported("the module has hooks registered, which its replacement would not run")
            except Unsupported as why:
                report.left_alone.append((qual, type(child).__name__, str(why)))
                visit(child, qual)  # an inner part may still be replaceable
                continue
            object.__setattr__(new, _ORIGINAL, child)  # not a submodule: state_dict unchanged
            new.train(child.training)
            setattr(parent, child_name, new)
            report.swapped.append((qual, type(child).__name__, type(new).__name__))
            if registry.is_model_level(family):  # a model's copy: its children are patched as usual
                visit(new, qual)

    family = registry.family_for(model, vision_tower=vision_tower)
    if family is not None and registry.is_model_level(family):
        report.left_alone.append(("", type(model).__name__, "the root module: wrap it in a parent module for its "
                                  "model-level token merge to be handed to the projector"))
    elif family is not None:
        raise ValueError("model: patch() replaces submodules in place; wrap a bare "
                         f"{type(model).__name__} in a parent module (or use its from_module)")
    visit(model, "")
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Put back every module ``patch`` replaced (parameters were shared, so training carries over).
    Returns the qualified names restored."""
    restored = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            qual = f"{prefix}.{child_name}" if prefix else child_name
            original = child.__dict__.get(_ORIGINAL)
            if original is not None:
                original.train(child.training)
                setattr(parent, child_name, original)
                restored.append(qual)
                visit(child, qual)  # a model-level copy's patched children: named (the copy is dropped)
            else:
                visit(child, qual)

    visit(model, "")
    return restored
