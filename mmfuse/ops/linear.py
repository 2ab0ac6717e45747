"""Linear -> bias -> activation, and MLP chains of them: reference, autograd Functions, functional API.

Saved for backward (training only; inference stores nothing extra):
  linear: x, W and, with an activation, the pre-activation h written by the forward epilogue.
  mlp:    x, every W, every intermediate output y_i (the next layer's input, needed for its dW)
          and every intermediate pre-activation h_i.

Backward of layer i, given dH_i (the gradient at its pre-activation):
  dW_i, db_i = dH_i^T @ X_i, rowsum(dH_i)          one GEMM (db from the same loads)
  dH_{i-1}   = (dH_i @ W_i) * act'(h_{i-1})        one GEMM (act' in its epilogue)
A standalone Linear+act forms dH = dY * act'(h) in one elementwise pass first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mmfuse._checks import check_choice, check_like, check_size, check_tensor
from mmfuse._dispatch import REFERENCE, backend_for
from mmfuse.kernels import linear as K

ACTIVATION_NAMES = (None, "gelu", "gelu_tanh")


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def apply_activation_reference(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    return F.gelu(y, approximate="tanh")


def linear_reference(x, weight, bias=None, activation=None):
    """``act(F.linear(x, weight, bias))`` in plain PyTorch."""
    return apply_activation_reference(F.linear(x, weight, bias), activation)


def mlp_reference(x, weights, biases=None, activation="gelu"):
    """Linear -> act -> Linear -> ... -> Linear in plain PyTorch (no activation after the last)."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = linear_reference(x, w, b, activation if i < len(weights) - 1 else None)
    return x


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _check_layer(x, weight, bias, in_features, wname="weight", bname="bias"):
    check_tensor(wname, weight, ndim=2)
    check_like(wname, weight, "x", x)
    check_size(wname, "shape[1] (in_features)", weight.shape[1], in_features)
    if bias is not None:
        check_tensor(bname, bias, ndim=1)
        check_like(bname, bias, "x", x)
        check_size(bname, "shape[0] (out_features of " + wname + ")", bias.shape[0], weight.shape[0])


def _check_x(x):
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected in_features > 0, got 0 (shape {tuple(x.shape)})")


