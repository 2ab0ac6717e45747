"""Regression tests for what a randomized search over the public API found (issue 15), and the audit
that followed: every pointer argument of every kernel read through its strides, strided and expanded
(stride 0) views alike; zero-size widths and batches; non-finite inputs where the gradient is exactly 0;
pos_embed's gradient rounded once."""

import pytest
import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.ops.cross_attention import cross_attention_reference, cross_attention_term_scales
from mmfuse.ops.linear import linear_reference, mlp_reference
from mmfuse.ops.patch_embed import patch_embed_reference
from mmfuse.testing import assert_matches_reference


# ----------------------------------------------------------------------------------------------
# 1. bias (linear, mlp, patch_embed) and pos_embed: strided and expanded views
# ----------------------------------------------------------------------------------------------
def _strided(n, dtype):
    """(leaf, view of n elements with stride 2)."""
    leaf = torch.randn(2 * n, dtype=dtype)
    return leaf, lambda t: t[::2]


def _expanded(n, dtype):
    """(leaf of one element, view of n elements with stride 0)."""
    return torch.randn(1, dtype=dtype), lambda t: t.expand(n)


@pytest.mark.parametrize("view", [_strided, _expanded], ids=["strided", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_bias_views(view, dtype):
    M, K, N = 37, 45, 70
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K ** 0.5
    b, as_view = view(N, dtype)
    assert_matches_reference(lambda x, w, b: mmfuse.linear(x, w, as_view(b), "gelu"),
                             lambda x, w, b: linear_reference(x, w, as_view(b), "gelu"), [x, w, b], ["x", "w", "b"])


@pytest.mark.parametrize("view", [_strided, _expanded], ids=["strided", "expanded"])
def test_mlp_bias_views(view):
    x = torch.randn(21, 30)
    ws = [torch.randn(40, 30) / 30 ** 0.5, torch.randn(33, 40) / 40 ** 0.5]
    (b0, v0), (b1, v1) = view(40, torch.float32), view(33, torch.float32)
    assert_matches_reference(lambda x, w0, w1, b0, b1: mmfuse.mlp(x, [w0, w1], [v0(b0), v1(b1)]),
                             lambda x, w0, w1, b0, b1: mlp_reference(x, [w0, w1], [v0(b0), v1(b1)]),
                             [x, *ws, b0, b1], ["x", "w0", "w1", "b0", "b1"])


@pytest.mark.parametrize("view", [_strided, _expanded], ids=["strided", "expanded"])
def test_patch_embed_bias_and_pos_views(view):
    B, C, P, D, N = 2, 3, 4, 40, 12
    x = torch.randn(B, C, 3 * P, 4 * P)
    w = torch.randn(D, C, P, P) / (C * P * P) ** 0.5
    b, vb = view(D, torch.float32)
    if view is _strided:
        pos, vp = torch.randn(N, 2 * D), (lambda t: t[:, ::2])
    else:
        pos, vp = torch.randn(N, 1), (lambda t: t.expand(N, D))
    assert_matches_reference(lambda x, w, b, p: mmfuse.patch_embed(x, w, vb(b), vp(p)),
                             lambda x, w, b, p: patch_embed_reference(x, w, vb(b), vp(p)),
                             [x, w, b, pos], ["pixels", "weight", "bias", "pos_embed"])


def test_bias_views_give_the_contiguous_answer_bitwise():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    for b in (torch.randn(12)[::2], torch.randn(1).expand(6)):
        assert torch.equal(mmfuse.linear(x, w, b), mmfuse.linear(x, w, b.contiguous()))


# ----------------------------------------------------------------------------------------------
# 2. cross_attention's kv_lens and key_mask: strided and expanded views
# ----------------------------------------------------------------------------------------------
def _attn(q, k, v, **masks):
    return assert_matches_reference(lambda q, k, v: mmfuse.cross_attention(q, k, v, _splits=2, **masks),
                                    lambda q, k, v: cross_attention_reference(q, k, v, **masks),
                                    [q, k, v], ["q", "k", "v"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_kv_lens_strided_and_expanded(dtype):
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    strided = torch.tensor([4, 0, 37, 0], dtype=dtype)[::2]
    expanded = torch.tensor([23], dtype=dtype).expand(2)
    for lens in (strided, expanded):
        out = mmfuse.cross_attention(q, k, v, kv_lens=lens, _splits=2)
        assert torch.equal(out, mmfuse.cross_attention(q, k, v, kv_lens=lens.contiguous(), _splits=2))
        _attn(q, k, v, kv_lens=lens)


def test_key_mask_strided_and_expanded():
    q, k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    strided = (torch.rand(2, 80) > 0.3)[:, ::2]
    expanded = (torch.rand(1, 40) > 0.3).expand(2, 40)
    transposed = (torch.rand(40, 2) > 0.3).t()
    for mask in (strided, expanded, transposed):
        out = mmfuse.cross_attention(q, k, v, key_mask=mask, _splits=2)
        assert torch.equal(out, mmfuse.cross_attention(q, k, v, key_mask=mask.contiguous(), _splits=2))
        _attn(q, k, v, key_mask=mask)


def test_expanded_grad_output_and_inputs():
    """dY of ``.sum()`` is an expanded (stride 0) tensor; inputs may be expanded too. Checked under the
    project's error rule (a fixed tolerance would depend on the CPU's SIMD and BLAS paths)."""
    x = torch.randn(1, 45).expand(13, 45)
    w = torch.randn(30, 45)
    assert_matches_reference(lambda x, w: mmfuse.linear(x, w, None, "gelu"),
                             lambda x, w: linear_reference(x, w, None, "gelu"), [x, w], ["x", "w"],
                             dy=torch.ones(()).expand(13, 30))
    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 2, 1, 16).expand(2, 2, 20, 16)
    assert_matches_reference(lambda q, k: mmfuse.cross_attention(q, k, k),
                             lambda q, k: cross_attention_reference(q, k, k), [q, k], ["q", "k"],
                             dy=torch.ones(()).expand(2, 2, 3, 16),
                             term_scales=lambda inputs, do: cross_attention_term_scales(inputs[0], inputs[1],
                                                                                        inputs[1], do))


# ----------------------------------------------------------------------------------------------
# 3. zero widths
# ----------------------------------------------------------------------------------------------
def _same_as_torch(fn, ref, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn_like(out))
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref_out = ref(*ref_leaves)
    torch.manual_seed(0)
    assert out.shape == ref_out.shape
    for a, b in zip(leaves, ref_leaves):
        assert a.grad is not None and a.grad.shape == b.shape
    return out, leaves


def test_linear_out_features_zero():
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(0, 7, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    y = mmfuse.linear(x, w, b, "gelu")
    assert y.shape == (5, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 7)) and w.grad.shape == (0, 7) and b.grad.shape == (0,)


def test_mlp_last_width_zero():
    x = torch.randn(5, 7, requires_grad=True)
    ws = [torch.randn(9, 7, requires_grad=True), torch.randn(0, 9, requires_grad=True)]
    y = mmfuse.mlp(x, ws)
    assert y.shape == (5, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 7))
    assert torch.equal(ws[0].grad, torch.zeros(9, 7)) and ws[1].grad.shape == (0, 9)


def test_mlp_hidden_width_zero_is_torch():
    """A hidden layer of width 0: the next layer sees no features, its output is its bias (as torch)."""
    x = torch.randn(5, 7)
    ws = [torch.randn(0, 7), torch.randn(4, 0)]
    bs = [torch.randn(0), torch.randn(4)]
    assert_matches_reference(lambda x, w0, w1, b0, b1: mmfuse.mlp(x, [w0, w1], [b0, b1]),
                             lambda x, w0, w1, b0, b1: mlp_reference(x, [w0, w1], [b0, b1]),
                             [x, *ws, *bs], ["x", "w0", "w1", "b0", "b1"])


# ----------------------------------------------------------------------------------------------
# 4. an empty batch with broadcast queries
# ----------------------------------------------------------------------------------------------
def test_empty_batch_with_broadcast_queries():
    q = torch.randn(1, 2, 3, 16, requires_grad=True)
    k = torch.randn(0, 2, 9, 16, requires_grad=True)
    v = torch.randn(0, 2, 9, 16, requires_grad=True)
    out = mmfuse.cross_attention(q, k, v)
    assert out.shape == (0, 2, 3, 16)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape and v.grad.shape == v.shape


# ----------------------------------------------------------------------------------------------
# 5. dK / dV where the gradient is exactly 0 and inputs are not finite
# ----------------------------------------------------------------------------------------------
def _grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("Lq", [3, 16, 17])
def test_key_with_minus_inf_score_gets_zero_dk_dv(Lq):
    q = torch.ones(1, 1, Lq, 4)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    k[0, 0, 2, 0] = -float("inf")
    out, _, dk, dv = _grads(mmfuse.cross_attention, q, k, v)
    sdpa, _, dk_ref, dv_ref = _grads(F.scaled_dot_product_attention, q, k, v)
    torch.testing.assert_close(out, sdpa)
    torch.testing.assert_close(dk, dk_ref)  # finite everywhere, 0 for the -inf key (as SDPA)
    torch.testing.assert_close(dv, dv_ref)
    assert torch.equal(dk[0, 0, 2], torch.zeros(4)) and torch.equal(dv[0, 0, 2], torch.zeros(4))


@pytest.mark.parametrize("where", ["kv_lens", "key_mask"])
def test_nan_in_a_key_left_out_does_not_reach_any_gradient(where):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(2, 1, 20, 8), torch.randn(2, 1, 20, 8)
    k[0, 0, 17], v[0, 0, 17] = float("nan"), float("nan")
    k[1, 0, 3], v[1, 0, 3] = float("inf"), float("-inf")
    if where == "kv_lens":
        masks = dict(kv_lens=torch.tensor([15, 20]))
        mask = torch.arange(20)[None, :] < masks["kv_lens"][:, None]
        k[1, 0, 3], v[1, 0, 3] = 0.5, 0.5  # kv_lens only cuts the tail
    else:
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[0, 17] = mask[1, 3] = False
        masks = dict(key_mask=mask)
    fn = lambda q, k, v: mmfuse.cross_attention(q, k, v, _splits=2, **masks)  # noqa: E731
    out, dq, dk, dv = _grads(fn, q, k, v)
    clean_k, clean_v = k.masked_fill(~mask[:, None, :, None], 0), v.masked_fill(~mask[:, None, :, None], 0)
    ref = lambda q, k, v: cross_attention_reference(q, k, v, **masks)  # noqa: E731
    out_ref, dq_ref, dk_ref, dv_ref = _grads(ref, q, clean_k, clean_v)
    for got, want in ((out, out_ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(dk.masked_select(~mask[:, None, :, None]), torch.zeros(int((~mask).sum()) * 8))


# ----------------------------------------------------------------------------------------------
# 6. pos_embed broadcast over tokens / features: its gradient is one fp32 sum, rounded once
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (1,), (24,), (1, 1), (1, 24), (6, 1), (1, 1, 24), (3, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_pos_grad_is_rounded_once(shape, dtype):
    B, C, P, D = 3, 2, 2, 24
    x = torch.randn(B, C, 2 * P, 3 * P, dtype=dtype)
    w = torch.randn(D, C, P, P, dtype=dtype)
    pos = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = mmfuse.patch_embed(x, w, None, pos)
    g = torch.randn_like(out) * 100
    out.backward(g)
    exact = g.double().sum_to_size((1,) * (3 - len(shape)) + shape).reshape(shape)
    # Rounded once from an fp32 sum: within half an ulp of the exact sum (plus fp32's own error).
    # The batch sum rounded to ``dtype`` and summed again missed this by up to an ulp.
    _, e = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), e - 1 - {torch.float16: 10, torch.bfloat16: 7}[dtype])
    assert ((pos.grad.double() - exact).abs() <= 0.5 * ulp * (1 + 2 ** -10)).all()


# ----------------------------------------------------------------------------------------------
# The interpreter rounds fp32 -> bf16 to nearest even, as a GPU does (mmfuse/_interpreter.py)
# ----------------------------------------------------------------------------------------------
def test_interpreted_bf16_cast_rounds_to_nearest_even():
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x.to(tl.bfloat16))  # explicit cast
        tl.store(z_ptr + offs, x)  # implicit cast by the store

    nan_low_bits = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([1 + 2 ** -8 + 2 ** -10, 1 + 2 ** -9, 1 + 3 * 2 ** -9, float("inf"), -1e-40, 3e38,
                                 -2.5]), nan_low_bits]).float()
    y, z = torch.empty(8, dtype=torch.bfloat16), torch.empty(8, dtype=torch.bfloat16)
    cast[(1,)](x, y, z, N=8)
    want = x.to(torch.bfloat16)  # torch rounds to nearest even, as cvt.rn.bf16.f32 does
    assert y[0].item() == 1.0078125 and torch.isnan(y[7])
    assert torch.equal(y.view(torch.int16)[:7], want.view(torch.int16)[:7])
    assert torch.equal(z.view(torch.int16)[:7], want.view(torch.int16)[:7]) and torch.isnan(z[7])


