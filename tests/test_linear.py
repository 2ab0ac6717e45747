"""mmfuse.linear and mmfuse.mlp: values and gradients against the references (flash-attention rule),
gradcheck, determinism, launch counts, bad input. Kernels run in Triton's interpreter."""

import pytest
import torch

import mmfuse
from mmfuse.kernels import linear as KL
from mmfuse.testing import assert_matches_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [None, "gelu", "gelu_tanh"]
#: Added for CLIP-style (quick_gelu), SiLU and ReLU projectors; tested on their own so the full
#: dtype x bias x activation grid above does not double.
NEW_ACTS = ["quick_gelu", "silu", "relu", "relu2"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(dtype, activation, bias):
    # Odd sizes that are multiples of no block; leading dims (2, 3).
    x = torch.randn(2, 3, 75, dtype=dtype)
    w = torch.randn(131, 75, dtype=dtype) / 75 ** 0.5
    inputs, names = [x, w], ["x", "weight"]
    if bias:
        inputs.append(torch.randn(131, dtype=dtype))
        names.append("bias")
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation=activation),
              lambda *t: mmfuse.linear_reference(*t, activation=activation), inputs, names)
    assert mmfuse.linear(x, w, activation=activation).shape == (2, 3, 131)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", NEW_ACTS)
def test_linear_new_activations(dtype, activation):
    # Forward epilogue act(acc) and the standalone dY * act'(h) pass of the backward.
    x = torch.randn(2, 3, 75, dtype=dtype)
    w = torch.randn(131, 75, dtype=dtype) / 75 ** 0.5
    b = torch.randn(131, dtype=dtype)
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation=activation),
                             lambda *t: mmfuse.linear_reference(*t, activation=activation),
                             [x, w, b], ["x", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", NEW_ACTS)
def test_mlp_new_activations(dtype, activation):
    # The dX GEMM's act'(h_prev) epilogue of each new activation.
    widths = (40, 96, 33)
    x = torch.randn(23, widths[0], dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k ** 0.5 for k, n in zip(widths, widths[1:])]
    bs = [torch.randn(n, dtype=dtype) for n in widths[1:]]
    assert_matches_reference(lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation=activation),
                             lambda x, *p: mmfuse.mlp_reference(x, p[:2], p[2:], activation=activation),
                             [x, *ws, *bs], ["x", "W0", "W1", "b0", "b1"])


def test_new_activation_values():
    # The references are the formulas transformers and torch use (checked, not assumed).
    from transformers.activations import QuickGELUActivation, ReLUSquaredActivation

    h = torch.linspace(-6, 6, 97, dtype=torch.float64)
    ref = mmfuse.linear_reference
    eye = torch.eye(97, dtype=torch.float64)
    torch.testing.assert_close(ref(h, eye, activation="quick_gelu"), QuickGELUActivation()(h))
    torch.testing.assert_close(ref(h, eye, activation="silu"), torch.nn.SiLU()(h))
    torch.testing.assert_close(ref(h, eye, activation="relu"), torch.relu(h))
    torch.testing.assert_close(ref(h, eye, activation="relu2"), ReLUSquaredActivation()(h))
    for act in NEW_ACTS:  # kernel vs reference, values and gradients, incl. exactly 0 for relu
        x = h.clone().requires_grad_()
        y = mmfuse.linear(x[None], eye, activation=act)
        y.sum().backward()
        x_ref = h.clone().requires_grad_()
        ref(x_ref[None], eye, activation=act).sum().backward()
        torch.testing.assert_close(y[0], ref(h, eye, activation=act))
        torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "quick_gelu"])
def test_sigmoid_activation_gradients_do_not_cancel_in_fp32(activation):
    """act' of the sigmoid-based activations, in fp32, within 4e-7 of fp64 at every x in [-30, 30]. Formed as
    s + x s (1 - s), 1 - s cancels where s nears 1 (|x| ~ 5-17): up to 2e-6 off (gelu_tanh; PyTorch's own
    fp32 backward reaches 1e-6 there). ``_sigmoid_and_slope`` forms the slope as t - t^2 from
    t = sigmoid(-|z|). Read through dX of a 1x1 identity: x (M, 1), W = 1, dY = 1 give dX = act'(x) exactly."""
    x = torch.linspace(-30, 30, 6001, dtype=torch.float32)[:, None]
    leaf = x.clone().requires_grad_()
    mmfuse.linear(leaf, torch.ones(1, 1), activation=activation).sum().backward()
    x64 = x.double().requires_grad_()
    mmfuse.linear_reference(x64, torch.ones(1, 1, dtype=torch.float64), activation=activation).sum().backward()
    x32 = x.clone().requires_grad_()
    mmfuse.linear_reference(x32, torch.ones(1, 1), activation=activation).sum().backward()
    err = (leaf.grad.double() - x64.grad).abs().max().item()
    torch_err = (x32.grad.double() - x64.grad).abs().max().item()
    assert err <= 4e-7, (err, torch_err)
    assert err < torch_err  # finer than PyTorch's fp32 backward of the same formula


