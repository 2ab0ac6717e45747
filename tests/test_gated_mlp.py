"""mmfuse.gated_mlp (SwiGLU / GeGLU: down(act(gate(x)) * up(x))): values and gradients against the
reference (flash-attention rule), gradcheck, determinism, launch counts, edge cases, bad input.
Kernels run in Triton's interpreter."""

import pytest
import torch

import mmfuse
from mmfuse.kernels import linear as KL
from mmfuse.testing import assert_matches_reference

NAMES = ["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"]


def _params(K, N, D, dtype, bias=True):
    wg = torch.randn(N, K, dtype=dtype) / K ** 0.5
    wu = torch.randn(N, K, dtype=dtype) / K ** 0.5
    wd = torch.randn(D, N, dtype=dtype) / N ** 0.5
    bs = [torch.randn(n, dtype=dtype) for n in (N, N, D)] if bias else []
    return [wg, wu, wd, *bs]


def _check(x, params, activation="silu", names=None):
    n = len(params)
    names = names or NAMES[:1 + n]
    return assert_matches_reference(lambda x, *p: mmfuse.gated_mlp(x, *p, activation=activation),
                                    lambda x, *p: mmfuse.gated_mlp_reference(x, *p, activation=activation),
                                    [x, *params], names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_matches_reference(dtype, bias):
    # Odd sizes, multiples of no block; leading dims (2, 19).
    x = torch.randn(2, 19, 45, dtype=dtype)
    _check(x, _params(45, 70, 29, dtype, bias))
    assert mmfuse.gated_mlp(x, *_params(45, 70, 29, dtype, bias)).shape == (2, 19, 29)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "relu"])
def test_other_gates(activation):
    # GeGLU (exact and tanh) and the other epilogue activations, forward and act'(g) in [dG | dU].
    _check(torch.randn(37, 45), _params(45, 70, 29, torch.float32), activation)


def test_non_contiguous_views():
    # x sliced along K; the gate / up weights as the halves of one chunked (2N, K) weight stored
    # transposed (Aya Vision's linear_1 is chunked: up first, then gate); W_down column-major.
    N = 70
    x = torch.randn(37, 90)[:, ::2]
    w_chunked = (torch.randn(45, 2 * N) / 45 ** 0.5).t()
    w_up, w_gate = w_chunked[:N], w_chunked[N:]
    wd = (torch.randn(N, 29) / N ** 0.5).t()
    b = torch.randn(4 * N)[::2]  # stride-2 biases
    bu, bg = b[:N], b[N:]
    bd = torch.randn(1).expand(29)  # stride 0
    params = [w_gate, w_up, wd, bg, bu, bd]
    assert not any(t.is_contiguous() for t in [x, *params])

    def fused(x_, *p):  # the kernels receive the views themselves
        assert [t.stride() for t in (x_, *p)] == [t.stride() for t in (x, *params)]
        return mmfuse.gated_mlp(x_, *p)

    assert_matches_reference(fused, mmfuse.gated_mlp_reference, [x, *params], NAMES)


def test_weights_with_different_strides():
    # Gate row-major, up column-major: the launcher reads both with one set of strides, so it copies.
    x = torch.randn(21, 33)
    wg = torch.randn(40, 33) / 6
    wu = (torch.randn(33, 40) / 6).t()
    _check(x, [wg, wu, torch.randn(17, 40) / 6])


def test_one_bias_of_the_pair():
    # Only the up projection has a bias (the kernel adds both or neither: the gate's is zeros).
    x, (wg, wu, wd) = torch.randn(13, 20), _params(20, 24, 9, torch.float32, bias=False)
    bu = torch.randn(24)
    assert_matches_reference(lambda x, wg, wu, wd, bu: mmfuse.gated_mlp(x, wg, wu, wd, None, bu),
                             lambda x, wg, wu, wd, bu: mmfuse.gated_mlp_reference(x, wg, wu, wd, None, bu),
                             [x, wg, wu, wd, bu], ["x", "w_gate", "w_up", "w_down", "b_up"])


def test_large_magnitudes_bf16():
    # Gate pre-activations in the hundreds: silu is identity / 0 there, act' 1 / 0, no overflow.
    x = torch.randn(33, 40, dtype=torch.bfloat16) * 20
    _check(x, [p * 3 for p in _params(40, 24, 16, torch.bfloat16)])


def test_gradcheck_fp64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(5, 4, 3, torch.float64)]
    # fast_mode (a random projection of the Jacobian): the same check in a few interpreted launches
    # (the full Jacobian took 9 s here)
    assert torch.autograd.gradcheck(lambda x, *p: mmfuse.gated_mlp(x, *p), (x, *params), fast_mode=True)


