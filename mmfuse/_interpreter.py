"""Fixes for Triton's CPU interpreter, applied only when the interpreter is on.

Triton's interpreter stores bfloat16 as uint16 and its ``create_dot`` hands those bit patterns to
``np.matmul`` unconverted (upstream: triton-lang/triton#11584, "bf16 is not supported in the
interpreter yet"), so a bf16 ``tl.dot`` returns garbage. Its cast path already converts bf16 <-> fp32
correctly; this fix routes bf16 dot operands through that cast, so the interpreter computes what the
GPU computes: bf16 products accumulated in fp32. It changes nothing for other dtypes and nothing on a GPU.

Our kernels never do other arithmetic on bf16 values (they convert to fp32 first), which the
interpreter also gets wrong.

The interpreter also *truncates* fp32 -> bf16 in ``.to(tl.bfloat16)`` and in stores (1 + 2^-8 + 2^-10
becomes 1.0) and can turn a NaN into inf, where a GPU (``cvt.rn.bf16.f32``) and torch round to
nearest even. The tests are meant to measure what the GPU computes, so the second fix makes that cast
round to nearest even too (through torch's conversion). Without it an interpreted bf16 result carries
up to one extra ulp per rounding that the GPU does not have.

Triton 3.6's interpreter turns a scalar it holds as a one-element array into a loop bound with
``int(array)``, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"): every kernel whose ``range`` starts or ends at a computed value failed there (all of
``mmfuse verify`` on 3.6 with a current numpy). Triton 3.7 squeezes the array first; the third fix does
the same on 3.6.

Speed, not semantics: a kernel launch patches ``triton.language`` for the interpreter once (and restores
it after the grid), but every call of a ``@triton.jit`` helper from inside the kernel patches it again
(``InterpretedFunction.__call__`` -> ``_patch_lang``: ``inspect.getmembers`` over the language modules,
~1.3 ms a call). Our kernels call helpers inside their loops (the mapped GEMM's loads, the epilogues),
so that re-patching was ~20% of an interpreted run. Inside a launch whose patch already covers every
language module the helper sees, the helper now runs without re-patching: the same patched functions
are in place, so nothing it computes changes (tests/test_interpreter.py compares both ways bitwise).
"""

from __future__ import annotations

_INSTALLED = False


def install_bf16_dot_fix() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    original = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32) if a.dtype.scalar == tl.bfloat16 else a
            b = self.cast_impl(b, tl.float32) if b.dtype.scalar == tl.bfloat16 else b
            out = np.matmul(a.data, b.data, dtype=np.float32) + d.data.astype(np.float32)
            return interp.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            import torch

            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl  # create_fp_trunc and stores call self.cast_impl: they round too
    _INSTALLED = True


def install_index_fix() -> bool:
    """Triton 3.6's tensor ``__index__`` squeezed as 3.7's is (module docstring). Returns whether it was
    installed: only where the interpreter's own ``__index__`` is 3.6's ``int(self.handle.data)``."""
    import inspect

    from triton.runtime import interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mmfuse_index_fix", False):
        return False
    if "int(self.handle.data)" not in inspect.getsource(original):  # (3.7+: already squeezed)
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # set after Triton's own: the scope restores in reverse order, so the original comes back last
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._mmfuse_index_fix = True
    interp._patch_lang_tensor = patch_lang_tensor
    return True


_FAST_CALLS = False
#: Switch for the fast path once installed (tests/test_interpreter.py runs kernels both ways).
fast_calls_enabled = True


def install_device_call_fast_path() -> bool:
    """Skip the redundant re-patching of ``triton.language`` on each helper call inside a launch (module
    docstring). Returns whether it was installed: the interpreter internals it wraps must exist as in
    Triton 3.6-3.9, else nothing changes."""
    global _FAST_CALLS
    if _FAST_CALLS:
        return True
    from triton.runtime import interpreter as interp

    needed = (hasattr(interp, "GridExecutor") and hasattr(interp, "InterpretedFunction")
              and hasattr(interp, "_patch_lang") and hasattr(interp.InterpretedFunction, "rewrite"))
    if not needed:
        return False
    import threading

    local = threading.local()  # per thread: the running launches' (a stack) patched language modules

    def stack():
        if not hasattr(local, "patched"):
            local.patched = []
        return local.patched

    def languages(fn):
        import triton.language as tl

        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    grid_call = interp.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        patched = stack()
        patched.append(languages(self.fn))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.pop()

    device_call = interp.InterpretedFunction.__call__

    def call(self, *args, **kwargs):
        patched = stack()
        langs = languages(self.fn)
        if fast_calls_enabled and patched and langs <= patched[-1]:
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise interp.InterpreterError(repr(e)) from e
        # A helper that sees a module the launch did not patch (triton.language's own tl.sum sees
        # triton.language.core): Triton patches it here and never restores it, so for the rest of this
        # launch it is patched as well.
        result = device_call(self, *args, **kwargs)
        if patched:
            patched[-1] = patched[-1] | langs
        return result

    interp.GridExecutor.__call__ = launch
    interp.InterpretedFunction.__call__ = call
    _FAST_CALLS = True
    return True