def test_linear_m37_and_k_tail():
    # M=37 rows, K=75 not a multiple of BLOCK_K (masked K tail), N=131.
    x, w, b = torch.randn(37, 75), torch.randn(131, 75) / 9, torch.randn(131)
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation="gelu"),
              lambda *t: mmfuse.linear_reference(*t, activation="gelu"), [x, w, b], ["x", "weight", "bias"])


@pytest.mark.parametrize("layout", ["sliced", "transposed", "weight_transposed"])
def test_linear_non_contiguous(layout):
    if layout == "sliced":  # stride along K is 2
        x = torch.randn(37, 150)[:, ::2]
        w = torch.randn(131, 75) / 9
    elif layout == "transposed":  # x is column-major
        x = torch.randn(75, 37).t()
        w = torch.randn(131, 75) / 9
    else:  # weight column-major, as a transposed parameter would be
        x = torch.randn(37, 75)
        w = (torch.randn(75, 131) / 9).t()
    assert not x.is_contiguous() or not w.is_contiguous()
    b = torch.randn(131)

    def fused(x_, w_, b_):  # the kernel must receive the strided views themselves
        assert (x_.stride(), w_.stride()) == (x.stride(), w.stride())
        return mmfuse.linear(x_, w_, b_, activation="gelu_tanh")

    assert_matches_reference(fused, lambda *t: mmfuse.linear_reference(*t, activation="gelu_tanh"),
                             [x, w, b], ["x", "weight", "bias"])


def test_linear_large_magnitudes_fp16():
    # Pre-activations in the thousands: GELU is identity / zero there; no overflow in the epilogue.
    x = torch.randn(33, 40, dtype=torch.float16) * 30
    w = torch.randn(20, 40, dtype=torch.float16) * 3
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation="gelu"),
              lambda *t: mmfuse.linear_reference(*t, activation="gelu"), [x, w], ["x", "weight"])


@pytest.mark.parametrize("activation", ACTS + NEW_ACTS)
def test_linear_gradcheck_fp64(activation):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    # fast_mode (a random projection of the Jacobian): the same check in a few interpreted launches
    # instead of two per input element (GELU's full Jacobian took 12 s of CI; tests/test_patch_embed.py
    # keeps a full-Jacobian gradcheck)
    assert torch.autograd.gradcheck(lambda x, w, b: mmfuse.linear(x, w, b, activation), (x, w, b), fast_mode=True)


def test_linear_only_some_grads():
    # Frozen weight with a trainable bias, and a frozen input: each branch of backward.
    x = torch.randn(9, 12)
    w = torch.randn(10, 12)
    b = torch.randn(10, requires_grad=True)
    y = mmfuse.linear(x, w, b, "gelu")
    (gb,) = torch.autograd.grad(y.sum(), [b])
    bref = b.detach().double().requires_grad_()
    (gref,) = torch.autograd.grad(mmfuse.linear_reference(x.double(), w.double(), bref, "gelu").sum(), [bref])
    torch.testing.assert_close(gb.double(), gref, rtol=1e-5, atol=1e-5)


