"""fp64 (the gradchecks' dtype) keeps fp64 accuracy when the kernels' scalar arguments arrive as a GPU
passes them: a Python float becomes an fp32 kernel argument on a GPU and in Triton 3.6-3.8's interpreter,
while 3.9's interpreter, which CI runs, keeps it fp64 and so hid an fp64 attention that ran with its
softmax scale rounded to fp32 (~6e-8 relative error, found running the suite on Triton 3.8). Here every
float a launcher passes positionally is rounded to fp32 before the interpreter sees it, and each op that
takes a float scalar is compared with its fp64 reference at fp64's tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmfuse
from mmfuse.kernels._common import fp32_pair
from mmfuse.ops.cross_attention import cross_attention_reference
from mmfuse.ops.merged import merged_mlp_reference

pytestmark = pytest.mark.skipif(not mmfuse.INTERPRET, reason="rounds the interpreter's float arguments")


@pytest.fixture
def floats_as_a_gpu_passes_them(monkeypatch):
    from triton.runtime import interpreter

    real = interpreter.GridExecutor.__call__
    seen = []  # (kernel name, the floats it was passed)

    def call(self, *args, **kwargs):
        # Positional: the launchers pass every runtime scalar so (keyword arguments are constexprs, which a
        # GPU compiles in, not passes).
        rounded = [float(np.float32(a)) if isinstance(a, float) else a for a in args]
        seen.append((self.fn.__name__, [a for a in args if isinstance(a, float)]))
        return real(self, *rounded, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    return seen


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("heads,splits,kernels", [
    ((2, 2), 1, {"attn_fwd_kernel", "attn_bwd_dq_kernel"}),                       # the single-pass backward
    ((2, 2), 3, {"attn_fwd_kernel", "attn_combine_kernel", "attn_bwd_dq_kernel"}),
    ((4, 2), 3, {"attn_fwd_kernel", "attn_combine_kernel", "attn_delta_kernel", "attn_bwd_dkdv_kernel",
                 "attn_bwd_dq_kernel"}),
], ids=["single pass", "split", "grouped heads: dK/dV and dQ apart"])
def test_fp64_cross_attention_keeps_its_scale(floats_as_a_gpu_passes_them, heads, splits, kernels):
    torch.manual_seed(0)
    Hq, Hkv = heads
    q = torch.randn(1, Hq, 9, 24, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, 70, 24, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, 70, 24, dtype=torch.float64, requires_grad=True)
    scale = 0.3  # not an fp32 value, as 24 ** -0.5 is not
    out = mmfuse.cross_attention(q, k, v, scale=scale, _splits=splits)
    want = cross_attention_reference(q, k, v, scale=scale)
    _close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        _close(a, b)
    launched = {name for name, _ in floats_as_a_gpu_passes_them}
    assert launched == kernels, launched
    # every kernel that takes a scale was passed one (rounded here, as a GPU would)
    assert all(floats for name, floats in floats_as_a_gpu_passes_them
               if name not in ("attn_combine_kernel", "attn_delta_kernel"))


def test_scale_pairs_are_fp32_values_summing_to_the_scale():
    for value in (0.3 * 1.4426950408889634, 96 ** -0.5, 1.0, 1e-6, 0.0):
        hi, lo = fp32_pair(value, torch.float64)
        assert float(np.float32(hi)) == hi and float(np.float32(lo)) == lo
        assert abs(hi + lo - value) <= 2 ** -47 * abs(value)
        assert fp32_pair(value, torch.float32) == (hi, 0.0)  # fp32 accumulators: hi alone
    with pytest.raises(ValueError, match="fp32's range"):
        fp32_pair(1e39, torch.float64)


def test_scale_pairs_round_to_fp32_as_ieee_does_at_the_edges():
    # hi is the value rounded to nearest even in fp32 (torch's float64 -> float32 conversion), subnormals,
    # the largest finite value and the infinities included; a finite value that rounds past fp32's range
    # (FLT_MAX plus half an ulp or more) is an error, not inf.
    big = float(np.finfo(np.float32).max)
    edges = [1e-45, 7e-46, 1e-40, -1e-40, 2.0 ** -149, 0.1, -1 / 3, big, -big, 3.4028235677973362e38,
             float("inf"), float("-inf")]
    for value in edges:
        hi, lo = fp32_pair(value, torch.float64)
        assert hi == torch.tensor(value, dtype=torch.float64).float().item(), value
        if math.isfinite(value):
            assert lo == torch.tensor(value - hi, dtype=torch.float64).float().item(), value
    assert math.isnan(fp32_pair(float("nan"), torch.float32)[0])
    for value in (3.4028235677973366e38, 3.40282357e38, -1e39, 1e300):
        with pytest.raises(ValueError, match="fp32's range"):
            fp32_pair(value, torch.float32)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_fp64_norms_keep_their_eps(floats_as_a_gpu_passes_them, norm):
    """The norms' eps (1e-6 is not an fp32 value): tokens whose variance is far below eps have rstd set by
    eps, where an fp32-rounded eps (9.99999997e-07) shows at ~1.5e-9 relative, 15x fp64's tolerance here.
    The merged projector's statistics and Gemma 3's pool-and-norm kernels (forward and backward, with a
    weight offset of 0.3: that scalar is a pair too)."""
    torch.manual_seed(0)
    x = 1e-4 * torch.randn(16, 12, dtype=torch.float64)  # variance ~1e-8: rstd ~ 1 / sqrt(eps)
    w = [torch.randn(8, 48, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    gamma, beta = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    kw = dict(group=4, norm=norm, norm_weight=gamma, norm_bias=beta if norm == "layer" else None, eps=1e-6)
    _close(mmfuse.merged_mlp(x, w, None, "gelu", **kw), merged_mlp_reference(x, w, None, "gelu", **kw))
    table = torch.arange(16, dtype=torch.int32).view(4, 4)
    # Gemma 3's form, with a weight offset that is not an fp32 value (Gemma's is 1.0)
    pooled = dict(group=4, token_map=table, norm=norm, norm_weight=gamma, norm_bias=beta if norm == "layer" else None,
                  eps=1e-6, norm_after_merge=True, pool=True, norm_weight_offset=0.3)
    wp = [torch.randn(8, 12, dtype=torch.float64)]
    xp = x.clone().requires_grad_()
    out = mmfuse.merged_mlp(xp, wp, None, None, **pooled)
    want = merged_mlp_reference(xp, wp, None, None, **pooled)
    _close(out, want)
    g = torch.randn_like(out)
    _close(torch.autograd.grad(out, xp, g)[0], torch.autograd.grad(want, xp, g)[0])
    names = {name for name, floats in floats_as_a_gpu_passes_them if floats}
    assert {"norm_stats_kernel", "pool_norm_fwd_kernel", "pool_norm_bwd_kernel"} <= names, names