def test_a_bad_activation_is_named_at_construction_not_at_the_first_forward():
    with pytest.raises(ValueError, match="activation: expected one of"):
        mmfuse.nn.Linear(5, 7, activation="tanh")
    with pytest.raises(ValueError, match="activation: expected one of"):
        mmfuse.nn.Linear.from_module(torch.nn.Linear(5, 7), activation="tanh")


def test_merged_mlp_refuses_a_norm_bias_an_rmsnorm_would_drop():
    x, w = torch.randn(8, 4), torch.randn(6, 8)
    with pytest.raises(ValueError, match="norm_bias: expected None with norm='rms'"):
        mmfuse.merged_mlp(x, [w], group=2, norm="rms", norm_weight=torch.ones(4), norm_bias=torch.zeros(4))


def test_weights_may_be_any_iterable_and_layer_names_must_be_distinct():
    x = torch.randn(5, 8)
    ws = [torch.randn(6, 8), torch.randn(4, 6)]
    torch.testing.assert_close(mmfuse.mlp(x, (w for w in ws)), mmfuse.mlp(x, ws))
    torch.testing.assert_close(mmfuse.merged_mlp(x.view(10, 4), (w for w in ws), group=2),
                               mmfuse.merged_mlp(x.view(10, 4), ws, group=2))
    with pytest.raises(ValueError, match="weights: expected a non-empty sequence"):
        mmfuse.mlp(x, iter(()))
    with pytest.raises(ValueError, match="names: expected 2 distinct names"):
        mmfuse.nn.MLPProjector((8, 6, 4), names=["a", "a"])