def test_linear_backward_is_deterministic():
    x = torch.randn(70, 75, dtype=torch.float16, requires_grad=True)
    w = (torch.randn(131, 75, dtype=torch.float16) / 9).requires_grad_()
    b = torch.randn(131, dtype=torch.float16, requires_grad=True)
    dy = torch.randn(70, 131, dtype=torch.float16)
    runs = [torch.autograd.grad(mmfuse.linear(x, w, b, "gelu"), [x, w, b], dy) for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_linear_empty_batch():
    w = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    y = mmfuse.linear(x, w, b, "gelu")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == (0, 8)
    assert mmfuse.linear(torch.randn(2, 0, 8), w, b).shape == (2, 0, 16)


def test_linear_inference_stores_no_preactivation(monkeypatch):
    seen = []
    real = KL.linear_fwd

    def spy(*args, **kwargs):
        y, h = real(*args, **kwargs)
        seen.append(h)
        return y, h

    monkeypatch.setattr(KL, "linear_fwd", spy)
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    with torch.no_grad():
        mmfuse.linear(x, w, None, "gelu")
    mmfuse.linear(x, w.requires_grad_(), None, "gelu")
    assert seen[0] is None and seen[1] is not None


class TestBadInput:
    def test_wrong_in_features(self):
        with pytest.raises(ValueError, match=r"weight: expected shape\[1\] \(in_features\) == 8, got 7"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(4, 7))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 .*got torch.float16"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(4, 8, dtype=torch.float16))
        with pytest.raises(TypeError, match=r"bias: expected dtype torch.float32"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(4, 8), torch.randn(4, dtype=torch.float64))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match=r"weight: expected device (cpu|cuda:0) .*got meta"):
            mmfuse.linear(torch.randn(3, 8), torch.empty(4, 8, device="meta"))

    def test_weight_not_2d(self):
        with pytest.raises(ValueError, match=r"weight: expected a 2-D tensor, got 3-D"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(1, 4, 8))

    def test_bias_wrong_length(self):
        with pytest.raises(ValueError, match=r"bias: expected shape\[0\] .* == 4, got 5"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5))

    def test_unknown_activation(self):
        with pytest.raises(ValueError, match=r"activation: expected one of \[None, 'gelu', 'gelu_tanh', "
                           r"'quick_gelu', 'silu', 'relu', 'relu2'\], got 'swish'"):
            mmfuse.linear(torch.randn(3, 8), torch.randn(4, 8), activation="swish")

    def test_integer_input(self):
        with pytest.raises(TypeError, match=r"x: expected a floating dtype .*got torch.int64"):
            mmfuse.linear(torch.arange(8).reshape(1, 8), torch.randn(4, 8))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"weight: expected a torch.Tensor, got list"):
            mmfuse.linear(torch.randn(3, 8), [[1.0] * 8])

    def test_zero_in_features(self):
        with pytest.raises(ValueError, match=r"x: expected in_features > 0, got 0"):
            mmfuse.linear(torch.randn(3, 0), torch.randn(4, 0))

    def test_mlp_chain_mismatch(self):
        with pytest.raises(ValueError, match=r"weights\[1\]: expected shape\[1\] \(in_features\) == 16, got 15"):
            mmfuse.mlp(torch.randn(3, 8), [torch.randn(16, 8), torch.randn(4, 15)])

    def test_mlp_biases_length(self):
        with pytest.raises(ValueError, match=r"biases: expected len\(biases\) \(one per weight\) == 2, got 1"):
            mmfuse.mlp(torch.randn(3, 8), [torch.randn(16, 8), torch.randn(4, 16)], [None])

    def test_mlp_no_weights(self):
        with pytest.raises(ValueError, match=r"weights: expected a non-empty sequence"):
            mmfuse.mlp(torch.randn(3, 8), [])


# ----------------------------------------------------------------------------------------------
# MLP chains
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_mlp_matches_reference(dtype, activation):
    widths = (40, 96, 72, 33)  # three layers, odd widths
    x = torch.randn(2, 23, widths[0], dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k ** 0.5 for k, n in zip(widths, widths[1:])]
    bs = [torch.randn(widths[1], dtype=dtype), None, torch.randn(widths[3], dtype=dtype)]
    biases = [b for b in bs if b is not None]

    def split(params):
        ws_, rest = params[:3], list(params[3:])
        return ws_, [rest.pop(0) if b is not None else None for b in bs]

    assert_matches_reference(lambda x, *p: mmfuse.mlp(x, *split(p), activation=activation),
              lambda x, *p: mmfuse.mlp_reference(x, *split(p), activation=activation),
              [x, *ws, *biases], ["x", "W0", "W1", "W2", "b0", "b2"])
    assert mmfuse.mlp(x, ws, bs, activation).shape == (2, 23, 33)


def test_mlp_single_layer_and_llava_2x():
    x = torch.randn(19, 24)
    w = torch.randn(10, 24) / 5
    assert_matches_reference(lambda x, w: mmfuse.mlp(x, [w]), lambda x, w: mmfuse.mlp_reference(x, [w]),
                             [x, w], ["x", "W"])
    w1, b1, w2, b2 = torch.randn(48, 24) / 5, torch.randn(48), torch.randn(40, 48) / 7, torch.randn(40)
    assert_matches_reference(lambda x, *p: mmfuse.mlp(x, p[0::2], p[1::2]),
                             lambda x, *p: mmfuse.mlp_reference(x, p[0::2], p[1::2]),
              [x, w1, b1, w2, b2], ["x", "W1", "b1", "W2", "b2"])


@pytest.mark.parametrize("activation", ["gelu_tanh", *NEW_ACTS])
def test_mlp_gradcheck_fp64(activation):
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(7, 6), torch.randn(7), torch.randn(4, 7), torch.randn(4), torch.randn(3, 4), torch.randn(3)]
    params = [p.double().requires_grad_() for p in params]
    # fast_mode (a random projection of the Jacobian): the same check in a few interpreted launches
    # instead of two per input element (the full one took 33 s of CI; test_linear_gradcheck_fp64[gelu]
    # keeps a full gradcheck of the GEMM kernels)
    assert torch.autograd.gradcheck(lambda x, *p: mmfuse.mlp(x, p[0::2], p[1::2], activation), (x, *params),
                                    fast_mode=True)


