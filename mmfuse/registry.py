"""The model registry: which transformers classes ``mmfuse.patch`` replaces, and how. One place.

Families are data (``FAMILIES``): a family names the transformers classes it covers (module and class
name), the recipe that replaces them and the recipe's options (which attributes hold the Linear layers,
which activation module follows which Linear, ...). Recipes are code and few (``RECIPES``). Classes that
look like projectors or patch embeddings but are not replaced are listed in ``DECLINED`` with the reason;
tests/test_registry.py walks the installed transformers and fails on any class in neither table.
Families marked ``tower`` (each ViT block's MLP) are swapped only by ``patch(model, vision_tower=True)``;
they sit outside that walk (it looks for projector-like classes) and each has its own test.

Recipes that keep the original's forward (``mlp``, ``norm+mlp``, ``merge+mlp``, ``linear``, ``gemm swap``)
build a shallow copy of the module, of a subclass named ``Fused<Class>``, whose GEMM children are
mmfuse's: each listed ``nn.Linear`` becomes ``mmfuse.nn.Linear`` (same parameters), a Linear followed by
its activation module gets the activation fused into its epilogue (the activation child becomes
``nn.Identity``), and an ``nn.Sequential`` MLP becomes one fused ``MLPProjector``. The original's glue
(norm, token merge) runs unchanged, so the replacement is faithful by construction, and the state_dict
is the original's (same children, same parameters). Recipes with a forward of their own (``gated mlp``:
the gate product inside the GEMM; ``merged mlp``: the norm and the token merge in its loads;
``pool+norm+matmul``: Gemma's pooling and norm in one kernel) are the same kind of copy with one method
replaced; glue still run in PyTorch before their GEMMs is named in the family's options (``GATED_PRE``),
so a later change can fuse it into the kernels' loads without touching the family table.

One recipe works on a whole model (``merge into projector``): InternVL runs its pixel shuffle in the
model's ``get_image_features``, between the tower and the projector. The model's copy keeps that code
and hands the merge to the projector's first GEMM (``_DeferredMerge``); ``patch`` goes on into the
copy's children as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading
from typing import Callable

import torch
import torch.nn as nn

from mmfuse import _dispatch, _patch
from mmfuse.nn._activations import activation_name, exact_linears, plain_linear

PROJECTOR, PATCH_EMBED, CROSS_ATTENTION = "projector", "patch embedding", "cross-attention"
TOWER_MLP = "vision-tower MLP"  # counted apart from projectors (a tower family's recipe is a projector recipe)
MODEL_MERGE = "model-level merge"  # a model whose token merge runs outside its projector (InternVL)
NOTHING = "nothing to fuse"  # counted apart: recognised, left as PyTorch by default (PLAIN_GEMMS)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    kind: str          # PROJECTOR, PATCH_EMBED or CROSS_ATTENTION
    fused: str         # what runs on mmfuse kernels
    pytorch: str       # what stays PyTorch
    build: Callable[[nn.Module, "Family"], nn.Module]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                         # as users say it: "LLaVA-NeXT"
    module: str                       # transformers.models.<module>
    classes: tuple[str, ...]          # class names in that module
    recipe: str                       # a key of RECIPES
    options: tuple = ()               # recipe options as (key, value) pairs (hashable)
    notes: str = ""
    match: Callable[[nn.Module], bool] | None = None  # structural families (no transformers class)
    tower: bool = False               # a vision-tower block: swapped only by patch(..., vision_tower=True)

    def opt(self, key, default=None):
        return dict(self.options).get(key, default)

    def matches(self, m: nn.Module) -> bool:
        if self.match is not None:
            return self.match(m)
        cls = type(m)
        return cls.__name__ in self.classes and cls.__module__.startswith(f"transformers.models.{self.module}.")


# ----------------------------------------------------------------------------------------------
# The GEMM-swap recipes: a copy of the module with mmfuse GEMMs, running the original forward
# ----------------------------------------------------------------------------------------------
#: A Linear with nothing to fuse into its epilogue (no activation module after it: a projection, an MLP's
#: last Linear, a Linear on pre-cut patches) stays PyTorch's unless ``MMFUSE_PLAIN_GEMMS=mmfuse``
#: (``_dispatch.PLAIN_GEMMS``, the measurement behind it there). A module whose only GEMMs are such Linears
#: is left alone (``NOTHING_TO_FUSE``).
NOTHING_TO_FUSE = ("nothing to fuse: its only GEMMs are Linears with no activation after them, which run faster as "
                   "PyTorch's own (0.17-0.26x through mmfuse on an H100); MMFUSE_PLAIN_GEMMS=mmfuse swaps them anyway")


def unfused_linears(fam: "Family") -> tuple[str, ...]:
    """The family's listed Linears with no activation to fuse (left as they are by default)."""
    if RECIPES[fam.recipe].build not in (_swap_gemms, _gated_mlp):
        return ()
    fused = dict(fam.opt("fuse", ()))
    return tuple(p for p in fam.opt("linears", ()) if p not in fused)


def plain_gemms_only(fam: "Family") -> bool:
    """Whether the family's swap has nothing to fuse (``PLAIN_GEMMS``): a GEMM-swap recipe whose listed
    Linears have no activation to take in, and no conv, chain or fused Sequential beside them."""
    return (RECIPES[fam.recipe].build is _swap_gemms and not fam.opt("fuse") and not fam.opt("chain")
            and not fam.opt("convs") and not fam.opt("sequential"))


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    """``Fused<Class>``: the original class, recognisably replaced (forward and helpers inherited).
    Pickled (``torch.save(model)``, multiprocessing) through ``_unpickle_swapped``."""
    name = "Fused" + cls.__name__
    return type(name, (cls,), {"__module__": "mmfuse.registry", "__qualname__": name,
                               "__reduce_ex__": _reduce_swapped})


def _reduce_swapped(self, protocol):
    """A recipe's classes are made per family (and some per module, their forward a closure over the
    family's paths), so pickle cannot find them by name: the pickle names the original module instead
    (kept on the swapped one for ``unpatch``), the class is made again from it by the same recipe, and
    the swapped module's own state (children, hooks, training flag, adapters since) restored as it was."""
    original = self.__dict__.get(_patch._ORIGINAL)
    if original is None:
        raise TypeError(f"{type(self).__name__}: a module built by mmfuse's registry outside mmfuse.patch "
                        "(no original kept) cannot be pickled")
    # (__getstate__, not __dict__: a class that refuses pickling, a parametrized module's, still refuses)
    return _unpickle_swapped, (original,), self.__getstate__()


def _unpickle_swapped(original: nn.Module) -> nn.Module:
    family = family_for(original, vision_tower=True)
    # (a GEMM swap's class does not depend on which Linears it swapped: one pickled under another
    # MMFUSE_PLAIN_GEMMS, even one with nothing fused, is made again)
    new = (_swap_gemms(original, family, nothing_else=False) if RECIPES[family.recipe].build is _swap_gemms
           else build(original, family))
    return type(new).__new__(type(new))  # (its state follows, from the pickle)


def _shallow_copy(module: nn.Module, cls: type | None = None) -> nn.Module:
    """A new module object sharing every parameter, buffer and child, with its own child table."""
    new = (cls or type(module)).__new__(cls or type(module))
    # Own copies of every dict (children, parameters, buffers, hook tables): editing the copy's
    # children or hooks must not touch the original, which unpatch() puts back.
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def _linear_at(module: nn.Module, path: str) -> nn.Linear:
    """The Linear a recipe's own forward reads at ``path``, checked on every call (``exact_child``)."""
    return exact_linears(module, path)[0]


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    """Set a child by dotted path, copying the intermediate modules (the original stays untouched)."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = _shallow_copy(node._modules[part])
        node._modules[part] = child
        node = child
    node._modules[leaf] = value


def _swap_gemms(module: nn.Module, family: Family, nothing_else: bool = True) -> nn.Module:
    """The copy with the family's GEMM children swapped. ``nothing_else``: the recipe swaps nothing but
    these, so a copy with none swapped is refused (``NOTHING_TO_FUSE``); a recipe with a forward of its
    own passes False."""
    from mmfuse.nn.linear import Linear, MLPProjector

    fused_acts = dict(family.opt("fuse", ()))  # linear path -> activation path
    linear_paths = list(family.opt("linears", ()))
    chain = family.opt("chain")
    if chain:  # (first, list, act): first, then a ModuleList of Linears, each after the activation (Janus)
        first, layers, act_path = chain
        links = [first, *(f"{layers}.{i}" for i in range(len(_get(module, layers))))]
        linear_paths += links
        fused_acts.update({path: act_path for path in links[:-1]})  # the act follows every link but the last
    plan = []
    for path in linear_paths:
        act_path = fused_acts.get(path)
        if act_path is None and _dispatch.PLAIN_GEMMS == "pytorch":
            continue  # nothing to fuse: PyTorch's GEMM is the faster one (PLAIN_GEMMS)
        lin = plain_linear(_get(module, path), path)
        act = activation_name(_get(module, act_path)) if act_path else None
        plan.append((path, Linear.from_module(lin, activation=act), act_path))
    for path in family.opt("sequential", ()):
        plan.append((path, MLPProjector.from_module(_get(module, path)), None))
    for path in family.opt("convs", ()):  # Conv2d / Conv3d with kernel == stride: the patch GEMM
        from mmfuse.nn.patch_embed import PatchEmbed, PatchEmbed3d

        conv = _get(module, path)
        drop_in = PatchEmbed3d if isinstance(conv, nn.Conv3d) else PatchEmbed
        plan.append((path, drop_in.from_module(conv), None))
    if not plan and nothing_else:
        raise _patch.Unsupported(NOTHING_TO_FUSE)
    new = _shallow_copy(module, _fused_class(type(module)))
    for path, replacement, act_path in plan:
        _set(new, path, replacement)
        if act_path:
            _set(new, act_path, nn.Identity())
    fused = tuple(path for path, _, act_path in plan if act_path)
    if fused:  # an adapter wrapping a Linear with its activation fused would add its update after the activation
        base = type(new)

        def forward(self, *args, **kwargs):
            for path in fused:
                _patch.exact_child(self, path, Linear, "the activation after it runs in its GEMM's epilogue, so a "
                                   "module wrapping it (an adapter adding its update) would act after the activation")
            return base.forward(self, *args, **kwargs)

        new.__class__ = type(base.__name__, (base,), {"__module__": "mmfuse.registry", "forward": forward})
    return new


# ----------------------------------------------------------------------------------------------
# Recipes with a forward of their own
# ----------------------------------------------------------------------------------------------
def _normal_tensors(build):
    """Token tables are cached and then saved for backward: build them as normal tensors even when the
    first call runs under ``torch.inference_mode()`` (an inference tensor cannot be saved later)."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return build(*args, **kwargs)
    return wrapper


def _pooled_matmul(module: nn.Module, family: Family) -> nn.Module:
    """Gemma 3: average pooling of each image's patch grid, the RMSNorm and ``@ W`` (an (in, out)
    parameter) as ``mmfuse.merged_mlp(pool=True)``: one row-wise pool-and-norm kernel, one GEMM on W^T.
    Options: ``weight`` (the parameter), ``norm`` (its path; ``norm_offset``: it scales by offset +
    weight, Gemma's 1)."""
    from mmfuse.ops.merged import merged_mlp

    weight_name, norm_path, offset = family.opt("weight"), family.opt("norm"), family.opt("norm_offset", 0.0)
    norm = _get(module, norm_path)
    if not (isinstance(getattr(norm, "weight", None), torch.Tensor) and isinstance(getattr(norm, "eps", None), float)
            and "RMSNorm" in type(norm).__name__):
        raise _patch.Unsupported(f"{norm_path}: expected an RMSNorm with weight and eps, got {type(norm).__name__}")
    pool = getattr(module, "avg_pool", None)
    if not isinstance(pool, nn.AvgPool2d):
        raise _patch.Unsupported("avg_pool: expected nn.AvgPool2d")
    kernel, side = getattr(module, "kernel_size", None), getattr(module, "patches_per_image", None)
    if not (isinstance(kernel, int) and isinstance(side, int) and kernel > 0 and side % kernel == 0):
        raise _patch.Unsupported(f"kernel_size / patches_per_image: expected ints, a grid of whole {kernel}-windows, "
                                 f"got {kernel!r} / {side!r}")
    pair = torch.nn.modules.utils._pair
    got = (pair(pool.kernel_size), pair(pool.stride), pair(pool.padding), pool.ceil_mode, pool.divisor_override)
    if got != ((kernel, kernel), (kernel, kernel), (0, 0), False, None):
        raise _patch.Unsupported(f"avg_pool: expected non-overlapping {kernel}x{kernel} windows (kernel_size == "
                                 f"stride == {kernel}, no padding, no ceil_mode, no divisor_override), got kernel_size="
                                 f"{pool.kernel_size}, stride={pool.stride}, padding={pool.padding}, ceil_mode="
                                 f"{pool.ceil_mode}, divisor_override={pool.divisor_override}")

    def forward(self, x):
        images, tokens, channels = x.shape
        side, kernel = self.patches_per_image, self.kernel_size
        if tokens != side * side:
            raise ValueError(f"vision_outputs: expected {side * side} tokens per image (a {side}x{side} patch grid), "
                             f"got {tokens}")
        nm = _patch.exact_child(self, norm_path, type(norm))
        table = _unfold_table(((side, side),) * images, kernel, x.device)  # AvgPool2d's windows: unfold's
        y = merged_mlp(x.reshape(-1, channels), [getattr(self, weight_name).t()], None, None, group=kernel * kernel,
                       token_map=table, pool=True, norm="rms", norm_weight=nm.weight, eps=nm.eps,
                       norm_after_merge=True, norm_weight_offset=offset, _table_checked=True)
        return y.view(images, -1, y.shape[-1]).type_as(x)

    cls = _fused_class(type(module))
    sub = type(cls.__name__, (cls,), {"__module__": "mmfuse.registry", "forward": forward})
    return _shallow_copy(module, sub)