def test_backward_is_deterministic():
    x = torch.randn(50, 40, dtype=torch.float16, requires_grad=True)
    params = [p.requires_grad_() for p in _params(40, 72, 33, torch.float16)]
    dy = torch.randn(50, 33, dtype=torch.float16)
    runs = [torch.autograd.grad(mmfuse.gated_mlp(x, *params), [x, *params], dy) for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_launch_counts(launches):
    x = torch.randn(20, 16, requires_grad=True)
    params = [p.requires_grad_() for p in _params(16, 24, 8, torch.float32)]
    y = mmfuse.gated_mlp(x, *params)
    # gate and up in one GEMM (act(g) * u in its epilogue), then down: no elementwise pass.
    assert launches == ["fused_gemm_kernel"] * 2
    launches.clear()
    y.sum().backward()
    # dW_down; [dG | dU] (the gate product's backward in dH's epilogue); [dW_gate; dW_up] in one GEMM;
    # dX over both sources in one GEMM. Bias gradients are torch sums beside them.
    assert launches == ["fused_gemm_kernel"] * 4


def test_only_some_grads():
    # Frozen gate/up weights with a trainable down projection and input; then only the gate bias.
    x = torch.randn(11, 12)
    wg, wu, wd, bg, bu, bd = _params(12, 16, 7, torch.float32)
    for trainable in ([x, wd], [bg], [wu, bd]):
        for t in trainable:
            t.requires_grad_()
        args = [x, wg, wu, wd, bg, bu, bd]
        got = torch.autograd.grad(mmfuse.gated_mlp(*args).sum(), trainable)
        ref_args = [t.detach().double().requires_grad_(t.requires_grad) for t in args]
        want = torch.autograd.grad(mmfuse.gated_mlp_reference(*ref_args).sum(),
                                   [r for r, t in zip(ref_args, args) if t.requires_grad])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
        for t in trainable:
            t.requires_grad_(False)


def test_empty_batch_and_zero_widths():
    wg, wu, wd, bg, bu, bd = [p.requires_grad_() for p in _params(8, 16, 5, torch.float32)]
    x = torch.randn(0, 8, requires_grad=True)
    y = mmfuse.gated_mlp(x, wg, wu, wd, bg, bu, bd)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in (wg, wu, wd, bg, bu, bd))
    assert x.grad.shape == (0, 8)
    # A hidden width of 0: y = b_down, dx = 0, as torch gives.
    x = torch.randn(4, 8, requires_grad=True)
    p0 = [p.requires_grad_() for p in _params(8, 0, 5, torch.float32)]
    y = mmfuse.gated_mlp(x, *p0)
    torch.testing.assert_close(y, p0[-1].detach().expand(4, 5))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_inference_stores_no_preactivations(monkeypatch):
    seen = []
    real = KL.gated_fwd

    def spy(*args, **kwargs):
        h, gu = real(*args, **kwargs)
        seen.append(gu)
        return h, gu

    monkeypatch.setattr(KL, "gated_fwd", spy)
    x, params = torch.randn(5, 8), _params(8, 6, 4, torch.float32)
    with torch.no_grad():
        mmfuse.gated_mlp(x, *params)
    mmfuse.gated_mlp(x.requires_grad_(), *params)
    assert seen[0] is None and seen[1] is not None


class TestBadInput:
    def test_up_shape(self):
        wg, wu, wd = _params(8, 6, 4, torch.float32, bias=False)
        with pytest.raises(ValueError, match=r"w_up: expected shape\[0\] \(the gate's out_features\) == 6, got 5"):
            mmfuse.gated_mlp(torch.randn(3, 8), wg, wu[:5], wd)

    def test_down_in_features(self):
        wg, wu, wd = _params(8, 6, 4, torch.float32, bias=False)
        with pytest.raises(ValueError, match=r"w_down: expected shape\[1\] \(in_features\) == 6, got 5"):
            mmfuse.gated_mlp(torch.randn(3, 8), wg, wu, wd[:, :5])

    def test_gate_in_features(self):
        wg, wu, wd = _params(8, 6, 4, torch.float32, bias=False)
        with pytest.raises(ValueError, match=r"w_gate: expected shape\[1\] \(in_features\) == 7, got 8"):
            mmfuse.gated_mlp(torch.randn(3, 7), wg, wu, wd)

    def test_no_activation(self):
        with pytest.raises(ValueError, match=r"activation: expected one of .*got None"):
            mmfuse.gated_mlp(torch.randn(3, 8), *_params(8, 6, 4, torch.float32, bias=False), activation=None)

    def test_bias_length(self):
        wg, wu, wd = _params(8, 6, 4, torch.float32, bias=False)
        with pytest.raises(ValueError, match=r"b_up: expected shape\[0\] \(out_features of w_up\) == 6, got 5"):
            mmfuse.gated_mlp(torch.randn(3, 8), wg, wu, wd, torch.randn(6), torch.randn(5))

    def test_dtype_mismatch(self):
        wg, wu, wd = _params(8, 6, 4, torch.float32, bias=False)
        with pytest.raises(TypeError, match=r"w_down: expected dtype torch.float32"):
            mmfuse.gated_mlp(torch.randn(3, 8), wg, wu, wd.half())


def test_drop_in_module_from_a_transformers_mlp():
    # Idefics2MLP (SwiGLU, separate gate / up): same state_dict, same values and gradients.
    from transformers.models.idefics2.modeling_idefics2 import Idefics2MLP

    orig = Idefics2MLP(hidden_size=24, intermediate_size=40, output_size=16, hidden_act="silu")
    fused = mmfuse.nn.GatedMLP.from_module(orig)
    assert fused.state_dict().keys() == orig.state_dict().keys() and fused.activation == "silu"
    x = torch.randn(3, 7, 24)
    params = [p.detach() for p in (orig.gate_proj.weight, orig.up_proj.weight, orig.down_proj.weight)]
    assert_matches_reference(lambda x, *p: torch.func.functional_call(fused, dict(zip(
                                 ["gate_proj.weight", "up_proj.weight", "down_proj.weight"], p)), (x,)),
                             lambda x, *p: torch.func.functional_call(orig, dict(zip(
                                 ["gate_proj.weight", "up_proj.weight", "down_proj.weight"], p)), (x,)),
                             [x, *params], ["x", "w_gate", "w_up", "w_down"])
    new = mmfuse.nn.GatedMLP(24, 40, 16, bias=False, activation="gelu")
    assert new(x).shape == (3, 7, 16)
    with pytest.raises(TypeError, match="gate_proj, up_proj and down_proj"):
        mmfuse.nn.GatedMLP.from_module(torch.nn.Linear(2, 2))
