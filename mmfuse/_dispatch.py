"""The one place that decides which implementation a call runs.

* CUDA tensors                          -> the compiled Triton kernels ("triton").
* CPU tensors, Triton interpreter on     -> the same Triton kernels, interpreted ("interpreter").
* CPU tensors otherwise                  -> the pure-PyTorch reference ("reference").

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the interpreter is
"on" only if it was set before ``mmfuse.kernels`` was first imported. We read the environment once,
here, at import of ``mmfuse`` (which imports this module before any kernel), and never again.
"""

from __future__ import annotations

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
    """``torch.library.custom_op(name, **kwargs)`` that also keeps the undecorated implementation, for
    ``call_op``."""
    def register(fn):
        op = torch.library.custom_op(name, **kwargs)(fn)
        op._mmfuse_impl = fn
        return op
    return register


def _direct_call_is_invisible(tensors) -> bool:
    """True when calling an op's implementation is indistinguishable from calling the op: no autograd
    graph to record, plain tensors (no subclass, FakeTensor or DTensor), and no tracer, compiler,
    dispatch or function mode, functorch transform or profiler that would want to see the op. (A kernel
    registered for an mmfuse op with ``torch.library.register_kernel`` is not consulted on this path.)"""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(type(t) not in _PLAIN_TENSORS for t in tensors):
        return False
    try:
        return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                    or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
                    or torch.autograd._profiler_enabled())
    except AttributeError:  # (a torch without one of these queries: take the op)
        return False


def call_op(op, *args):
    """``op(*args)`` (an op made by ``custom_op``); where no autograd, tracing, compiling or mode could see
    the difference (``_direct_call_is_invisible``), its implementation called directly: the same
    kernels and results without torch.library's dispatch, which costs about a third of an inference
    forward's host time (bench/NOTES.md, "Host overhead per call")."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    if _direct_call_is_invisible(tensors):
        return op._mmfuse_impl(*args)
    return op(*args)