#: Glue a gated recipe runs before its gated MLP (each the original forward's first lines; a later
#: change may read them inside the first GEMM's loads): (what of it stays PyTorch, the glue).
GATED_PRE = {
    "glm_merger": ("the LayerNorm + GELU between the merger's proj Linear and the gated MLP",
                   lambda m, x: m.act1(m.post_projection_norm(m.proj(x)))),
}


def _gated_mlp(module: nn.Module, family: Family) -> nn.Module:
    """``down(act(gate(x)) * up(x))`` as ``mmfuse.gated_mlp``: gate and up in one GEMM (act(g) * u in
    its epilogue), down in a second. Options: ``gated`` = (gate, up, down, act) paths of separate
    Linears; ``pre``: a GATED_PRE glue step; ``linears``: other Linears the glue calls (swapped as in
    ``_swap_gemms``). (A chunked gate/up weight after a token merge is the merged-mlp recipe's
    ``gate_half``.)"""
    from mmfuse.ops.linear import GATE_ACTIVATIONS, gated_mlp

    new = _swap_gemms(module, family, nothing_else=False)  # the glue's own Linears (GLM's proj), if any
    pre = GATED_PRE[family.opt("pre")][1] if family.opt("pre") else None
    gate, up, down, act_path = family.opt("gated")
    for path in (gate, up, down):
        plain_linear(_get(module, path), path)
    # ``fixed_act``: the activation written as a function in the forward (no module to read)
    act = family.opt("fixed_act") if act_path is None else activation_name(_get(module, act_path))
    if act not in GATE_ACTIVATIONS:
        raise _patch.Unsupported(f"gate activation: expected one the epilogue computes, got {act!r}")

    def forward(self, x):
        x = pre(self, x) if pre is not None else x
        g, u, d = _linear_at(self, gate), _linear_at(self, up), _linear_at(self, down)
        return gated_mlp(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias, act)

    cls = type(new)
    sub = type(cls.__name__, (cls,), {"__module__": "mmfuse.registry", "forward": forward})
    new.__class__ = sub
    return new


def _norm_form(m: nn.Module):
    """("layer" | "rms", weight, bias, eps) of a norm module the merged kernels compute exactly:
    nn.LayerNorm (affine), or an RMSNorm written as transformers' Qwen2RMSNorm / T5LayerNorm are
    (a ``weight``, ``variance_epsilon`` or ``eps``, no bias)."""
    if type(m) is nn.LayerNorm:  # (exactly: a subclass may compute something else)
        if m.weight is None or len(m.normalized_shape) != 1:
            raise _patch.Unsupported(f"{type(m).__name__}: expected an affine LayerNorm over one dimension")
        return "layer", m.weight, m.bias if m.bias is not None else torch.zeros_like(m.weight), m.eps
    if "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor) \
            and getattr(m, "bias", None) is None:
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if isinstance(eps, float):
            return "rms", m.weight, None, eps
    raise _patch.Unsupported(f"norm: expected nn.LayerNorm or a transformers RMSNorm, got {type(m).__name__}")


#: Token tables probed so far: {(merge class, tokens per row, input shape, device): (M, G) int32 table}.
_TABLES: dict = {}


def _probed_token_map(module: nn.Module, merge, lead: tuple, device: torch.device) -> tuple[torch.Tensor, tuple]:
    """The (M, G) token table of a merge written as reshapes and permutes (pixel shuffle / unshuffle):
    the module's own merge run once on token ids (2 channels per token, the input's leading shape) on
    the device (no host transfer), then kept per (class, G, shape, device). The merge must keep each
    token's channels together as one chunk, else it is not a token merge these kernels read. Returns
    (table, the merge's output leading shape)."""
    group, run = merge
    return _cached_table((type(module), group(module), lead, device), lambda: _probe(run, module, lead, device))


def _cached_table(key, build):
    table = _TABLES.get(key)
    if table is None:
        table = build()
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


