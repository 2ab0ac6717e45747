"""What the tests and ``mmfuse verify`` share: the flash-attention error rule and input makers.

The rule: a kernel's error against an fp64 reference may be at most ``MULT`` times the error that
PyTorch's own same-precision reference makes against fp64, plus a rounding floor of a few units in the
last place of the output's scale (so exact references do not demand bit equality).

The floor's scale is the output's own magnitude, unless the output is a sum of terms that cancel: then
it is the magnitude of those terms (``term_scales``). Attention's dQ and dK are such sums
(dS = P (dP - delta)): where they cancel to ~0 (one key, or near one-hot rows at large logits) a
correct kernel still makes ulps of |dP| |K| scale, while PyTorch's reference may happen to round to
exactly 0 on one CPU and not on another (ATen picks a different SIMD path per machine). Without this
the rule's verdict depended on the machine (issue 10).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MULT = 3.0
#: Units in the last place of the output scale allowed on top of MULT * reference error.
FLOOR_ULPS = 4.0


def floor_for(dtype: torch.dtype, scale: float) -> float:
    return FLOOR_ULPS * torch.finfo(dtype).eps * max(scale, 1.0)


@dataclasses.dataclass
class Comparison:
    what: str
    error: float      # max |out - ref64|
    ref_error: float  # max |ref_same_precision - ref64|
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed  # NaN compares False: a poisoned output fails

    def __str__(self) -> str:
        return (f"{self.what}: error {self.error:.3g} > allowed {self.allowed:.3g} "
                f"(reference error {self.ref_error:.3g})") if not self.ok else \
               f"{self.what}: error {self.error:.3g} <= {self.allowed:.3g}"


def compare(what: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
            mult: float = MULT, term_scale: float = 0.0) -> Comparison:
    """Flash-attention rule for one output. ``ref_lowp`` is PyTorch's reference in ``out.dtype``;
    ``term_scale``: the magnitude of the terms the output sums, when they cancel (module docstring)."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if out.numel() == 0:
        return Comparison(what, 0.0, 0.0, 0.0)
    out64, ref_lowp64 = out.detach().double().cpu(), ref_lowp.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    err = (out64 - ref64).abs().max().item()
    if torch.isnan(out64).any():
        err = float("nan")
    ref_err = (ref_lowp64 - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), term_scale)
    return Comparison(what, err, ref_err, mult * ref_err + floor_for(out.dtype, scale))


def assert_close(what, out, ref64, ref_lowp, mult: float = MULT) -> Comparison:
    c = compare(what, out, ref64, ref_lowp, mult)
    assert c.ok, str(c)
    return c


def compare_with_reference(fn, ref_fn, inputs, names, dy=None, mult: float = MULT,
                           term_scales=None) -> list[Comparison]:
    """``fn(*inputs)`` and its gradients w.r.t. every input, against ``ref_fn`` run in fp64 and in the
    inputs' dtype (the flash-attention rule). ``dy`` (the upstream gradient) defaults to randn.
    ``term_scales(inputs, dy) -> {"grad <name>": scale}`` gives the floor's scale of outputs that sum
    cancelling terms (module docstring). Returns one Comparison for the output and one per input,
    named ``"grad <name>"``."""
    # detach() keeps the strides (clone() would make sliced views contiguous): the kernel must see
    # the non-contiguous inputs a test built.
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dy = torch.randn_like(out) if dy is None else dy
    grads = torch.autograd.grad(out, leaves, dy)
    refs = {}
    for dtype in (torch.float64, inputs[0].dtype):
        rl = [t.detach().to(dtype).requires_grad_() for t in inputs]
        ro = ref_fn(*rl)
        refs[dtype] = (ro, torch.autograd.grad(ro, rl, dy.to(dtype)))
    (o64, g64), (olp, glp) = refs[torch.float64], refs[inputs[0].dtype]
    if out.dtype != inputs[0].dtype:
        raise AssertionError(f"out: dtype {out.dtype} != input dtype {inputs[0].dtype}")
    terms = term_scales(inputs, dy) if term_scales is not None else {}
    results = [compare("out", out, o64, olp, mult, terms.get("out", 0.0))]
    results += [compare(f"grad {n}", g, r64, rlp, mult, terms.get(f"grad {n}", 0.0))
                for n, g, r64, rlp in zip(names, grads, g64, glp)]
    return results


def assert_matches_reference(fn, ref_fn, inputs, names, dy=None, mult: float = MULT,
                             term_scales=None) -> list[Comparison]:
    """``compare_with_reference``, failing on the first comparison out of bounds."""
    results = compare_with_reference(fn, ref_fn, inputs, names, dy, mult, term_scales)
    for c in results:
        assert c.ok, str(c)
    return results


class poisoned_outputs:
    """Context manager: every buffer the launchers allocate starts as NaN (-1 for integers)."""

    def __enter__(self):
        from mmfuse.kernels import _common

        self._old = _common.POISON_OUTPUTS
        _common.POISON_OUTPUTS = True
        return self

    def __exit__(self, *exc):
        from mmfuse.kernels import _common

        _common.POISON_OUTPUTS = self._old
        return False


class OpNames(TorchDispatchMode):
    """Records the name (without overload) of every aten op dispatched inside it: what PyTorch itself
    ran around the kernels (no norm pass, no layout copy, no host read)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))
