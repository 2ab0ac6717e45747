"""mmfuse's fixes to Triton's CPU interpreter (mmfuse/_interpreter.py): the device-call fast path changes
speed, not results."""

import pytest
import torch

import mmfuse
from mmfuse import _interpreter
from mmfuse.ops.merged import merged_mlp

pytestmark = pytest.mark.skipif(not mmfuse.INTERPRET, reason="the interpreter's own fixes")


def _run():
    # Kernels that call @triton.jit helpers inside their loops and from other modules (the mapped GEMM's
    # loads, the fused GEMM's gated epilogue, triton.language's tl.sum in the row-wise kernels), forward
    # and backward, in bf16 (the rounding fix on every store).
    torch.manual_seed(0)
    T, C, G = 48, 40, 4
    x = torch.randn(T, C, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(2 * 24, G * C, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(8, 24, dtype=torch.bfloat16, requires_grad=True)
    g, b = torch.ones(G * C, dtype=torch.bfloat16), torch.zeros(G * C, dtype=torch.bfloat16)
    y = merged_mlp(x, [w1, w2], None, "silu", group=G, token_map=torch.randperm(T).view(-1, G), norm="layer",
                   norm_weight=g, norm_bias=b, norm_after_merge=True, gate_half=1)
    return (y, *torch.autograd.grad(y, [x, w1, w2], torch.randn_like(y)))


def test_device_call_fast_path_changes_no_bit(launches):
    assert _interpreter._FAST_CALLS  # installed with the interpreter (mmfuse/_dispatch.py)
    fast = _run()
    assert "mapped_gemm_kernel" in launches and "norm_bwd_kernel" in launches
    _interpreter.fast_calls_enabled = False
    try:
        slow = _run()
    finally:
        _interpreter.fast_calls_enabled = True
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