@_normal_tensors
def _probe(run, module, lead, device):
    """``_probed_token_map``'s table and output leading shape, built once."""
    ids = torch.arange(torch.Size(lead).numel() * 2, device=device).view(*lead, 2)
    out = run(module, ids)
    out_lead = tuple(out.shape[:-1])
    out = out.reshape(-1, out.shape[-1])
    first, second = out[:, 0::2], out[:, 1::2]
    if not bool(((first % 2 == 0) & (second == first + 1)).all()):
        raise _patch.Unsupported("merge: the probe did not keep each token's channels together")
    return (first // 2).to(torch.int32), out_lead


def _defining_module(m: nn.Module):
    """The Python module (transformers' modeling file) that defines m's original class (the fused copy's
    classes are mmfuse.registry's)."""
    mods = [c.__module__ for c in type(m).__mro__ if not c.__module__.startswith("mmfuse")]
    return sys.modules[next((n for n in mods if n.startswith("transformers.models.")), mods[0])]


#: Merges the merged-mlp recipe reads inside the GEMM: None (adjacent rows: Qwen's 2x2 merge, a view),
#: or (tokens per row, the module's own merge on a tensor) for a probed shuffle.
MERGES = {
    "view": None,
    "pixel_shuffle": (lambda m: m.scale_factor ** 2, lambda m, t: m.pixel_shuffle(t, m.scale_factor)),  # Idefics3
    "pixel_unshuffle": (lambda m: m.factor ** 2, lambda m, t: m.pixel_unshuffle(t)),                    # LFM2-VL
    "pixel_shuffle_factor": (lambda m: m.pixel_shuffle_factor ** 2,                                     # ModernVBERT
                             lambda m, t: m.pixel_shuffle(t, m.pixel_shuffle_factor)),
    "pixel_shuffle_downsample": (lambda m: m.downsample_factor ** 2, lambda m, t: m.pixel_shuffle(t)),  # Aya Vision
    # Llama 4's vision adapter: a module-level function of its modeling file, ratio 0.5 (4 tokens a row)
    "pixel_shuffle_ratio": (lambda m: round(1 / m.pixel_shuffle_ratio ** 2),
                            lambda m, t: _defining_module(m).pixel_shuffle(t, m.pixel_shuffle_ratio)),
}


def _merged_mlp(module: nn.Module, family: Family) -> nn.Module:
    """The merge and the norm read inside the first GEMM (``mmfuse.merged_mlp``): the module's Linears
    (``linears``, activation ``act`` between them), its norm (``norm``: before the merge, or after it
    where ``post`` names a true attribute), its merge (``merge``: a MERGES key); ``gate_half``: the first
    Linear is a chunked SwiGLU / GeGLU weight whose half ``gate_half`` is the gate (``act`` its
    activation), computed in the same GEMM; ``act_after_last``: the activation follows the last Linear
    too (in its epilogue); ``dropout``: the path of a dropout probability between the
    Linears (the original forward runs while training with it above 0); ``keep_batch``: a view merge that
    keeps the input's leading dimension (``view(x.shape[0], -1, G * C)``) instead of flat rows."""
    from mmfuse.ops.linear import GATE_ACTIVATIONS
    from mmfuse.ops.merged import merged_mlp

    lin_paths, act_path, gate_half = family.opt("linears"), family.opt("act"), family.opt("gate_half")
    for path in lin_paths:
        plain_linear(_get(module, path), path)
    act = activation_name(_get(module, act_path)) if act_path else None
    if gate_half is not None and act not in GATE_ACTIVATIONS:
        raise _patch.Unsupported(f"gate activation: expected one the epilogue computes, got {act!r}")
    norm_path, merge = family.opt("norm"), MERGES[family.opt("merge", "view")]
    post = family.opt("post", False)
    post = bool(getattr(module, post, False)) if isinstance(post, str) else post
    if norm_path and _get(module, norm_path) is None:  # an optional norm the config turned off
        norm_path = None
    norm_type = type(_get(module, norm_path)) if norm_path else None
    if norm_path:
        _norm_form(_get(module, norm_path))  # Unsupported now, not at the first call

    act_after_last, dropout_path = family.opt("act_after_last", False), family.opt("dropout")
    keep_batch = family.opt("keep_batch", False)
    original_forward = type(module).forward

    def forward(self, x):
        deferred = _pending_merge(self)
        if deferred is not None:
            if deferred.stands_for(x):  # the model's merge, handed to this GEMM
                return fused_forward(self, x, deferred)
            if x.device.type == "meta" and not deferred.taken:
                raise RuntimeError(f"{type(self).__name__}: the token merge's stand-in reached the projector "
                                   "reordered or copied (mmfuse reads the merge in the GEMM only when the model "
                                   "passes its output straight on): mmfuse.unpatch the model")
        if dropout_path and self.training and _get(self, dropout_path) > 0:
            return original_forward(self, x)  # dropout between the GEMMs: not in the kernels
        return fused_forward(self, x)

    def fused_forward(self, x, deferred=None):
        lins = [_linear_at(self, p) for p in lin_paths]
        norm, weight, bias, eps = (_norm_form(_patch.exact_child(self, norm_path, norm_type)) if norm_path
                                   else (None, None, None, 1e-6))
        kw = dict(norm=norm, norm_weight=weight, norm_bias=bias, eps=eps, norm_after_merge=post, gate_half=gate_half,
                  final_activation=act_after_last)
        ws, bs = [m.weight for m in lins], [m.bias for m in lins]
        if deferred is not None:
            rows, table = deferred.take()
            y = merged_mlp(rows, ws, bs, act, group=table.shape[1], token_map=table, _table_checked=True, **kw)
            return y.view(*x.shape[:-1], y.shape[-1])
        C = x.shape[-1]
        if merge is None:
            group = lins[0].in_features // C
            y = merged_mlp(x.reshape(-1, C), ws, bs, act, group=group, **kw)
            # Qwen's merge returns the merged rows flat; without one (group 1: a norm then an MLP) the
            # tokens keep their leading dims.
            if keep_batch:  # Kimi K2.5: view(batch, -1, G * C) before the Linears
                return y.view(x.shape[0], -1, y.shape[-1])
            return y.view(*x.shape[:-1], y.shape[-1]) if group == 1 else y
        table, out_lead = _probed_token_map(self, merge, tuple(x.shape[:-1]), x.device)
        y = merged_mlp(x.reshape(-1, C), ws, bs, act, group=merge[0](self), token_map=table, _table_checked=True,
                       **kw)
        return y.view(*out_lead, y.shape[-1])

    cls = _fused_class(type(module))
    sub = type(cls.__name__, (cls,), {"__module__": "mmfuse.registry", "forward": forward,
                                      "_reads_deferred_merge": merge is None and not act_after_last})
    return _shallow_copy(module, sub)


# ----------------------------------------------------------------------------------------------
# Model-level merges: InternVL runs its pixel shuffle in ``InternVLModel.get_image_features``, between
# the tower and the projector, not in the projector. The model's copy hands the merge to the
# projector's first GEMM instead: the model's own code still runs, every line of it.
# ----------------------------------------------------------------------------------------------
#: Per thread, the model-level merges in flight (``get_image_features`` calls, innermost last): the
#: handoff is per call, so two threads running one model never see each other's.
_IN_FLIGHT = threading.local()


def _calls() -> list:
    stack = getattr(_IN_FLIGHT, "calls", None)
    if stack is None:
        stack = _IN_FLIGHT.calls = []
    return stack


def _pending_merge(projector: nn.Module):
    """The innermost in-flight merge handed to ``projector`` on this thread, or None."""
    return next((c for c in reversed(_calls()) if c.projector is projector and c.stand_in is not None), None)


@dataclasses.dataclass(eq=False)
class _DeferredMerge:
    """One ``get_image_features`` call's token merge, read by the projector in its first GEMM's loads.
    The merge returned a stand-in: an empty tensor on the meta device, of the merge's output shape (no
    memory, no data), which the model's code reshapes and passes to its projector. The projector takes
    it (``stands_for``: that tensor or a view of it with its element order, contiguous) and reads
    ``rows`` through ``table`` instead. Anything else that touches the stand-in fails loudly (meta
    tensors hold no data; mixing them with real ones raises), a reordered or copied stand-in reaching
    the projector raises, and ``get_image_features`` raises when the projector did not take it."""
    model: nn.Module
    projector: nn.Module
    rows: torch.Tensor | None = None     # (R, C): the merge's input tokens as rows of one view, in place
    table: torch.Tensor | None = None    # (merged rows, group) int32: each merged row's tokens, as rows
    stand_in: torch.Tensor | None = None
    taken: bool = False

    def stands_for(self, t: torch.Tensor) -> bool:
        s = self.stand_in
        return (not self.taken and (t is s or t._base is s) and t.is_contiguous() and t.numel() == s.numel()
                and t.shape[-1] == s.shape[-1])

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.taken = True
        return self.rows, self.table


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """x (..., C) as the rows of a 2-D view (R, C), and per leading dim the row step of its index
    (None: row i is token i). InternVL hands over ``last_hidden_state[:, 1:]`` (the class token
    dropped): its tokens sit in the hidden state's rows with a gap per image, which a strided view over
    those rows keeps with no copy (the gaps are rows no merged row reads: zero gradient). Shapes and
    strides only: no device work. A layout no row view covers is copied."""
    C, lead = x.shape[-1], x.shape[:-1]
    if x.is_contiguous() or x.numel() == 0:
        return x.reshape(-1, C), None
    dims = sorted((s, n) for s, n in zip(x.stride()[:-1], lead) if n > 1)
    span, apart = C, True  # tokens apart: each dim's stride clears the extent of the finer ones
    for s, n in dims:
        apart, span = apart and s >= span, s * n
    step = math.gcd(*(s for s, _ in dims)) or C  # rows: every token starts on one
    if (x.stride(-1) != 1 and C > 1) or not apart or step < C:
        return x.reshape(-1, C).contiguous(), None
    steps = tuple(s // step if n > 1 else 0 for n, s in zip(lead, x.stride()[:-1]))
    return x.as_strided((1 + sum((n - 1) * k for n, k in zip(lead, steps)), C), (step, 1)), steps


def _row_ids(lead: tuple, steps: tuple, device) -> torch.Tensor:
    """Each token's row in ``_token_rows``' view, in x's token order (int64)."""
    ids = torch.zeros((), dtype=torch.long, device=device)
    for dim, (n, k) in enumerate(zip(lead, steps)):
        shape = [1] * len(lead)
        shape[dim] = n
        ids = ids + torch.arange(n, device=device).view(shape) * k
    return ids.reshape(-1)


def _deferred_merge_model(module: nn.Module, family: Family) -> nn.Module:
    """The model with its token merge (method ``merge``) handed to its projector (``projector``, a
    merged-mlp copy): ``get_image_features`` runs the model's own code while the merge returns a
    stand-in the projector recognises (``_DeferredMerge``). The token table is the model's own merge
    run once on token ids, per input shape."""
    merge_name, proj_path = family.opt("merge"), family.opt("projector")
    cls = type(module)
    if not callable(getattr(cls, merge_name, None)) or not callable(getattr(cls, "get_image_features", None)):
        raise _patch.Unsupported(f"expected methods {merge_name} and get_image_features")
    if not isinstance(_get(module, proj_path), nn.Module):
        raise _patch.Unsupported(f"{proj_path}: expected the projector module")
    original_features, original_merge = cls.get_image_features, getattr(cls, merge_name)

    def get_image_features(self, *args, **kwargs):
        proj = _get(self, proj_path)
        if not getattr(type(proj), "_reads_deferred_merge", False):  # the projector was left alone
            return original_features(self, *args, **kwargs)
        call, stack = _DeferredMerge(self, proj), _calls()
        stack.append(call)
        try:
            out = original_features(self, *args, **kwargs)
        finally:
            stack.remove(call)
        if call.stand_in is not None and not call.taken:
            raise RuntimeError(f"{cls.__name__}.get_image_features: the {merge_name} output did not reach "
                               f"{proj_path} (mmfuse hands the merge to it): mmfuse.unpatch the model")
        return out

    def merge(self, *args, **kwargs):
        call = next((c for c in reversed(_calls()) if c.model is self), None)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if call is None or call.stand_in is not None or x is None or x.dim() < 2:
            return original_merge(self, *args, **kwargs)  # outside get_image_features, again, or by keyword
        rest, lead = args[1:], tuple(x.shape[:-1])
        rows, steps = _token_rows(x)
        key = (cls, merge_name, rest, tuple(sorted(kwargs.items())), lead, steps, x.device)

        def build():
            table, out_lead = _probe(lambda m, t: original_merge(m, t, *rest, **kwargs), self, lead, x.device)
            if steps is not None:  # tokens to rows of the strided view (built once per shape)
                table = _row_ids(lead, steps, x.device)[table.long()].to(torch.int32)
            return table, out_lead

        try:
            table, out_lead = _cached_table(key, _normal_tensors(build))
        except _patch.Unsupported:  # not a token merge the kernels read: the model's own
            return original_merge(self, *args, **kwargs)
        call.rows, call.table = rows, table
        call.stand_in = torch.empty((*out_lead, table.shape[1] * x.shape[-1]), dtype=x.dtype, device="meta")
        return call.stand_in

    sub = type(_fused_class(cls).__name__, (_fused_class(cls),),
               {"__module__": "mmfuse.registry", "get_image_features": get_image_features, merge_name: merge})
    return _shallow_copy(module, sub)


@functools.lru_cache(maxsize=32)
@_normal_tensors
def _unfold_table(grids: tuple, s: int, device: torch.device) -> torch.Tensor:
    """The (M, s*s) int32 token table of ``F.unfold(kernel_size=s, stride=s)`` over each image's (h, w)
    row-major token grid, images one after another (Mistral3's patch merger, and Gemma 3's AvgPool2d
    windows on square grids; trailing rows / columns
    dropped as unfold does). Slot j = di * s + dj."""
    tables, offset = [], 0
    d = torch.arange(s, device=device)
    for h, w in grids:
        r = torch.arange(h // s, device=device)[:, None] * s + d          # (h // s, s) grid rows
        c = torch.arange(w // s, device=device)[:, None] * s + d          # (w // s, s) grid columns
        tables.append(offset + (r[:, None, :, None] * w + c[None, :, None, :]).reshape(-1, s * s))
        offset += h * w
    return torch.cat(tables).to(torch.int32) if tables else torch.zeros(0, s * s, dtype=torch.int32, device=device)


def _unfold_merged_mlp(module: nn.Module, family: Family) -> nn.Module:
    """Mistral3 / Pixtral: RMSNorm per token, the patch merger's per-image ``unfold`` merge and its merging
    Linear as one ``mmfuse.merged_mlp`` (the norm and the merge read in the GEMM's loads), then the MLP
    (``mmfuse.mlp``). unfold lays a merged row out channel-major (column c * s^2 + j); the mapped GEMM
    reads token-major rows (j * C + c), so the merging weight's columns are permuted to match (a view
    plus one copy of that weight per call; under autograd, through it). Not cached between calls: writes
    through ``weight.data`` (PEFT's adapter merge, EMA updates) do not bump the version a cache would
    key on, and a stale weight would be a silent wrong answer. Options: ``norm``, ``merger``
    (with ``merging_layer``, ``spatial_merge_size``, ``patch_size``), ``linears`` and ``act``."""
    from mmfuse.ops.linear import mlp
    from mmfuse.ops.merged import merged_mlp

    norm_path, merger_path, (l1, l2), act_path = (family.opt("norm"), family.opt("merger"), family.opt("linears"),
                                                  family.opt("act"))
    merger = _get(module, merger_path)
    for path in (f"{merger_path}.merging_layer", l1, l2):
        plain_linear(_get(module, path), path)
    _norm_form(_get(module, norm_path))
    norm_type = type(_get(module, norm_path))
    act = activation_name(_get(module, act_path))
    G, C = merger.spatial_merge_size ** 2, merger.merging_layer.out_features
    if merger.merging_layer.in_features != G * C:
        raise _patch.Unsupported(f"{merger_path}.merging_layer: expected in_features == {G * C}, got "
                                 f"{merger.merging_layer.in_features}")

    def forward(self, image_features, image_sizes):
        m = _get(self, merger_path)
        s, patch = m.spatial_merge_size, m.patch_size
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        grids = tuple((int(h) // patch, int(w) // patch) for h, w in sizes)
        x = image_features.reshape(-1, image_features.shape[-1])
        if x.shape[0] != sum(h * w for h, w in grids):
            raise ValueError(f"image_features: expected {sum(h * w for h, w in grids)} tokens (the image_sizes' "
                             f"patch grids), got {x.shape[0]}")
        norm, weight, bias, eps = _norm_form(_patch.exact_child(self, norm_path, norm_type))
        wm = _linear_at(self, f"{merger_path}.merging_layer").weight
        wm = wm.reshape(wm.shape[0], -1, s * s).transpose(1, 2).reshape(wm.shape[0], -1)  # columns j * C + c
        merged = merged_mlp(x, [wm], [m.merging_layer.bias], None, group=s * s,
                            token_map=_unfold_table(grids, s, x.device), norm=norm, norm_weight=weight,
                            norm_bias=bias, eps=eps, _table_checked=True)
        a, b = _linear_at(self, l1), _linear_at(self, l2)
        return mlp(merged, [a.weight, b.weight], [a.bias, b.bias], act)

    cls = _fused_class(type(module))
    sub = type(cls.__name__, (cls,), {"__module__": "mmfuse.registry", "forward": forward})
    return _shallow_copy(module, sub)


def _unfold_patch_embed(module: nn.Module, family: Family) -> nn.Module:
    """Llama 4: ``nn.Unfold(P, stride=P)``, a permute and a bias-free Linear(C * P * P, D): a Conv2d(k=s)
    with the Linear's weight viewed as (D, C, P, P) (unfold's column order is the conv weight's), as one
    patch GEMM writing the (B, N, D) tokens the original returns. Pixels past the last whole patch are
    dropped, as unfold drops them (a view). Options: ``unfold``, ``linear`` (paths)."""
    from mmfuse.nn.patch_embed import _packed
    from mmfuse.ops.patch_embed import fused_patch_embed

    unfold_path, linear_path = family.opt("unfold"), family.opt("linear")
    unfold, lin = _get(module, unfold_path), _get(module, linear_path)
    if type(unfold) is not nn.Unfold or type(lin) is not nn.Linear:
        raise _patch.Unsupported(f"{unfold_path} / {linear_path}: expected nn.Unfold and nn.Linear, got "
                                 f"{type(unfold).__name__} / {type(lin).__name__}")
    pair = torch.nn.modules.utils._pair
    k, stride = pair(unfold.kernel_size), pair(unfold.stride)
    if k != stride or k[0] != k[1] or pair(unfold.padding) != (0, 0) or pair(unfold.dilation) != (1, 1):
        raise _patch.Unsupported(f"{unfold_path}: expected square non-overlapping patches (kernel_size == stride, no "
                                 f"padding, dilation 1), got kernel_size={unfold.kernel_size}, stride={unfold.stride}, "
                                 f"padding={unfold.padding}, dilation={unfold.dilation}")
    P = k[0]
    if lin.in_features % (P * P):
        raise _patch.Unsupported(f"{linear_path}: expected in_features a multiple of {P * P} (channels x {P}x{P}), "
                                 f"got {lin.in_features}")

    def forward(self, pixels):
        if pixels.dim() != 4:
            raise ValueError(f"pixels: expected (B, C, H, W), got shape {tuple(pixels.shape)}")
        lin = _linear_at(self, linear_path)
        w = lin.weight
        C = w.shape[1] // (P * P)
        if pixels.shape[1] != C:
            raise ValueError(f"pixels: expected {C} channels, got {pixels.shape[1]}")
        h, w_ = pixels.shape[-2] // P * P, pixels.shape[-1] // P * P
        weight = w.view(w.shape[0], C, P, P)
        return fused_patch_embed(pixels[..., :h, :w_], weight, lin.bias,
                                 cache=_packed(self), cache_owner=w)

    cls = _fused_class(type(module))
    sub = type(cls.__name__, (cls,), {"__module__": "mmfuse.registry", "forward": forward})
    return _shallow_copy(module, sub)


def _conv3d_patch_embed(module: nn.Module, family: Family) -> nn.Module:
    from mmfuse.nn.hf import Qwen2VLPatchEmbed

    return Qwen2VLPatchEmbed.from_module(module)


def _vision_embeddings(module: nn.Module, family: Family) -> nn.Module:
    from mmfuse.nn.patch_embed import CLIPVisionEmbeddings, SiglipVisionEmbeddings

    cls = {"clip": CLIPVisionEmbeddings, "siglip": SiglipVisionEmbeddings}[family.opt("layout")]
    return cls.from_module(module)


def _from_module(dotted: str):
    def build(module, family):
        import importlib

        mod, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(mod), name).from_module(module)
    return build


def _mlp_projector(module, family):
    from mmfuse.nn.linear import MLPProjector

    return MLPProjector.from_module(module)


_SWAP_PYTORCH = "the original forward's glue"
RECIPES = {r.name: r for r in [
    Recipe("mlp", PROJECTOR, "each Linear with the activation after it (one GEMM each, bias and act in the "
           "epilogue)", "nothing", _swap_gemms),
    Recipe("mlp (fused chain)", PROJECTOR,
           "Linear -> act -> Linear ... as one autograd op (act' in the dX GEMM's epilogue)", "nothing",
           _mlp_projector),
    Recipe("linear", PROJECTOR, "the Linear (bias in the epilogue)", "nothing", _swap_gemms),
    Recipe("norm+mlp", PROJECTOR, "each Linear with the activation after it (bias and act in the epilogue)",
           "the norm", _swap_gemms),
    Recipe("gemm swap", PROJECTOR,
           "each listed Conv(k=s), and each listed Linear with an activation module the family fuses, as one "
           "mmfuse GEMM (bias and activation in the epilogue)",
           "the rest of the original forward (the family's notes name it)", _swap_gemms),
    Recipe("merge+mlp", PROJECTOR, "each Linear with the activation after it (bias and act in the epilogue)",
           "the norm and the token merge (reshapes / unfold / pixel shuffle)", _swap_gemms),
    Recipe("gated mlp", PROJECTOR,
           "gate and up as one GEMM (bias, act(g) * u in its epilogue; dG and dU in the backward GEMM's), "
           "down as a second", "nothing", _gated_mlp),
    Recipe("merged mlp", PROJECTOR,
           "the norm and the token merge inside the first GEMM's loads (for large GEMMs written once by a row-wise "
           "pass instead: measured faster), every Linear, "
           "bias and activation (a chunked SwiGLU's gate and up: one GEMM, act(g) * u in its epilogue)", "nothing (a pixel shuffle's token table is probed once per shape)", _merged_mlp),
    Recipe("unfold merged mlp", PROJECTOR,
           "the norm and the per-image unfold merge inside the merging Linear's loads (its columns permuted to "
           "the kernel's token-major order), then the MLP (act in the epilogue)", "nothing", _unfold_merged_mlp),
    Recipe("merge into projector", MODEL_MERGE,
           "the model's token merge (InternVL's pixel shuffle in get_image_features), read by its merged-mlp "
           "projector's first GEMM (not materialised, below the written-operand sizes)", "nothing (the model's own code runs; the merge returns a "
           "zero-memory stand-in)", _deferred_merge_model),
    Recipe("pool+norm+matmul", PROJECTOR,
           "the average pool and the RMSNorm (one row-wise kernel) and the weight matmul (W^T as the GEMM's B)",
           "nothing", _pooled_matmul),
    Recipe("patch embed (pre-cut rows)", PATCH_EMBED, "Conv3d(k=s) on pre-cut patch rows as one GEMM + bias "
           "(nothing to fuse: PyTorch's `F.linear` unless `MMFUSE_PLAIN_GEMMS=mmfuse`; the win is not running "
           "cuDNN's Conv3d)", "nothing", _conv3d_patch_embed),
    Recipe("patch embed (conv swap)", PATCH_EMBED,
           "Conv(k=s) as one GEMM (im2col in the loads, bias in the epilogue; conv layout as a free view)",
           "class token, position table / gathered position ids, norms (the original's code)", _swap_gemms),
    Recipe("patch embed (linear on patches)", PATCH_EMBED, "the Linear on pre-cut patches (bias in the epilogue)",
           "position table resizing and add (the original's code)", _swap_gemms),
    Recipe("patch embed (unfold + linear)", PATCH_EMBED,
           "nn.Unfold(k=s) + Linear as one patch GEMM (the Linear's weight viewed as a conv weight; im2col in the "
           "loads, token-major output)", "nothing", _unfold_patch_embed),
    Recipe("vision embeddings", PATCH_EMBED,
           "Conv2d(k=s) patchify + bias [+ class token] + position table, one kernel",
           "interpolate_pos_encoding and off-size images (the original's code)", _vision_embeddings),
    Recipe("cross-attention", CROSS_ATTENTION, "the attention (one kernel, the Lq x Lk matrix never formed)",
           "head reshapes; the Q/K/V/O projections (plain GEMMs: `MMFUSE_PLAIN_GEMMS`)",
           lambda m, f: _from_module(f.opt("dropin"))(m, f)),
]}


# ----------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------
def _llava_mlp(name, module, cls, notes=""):
    return Family(name, module, (cls,), "mlp", (("linears", ("linear_1", "linear_2")),
                                                 ("fuse", (("linear_1", "act"),))), notes)


def _tower_mlp(name, module, cls, linears=("fc1", "fc2"), act="activation_fn", notes="", recipe="mlp"):
    """A ViT block's fc1 -> act -> fc2 (opt-in: ``tower=True``); ``recipe`` "gemm swap" where more of its
    forward than the GEMMs and the activation stays the original's (the notes say what)."""
    return Family(name, module, (cls,), recipe, (("linears", linears), ("fuse", ((linears[0], act),))), notes,
                  tower=True)


def _tower_gated(name, module, cls, notes=""):
    """A ViT block's SwiGLU, down(act(gate(x)) * up(x)) (opt-in: ``tower=True``)."""
    return Family(name, module, (cls,), "gated mlp", _SEPARATE_GATE, notes, tower=True)


def _conv_swap(name, module, cls, conv, notes=""):
    """A patch embedding whose Conv2d(k=s) is swapped; the rest of its forward is the original's."""
    return Family(name, module, (cls,), "patch embed (conv swap)", (("convs", (conv,)),), notes)


def _linear_patches(name, module, cls, linear, notes=""):
    """A patch embedding whose Linear runs on patches the processor cut."""
    return Family(name, module, (cls,), "patch embed (linear on patches)", (("linears", (linear,)),), notes)


def _window_merger(name, module, cls):
    """MiniCPM's window-attention merger: attention projections and the merge MLP's Linears."""
    return Family(name, module, (cls,), "gemm swap",
                  (("linears", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                "linear_1", "linear_2")),),
                  notes="the window attention's four projections and the 2x2 merge MLP's two Linears; the LayerNorms, "
                  "the windowed attention, gelu_tanh (a plain function, no module to fuse) and the residuals stay "
                  "PyTorch")


def _is_llava_mlp_sequential(m: nn.Module) -> bool:
    from mmfuse.nn.linear import MLPProjector

    if not isinstance(m, nn.Sequential) or len(m) < 3 or len(m) % 2 == 0:
        return False
    try:
        MLPProjector._from_sequential(m)
    except (TypeError, ValueError):
        return False
    return True


_QWEN_MERGER = (("linears", ("mlp.0", "mlp.2")), ("act", "mlp.1"), ("norm", "ln_q"), ("merge", "view"))
_QWEN3_MERGER = (("linears", ("linear_fc1", "linear_fc2")), ("act", "act_fn"), ("norm", "norm"), ("merge", "view"),
                 ("post", "use_postshuffle_norm"))
_PIXEL_SHUFFLE = (("linears", ("modality_projection.proj",)), ("merge", "pixel_shuffle"))
_UNFOLD = (("norm", "norm"), ("merger", "patch_merger"), ("linears", ("linear_1", "linear_2")), ("act", "act"))
_INTERNVL_PROJECTOR = (("linears", ("linear_1", "linear_2")), ("act", "act"), ("norm", "layer_norm"), ("post", True))
_INTERNVL_MODEL = (("merge", "pixel_shuffle"), ("projector", "multi_modal_projector"))
_GEMMA3_POOL = (("weight", "mm_input_projection_weight"), ("norm", "mm_soft_emb_norm"), ("norm_offset", 1.0))
# `x, gate = linear_1(a).chunk(2)`: the gate is the second half.
_DOWNSAMPLE_SWIGLU = (("linears", ("linear_1", "linear_2")), ("act", "act"), ("merge", "pixel_shuffle_downsample"),
                      ("gate_half", 1))
_KOSMOS_PROJECTION = (("linears", ("dense", "x_attn.q_proj", "x_attn.k_proj", "x_attn.v_proj", "x_attn.out_proj")),)
_KOSMOS_NOTE = ("dense and the latent-query attention's four projections; the concat of features and latents and "
                "the attention itself (the text model's attention class, no drop-in) stay PyTorch")
_CONV3D_NOTE = "Conv3d(k=s) on rows the processor cut: cuDNN's bf16 Conv3d path avoided"
_SEPARATE_GATE = (("gated", ("gate_proj", "up_proj", "down_proj", "act_fn")),)
_GLM_MERGER = (("linears", ("proj",)), ("pre", "glm_merger"), *_SEPARATE_GATE)
_CLIP = (("layout", "clip"),)
_ACT_AFTER_BOTH = (("linears", ("fc1", "fc2")), ("fuse", (("fc1", "act"), ("fc2", "act"))))
_MINICPM_MLP = (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),)))
_NEAREST_POS = "NaViT-style nearest position ids per image stay PyTorch"

FAMILIES: list[Family] = [
    # LLaVA and its relatives: Linear -> act -> Linear
    Family("LLaVA-1.5", "llava", ("LlavaMultiModalProjector",), "mlp (fused chain)"),
    Family("LLaVA (original code)", "", (), "mlp (fused chain)",
           notes="nn.Sequential(Linear, act, Linear, ...) as LLaVA's own repository builds it",
           match=_is_llava_mlp_sequential),
    _llava_mlp("LLaVA-NeXT", "llava_next", "LlavaNextMultiModalProjector"),
    _llava_mlp("LLaVA-NeXT-Video", "llava_next_video", "LlavaNextVideoMultiModalProjector"),
    _llava_mlp("LLaVA-OneVision", "llava_onevision", "LlavaOnevisionMultiModalProjector"),
    _llava_mlp("Video-LLaVA", "video_llava", "VideoLlavaMultiModalProjector"),
    _llava_mlp("FastVLM", "fast_vlm", "FastVlmMultiModalProjector"),
    Family("VideoLLaMA3", "video_llama_3", ("VideoLlama3Projector",), "mlp", (("sequential", ("readout",)),)),
    Family("VipLLaVA", "vipllava", ("VipLlavaMultiModalProjector",), "norm+mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),)))),
    Family("InternVL", "internvl", ("InternVLMultiModalProjector",), "merged mlp", _INTERNVL_PROJECTOR,
           notes="LayerNorm read in linear_1's loads; with the model-level family, the pixel shuffle too"),
    Family("InternVL", "internvl", ("InternVLModel",), "merge into projector", _INTERNVL_MODEL),
    Family("PaliGemma", "paligemma", ("PaliGemmaMultiModalProjector",), "linear", (("linears", ("linear",)),)),
    Family("Llama 4", "llama4", ("Llama4MultiModalProjector",), "linear", (("linears", ("linear_1",)),)),
    Family("DeepSeek-VL", "deepseek_vl", ("DeepseekVLAligner",), "mlp",
           (("linears", ("linear1", "linear2")), ("fuse", (("linear1", "activation"),)))),
    Family("DeepSeek-VL (hybrid)", "deepseek_vl_hybrid", ("DeepseekVLHybridAligner",), "gemm swap",
           (("linears", ("vision_proj", "high_res_vision_proj", "proj")),
            ("fuse", (("vision_proj", "act"), ("high_res_vision_proj", "act")))),
           notes="GELU of the two projections' concatenation is the concatenation of their GELUs: in both "
           "epilogues; the concat stays PyTorch"),
    Family("Janus", "janus", ("JanusVisionAlignerMLP", "JanusVQVAEAlignerMLP"), "mlp",
           (("chain", ("fc1", "hidden_layers", "activation_fn")),),
           notes="fc1, then the activation before each of its depth - 1 hidden Linears"),
    Family("Kimi K2.5", "kimi_k25", ("Kimi_K25MultimodalProjection",), "merged mlp",
           (("linears", ("in_proj", "out_proj")), ("act", "act"), ("norm", "pre_norm"), ("merge", "view"),
            ("keep_batch", True)), notes="LayerNorm per token, the 2x2 merge (a view), Linear -> GELU -> Linear"),
    Family("Kosmos-2", "kosmos2", ("Kosmos2ImageToTextProjection",), "gemm swap", _KOSMOS_PROJECTION,
           notes=_KOSMOS_NOTE),
    Family("Kosmos-2.5", "kosmos2_5", ("Kosmos2_5ImageToTextProjection",), "gemm swap", _KOSMOS_PROJECTION,
           notes=_KOSMOS_NOTE),
    Family("Llama 4 (vision adapter)", "llama4", ("Llama4VisionPixelShuffleMLP",), "merged mlp",
           (("linears", ("mlp.fc1", "mlp.fc2")), ("act", "mlp.activation_fn"), ("merge", "pixel_shuffle_ratio"),
            ("act_after_last", True), ("dropout", "mlp.dropout")),
           notes="pixel shuffle read in fc1's loads, GELU in both epilogues; while training with "
           "projector_dropout > 0 the original forward runs"),
    # token merge then MLP
    Family("Qwen2-VL", "qwen2_vl", ("PatchMerger",), "merged mlp", _QWEN_MERGER,
           notes="LayerNorm per token and the 2x2 merge read in the first GEMM, Linear -> GELU -> Linear"),
    Family("Qwen2.5-VL", "qwen2_5_vl", ("Qwen2_5_VLPatchMerger",), "merged mlp", _QWEN_MERGER,
           notes="RMSNorm per token and the 2x2 merge read in the first GEMM"),
    Family("Qwen2.5-Omni", "qwen2_5_omni", ("Qwen2_5OmniPatchMerger",), "merged mlp", _QWEN_MERGER),
    Family("Qwen3-VL", "qwen3_vl", ("Qwen3VLVisionPatchMerger",), "merged mlp", _QWEN3_MERGER,
           notes="also the deepstack mergers (LayerNorm over the merged row)"),
    Family("Qwen3-VL-MoE", "qwen3_vl_moe", ("Qwen3VLMoeVisionPatchMerger",), "merged mlp", _QWEN3_MERGER),
    Family("Qwen3.5", "qwen3_5", ("Qwen3_5VisionPatchMerger",), "merged mlp", _QWEN3_MERGER),
    Family("Qwen3.5-MoE", "qwen3_5_moe", ("Qwen3_5MoeVisionPatchMerger",), "merged mlp", _QWEN3_MERGER),
    Family("Qwen3-Omni-MoE", "qwen3_omni_moe", ("Qwen3OmniMoeVisionPatchMerger",), "merge+mlp",
           (("linears", ("mlp.0", "mlp.2")), ("fuse", (("mlp.0", "mlp.1"),))), notes="the MLP is a ModuleList"),
    Family("Cohere Compass", "cohere_compass", ("CohereCompassVisionPatchMerger",), "merged mlp", _QWEN3_MERGER),
    Family("Qwen4-Exp", "qwen4_exp", ("Qwen4ExpVisionPatchMerger",), "merged mlp", _QWEN3_MERGER),
    Family("EXAONE 4.5", "exaone4_5", ("Exaone4_5_PatchMerger",), "merged mlp", _QWEN_MERGER),
    Family("MistralLarge4", "mistral_large4", ("MistralLarge4MultiModalProjector",), "unfold merged mlp", _UNFOLD),
    Family("Qianfan-OCR", "qianfan_ocr", ("QianfanOCRMultiModalProjector",), "merged mlp", _INTERNVL_PROJECTOR,
           notes="as InternVL's"),
    Family("Qianfan-OCR", "qianfan_ocr", ("QianfanOCRModel",), "merge into projector", _INTERNVL_MODEL),
    Family("T5Gemma 2", "t5gemma2", ("T5Gemma2MultiModalProjector",), "pool+norm+matmul",
           _GEMMA3_POOL),
    Family("Mistral3 / Pixtral", "mistral3", ("Mistral3MultiModalProjector",), "unfold merged mlp", _UNFOLD,
           notes="RMSNorm and the per-image unfold merge read in the merge Linear's loads, Linear -> act -> Linear"),
    Family("LightOnOCR", "lighton_ocr", ("LightOnOcrMultiModalProjector",), "unfold merged mlp", _UNFOLD),
    Family("Idefics3", "idefics3", ("Idefics3Connector",), "merged mlp", _PIXEL_SHUFFLE,
           notes="pixel shuffle read in the Linear's loads (no copy)"),
    Family("SmolVLM", "smolvlm", ("SmolVLMConnector",), "merged mlp", _PIXEL_SHUFFLE,
           notes="pixel shuffle read in the Linear's loads (no copy)"),
    Family("LFM2-VL", "lfm2_vl", ("Lfm2VlMultiModalProjector",), "merged mlp",
           (("linears", ("linear_1", "linear_2")), ("act", "act"), ("norm", "layer_norm"), ("post", True),
            ("merge", "pixel_unshuffle")),
           notes="pixel unshuffle and the optional LayerNorm over the merged row read in the first GEMM"),
    Family("PaddleOCR-VL", "paddleocr_vl", ("PaddleOCRProjector",), "merge+mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),))),
           notes="per image: LayerNorm, 2x2 merge, Linear -> GELU -> Linear"),
    Family("Gemma 3", "gemma3", ("Gemma3MultiModalProjector",), "pool+norm+matmul",
           _GEMMA3_POOL),
    Family("LFM3-VL", "lfm3_vl", ("Lfm3VlMultiModalProjector",), "merge+mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),))),
           notes="LayerNorm, then the merge as a reshape"),
    Family("MiniMax-M3-VL", "minimax_m3_vl", ("MiniMaxM3VLMultiModalProjector",), "merge+mlp",
           (("linears", ("linear_1", "linear_2", "merge_linear_1", "merge_linear_2")),
            ("fuse", (("linear_1", "act"), ("merge_linear_1", "merge_act")))),
           notes="an MLP per patch, the merge as a reshape, then a second MLP"),
    # gated
    Family("Command A Vision", "cohere2_vision", ("Cohere2VisionMultiModalProjector",), "merged mlp",
           _DOWNSAMPLE_SWIGLU, notes="pixel shuffle read in the loads of one GEMM for gate and up (SwiGLU on one "
           "chunked weight: up, gate)"),
    Family("Aya Vision", "aya_vision", ("AyaVisionMultiModalProjector",), "merged mlp",
           (*_DOWNSAMPLE_SWIGLU, ("norm", "layernorm"), ("post", True)),
           notes="pixel shuffle and the LayerNorm over the merged row read in the loads of one GEMM for gate "
           "and up (SwiGLU on one chunked weight: up, gate)"),
    Family("GLM-4V", "glm4v", ("Glm4vVisionPatchMerger",), "gated mlp", _GLM_MERGER,
           notes="Linear, LayerNorm + GELU, then SwiGLU (separate gate / up)"),
    Family("GLM-4V-MoE", "glm4v_moe", ("Glm4vMoeVisionPatchMerger",), "gated mlp", _GLM_MERGER),
    Family("GLM-OCR", "glm_ocr", ("GlmOcrVisionPatchMerger",), "gated mlp", _GLM_MERGER),
    Family("Idefics2", "idefics2", ("Idefics2MLP",), "gated mlp", _SEPARATE_GATE,
           notes="the connector's modality projection and the perceiver layers' MLPs (SwiGLU, separate gate / up)"),
    # examined in a second pass over transformers 5.23 (issue 11's follow-up)
    Family("Aria", "aria", ("AriaProjectorMLP",), "mlp",
           (("linears", ("linear_in", "linear_out")), ("fuse", (("linear_in", "act"),))),
           notes="gelu_new (tanh GELU) fused"),
    Family("Inkling 2", "inkling2", ("Inkling2VisionMerger",), "mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),)))),
    Family("Muse Glimmer", "muse_glimmer", ("MuseGlimmerVisionAdapter",), "mlp", _ACT_AFTER_BOTH,
           notes="act(fc2(act(fc1(x)))): the one activation module fused after both Linears"),
    Family("Muse Spark", "muse_spark", ("MuseSparkVisionAdapter",), "mlp", _ACT_AFTER_BOTH,
           notes="act(fc2(act(fc1(x)))): the one activation module fused after both Linears"),
    Family("PerceptionLM", "perception_lm", ("PerceptionLMMultiModalProjector",), "merge+mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "gelu"),))),
           notes="Linear -> GELU -> Linear; the permutes and the adaptive average pool after it stay PyTorch"),
    Family("Granite-Docling", "granite_docling", ("GraniteDoclingDeepStackMerger",), "norm+mlp",
           (("linears", ("linear_1", "linear_2")), ("fuse", (("linear_1", "act"),))),
           notes="the DeepStack mergers (LayerNorm over the pixel-shuffled row, Linear -> GELU -> Linear)"),
    Family("MiniCPM-o OCR", "minicpm_ocr", ("MiniCPMOcrDownsampleMLP",), "norm+mlp", _MINICPM_MLP,
           notes="the merger's downsample MLPs (LayerNorm over the 2x2-merged row); the per-image merge stays PyTorch"),
    Family("MiniCPM-V 4.6", "minicpmv4_6", ("MiniCPMV4_6DownsampleMLP",), "norm+mlp", _MINICPM_MLP),
    Family("MiniCPM-V 4.7", "minicpmv4_7", ("MiniCPMV4_7DownsampleMLP",), "norm+mlp", _MINICPM_MLP),
    Family("Cosmos 3 Edge", "cosmos3_edge", ("Cosmos3EdgePatchMerger",), "merged mlp", _QWEN3_MERGER,
           notes="LayerNorm per token and the 2x2 merge read in the first GEMM"),
    Family("dots.3 note", "dots3_note", ("Dots3NoteVisionMerger",), "merged mlp", _QWEN_MERGER,
           notes="LayerNorm per token and the 2x2 merge read in the first GEMM"),
    Family("ModernVBERT", "modernvbert", ("ModernVBertConnector",), "merged mlp",
           (("linears", ("modality_projection",)), ("merge", "pixel_shuffle_factor")),
           notes="pixel shuffle read in the Linear's loads (no copy)"),
    Family("UltraVBERT", "ultravbert", ("UltraVBertConnector",), "merge+mlp", (("linears", ("modality_projection",)),),
           notes="pixel shuffle, Linear, RMSNorm after it (the shuffle and the norm stay PyTorch)"),
    Family("Ernie-4.5-VL", "ernie4_5_vl_moe",
           ("Ernie4_5_VLMoeVariableResolutionResamplerModel", "Ernie4_5_VL_MoeVariableResolutionResamplerModel"),
           "merge+mlp", (("linears", ("spatial_linear.fc1", "spatial_linear.fc2", "temporal_linear.fc1",
                                      "temporal_linear.fc2", "mlp")),
                         ("fuse", (("spatial_linear.fc1", "spatial_linear.act_fn"),
                                   ("temporal_linear.fc1", "temporal_linear.act_fn")))),
           notes="2x2 merge, spatial MLP, temporal slicing (index_select), temporal MLP, Linear; the LayerNorms, "
           "the slicing and the final RMSNorm stay PyTorch (also the deprecated alias class)"),
    Family("Molmo2", "molmo2", ("Molmo2ImageProjectorMLP",), "gated mlp", _SEPARATE_GATE,
           notes="SwiGLU (separate gate / up); the adapter's attention pooling is not covered"),
    Family("Nemotron Omni", "nemotron_h_omni", ("NemotronH_Omni_Reasoning_V3MultiModalProjector",), "merged mlp",
           (("linears", ("linear_1", "linear_2")), ("act", "act"), ("norm", "layer_norm"), ("merge", "view")),
           notes="RMSNorm read in the first GEMM's loads (one token per row), squared ReLU in its epilogue"),
    Family("GLM-5-Next", "glm5_next", ("Glm5NextVisionPatchMerger",), "gemm swap",
           (("linears", ("proj", "gate_proj", "up_proj", "down_proj")),),
           notes="SwiGLU with gate.clamp(max=limit) and up.clamp(+-limit) before the product (not gated_mlp's "
           "epilogue): four GEMMs; LayerNorm + GELU, clamps and the product stay PyTorch"),
    Family("Florence-2", "florence2", ("Florence2MultiModalProjector",), "gemm swap",
           (("linears", ("image_projection",)),),
           notes="the bias-free projection Linear; the position embeddings, spatial / temporal mean pools and "
           "the LayerNorm after it stay PyTorch"),
    Family("HunYuan-VL", "hunyuan_vl", ("HunYuanVLVisionPatchMerger",), "gemm swap",
           (("convs", ("proj_conv", "proj_out")), ("linears", ("mlp",))),
           notes="Conv2d(k=s=merge) and the 1x1 Conv2d as patch GEMMs, then the Linear; RMSNorms, the activation "
           "between the convs, the newline / begin / end tokens stay PyTorch"),
    Family("HY-V4-VL", "hy_v4_vl", ("HYV4VLVisionPatchMerger",), "gemm swap", (("convs", ("proj_conv", "proj_out")),),
           notes="HunYuan-VL's merger without its Linear (each frame merged on its own): Conv2d(k=s=merge) and the "
           "1x1 Conv2d as patch GEMMs; the RMSNorm, the activation between the convs and the newline token stay "
           "PyTorch"),
    Family("Aria", "aria", ("AriaCrossAttention",), "gemm swap",
           (("linears", ("q_proj", "k_proj", "v_proj", "linear")),),
           notes="the four Linears around nn.MultiheadAttention; the LayerNorms and nn.MultiheadAttention (its packed "
           "in-projection, attention and out-projection) stay PyTorch"),
    _window_merger("MiniCPM-o OCR", "minicpm_ocr", "MiniCPMOcrViTWindowAttentionMerger"),
    _window_merger("MiniCPM-V 4.6", "minicpmv4_6", "MiniCPMV4_6ViTWindowAttentionMerger"),
    _window_merger("MiniCPM-V 4.7", "minicpmv4_7", "MiniCPMV4_7ViTWindowAttentionMerger"),
    Family("X-CLIP", "x_clip", ("XCLIPCrossAttention",), "gemm swap",
           (("linears", ("q_proj", "k_proj", "v_proj", "proj")),),
           notes="the video prompt generator's cross-attention: the four Linears; the attention stays PyTorch"),
    # patch embeddings
    Family("Qwen2-VL", "qwen2_vl", ("PatchEmbed",), "patch embed (pre-cut rows)", notes=_CONV3D_NOTE),
    Family("Qwen2.5-VL", "qwen2_5_vl", ("Qwen2_5_VisionPatchEmbed",), "patch embed (pre-cut rows)", notes=_CONV3D_NOTE),
    Family("Qwen2.5-Omni", "qwen2_5_omni", ("Qwen2_5_VisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("Qwen3-VL", "qwen3_vl", ("Qwen3VLVisionPatchEmbed",), "patch embed (pre-cut rows)", notes=_CONV3D_NOTE),
    Family("Qwen3-VL-MoE", "qwen3_vl_moe", ("Qwen3VLMoeVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("Qwen3.5", "qwen3_5", ("Qwen3_5VisionPatchEmbed",), "patch embed (pre-cut rows)", notes=_CONV3D_NOTE),
    Family("Qwen3.5-MoE", "qwen3_5_moe", ("Qwen3_5MoeVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("Qwen3-Omni-MoE", "qwen3_omni_moe", ("Qwen3OmniMoeVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("GLM-4V", "glm4v", ("Glm4vVisionPatchEmbed",), "patch embed (pre-cut rows)", notes=_CONV3D_NOTE),
    Family("GLM-4V-MoE", "glm4v_moe", ("Glm4vMoeVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("GLM-OCR", "glm_ocr", ("GlmOcrVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("GLM-5-Next", "glm5_next", ("Glm5NextVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("Cohere Compass", "cohere_compass", ("CohereCompassVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("Qwen4-Exp", "qwen4_exp", ("Qwen4ExpVisionPatchEmbed",), "patch embed (pre-cut rows)"),
    Family("EXAONE 4.5", "exaone4_5", ("Exaone4_5_PatchEmbed",), "patch embed (pre-cut rows)"),
    Family("CLIP", "clip", ("CLIPVisionEmbeddings",), "vision embeddings", _CLIP,
           notes="the vision tower of LLaVA, LLaVA-NeXT, VipLLaVA, Video-LLaVA"),
    Family("AltCLIP", "altclip", ("AltCLIPVisionEmbeddings",), "vision embeddings", _CLIP),
    Family("MetaCLIP 2", "metaclip_2", ("MetaClip2VisionEmbeddings",), "vision embeddings", _CLIP),
    Family("Chinese-CLIP", "chinese_clip", ("ChineseCLIPVisionEmbeddings",), "vision embeddings", _CLIP),
    Family("X-CLIP", "x_clip", ("XCLIPVisionEmbeddings",), "vision embeddings", _CLIP),
    Family("Kosmos-2", "kosmos2", ("Kosmos2VisionEmbeddings",), "vision embeddings", _CLIP),
    Family("BridgeTower", "bridgetower", ("BridgeTowerVisionEmbeddings",), "vision embeddings", _CLIP),
    Family("Granite-Docling", "granite_docling", ("GraniteDoclingVisionEmbeddings",), "vision embeddings",
           (("layout", "siglip"),)),
    Family("SigLIP", "siglip", ("SiglipVisionEmbeddings",), "vision embeddings", (("layout", "siglip"),),
           notes="the vision tower of PaliGemma, LLaVA-OneVision, Idefics-style models built on SigLIP"),
    Family("Idefics2", "idefics2", ("Idefics2VisionEmbeddings",), "patch embed (conv swap)",
           (("convs", ("patch_embedding",)),), notes="bucketed position ids per image stay PyTorch"),
    Family("Idefics3", "idefics3", ("Idefics3VisionEmbeddings",), "patch embed (conv swap)",
           (("convs", ("patch_embedding",)),), notes="bucketed position ids per image stay PyTorch"),
    Family("SmolVLM", "smolvlm", ("SmolVLMVisionEmbeddings",), "patch embed (conv swap)",
           (("convs", ("patch_embedding",)),), notes="bucketed position ids per image stay PyTorch"),
    Family("InternVL", "internvl", ("InternVLVisionPatchEmbeddings",), "patch embed (conv swap)",
           (("convs", ("projection",)),)),
    Family("BLIP-2", "blip_2", ("Blip2VisionEmbeddings",), "patch embed (conv swap)",
           (("convs", ("patch_embedding",)),), notes="class token and position table stay PyTorch"),
    Family("BLIP", "blip", ("BlipVisionEmbeddings",), "patch embed (conv swap)", (("convs", ("patch_embedding",)),)),
    Family("Qianfan-OCR", "qianfan_ocr", ("QianfanOCRVisionPatchEmbeddings",), "patch embed (conv swap)",
           (("convs", ("projection",)),)),
    Family("InstructBLIP", "instructblip", ("InstructBlipVisionEmbeddings",), "patch embed (conv swap)",
           (("convs", ("patch_embedding",)),)),
    Family("InstructBLIP-Video", "instructblipvideo", ("InstructBlipVideoVisionEmbeddings",),
           "patch embed (conv swap)", (("convs", ("patch_embedding",)),)),
    Family("SigLIP 2", "siglip2", ("Siglip2VisionEmbeddings",), "patch embed (linear on patches)",
           (("linears", ("patch_embedding",)),), notes="NaFlex: the processor cuts the patches"),
    # examined in a second pass (issue 11's follow-up): Conv(k=s) swapped, the rest the original's code
    _conv_swap("AIMv2", "aimv2", "Aimv2VisionEmbeddings", "patch_embed",
               "RMSNorm after the patchify and the (sinusoidal or learned) position add stay PyTorch"),
    _conv_swap("CLIPSeg", "clipseg", "CLIPSegVisionEmbeddings", "patch_embedding",
               "CLIP-like, but interpolates positions by default: class token and position add stay PyTorch"),
    _conv_swap("Janus", "janus", "JanusVisionEmbeddings", "patch_embedding", "position add stays PyTorch"),
    _conv_swap("Ovis2", "ovis2", "Ovis2VisionEmbeddings", "patch_embedding",
               "RMSNorm and position add stay PyTorch"),
    _conv_swap("OWL-ViT", "owlvit", "OwlViTVisionEmbeddings", "patch_embedding",
               "class token and position add stay PyTorch"),
    _conv_swap("OWLv2", "owlv2", "Owlv2VisionEmbeddings", "patch_embedding",
               "class token and position add stay PyTorch"),
    _conv_swap("Step3.7", "step3p7", "Step3p7VisionEmbeddings", "patch_embedding", "position add stays PyTorch"),
    _conv_swap("MiniCPM-o OCR", "minicpm_ocr", "MiniCPMOcrVisionEmbeddings", "patch_embedding", _NEAREST_POS),
    _conv_swap("MiniCPM-V 4.6", "minicpmv4_6", "MiniCPMV4_6VisionEmbeddings", "patch_embedding", _NEAREST_POS),
    _conv_swap("MiniCPM-V 4.7", "minicpmv4_7", "MiniCPMV4_7VisionEmbeddings", "patch_embedding", _NEAREST_POS),
    _conv_swap("GOT-OCR2", "got_ocr2", "GotOcr2PatchEmbeddings", "projection", "SAM-style ViT stem (NHWC out)"),
    _conv_swap("PP-FormulaNet", "pp_formulanet", "PPFormulaNetPatchEmbeddings", "projection",
               "SAM-style ViT stem (NHWC out)"),
    _conv_swap("DeepSeek-OCR 2", "deepseek_ocr2", "DeepseekOcr2SamPatchEmbeddings", "projection",
               "SAM-style ViT stem (NHWC out)"),
    _conv_swap("Unlimited-OCR", "unlimited_ocr", "UnlimitedOcrSamPatchEmbeddings", "projection",
               "SAM-style ViT stem (NHWC out)"),
    _conv_swap("TIPSv2", "tipsv2", "Tipsv2VisionPatchEmbeddings", "projection"),
    _conv_swap("GroupViT", "groupvit", "GroupViTPatchEmbeddings", "projection"),
    _conv_swap("dots.3 note", "dots3_note", "Dots3NoteVisionPatchEmbed", "proj",
               "Conv2d(k=s) on pre-cut patch rows; the RMSNorm after it stays PyTorch"),
    _conv_swap("GLM-Image", "glm_image", "GlmImageVisionPatchEmbed", "proj", "Conv2d(k=s) on pre-cut patch rows"),
    _conv_swap("Kimi K2.5", "kimi_k25", "Kimi_K25VisionPatchEmbed", "proj",
               "Conv2d(k=s) on pre-cut patch rows; the position embedding stays PyTorch"),
    _conv_swap("HunYuan-VL", "hunyuan_vl", "HunYuanVLVisionPatchEmbed", "patch_embedding",
               "Conv2d(k=s) on pre-cut patch rows; the per-image interpolated position table stays PyTorch"),
    _conv_swap("HY-V4-VL", "hy_v4_vl", "HYV4VLVisionPatchEmbed", "patch_embedding",
               "Conv2d(k=s) on pre-cut patch rows; the per-image interpolated position table stays PyTorch"),
    _conv_swap("PaddleOCR-VL", "paddleocr_vl", "PaddleOCRVisionEmbeddings", "patch_embedding",
               "Conv2d(k=s) on pre-cut patch rows; the per-image interpolated position table (a weighted "
               "gather) stays PyTorch"),
    _conv_swap("VideoLLaMA3", "video_llama_3", "VideoLlama3VisionEmbeddings", "patch_embedding",
               "Conv2d(k=s) on pre-cut patch rows, nothing else"),
    Family("MiniMax-M3-VL", "minimax_m3_vl", ("MiniMaxM3VLVisionEmbeddings",), "patch embed (pre-cut rows)",
           notes=_CONV3D_NOTE),
    Family("Llama 4", "llama4", ("Llama4UnfoldConvolution",), "patch embed (unfold + linear)",
           (("unfold", "unfold"), ("linear", "linear"))),
    _linear_patches("Ernie-4.5-VL", "ernie4_5_vl_moe", "Ernie4_5_VLMoePatchEmbed", "proj"),
    _linear_patches("Gemma 4", "gemma4", "Gemma4VisionPatchEmbedder", "input_proj",
                    "the 2(x - 0.5) rescale and the gathered x / y position tables stay PyTorch"),
    _linear_patches("Cosmos 3 Edge", "cosmos3_edge", "Cosmos3EdgeVisionEmbeddings", "patch_embedding",
                    "the per-image resized position table stays PyTorch"),
    _linear_patches("Inkling 2", "inkling2", "Inkling2VisionEmbeddings", "patch_embedding",
                    "the patch reorder, interpolated positions and class-token scatter stay PyTorch"),
    _linear_patches("Kosmos-2.5", "kosmos2_5", "Kosmos2_5VisionEmbeddings", "patch_projection",
                    "row / column embeddings stay PyTorch"),
    _linear_patches("Pix2Struct", "pix2struct", "Pix2StructVisionEmbeddings", "patch_projection",
                    "row / column embeddings stay PyTorch"),
    _linear_patches("Muse Glimmer", "muse_glimmer", "MuseGlimmerVisionPatchEmbedder", "patch_embedding",
                    "interpolated position taps stay PyTorch"),
    _linear_patches("Muse Spark", "muse_spark", "MuseSparkVisionPatchEmbedder", "patch_embedding",
                    "interpolated position taps stay PyTorch"),
    # the vision tower's own MLPs: swapped only by patch(model, vision_tower=True) (opt-in until a
    # GPU run shows the fused epilogue wins at tower sizes)
    _tower_mlp("CLIP", "clip", "CLIPMLP", notes="quick_gelu; also a CLIPModel's text-tower MLPs (the same class)"),
    _tower_mlp("SigLIP", "siglip", "SiglipMLP",
               notes="gelu_tanh; also a SiglipModel's text-tower MLPs (the same class)"),
    _tower_mlp("SigLIP 2", "siglip2", "Siglip2MLP", notes="gelu_tanh; also a Siglip2Model's text-tower MLPs"),
    _tower_mlp("Idefics2", "idefics2", "Idefics2VisionMLP"),
    _tower_mlp("Idefics3", "idefics3", "Idefics3VisionMLP"),
    _tower_mlp("SmolVLM", "smolvlm", "SmolVLMVisionMLP"),
    _tower_mlp("InternVL (InternViT)", "internvl", "InternVLVisionMLP"),
    _tower_mlp("Qwen2-VL", "qwen2_vl", "VisionMlp", act="act", notes="quick_gelu"),
    _tower_mlp("Qwen3-VL", "qwen3_vl", "Qwen3VLVisionMLP", linears=("linear_fc1", "linear_fc2"), act="act_fn"),
    _tower_mlp("Llama 4", "llama4", "Llama4VisionMLP", notes="nn.GELU (erf)"),
    _tower_mlp("PaddleOCR-VL", "paddleocr_vl", "PaddleOCRVisionMLP"),
    _tower_mlp("VideoLLaMA3", "video_llama_3", "VideoLlama3VisionMLP"),
    _tower_mlp("HunYuan-VL", "hunyuan_vl", "HunYuanVLVisionMLP"),
    _tower_mlp("HY-V4-VL", "hy_v4_vl", "HYV4VLVisionMLP"),
    _tower_gated("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLMLP", notes="SwiGLU (separate gate / up, with biases)"),
    _tower_gated("Pixtral", "pixtral", "PixtralMLP", notes="SwiGLU (separate gate / up)"),
    _tower_gated("GLM-4V", "glm4v", "Glm4VisionMlp", notes="SwiGLU (separate gate / up)"),
    # session 12: the rest of the tower MLPs the tower enumeration finds (tests/test_registry.py)
    *[_tower_mlp(name, mod, cls) for name, mod, cls in (
        ("AltCLIP", "altclip", "AltCLIPMLP"), ("Chinese-CLIP", "chinese_clip", "ChineseCLIPVisionMLP"),
        ("CLIPSeg", "clipseg", "CLIPSegMLP"), ("Florence-2", "florence2", "Florence2VisionMLP"),
        ("GIT", "git", "GitVisionMLP"), ("GLM-Image", "glm_image", "GlmImageVisionMLP"),
        ("Granite-Docling", "granite_docling", "GraniteDoclingVisionMLP"), ("GroupViT", "groupvit", "GroupViTMLP"),
        ("Inkling 2", "inkling2", "Inkling2VisionMLP"), ("Janus", "janus", "JanusVisionMLP"),
        ("Kosmos-2", "kosmos2", "Kosmos2VisionMLP"), ("MetaCLIP 2", "metaclip_2", "MetaClip2MLP"),
        ("MiniCPM-o OCR", "minicpm_ocr", "MiniCPMOcrVisionMLP"),
        ("MiniCPM-V 4.6", "minicpmv4_6", "MiniCPMV4_6VisionMLP"),
        ("MiniCPM-V 4.7", "minicpmv4_7", "MiniCPMV4_7VisionMLP"),
        ("MiniMax-M3-VL", "minimax_m3_vl", "MiniMaxM3VLVisionMLP"), ("Mllama", "mllama", "MllamaVisionMLP"),
        ("Molmo2", "molmo2", "Molmo2VisionMLP"), ("OWL-ViT", "owlvit", "OwlViTMLP"),
        ("Phi-4 multimodal", "phi4_multimodal", "Phi4MultimodalVisionMLP"),
        ("Qianfan-OCR", "qianfan_ocr", "QianfanOCRVisionMLP"), ("Step3p7", "step3p7", "Step3p7VisionMLP"),
        ("TIPSv2", "tipsv2", "Tipsv2VisionMLP"), ("X-CLIP", "x_clip", "XCLIPMLP"))],
    _tower_mlp("GroupViT", "groupvit", "GroupViTMixerMLP", notes="the token-mixing MLP: its own transposes stay"),
    *[_tower_mlp(name, mod, cls) for name, mod, cls in (
        ("BLIP", "blip", "BlipMLP"), ("BLIP-2", "blip_2", "Blip2MLP"),
        ("InstructBLIP", "instructblip", "InstructBlipMLP"),
        ("InstructBLIP-Video", "instructblipvideo", "InstructBlipVideoMLP"), ("OWLv2", "owlv2", "Owlv2MLP"),
        ("Cosmos 3 Edge", "cosmos3_edge", "Cosmos3EdgeMLP"), ("Unlimited-OCR", "unlimited_ocr", "UnlimitedOcrMLP"),
        ("VideoPrism", "videoprism", "VideoPrismMLP"))],
    *[_tower_mlp(name, mod, cls, linears=("lin1", "lin2"), act="act", notes="the SAM encoder's MLP block")
      for name, mod, cls in (
        ("DeepSeek-OCR 2", "deepseek_ocr2", "DeepseekOcr2SamMLPBlock"), ("GOT-OCR2", "got_ocr2", "GotOcr2MLPBlock"),
        ("PP-FormulaNet", "pp_formulanet", "PPFormulaNetMLPBlock"),
        ("Unlimited-OCR", "unlimited_ocr", "UnlimitedOcrSamMLPBlock"))],
    *[_tower_mlp(name, mod, cls, linears=("linear_fc1", "linear_fc2"), act="act_fn") for name, mod, cls in (
        ("Qwen3.5", "qwen3_5", "Qwen3_5VisionMLP"), ("Qwen3.5-MoE", "qwen3_5_moe", "Qwen3_5MoeVisionMLP"),
        ("Qwen3-Omni-MoE", "qwen3_omni_moe", "Qwen3OmniMoeVisionMLP"),
        ("Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeVisionMLP"), ("Qwen4-Exp", "qwen4_exp", "Qwen4ExpVisionMLP"),
        ("Cohere Compass", "cohere_compass", "CohereCompassVisionMLP"))],
    *[_tower_mlp(name, mod, cls, act="act") for name, mod, cls in (
        ("Ernie-4.5-VL", "ernie4_5_vl_moe", "Ernie4_5VLVisionMLP"), ("Kimi K2.5", "kimi_k25", "Kimi_K25VisionMLP"),
        ("Muse Glimmer", "muse_glimmer", "MuseGlimmerVisionMLP"), ("Muse Spark", "muse_spark", "MuseSparkVisionMLP"))],
    *[_tower_mlp(name, mod, cls, linears=("wi_0", "wi_1", "wo"), act="act", recipe="gemm swap",
                 notes="T5-style gated GELU: wi_0's activation in its epilogue; the product, dropout and wo's "
                 "dtype guard stay the original's") for name, mod, cls in (
        ("Kosmos-2.5", "kosmos2_5", "Kosmos2_5VisionMlp"), ("Pix2Struct", "pix2struct", "Pix2StructVisionMlp"))],
    *[_tower_gated(name, mod, cls) for name, mod, cls in (
        ("DeepSeek-OCR 2", "deepseek_ocr2", "DeepseekOcr2VisionMLP"),
        ("dots.3 note", "dots3_note", "Dots3NoteVisionMLP"),
        ("GLM-OCR", "glm_ocr", "GlmOcrVisionMlp"), ("Ovis2", "ovis2", "Ovis2VisionMLP"),
        ("TIPSv2", "tipsv2", "Tipsv2VisionSwiGLUFFN"), ("GLM-4V-MoE", "glm4v_moe", "Glm4vMoeisionMlp"),
        ("Ovis2", "ovis2", "Ovis2MLP"), ("PE Video", "pe_video", "PeVideoEncoderMLP"),
        ("Qwen2.5-Omni", "qwen2_5_omni", "Qwen2_5OmniMLP"))],
    _tower_gated("AIMv2", "aimv2", "Aimv2MLP", notes="SwiGLU; also an Aimv2Model's text-tower MLPs (the same class)"),
    Family("LFM3-VL", "lfm3_vl", ("Lfm3VlVisionMLP",), "gated mlp", (("gated", ("w1", "w3", "w2", None)),
           ("fixed_act", "silu")), notes="SwiGLU with F.silu written in its forward", tower=True),
    Family("GLM-5-Next", "glm5_next", ("Glm5NextVisionMLP",), "gemm swap",
           (("linears", ("gate_proj", "up_proj", "down_proj")),),
           notes="SwiGLU with clamps between the GEMMs and the activation: the three GEMMs (with "
           "MMFUSE_PLAIN_GEMMS=mmfuse; nothing to fuse), the clamps, "
           "SiLU and product stay the original's", tower=True),
    # cross-attention
    Family("Idefics2", "idefics2", ("Idefics2PerceiverAttention",), "cross-attention",
           (("dropin", "mmfuse.nn.attention.Idefics2PerceiverAttention"),),
           notes="the perceiver resampler's attention (keys = context + latents)"),
    *[Family(name, mod, (cls,), "cross-attention", (("dropin", "mmfuse.nn.attention.QFormerAttention"),),
             notes="the Q-Former's self- and cross-attention (Q/K/V projections and the attention; its output "
             "projection is the layer's own module); the class's own forward runs with attention dropout in "
             "training (the checkpoints' 0.1), attention weights asked for, or a mask not one row per sample")
      for name, mod, cls in (("BLIP-2", "blip_2", "Blip2QFormerMultiHeadAttention"),
                             ("InstructBLIP", "instructblip", "InstructBlipQFormerMultiHeadAttention"),
                             ("InstructBLIP-Video", "instructblipvideo", "InstructBlipVideoQFormerMultiHeadAttention"))],
]


def family_for(module: nn.Module, vision_tower: bool = False) -> Family | None:
    return next((f for f in FAMILIES if (vision_tower or not f.tower) and f.matches(module)), None)


def build(module: nn.Module, family: Family) -> nn.Module:
    return RECIPES[family.recipe].build(module, family)


def is_model_level(family: Family) -> bool:
    """A model's copy (``patch`` goes on into its children), not a leaf replacement."""
    return RECIPES[family.recipe].kind == MODEL_MERGE


def declined_reason(module: nn.Module, vision_tower: bool = False) -> str | None:
    """Why the registry leaves this transformers class alone, or None if it is not listed (tower MLPs
    only with ``vision_tower``: without it no tower MLP is swapped)."""
    cls = type(module)
    parts = cls.__module__.split(".")
    if len(parts) < 3 or parts[:2] != ["transformers", "models"]:
        return None
    key = (parts[2], cls.__name__)
    tower = TOWER_DECLINED.get(key) if vision_tower else None
    # (the language model's and speech heads' MLPs are not tower candidates: no report line per layer)
    return DECLINED.get(key) or (tower if tower not in _NOT_THE_TOWER else None)


# ----------------------------------------------------------------------------------------------
# Recognised but not replaced (the enumeration test requires every projector-like class to be in
# FAMILIES or here)
# ----------------------------------------------------------------------------------------------
_TOWER = "vision-tower internals, not a projector (issue 12's opt-in tower swapping)"
_AUDIO = "not a vision module"
_WRAPPER = "a container whose GEMMs sit in covered (or declined) child classes"
_OVERLAP = "overlapping or padded patches (kernel != stride): not a GEMM"
_MINICPM_MERGER = ("a container: per image, view / permute 2x2 merges between its downsample MLPs "
                   "(DownsampleMLP: LayerNorm + Linear -> GELU -> Linear), which are replaced")
_SAM_NECK = ("the SAM encoder's neck: two 3x3 stride-2 padded convolutions (after a bilinear resize in DeepSeek-VL's): "
             "overlapping windows, not a patch GEMM")
DECLINED: dict[tuple[str, str], str] = {
    # cross-attention / Q-Former
    ("blip_2", "Blip2QFormerAttention"): _WRAPPER,
    ("instructblip", "InstructBlipQFormerAttention"): _WRAPPER,
    ("instructblipvideo", "InstructBlipVideoQFormerAttention"): _WRAPPER,
    ("idefics2", "Idefics2PerceiverResampler"): "its Idefics2PerceiverAttention layers are replaced",
    ("idefics2", "Idefics2Connector"): "a container: its gated MLPs (Idefics2MLP) and perceiver attention are replaced",
    ("mllama", "MllamaTextCrossAttention"): "language-model cross-attention with a KV cache, not a projector",
    ("mllama", "MllamaCrossAttentionDecoderLayer"): "language-model layer, not a projector",
    ("bridgetower", "BridgeTowerCrossAttention"): "language-model cross-attention, not a projector",
    ("groupvit", "GroupViTCrossAttentionLayer"): "grouping block inside the vision tower",
    ("pix2struct", "Pix2StructTextLayerCrossAttention"): "decoder cross-attention, not a projector",
    # patch embeddings that are more than a patchify
    ("sam3", "Sam3ViTPatchEmbeddings"): "a bias-free Conv2d(k=s) that the conv swap would fit, but transformers "
    "declares modeling_sam3 as needing torchvision (its lazy import refuses without it), which mmfuse's test "
    "environment lacks: untestable here, so left alone",
    ("glm4v", "Glm4vVisionEmbeddings"): "position table interpolated per image (grid_sample), no patchify",
    ("glm4v_moe", "Glm4vMoeVisionEmbeddings"): "position table interpolated per image (grid_sample), no patchify",
    ("glm_image", "GlmImageVisionEmbeddings"): "position table interpolated per image (grid_sample), no patchify",
    ("align", "AlignVisionEmbeddings"): "EfficientNet stem: ZeroPad2d, a 3x3 stride-2 Conv2d (kernel != stride: "
    "overlapping windows), BatchNorm and an activation; not a patch GEMM",
    ("aria", "AriaProjector"): "a container: learnable queries into its AriaCrossAttention, LayerNorm, then its "
    "AriaProjectorMLP; both are replaced",
    ("dots3_note", "Dots3NoteAudioAdapter"): _AUDIO,
    ("got_ocr2", "GotOcr2MultiModalProjector"): "two 3x3 stride-2 padded convolutions before its Linear: "
    "overlapping windows, not a patch GEMM (only the last Linear could run on mmfuse)",
    ("granite_docling", "GraniteDoclingConnectorPath"): "a container holding covered GraniteDoclingDeepStackMerger "
    "layers: patch swaps the outermost match only, so swapping this class would leave those mergers PyTorch; its "
    "pixel-shuffle projection (one bias-free Linear) and the position add stay PyTorch",
    ("granite_docling", "GraniteDoclingConnector"): "a container over GraniteDoclingConnectorPath (coarse / fine) "
    "whose DeepStack mergers are replaced (an outer swap would hide them); its LayerNorms, GELU and the bias-free "
    "mlp_fc2 Linear stay PyTorch",
    ("groupvit", "GroupViTVisionEmbeddings"): "a container: its GroupViTPatchEmbeddings is replaced; the LayerNorm "
    "and the position add stay PyTorch",
    ("internvl", "InternVLVisionEmbeddings"): "a container: its InternVLVisionPatchEmbeddings is replaced; "
    "the class token, mask token and position add stay PyTorch",
    ("deepseek_vl_hybrid", "DeepseekVLSamVisionProj"): _SAM_NECK,
    ("deepseek_ocr2", "DeepseekOcr2SamVisionProj"): _SAM_NECK,
    ("unlimited_ocr", "UnlimitedOcrSamVisionProj"): _SAM_NECK,
    ("florence2", "Florence2VisionConvEmbed"): "a DaViT stage's convolutional embedding: kernel 7 stride 4, then "
    "kernel 3 stride 2, padded (the published configs' patch_size / patch_stride / patch_padding): overlapping "
    "windows, not a patch GEMM",
    ("granite4_vision", "Granite4VisionWindowQFormerDownsampler"): "a container: LayerNorm, windowing views, a "
    "Q-Former built by AutoModel from its qformer_config (the BLIP-2 Q-Former's cross-attention is covered by its "
    "own family) and out_linear; patch swaps the outermost match only, so covering this class would hide that "
    "Q-Former: out_linear (one Linear) stays PyTorch",
    ("lighton_ocr", "LightOnOcrPatchMerger"):
        "part of the covered LightOnOcrMultiModalProjector: its merging_layer runs on mmfuse there",
    ("minicpm_ocr", "MiniCPMOcrMerger"): _MINICPM_MERGER,
    ("minicpmv4_6", "MiniCPMV4_6Merger"): _MINICPM_MERGER,
    ("minicpmv4_7", "MiniCPMV4_7Merger"): _MINICPM_MERGER,
    ("mistral3", "Mistral3PatchMerger"):
        "part of the covered Mistral3MultiModalProjector: its merging_layer runs on mmfuse there",
    ("mistral_large4", "MistralLarge4PatchMerger"):
        "part of the covered MistralLarge4MultiModalProjector: its merging_layer runs on mmfuse there",
    ("molmo2", "Molmo2Adapter"): "a container: attention pooling (a masked mean of gathered patches as the "
    "query, Molmo2VisionAttention over those patches with a validity mask; no drop-in for that attention class), "
    "then its Molmo2ImageProjectorMLP, which is replaced",
    ("muse_spark", "MuseSparkAudioPatchEmbedding"): _AUDIO,
    ("pe_video", "PeVideoEncoderPatchEmbedder"): "no patchify: a class token, then a 1-D ResNet block (Conv1d "
    "with kernel 3 over already-embedded frames: overlapping windows, not a patch GEMM)",
    ("pp_formulanet", "PPFormulaNetMultiModalProjector"): "two 3x3 stride-2 padded convolutions before its "
    "Linears: overlapping windows, not a patch GEMM (only the two Linears could run on mmfuse)",
    ("qianfan_ocr", "QianfanOCRVisionEmbeddings"): "a container: its QianfanOCRVisionPatchEmbeddings is replaced",
    ("tipsv2", "Tipsv2VisionEmbeddings"): "a container: its Tipsv2VisionPatchEmbeddings is replaced; the mask, "
    "class and register tokens and the interpolated position add stay PyTorch",
    ("unlimited_ocr", "UnlimitedOcrVisionEmbeddings"): "no patchify and no GEMM: takes the SAM encoder's "
    "feature map as patch embeddings and adds a class token and an interpolated position table",
}


#: Vision-tower MLP-like classes (``tower_mlp_like_classes``) that ``vision_tower=True`` leaves alone.
_LM_MLP = "the language model's MLP, not the vision tower's"
_SPEECH_MLP = "speech generation (talker / code-to-wave), not the vision tower"
_NOT_THE_TOWER = (_LM_MLP, _SPEECH_MLP)
TOWER_DECLINED: dict[tuple[str, str], str] = {
    ("gemma4", "Gemma4VisionMLP"): "its Linears are Gemma4ClippableLinear (input / output clipping around the "
    "matmul), not nn.Linear",
    ("llama4", "Llama4VisionMLP2"): "part of the covered Llama4VisionPixelShuffleMLP (the vision adapter)",
    ("ernie4_5_vl_moe", "Ernie4_5_VLMoeVisionMLP"): "the resampler's spatial / temporal MLP: its Linears run on "
    "mmfuse inside the covered Ernie-4.5-VL resampler",
    ("exaone4_5", "Exaone4_5_MLP"): "one class for the vision blocks and the language model's decoder layers: "
    "vision_tower=True would swap the language model's MLPs too",
    ("idefics3", "Idefics3SimpleMLP"): "the connector's Linear, inside the covered Idefics3Connector",
    ("smolvlm", "SmolVLMSimpleMLP"): "the connector's Linear, inside the covered SmolVLMConnector",
    ("sam3", "Sam3MLP"): "SAM 3's DETR and geometry heads, not a ViT block (and modeling_sam3 needs torchvision)",
    ("sam3", "Sam3DecoderMLP"): "SAM 3's DETR decoder head, not a ViT block (and modeling_sam3 needs torchvision)",
    ("tipsv2", "Tipsv2MLP"): "TIPSv2's text encoder MLP",
    **{key: _SPEECH_MLP for key in (
        ("qwen2_5_omni", "DiTMLP"), ("qwen3_omni_moe", "Qwen3OmniMoeTalkerResizeMLP"),
        ("qwen3_omni_moe", "Qwen3OmniMoeMLP"), ("qwen3_omni_moe", "Qwen3OmniMoeCode2WavMlp"))},
    **{key: _LM_MLP for key in (
        ("aria", "AriaSharedExpertsMLP"), ("cohere_compass", "CohereCompassMLP"),
        ("ernie4_5_vl_moe", "Ernie4_5_VLMoeMLP"),
        ("gemma3", "Gemma3MLP"), ("hunyuan_vl", "HunYuanVLMLP"), ("hy_v4_vl", "HYV4VLMLP"), ("inkling", "InklingMLP"),
        ("minimax_m3_vl", "MiniMaxM3VLDenseMLP"), ("ministral3", "Ministral3MLP"), ("molmo2", "Molmo2MLP"),
        ("paddleocr_vl", "PaddleOCRMLP"), ("qwen2_5_omni", "Qwen2MLP"), ("qwen2_5_vl", "Qwen2MLP"),
        ("qwen2_vl", "Qwen2MLP"), ("qwen3_5", "Qwen3_5MLP"), ("qwen3_5_moe", "Qwen3_5MoeMLP"),
        ("step3p7", "Step3p7MLP"), ("t5gemma2", "T5Gemma2MLP"), ("embedding_gemma2", "EmbeddingGemma2MLP"))},
}


# ----------------------------------------------------------------------------------------------
# What "projector-like" means (tests/test_registry.py enumerates with it)
# ----------------------------------------------------------------------------------------------
#: A vision-language model module: its configuration file has both a vision_config and a text_config.
#: A projector-like class: defined at top level of its modeling file, with a name containing one of
#: these words.
PROJECTOR_WORDS = ("Projector", "Merger", "Connector", "Resampler", "PatchEmbed", "PatchEmbeddings",
                   "PatchEmbedder", "VisionEmbeddings", "Adapter", "QFormer\\w*Attention", "CrossAttention",
                   # other names for the same parts (DeepSeek-VL / Janus, Kimi K2.5, Kosmos-2, Llama 4, Granite 4)
                   "Aligner", "[Mm]odalProjection", "ImageToTextProjection", "UnfoldConvolution", "Downsampler",
                   "VisionProj", "ConvEmbed")

#: Covered classes tested through the sibling they copy: transformers' modular files generate them,
#: and tests/test_registry.py checks that class body == the sibling's up to the class-name prefix.
TESTED_BY_SIBLING = {
    ("instructblip", "InstructBlipQFormerMultiHeadAttention"): ("blip_2", "Blip2QFormerMultiHeadAttention"),
    ("instructblipvideo", "InstructBlipVideoQFormerMultiHeadAttention"): ("blip_2", "Blip2QFormerMultiHeadAttention"),
    ("qwen2_5_omni", "Qwen2_5OmniPatchMerger"): ("qwen2_5_vl", "Qwen2_5_VLPatchMerger"),
    ("qwen2_5_omni", "Qwen2_5_VisionPatchEmbed"): ("qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"),
    ("exaone4_5", "Exaone4_5_PatchMerger"): ("qwen2_5_vl", "Qwen2_5_VLPatchMerger"),
    ("exaone4_5", "Exaone4_5_PatchEmbed"): ("qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"),
    ("qwen3_vl_moe", "Qwen3VLMoeVisionPatchMerger"): ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
    ("qwen3_5_moe", "Qwen3_5MoeVisionPatchMerger"): ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
    ("cohere_compass", "CohereCompassVisionPatchMerger"): ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
    ("qwen4_exp", "Qwen4ExpVisionPatchMerger"): ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
    ("qwen3_vl_moe", "Qwen3VLMoeVisionPatchEmbed"): ("qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("qwen3_5_moe", "Qwen3_5MoeVisionPatchEmbed"): ("qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("qwen3_omni_moe", "Qwen3OmniMoeVisionPatchEmbed"): ("qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("cohere_compass", "CohereCompassVisionPatchEmbed"): ("qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("qwen4_exp", "Qwen4ExpVisionPatchEmbed"): ("qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("glm4v_moe", "Glm4vMoeVisionPatchMerger"): ("glm4v", "Glm4vVisionPatchMerger"),
    ("glm_ocr", "GlmOcrVisionPatchMerger"): ("glm4v", "Glm4vVisionPatchMerger"),
    ("glm4v_moe", "Glm4vMoeVisionPatchEmbed"): ("glm4v", "Glm4vVisionPatchEmbed"),
    ("glm_ocr", "GlmOcrVisionPatchEmbed"): ("glm4v", "Glm4vVisionPatchEmbed"),
    ("glm5_next", "Glm5NextVisionPatchEmbed"): ("glm4v", "Glm4vVisionPatchEmbed"),
    ("mistral_large4", "MistralLarge4MultiModalProjector"): ("mistral3", "Mistral3MultiModalProjector"),
    ("qianfan_ocr", "QianfanOCRMultiModalProjector"): ("internvl", "InternVLMultiModalProjector"),
    ("t5gemma2", "T5Gemma2MultiModalProjector"): ("gemma3", "Gemma3MultiModalProjector"),
    # transformers copies of CLIP's / SigLIP's embeddings
    ("chinese_clip", "ChineseCLIPVisionEmbeddings"): ("clip", "CLIPVisionEmbeddings"),
    ("x_clip", "XCLIPVisionEmbeddings"): ("clip", "CLIPVisionEmbeddings"),
    ("kosmos2", "Kosmos2VisionEmbeddings"): ("clip", "CLIPVisionEmbeddings"),
    ("bridgetower", "BridgeTowerVisionEmbeddings"): ("clip", "CLIPVisionEmbeddings"),
    ("granite_docling", "GraniteDoclingVisionEmbeddings"): ("siglip", "SiglipVisionEmbeddings"),
    ("blip", "BlipVisionEmbeddings"): ("blip_2", "Blip2VisionEmbeddings"),
    ("qianfan_ocr", "QianfanOCRVisionPatchEmbeddings"): ("internvl", "InternVLVisionPatchEmbeddings"),
    ("pp_formulanet", "PPFormulaNetPatchEmbeddings"): ("got_ocr2", "GotOcr2PatchEmbeddings"),
    ("unlimited_ocr", "UnlimitedOcrSamPatchEmbeddings"): ("deepseek_ocr2", "DeepseekOcr2SamPatchEmbeddings"),
    ("owlv2", "Owlv2VisionEmbeddings"): ("owlvit", "OwlViTVisionEmbeddings"),
    ("minicpmv4_6", "MiniCPMV4_6VisionEmbeddings"): ("minicpm_ocr", "MiniCPMOcrVisionEmbeddings"),
    ("minicpmv4_7", "MiniCPMV4_7VisionEmbeddings"): ("minicpm_ocr", "MiniCPMOcrVisionEmbeddings"),
    ("minicpmv4_6", "MiniCPMV4_6DownsampleMLP"): ("minicpm_ocr", "MiniCPMOcrDownsampleMLP"),
    ("minicpmv4_7", "MiniCPMV4_7DownsampleMLP"): ("minicpm_ocr", "MiniCPMOcrDownsampleMLP"),
    ("muse_spark", "MuseSparkVisionAdapter"): ("muse_glimmer", "MuseGlimmerVisionAdapter"),
}
#: Registry entries outside the enumeration's reach (the vision tower lives in a module with no
#: text_config, or the class name carries none of the words). Vision-tower families (``tower=True``)
#: are outside it too: the enumeration is of projector-like classes only.
NOT_ENUMERATED = {("idefics2", "Idefics2PerceiverAttention"), ("idefics2", "Idefics2MLP"),
                  ("minicpm_ocr", "MiniCPMOcrDownsampleMLP"), ("minicpmv4_6", "MiniCPMV4_6DownsampleMLP"),
                  ("minicpmv4_7", "MiniCPMV4_7DownsampleMLP"), ("llama4", "Llama4VisionPixelShuffleMLP")}


#: An MLP-like class: a name with one of these words (and neither "Text" nor "Audio": those are not the
#: vision tower's). Transformers names tower MLPs freely (BlipMLP, Glm4vMoeisionMlp, GotOcr2MLPBlock), so
#: every MLP of a vision-language module is decided: a tower family, or TOWER_DECLINED with the reason
#: (most are the language model's).
TOWER_MLP_WORDS = ("MLP", "Mlp", "FeedForward", "FFN")


def tower_mlp_like_classes() -> list[tuple[str, str]]:
    """(module, class) of every MLP-like class of every vision-language model module of the installed
    transformers (the projector enumeration's modules), read from the source files."""
    found = _classes_named(r"^class (\w*(?:" + "|".join(TOWER_MLP_WORDS) + r")\w*)\(")
    return [(mod, cls) for mod, cls in found if "Text" not in cls and "Audio" not in cls]


def _classes_named(regex: str) -> list[tuple[str, str]]:
    import pathlib
    import re

    import transformers

    pattern = re.compile(regex, re.M)
    found = []
    for d in sorted((pathlib.Path(transformers.__file__).parent / "models").iterdir()):
        config_src = "".join(p.read_text() for p in d.glob("configuration_*.py"))
        if "vision_config" not in config_src or "text_config" not in config_src:
            continue
        for path in sorted(d.glob("modeling_*.py")):
            if path.name.startswith(("modeling_tf_", "modeling_flax_")):  # transformers 4.x: not torch modules
                continue
            found += [(d.name, c) for c in pattern.findall(path.read_text())]
    return found


def projector_like_classes() -> list[tuple[str, str]]:
    """(module, class) of every projector-like class of every vision-language model module of the
    installed transformers, read from the source files (nothing imported)."""
    return _classes_named(r"^class (\w*(?:" + "|".join(PROJECTOR_WORDS) + r")\w*)\(")


# ----------------------------------------------------------------------------------------------
# What users see: `mmfuse models` and the README's supported-models table
# ----------------------------------------------------------------------------------------------
MODELS_START = "<!-- models:start -->"
MODELS_END = "<!-- models:end -->"


def counts(plain: str | None = None) -> dict[str, int]:
    """Accelerated classes of the installed transformers, by kind (projector-like = projector,
    merger, connector, resampler attention; patch embeddings); ``plain``: a ``PLAIN_GEMMS`` setting
    (default: the one in effect)."""
    import pathlib

    try:
        import transformers
        models = pathlib.Path(transformers.__file__).parent / "models"
    except ImportError:  # (an optional dependency) without it, the registry's own count
        models = None
    out = {PROJECTOR: 0, PATCH_EMBED: 0, CROSS_ATTENTION: 0, TOWER_MLP: 0, MODEL_MERGE: 0, NOTHING: 0}
    for fam in FAMILIES:  # a family newer than the installed transformers has no classes to count
        if models is None or (models / fam.module).is_dir():
            kind = TOWER_MLP if fam.tower else RECIPES[fam.recipe].kind
            out[NOTHING if _left_as_pytorch(fam, plain) else kind] += len(fam.classes)
    return out


def _left_as_pytorch(fam: Family, plain: str | None = None) -> bool:
    return (plain or _dispatch.PLAIN_GEMMS) == "pytorch" and plain_gemms_only(fam)


def stays_pytorch(fam: Family) -> str:
    """What of the family's module stays PyTorch: the recipe's answer, or the family's own glue step."""
    if fam.opt("pre"):
        return GATED_PRE[fam.opt("pre")][0]
    return RECIPES[fam.recipe].pytorch


def models_table(plain: str | None = None) -> str:
    """The supported-models table as markdown: family, class, recipe, fused, PyTorch glue, notes;
    then the counts and the declined classes' number (``mmfuse models --declined`` lists them).
    ``plain``: the ``PLAIN_GEMMS`` setting it describes (default: the one in effect)."""
    plain = plain or _dispatch.PLAIN_GEMMS
    lines = ["| family | module class | recipe | fused (mmfuse kernels) | stays PyTorch | notes |",
             "|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        r = RECIPES[fam.recipe]
        cls = ", ".join(f"`{c}`" for c in fam.classes) or "`nn.Sequential(Linear, act, Linear, ...)`"
        notes = "; ".join(filter(None, ["vision tower, opt-in: `patch(model, vision_tower=True)`" if fam.tower
                                        else "", fam.notes]))
        fused, stays = r.fused, stays_pytorch(fam)
        if _left_as_pytorch(fam, plain):
            fused = "nothing (`MMFUSE_PLAIN_GEMMS=mmfuse`: its Linears)"
            stays = "all of it: its Linears have nothing to fuse and run faster as PyTorch's own"
        elif plain == "pytorch" and unfused_linears(fam):
            paths = ", ".join(f"`{p}`" for p in unfused_linears(fam))
            stays = ("" if stays == "nothing" else stays + "; ") + f"{paths} (nothing to fuse)"
        lines.append(f"| {fam.name} | {cls} | {r.name} | {fused} | {stays} | {notes} |")
    c = counts(plain)
    lines += ["", f"Accelerated classes of the installed transformers: **{c[PROJECTOR] + c[CROSS_ATTENTION]} "
              f"projectors / mergers / connectors** ({c[CROSS_ATTENTION]} of them resampler cross-attention) "
              f"and **{c[PATCH_EMBED]} vision patch embeddings**; with `vision_tower=True`, also **{c[TOWER_MLP]} "
              f"vision-tower MLP classes**. {c[MODEL_MERGE]} model classes hand the token merge they run outside "
              f"their projector to its first GEMM. {c[NOTHING]} recognised classes are left as PyTorch, "
              f"their only GEMMs being Linears with nothing to fuse (`MMFUSE_PLAIN_GEMMS`). "
              f"{len(DECLINED)} more projector-like classes and "
              f"{len(TOWER_DECLINED)} tower-MLP-like ones are recognised and left alone, each with its reason "
              "(`mmfuse models --declined`)."]
    return "\n".join(lines)


def declined_table() -> str:
    lines = ["| module | class | why it is left alone |", "|---|---|---|"]
    lines += [f"| {mod} | `{cls}` | {why} |" for (mod, cls), why in sorted(DECLINED.items())]
    lines += [f"| {mod} | `{cls}` | vision tower: {why} |" for (mod, cls), why in sorted(TOWER_DECLINED.items())]
    return "\n".join(lines)


def readme_block() -> str:
    """The README's table describes the default setting, whatever ``MMFUSE_PLAIN_GEMMS`` says here."""
    return f"{MODELS_START}\n{models_table(plain='pytorch')}\n{MODELS_END}"


def rewrite_readme(path: str) -> None:
    """Regenerate the supported-models block of a README in place (``mmfuse models --readme PATH``)."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(MODELS_START), text.index(MODELS_END) + len(MODELS_END)
    with open(path, "w") as f:
        f.write(text[:start] + readme_block() + text[end:])
