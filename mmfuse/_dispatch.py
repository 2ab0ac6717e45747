"""The one place that decides which implementation a call runs.

* CUDA tensors                          -> the compiled Triton kernels ("triton").
* CPU tensors, Triton interpreter on     -> the same Triton kernels, interpreted ("interpreter").
* CPU tensors otherwise                  -> the pure-PyTorch reference ("reference").

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the interpreter is
"on" only if it was set before ``mmfuse.kernels`` was first imported. We read the environment once,
here, at import of ``mmfuse`` (which imports this module before any kernel), and never again.
"""

from __future__ import annotations

import inspect
import os

import torch

TRITON = "triton"
INTERPRETER = "interpreter"
REFERENCE = "reference"


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


#: Whether the Triton kernels were decorated in interpreter mode (decided at import).
INTERPRET: bool = _env_interpret()

if INTERPRET:
    # The interpreter multiplies bf16 dot operands as raw bit patterns (see _interpreter.py).
    from mmfuse._interpreter import install_bf16_dot_fix, install_device_call_fast_path, install_index_fix

    install_bf16_dot_fix()
    install_index_fix()
    install_device_call_fast_path()


#: A GEMM with nothing to fuse into it (a projection with no activation after it; a Linear on pre-cut
#: patches) in the drop-in layers and ``patch``'s swaps: "pytorch" (the default: ``F.linear``, cuBLAS on a
#: GPU) or "mmfuse" (mmfuse's GEMM kernel), from ``MMFUSE_PLAIN_GEMMS`` at import. Measured on an H100
#: (bench/NOTES.md, session 14): PaliGemma's and Florence-2's projections, one such Linear each, ran at
#: 0.17-0.26x of ``F.linear`` through mmfuse (host time per call, and a GEMM slower than cuBLAS at those
#: sizes); with nothing fused into it there is no traffic to win back. The functional API is not affected:
#: ``mmfuse.linear(x, w, b)`` always runs mmfuse's kernel.
PLAIN_GEMMS: str = os.environ.get("MMFUSE_PLAIN_GEMMS", "pytorch")
if PLAIN_GEMMS not in ("pytorch", "mmfuse"):
    raise ValueError(f"MMFUSE_PLAIN_GEMMS: expected 'pytorch' or 'mmfuse', got {PLAIN_GEMMS!r}")


def plain_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a GEMM with nothing fused into it, on the path ``PLAIN_GEMMS``
    names."""
    if PLAIN_GEMMS == "pytorch":
        return torch.nn.functional.linear(x, weight, bias)
    from mmfuse.ops.linear import linear

    return linear(x, weight, bias)


def backend_for(*tensors: torch.Tensor | None) -> str:
    """Which path a call on these tensors takes: ``"triton"``, ``"interpreter"`` or ``"reference"``.

    ``None`` entries are ignored. The device of the first tensor decides (callers check that all
    tensors share one device before asking).
    """
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            return TRITON
        if t.device.type == "cpu":
            return INTERPRETER if INTERPRET else REFERENCE
        return REFERENCE
    return INTERPRETER if INTERPRET else REFERENCE


def uses_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when the call runs Triton code (compiled or interpreted)."""
    return backend_for(*tensors) != REFERENCE


def autocast_inputs(*tensors: torch.Tensor | None) -> list:
    """Cast floating inputs as ``torch.autocast`` casts those of F.linear / conv / SDPA (all in its
    lower-precision list on CPU and CUDA): to the autocast dtype when autocast is on for the device.
    fp64 tensors are left as they are, as autocast leaves them (its casts skip double).
    Our ops are custom operators, which autocast does not see, so each op calls this first."""
    device = next(t for t in tensors if t is not None).device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                for t in tensors]
    return list(tensors)


# ----------------------------------------------------------------------------------------------
# Calling an op: through torch.library, or its implementation directly where nothing can tell
# ----------------------------------------------------------------------------------------------
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op(name, **kwargs)`` that also keeps the undecorated implementation and its
    parameters' defaults, for ``call_op``."""
    def register(fn):
        op = torch.library.custom_op(name, **kwargs)(fn)
        op._mmfuse_impl = fn
        op._mmfuse_defaults = tuple(p.default for p in inspect.signature(fn).parameters.values())
        return op
    return register


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, the pair also kept for
    ``call_op``'s eager autograd path (``_EagerAutograd``)."""
    op.register_autograd(backward, setup_context=setup_context)
    op._mmfuse_autograd = (setup_context, backward)


#: Legacy vmap's batched tensors (``autograd.grad(is_grads_batched=True)``, ``gradcheck(check_batched_grad=
#: True)``, ``jacobian(vectorize=True)``) are plain ``torch.Tensor``s to ``type``: only this tells them apart.
_IS_LEGACY_BATCHED = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)