def test_mlp_backward_is_deterministic():
    x = torch.randn(50, 40, dtype=torch.float16, requires_grad=True)
    ws = [(torch.randn(64, 40, dtype=torch.float16) / 6).requires_grad_(),
          (torch.randn(33, 64, dtype=torch.float16) / 8).requires_grad_()]
    bs = [torch.randn(64, dtype=torch.float16, requires_grad=True),
          torch.randn(33, dtype=torch.float16, requires_grad=True)]
    dy = torch.randn(50, 33, dtype=torch.float16)
    runs = [torch.autograd.grad(mmfuse.mlp(x, ws, bs), [x, *ws, *bs], dy) for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------------------------
# Fusion: launches per op, counted from the interpreter's grid executor
# ----------------------------------------------------------------------------------------------


def test_linear_launch_counts(launches):
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y = mmfuse.linear(x, w, b, "gelu")
    assert launches == ["fused_gemm_kernel"]  # bias, GELU and the pre-activation in one kernel
    launches.clear()
    y.sum().backward()
    # dH in one pass; dX GEMM; dW GEMM that also reduces db. No separate bias-sum kernel.
    assert sorted(launches) == ["act_grad_kernel", "fused_gemm_kernel", "fused_gemm_kernel"]


def test_mlp_launch_counts(launches):
    x = torch.randn(20, 16, requires_grad=True)
    ws = [torch.randn(32, 16, requires_grad=True), torch.randn(24, 32, requires_grad=True),
          torch.randn(8, 24, requires_grad=True)]
    bs = [torch.randn(32, requires_grad=True), torch.randn(24, requires_grad=True), torch.randn(8, requires_grad=True)]
    y = mmfuse.mlp(x, ws, bs)
    assert launches == ["fused_gemm_kernel"] * 3
    launches.clear()
    y.sum().backward()
    # 3 dW(+db) GEMMs and 3 dX GEMMs, two of which apply GELU' in their epilogue: no elementwise pass.
    assert launches == ["fused_gemm_kernel"] * 6


# ----------------------------------------------------------------------------------------------
# Tile choice (the wave model of bench/NOTES.md, numbers worked by hand)
# ----------------------------------------------------------------------------------------------
def test_wave_efficiency_llava_1_image():
    # M = 576, N = 4096 on 132 SMs. 128x128: 5 x 32 = 160 tiles -> 2 waves of 132.
    assert KL.wave_efficiency(576, 4096, 128, 128, 132) == pytest.approx(576 * 4096 / (2 * 132 * 128 * 128))
    # 64x64: 9 x 64 = 576 tiles -> 5 waves; no ragged edge.
    assert KL.wave_efficiency(576, 4096, 64, 64, 132) == pytest.approx(576 / 660)
    tiles = KL.candidate_tiles(576, 4096, 132)
    assert all(t[:2] != (128, 128) for t in tiles)  # 55% of the machine busy: pruned
    assert (64, 64, 64, 4, 4) in tiles


def test_wave_efficiency_many_images_keeps_big_tiles():
    # 8 images: M = 4608 -> 36 x 32 = 1152 tiles of 128x128 = 8.7 waves: 97% busy.
    assert (128, 128, 64, 8, 4) in KL.candidate_tiles(8 * 576, 4096, 132)


def test_gpu_tile_choice_adapts_to_dtype_and_waves(monkeypatch):
    # The GPU launch at LLaVA-1.5, one image: the wave model's pick, 4-byte inputs halve BLOCK_K.
    seen = []
    monkeypatch.setattr(KL, "INTERPRET", False)
    record = type("K", (), {"__getitem__": lambda self, grid: lambda *a, **m: seen.append(
        (m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"]))})()
    monkeypatch.setattr(KL, "fused_gemm_kernel", record)
    for dtype in (torch.float32, torch.float16):
        KL.linear_fwd(torch.empty(576, 1024, device="meta", dtype=dtype), torch.empty(4096, 1024, device="meta",
                                                                                  dtype=dtype))
    assert seen == [(128, 64, 32), (128, 64, 64)]


def test_tf32_switch_sets_the_dot_precision():
    from mmfuse.kernels._common import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32" and dot_precision(torch.float16) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_mlp_without_biases_and_frozen_layers():
    # Op outputs for gradients nobody asked for must still be distinct tensors (custom-op rule).
    x = torch.randn(7, 12, requires_grad=True)
    ws = [torch.randn(16, 12, requires_grad=True), torch.randn(16, 16), torch.randn(5, 16, requires_grad=True)]
    mmfuse.mlp(x, ws).sum().backward()
    assert ws[1].grad is None and ws[0].grad.shape == (16, 12) and x.grad.shape == (7, 12)
    w = torch.randn(4, 12)
    mmfuse.linear(x, w).sum().backward()  # neither weight nor bias needs a gradient