# ----------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------
class LinearFunction(torch.autograd.Function):
    """y = act(x @ W^T + b) on 2-D x, with the fused kernels forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        training = any(ctx.needs_input_grad[:3])
        y, h = K.linear_fwd(x, weight, bias, activation, store_preact=training)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        if training:
            ctx.save_for_backward(x, weight, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, h = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dh = K.act_grad(dy, h, ctx.activation) if ctx.activation is not None else dy
        dx = K.input_grad(dh, weight) if need_x else None
        dw = db = None
        if need_w:
            dw, db = K.weight_grad(dh, x, with_bias=need_b)
        elif need_b:  # frozen weight, trainable bias: the rare case gets a plain reduction
            db = dh.sum(0, dtype=torch.float64 if dh.dtype == torch.float64 else torch.float32).to(dh.dtype)
        return dx, dw, db, None


class MLPFunction(torch.autograd.Function):
    """A chain Linear -> act -> ... -> Linear; params are (W_0, b_0, W_1, b_1, ...), b_i may be None."""

    @staticmethod
    def forward(ctx, x, activation, *params):
        n = len(params) // 2
        weights, biases = params[0::2], params[1::2]
        training = any(ctx.needs_input_grad)
        inputs, preacts = [x], []
        for i in range(n):
            act = activation if i < n - 1 else None
            y, h = K.linear_fwd(inputs[-1], weights[i], biases[i], act, store_preact=training)
            inputs.append(y)
            preacts.append(h)
        out = inputs.pop()
        ctx.activation = activation
        ctx.n = n
        ctx.has_bias = [b is not None for b in biases]
        if training:
            # inputs[i] is layer i's input; preacts[i] its pre-activation (None for the last layer).
            ctx.save_for_backward(*inputs, *weights, *preacts[:-1])
        return out

    @staticmethod
    def backward(ctx, dy):
        n, act = ctx.n, ctx.activation
        saved = ctx.saved_tensors
        inputs, weights, preacts = saved[:n], saved[n:2 * n], saved[2 * n:]
        needs = ctx.needs_input_grad
        grads = [None] * (2 * n)
        dh = dy  # no activation after the last layer
        dx = None
        for i in reversed(range(n)):
            need_w, need_b = needs[2 + 2 * i], needs[3 + 2 * i]
            if need_w:
                grads[2 * i], grads[2 * i + 1] = K.weight_grad(dh, inputs[i], with_bias=need_b)
            elif need_b:
                acc = torch.float64 if dh.dtype == torch.float64 else torch.float32
                grads[2 * i + 1] = dh.sum(0, dtype=acc).to(dh.dtype)
            if i > 0:
                if act is None:
                    dh = K.input_grad(dh, weights[i])
                else:  # dH_{i-1} straight from the GEMM epilogue
                    dh = K.input_grad(dh, weights[i], h_prev=preacts[i - 1], activation_prev=act)
            elif needs[0]:
                dx = K.input_grad(dh, weights[0])
        return (dx, None, *grads)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` with bias and activation fused into the GEMM.

    x (..., K), weight (N, K), bias (N,) or None; activation in {None, "gelu", "gelu_tanh"}.
    """
    _check_x(x)
    check_choice("activation", activation, ACTIVATION_NAMES)
    _check_layer(x, weight, bias, x.shape[-1])
    if backend_for(x) == REFERENCE:
        return linear_reference(x, weight, bias, activation)
    lead = x.shape[:-1]
    y = LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, activation)
    return y.reshape(*lead, weight.shape[0])


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None,
        activation: str | None = "gelu") -> torch.Tensor:
    """Linear -> act -> Linear -> ... (no activation after the last), LLaVA's ``mlp{n}x_gelu``.

    weights: (N_i, K_i) with K_0 = x.shape[-1] and K_{i+1} = N_i; biases None or one entry per
    weight (entries may be None).
    """
    _check_x(x)
    check_choice("activation", activation, ACTIVATION_NAMES)
    if isinstance(weights, torch.Tensor) or len(weights) == 0:
        raise ValueError(f"weights: expected a non-empty sequence of 2-D tensors, got {type(weights).__name__}"
                         + ("" if isinstance(weights, torch.Tensor) else " of length 0"))
    weights = list(weights)
    if biases is None:
        biases = [None] * len(weights)
    else:
        biases = list(biases)
        check_size("biases", "len(biases) (one per weight)", len(biases), len(weights))
    features = x.shape[-1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_layer(x, w, b, features, wname=f"weights[{i}]", bname=f"biases[{i}]")
        features = w.shape[0]
    if backend_for(x) == REFERENCE:
        return mlp_reference(x, weights, biases, activation)
    lead = x.shape[:-1]
    params = [p for wb in zip(weights, biases) for p in wb]
    y = MLPFunction.apply(x.reshape(-1, x.shape[-1]), activation, *params)
    return y.reshape(*lead, features)


# ----------------------------------------------------------------------------------------------
# mmfuse verify
# ----------------------------------------------------------------------------------------------
def _grads_vs_reference(fn, ref_fn, tensors, names):
    """Outputs and input gradients of ``fn`` against fp64 and same-precision references."""
    from mmfuse.testing import compare

    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    results = []
    refs = {}
    for dtype in (torch.float64, tensors[0].dtype):
        rl = [t.detach().to(dtype).requires_grad_() for t in tensors]
        ro = ref_fn(*rl)
        refs[dtype] = (ro, torch.autograd.grad(ro, rl, dy.to(dtype)))
    (o64, g64), (olp, glp) = refs[torch.float64], refs[tensors[0].dtype]
    results.append(compare("out", out, o64, olp))
    for name, g, r64, rlp in zip(names, grads, g64, glp):
        results.append(compare(f"grad {name}", g, r64, rlp))
    return results


def verify_checks():
    from mmfuse.verify import Check

    def linear_check(dtype, act, M, K, N):
        def run(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w = torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5
            b = torch.randn(N, device=device, dtype=dtype)
            return _grads_vs_reference(
                lambda x, w, b: linear(x, w, b, act), lambda x, w, b: linear_reference(x, w, b, act),
                [x, w, b], ["x", "weight", "bias"])
        return Check(f"linear {act or 'identity'}", dtype, f"M={M} K={K} N={N}", run)

    def mlp_check(dtype, M, widths):
        def run(device):
            x = torch.randn(M, widths[0], device=device, dtype=dtype)
            ws = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for k, n in zip(widths, widths[1:])]
            bs = [torch.randn(n, device=device, dtype=dtype) for n in widths[1:]]
            n = len(ws)
            return _grads_vs_reference(
                lambda x, *p: mlp(x, p[:n], p[n:]), lambda x, *p: mlp_reference(x, p[:n], p[n:]),
                [x, *ws, *bs], ["x"] + [f"W{i}" for i in range(n)] + [f"b{i}" for i in range(n)])
        return Check("mlp gelu", dtype, f"M={M} widths={'-'.join(map(str, widths))}", run)

    checks = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for act in (None, "gelu", "gelu_tanh"):
            checks.append(linear_check(dtype, act, 37, 75, 131))
        checks.append(mlp_check(dtype, 45, (40, 96, 72)))
    return checks