def _nothing_watches(tensors) -> bool:
    """Plain tensors (no subclass, FakeTensor or DTensor, no legacy-vmap batched tensor), and no tracer,
    compiler, dispatch or function mode, functorch transform or profiler that would want to see the op:
    then calling its implementation (or its autograd formula around it) is indistinguishable from calling
    it. (A kernel registered for an mmfuse op with ``torch.library.register_kernel`` is not consulted on
    these paths.) Batched tensors take the op, whose batching fallback runs it per batch entry."""
    if any(type(t) not in _PLAIN_TENSORS for t in tensors):
        return False
    try:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
                or torch.autograd._profiler_enabled()):
            return False
    except AttributeError:  # (a torch without one of these queries: take the op)
        return False
    # (After the compiler's query: Dynamo cannot trace this one, and while compiling the op is taken anyway.)
    return _IS_LEGACY_BATCHED is None or not any(_IS_LEGACY_BATCHED(t) for t in tensors)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_TENSOR, _TENSORS, _VALUE = 0, 1, 2


def _flatten(values):
    """(tensors, layout) of a sequence of op arguments or outputs, each a tensor, a list or tuple of
    tensors, or another value: the tensors in order, and what puts the sequence back (``_unflatten``).
    None where a list mixes tensors with other values (no op of ours takes one; such a call keeps
    torch.library's path, which flattens any structure)."""
    flat, layout = [], []
    for v in values:
        if isinstance(v, torch.Tensor):
            flat.append(v)
            layout.append((_TENSOR,))
        elif isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
            if not all(isinstance(t, torch.Tensor) for t in v):
                return None
            flat.extend(v)
            layout.append((_TENSORS, type(v), len(v)))
        else:
            layout.append((_VALUE, v))
    return flat, layout


def _unflatten(layout, flat):
    out, i = [], 0
    for entry in layout:
        if entry[0] == _TENSOR:
            out.append(flat[i])
            i += 1
        elif entry[0] == _TENSORS:
            out.append(entry[1](flat[i:i + entry[2]]))
            i += entry[2]
        else:
            out.append(entry[1])
    return out


class _EagerAutograd(torch.autograd.Function):
    """An op's own autograd formula (``register_autograd``'s pair) as a plain ``autograd.Function``
    around its implementation: what torch.library's autograd runs, without its dispatch and argument
    handling, which cost about as much host time as the op's launches (bench/NOTES.md, "Host time,
    session 21"). ``call_op`` takes it only where nothing but autograd watches the call."""

    @staticmethod
    def forward(ctx, op, layout, out_box, *flat):
        args = _unflatten(layout, flat)
        # As torch.library hands it to a formula: one entry per argument of the op (False where it is not
        # a tensor, a list for a list of tensors), not per argument of this Function.
        needs = iter(ctx.needs_input_grad[3:])
        ctx.needs_input_grad = tuple(next(needs) if e[0] == _TENSOR else [next(needs) for _ in range(e[2])]
                                     if e[0] == _TENSORS else False for e in layout)
        out = op._mmfuse_impl(*args)
        setup, _ = op._mmfuse_autograd
        setup(ctx, tuple(args), out)
        flat_out, out_layout = _flatten(out if isinstance(out, tuple) else (out,))
        ctx._mmfuse_eager = (op, layout, out_layout)
        out_box.append((out_layout, isinstance(out, tuple)))
        return tuple(flat_out)

    @staticmethod
    def backward(ctx, *flat_grads):
        op, layout, out_layout = ctx._mmfuse_eager
        arg_grads = op._mmfuse_autograd[1](ctx, *_unflatten(out_layout, flat_grads))
        if not isinstance(arg_grads, tuple):
            arg_grads = (arg_grads,)
        if len(arg_grads) != len(layout):
            raise RuntimeError(f"{op._qualname}: its backward returned {len(arg_grads)} gradients, expected "
                               f"{len(layout)} (one per argument)")
        flat = []
        for entry, g in zip(layout, arg_grads):
            if entry[0] == _TENSOR:
                flat.append(g)
            elif entry[0] == _TENSORS:
                flat.extend(g if g is not None else [None] * entry[2])
        return (None, None, None, *flat)


def call_op(op, *args):
    """``op(*args)`` (an op made by ``custom_op``), or what it would do, with less host time where nothing
    could see the difference (``_nothing_watches``): without an autograd graph to record, its
    implementation called directly; with one, its registered autograd formula run by ``_EagerAutograd``.
    The same kernels and results, without torch.library's dispatch, which costs about a third of an
    inference forward's host time and half of a training forward's (bench/NOTES.md, "Host overhead per
    call" and "Host time, session 21")."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    if not _nothing_watches(tensors):
        return op(*args)
    if not _needs_grad(tensors):
        return op._mmfuse_impl(*args)
    if not hasattr(op, "_mmfuse_autograd"):
        return op(*args)
    defaults = op._mmfuse_defaults[len(args):]  # torch.library hands setup_context every argument
    if any(d is inspect.Parameter.empty for d in defaults):
        return op(*args)  # (an argument missing: the op's own error)
    args = (*args, *defaults)
    flattened = _flatten(args)
    if flattened is None:
        return op(*args)
    flat, layout = flattened
    box = []
    flat_out = _EagerAutograd.apply(op, layout, box, *flat)
    out_layout, is_tuple = box[0]
    out = _unflatten(out_layout, flat_out)
    return tuple(out) if is_tuple else out[0]
