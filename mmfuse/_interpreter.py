"""A fix for Triton's CPU interpreter, applied only when the interpreter is on.

Triton's interpreter stores bfloat16 as uint16 and its ``create_dot`` hands those bit patterns to
``np.matmul`` unconverted (upstream: triton-lang/triton#11584, "bf16 is not supported in the
interpreter yet"), so a bf16 ``tl.dot`` returns garbage. Its cast path already converts bf16 <-> fp32
correctly; this fix routes bf16 dot operands through that cast, so the interpreter computes what the
GPU computes: bf16 products accumulated in fp32. It changes nothing for other dtypes and nothing on a GPU.

Our kernels never do other arithmetic on bf16 values (they convert to fp32 first), which the
interpreter also gets wrong.
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
    _INSTALLED = True
