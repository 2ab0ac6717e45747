"""A TF32 GEMM as a rounding GEMM library computes it, in plain PyTorch: the reference for the kernels'
rounding of fp32 operands to TF32 (kernels/_common.py, ``round_to_tf32`` / ``mma``)."""

import torch


def nearest_tf32_bits(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest (ties away from zero) to 10 mantissa bits, on the sign-magnitude bit pattern in
    int64 (no wrap-around): keep the high bits of the magnitude, add one TF32 unit when the dropped
    13 bits are at least half of it. Inf and NaN keep their bits."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign, mag = bits & 0x80000000, bits & 0x7FFFFFFF
    dropped = mag & 0x1FFF
    rounded = (mag - dropped) + torch.where(dropped >= 0x1000, 0x2000, 0)
    out = torch.where((mag & 0x7F800000) == 0x7F800000, bits, sign | rounded)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each element rounded to the nearest TF32 value (``nearest_tf32_bits``), in t's dtype."""
    return nearest_tf32_bits(t.detach().float().cpu()).view(torch.float32).to(t.device, t.dtype)


class _TF32MatMul(torch.autograd.Function):
    """``a @ b`` as a TF32 GEMM library computes it, forward and backward: every GEMM's operands rounded
    to nearest TF32 (the upstream gradient too), products accumulated in the tensors' own precision."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _tf32(a) @ _tf32(b)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return _tf32(dc) @ _tf32(b).transpose(-1, -2), _tf32(a).transpose(-1, -2) @ _tf32(dc)


def tf32_linear(x, w, b=None):
    y = _TF32MatMul.apply(x, w.t())
    return y + b if b is not None else y


def assert_rounds_like(fn, ref_fn, inputs, names, rel: float = 1e-5, share: float = 0.25):
    """``fn`` (a kernel with its TF32 rounding on) against ``ref_fn`` (whose matmuls are ``tf32_linear``),
    output and every gradient: at most ``share`` of the elements may differ by more than ``rel`` of the
    tensor's scale. Not the error rule: where a GEMM operand is itself computed (a norm, dH = dY W * act'),
    the kernel's fp32 value and the reference's may sit on opposite sides of a TF32 midpoint and round one
    unit apart, and one such element moves a whole output row; a GEMM that left an operand unrounded is off
    nearly everywhere."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dy = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, leaves, dy)]
    rl = [t.detach().requires_grad_() for t in inputs]
    ro = ref_fn(*rl)
    want = [ro, *torch.autograd.grad(ro, rl, dy)]
    for what, g, w in zip(["out", *(f"grad {n}" for n in names)], got, want):
        off = (g.detach() - w.detach()).abs() > rel * w.detach().abs().max().clamp(min=1.0)
        assert off.float().mean().item() <= share, f"{what}: {off.sum().item()} of {off.numel()} elements off"
