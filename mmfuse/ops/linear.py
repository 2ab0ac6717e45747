"""Linear -> bias -> activation, and MLP chains of them: reference, autograd Functions, functional API.

Saved for backward (training only; inference stores nothing extra):
  linear: x, W and, with an activation, the pre-activation h written by the forward epilogue.
  mlp:    x, every W, every intermediate output y_i (the next layer's input, needed for its dW)
          and every intermediate pre-activation h_i.

Backward of layer i, given dH_i (the gradient at its pre-activation):
  dW_i       = dH_i^T @ X_i                        one GEMM
  db_i       = sum over tokens of dH_i             one reduction
  dH_{i-1}   = (dH_i @ W_i) * act'(h_{i-1})        one GEMM (act' in its epilogue)
A standalone Linear+act forms dH = dY * act'(h) in one elementwise pass first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mmfuse._checks import check_choice, check_like, check_size, check_tensor
from mmfuse._dispatch import REFERENCE, autocast_inputs, backend_for, call_op, custom_op, register_autograd
from mmfuse.kernels import linear as K

ACTIVATION_NAMES = (None, "gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "relu2")


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def apply_activation_reference(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":  # CLIP's, as transformers' QuickGELUActivation writes it
        return y * torch.sigmoid(1.702 * y)
    if activation == "silu":
        return F.silu(y)
    if activation == "relu2":  # Nemotron's, as transformers' ReLUSquaredActivation writes it
        return torch.square(F.relu(y))
    return F.relu(y)


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
# Custom operators with autograd (torch.compile sees them as opaque ops with fake implementations)
# ----------------------------------------------------------------------------------------------
# A plain ``custom_op`` rather than ``triton_op``: the launchers pick configs at run time (wave model
# or timed per octave of M on a GPU, a fixed config in the interpreter), which Inductor would not reproduce, and the
# interpreter path must stay callable on CPU. Empty tensors stand for "not computed" in op outputs
# (an op's schema cannot return None).
def _nothing(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _acc_sum_rows(dh: torch.Tensor) -> torch.Tensor:
    """Bias gradient when the weight is frozen (no dW GEMM to fold it into): a plain reduction."""
    return dh.sum(0, dtype=torch.float64 if dh.dtype == torch.float64 else torch.float32).to(dh.dtype)


@custom_op("mmfuse::linear_fwd", mutates_args=())
def linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                  save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): y = act(x @ W^T + b) on 2-D x; h the pre-activation when saved for backward."""
    y, h = K.linear_fwd(x, weight, bias, activation, store_preact=save_preact)
    return y, (h if h is not None else _nothing(x))


@linear_fwd_op.register_fake
def _(x, weight, bias, activation, save_preact):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), (x.new_empty(shape) if save_preact and activation else _nothing(x))


@custom_op("mmfuse::linear_bwd", mutates_args=())
def linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor,
                  activation: str | None, need_x: bool, need_w: bool, need_b: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db); dH = dY * act'(h) in one pass, db inside the dW GEMM."""
    dh = K.act_grad(dy, h, activation) if activation is not None else dy
    dx = K.input_grad(dh, weight) if need_x else _nothing(x)
    dw, db = _nothing(x), _nothing(x)  # distinct: op outputs may not alias each other
    if need_w:
        dw, db = K.weight_grad(dh, x, with_bias=need_b)
        db = db if need_b else _nothing(x)
    elif need_b:
        db = _acc_sum_rows(dh)
    return dx, dw, db


@linear_bwd_op.register_fake
def _(dy, x, weight, h, activation, need_x, need_w, need_b):
    return (x.new_empty(x.shape) if need_x else _nothing(x), weight.new_empty(weight.shape) if need_w else _nothing(x),
            weight.new_empty(weight.shape[:1]) if need_b else _nothing(x))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.set_materialize_grads(False)  # h is an output for backward only; no zeros for its "gradient"
    ctx.activation = activation
    ctx.needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    ctx.save_for_backward(x, weight, output[1])


def _linear_backward(ctx, dy, _dh):
    x, weight, h = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs
    if dy is None:
        return None, None, None, None, None
    dx, dw, db = call_op(linear_bwd_op, dy, x, weight, h, ctx.activation, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


register_autograd(linear_fwd_op, _linear_backward, _linear_setup)


@custom_op("mmfuse::mlp_fwd", mutates_args=())
def mlp_fwd_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], has_bias: list[bool],
               activation: str | None, save: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(y, hidden, preacts): hidden[i] = layer i's output (layer i+1's input) and preacts[i] its
    pre-activation, for i < n-1, when saved for backward (empty lists otherwise).

    ``biases[i]`` is a placeholder when ``has_bias[i]`` is False: a ``Tensor?[]`` argument cannot
    receive per-entry gradients through ``register_autograd``."""
    n = len(weights)
    biases = [b if hb else None for b, hb in zip(biases, has_bias)]
    inputs, preacts = [x], []
    for i in range(n):
        act = activation if i < n - 1 else None
        y, h = K.linear_fwd(inputs[-1], weights[i], biases[i], act, store_preact=save)
        inputs.append(y)
        preacts.append(h if h is not None else _nothing(x))
    if not save:
        return inputs[-1], [], []
    return inputs[-1], inputs[1:-1], preacts[:-1]


@mlp_fwd_op.register_fake
def _(x, weights, biases, has_bias, activation, save):
    y = x.new_empty(x.shape[0], weights[-1].shape[0])
    if not save:
        return y, [], []
    hidden = [x.new_empty(x.shape[0], w.shape[0]) for w in weights[:-1]]
    pre = [x.new_empty(x.shape[0], w.shape[0]) if activation else _nothing(x) for w in weights[:-1]]
    return y, hidden, pre


@custom_op("mmfuse::mlp_bwd", mutates_args=())
def mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, hidden: list[torch.Tensor], weights: list[torch.Tensor],
               preacts: list[torch.Tensor], activation: str | None, need_x: bool, need_w: list[bool],
               need_b: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, dW_i, db_i). Layer i: dW_i = dH_i^T @ X_i in one GEMM, db_i by one reduction; then
    dH_{i-1} = (dH_i @ W_i) * act'(h_{i-1}) in one GEMM (act' in its epilogue)."""
    n = len(weights)
    inputs = [x, *hidden]
    dws, dbs = [_nothing(x) for _ in range(n)], [_nothing(x) for _ in range(n)]  # distinct, no aliasing
    dh, dx = dy, _nothing(x)  # no activation after the last layer
    for i in reversed(range(n)):
        if need_w[i]:
            dws[i], db = K.weight_grad(dh, inputs[i], with_bias=need_b[i])
            dbs[i] = db if need_b[i] else dbs[i]
        elif need_b[i]:
            dbs[i] = _acc_sum_rows(dh)
        if i > 0:
            if activation is None:
                dh = K.input_grad(dh, weights[i])
            else:  # dH_{i-1} straight from the GEMM epilogue
                dh = K.input_grad(dh, weights[i], h_prev=preacts[i - 1], activation_prev=activation)
        elif need_x:
            dx = K.input_grad(dh, weights[0])
    return dx, dws, dbs


@mlp_bwd_op.register_fake
def _(dy, x, hidden, weights, preacts, activation, need_x, need_w, need_b):
    dws = [w.new_empty(w.shape) if nw else _nothing(x) for w, nw in zip(weights, need_w)]
    dbs = [w.new_empty(w.shape[:1]) if nb else _nothing(x) for w, nb in zip(weights, need_b)]
    return (x.new_empty(x.shape) if need_x else _nothing(x)), dws, dbs


def _mlp_setup(ctx, inputs, output):
    x, weights, biases, has_bias, activation, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.need_x = x.requires_grad
    ctx.need_w = [w.requires_grad for w in weights]
    ctx.need_b = [hb and b.requires_grad for b, hb in zip(biases, has_bias)]
    ctx.n = len(weights)
    _, hidden, preacts = output
    ctx.save_for_backward(x, *hidden, *weights, *preacts)


def _mlp_backward(ctx, dy, _hidden, _preacts):
    n = ctx.n
    if dy is None:
        return None, [None] * n, [None] * n, None, None, None
    saved = ctx.saved_tensors
    x, hidden, weights, preacts = saved[0], list(saved[1:n]), list(saved[n:2 * n]), list(saved[2 * n:])
    dx, dws, dbs = call_op(mlp_bwd_op, dy, x, hidden, weights, preacts, ctx.activation, ctx.need_x, ctx.need_w,
                           ctx.need_b)
    return (dx if ctx.need_x else None, [g if nw else None for g, nw in zip(dws, ctx.need_w)],
            [g if nb else None for g, nb in zip(dbs, ctx.need_b)], None, None, None)


register_autograd(mlp_fwd_op, _mlp_backward, _mlp_setup)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` with bias and activation fused into the GEMM.

    x (..., K), weight (N, K), bias (N,) or None; activation in {None, "gelu", "gelu_tanh", "quick_gelu", "silu", "relu",
    "relu2"}.
    """
    _check_x(x)
    check_choice("activation", activation, ACTIVATION_NAMES)
    if backend_for(x) == REFERENCE:  # plain torch: autocast and checks as F.linear does them
        _check_layer(x, weight, bias, x.shape[-1])
        return linear_reference(x, weight, bias, activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_layer(x, weight, bias, x.shape[-1])
    lead = x.shape[:-1]
    y, _ = call_op(linear_fwd_op, x.reshape(-1, x.shape[-1]), weight, bias, activation,
                   _needs_grad(x, weight, bias))
    return y.reshape(*lead, weight.shape[0])


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None,
        activation: str | None = "gelu") -> torch.Tensor:
    """Linear -> act -> Linear -> ... (no activation after the last), LLaVA's ``mlp{n}x_gelu``.

    weights: (N_i, K_i) with K_0 = x.shape[-1] and K_{i+1} = N_i; biases None or one entry per
    weight (entries may be None).
    """
    _check_x(x)
    check_choice("activation", activation, ACTIVATION_NAMES)
    if isinstance(weights, torch.Tensor) or not hasattr(weights, "__iter__"):
        raise ValueError(f"weights: expected a non-empty sequence of 2-D tensors, got {type(weights).__name__}")
    weights = list(weights)  # (any iterable: a generator too)
    if not weights:
        raise ValueError("weights: expected a non-empty sequence of 2-D tensors, got one of length 0")
    if biases is None:
        biases = [None] * len(weights)
    else:
        biases = list(biases)
        check_size("biases", "len(biases) (one per weight)", len(biases), len(weights))
    reference = backend_for(x) == REFERENCE
    if not reference:
        n = len(weights)
        x, *params = autocast_inputs(x, *weights, *biases)
        weights, biases = params[:n], params[n:]
    features = x.shape[-1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_layer(x, w, b, features, wname=f"weights[{i}]", bname=f"biases[{i}]")
        features = w.shape[0]
    if reference:
        return mlp_reference(x, weights, biases, activation)
    lead = x.shape[:-1]
    has_bias = [b is not None for b in biases]
    placeholders = [b if b is not None else _nothing(x) for b in biases]
    y, _, _ = call_op(mlp_fwd_op, x.reshape(-1, x.shape[-1]), weights, placeholders, has_bias, activation,
                      _needs_grad(x, *weights, *biases))
    return y.reshape(*lead, features)


# ----------------------------------------------------------------------------------------------
# mmfuse verify
# ----------------------------------------------------------------------------------------------
def verify_checks():
    from mmfuse.testing import compare_with_reference
    from mmfuse.verify import Check

    def linear_check(dtype, act, M, K, N):
        def run(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w = torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5
            b = torch.randn(N, device=device, dtype=dtype)
            return compare_with_reference(
                lambda x, w, b: linear(x, w, b, act), lambda x, w, b: linear_reference(x, w, b, act),
                [x, w, b], ["x", "weight", "bias"])
        return Check(f"linear {act or 'identity'}", dtype, f"M={M} K={K} N={N}", run)

    def mlp_check(dtype, M, widths):
        def run(device):
            x = torch.randn(M, widths[0], device=device, dtype=dtype)
            ws = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for k, n in zip(widths, widths[1:])]
            bs = [torch.randn(n, device=device, dtype=dtype) for n in widths[1:]]
            n = len(ws)
            return compare_with_reference(
                lambda x, *p: mlp(x, p[:n], p[n:]), lambda x, *p: mlp_reference(x, p[:n], p[n:]),
                [x, *ws, *bs], ["x"] + [f"W{i}" for i in range(n)] + [f"b{i}" for i in range(n)])
        return Check("mlp gelu", dtype, f"M={M} widths={'-'.join(map(str, widths))}", run)

    def gated_check(dtype, M, K, N, D):
        def run(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            ws = [torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5 for _ in range(2)]
            ws.append(torch.randn(D, N, device=device, dtype=dtype) / N ** 0.5)
            bs = [torch.randn(n, device=device, dtype=dtype) for n in (N, N, D)]
            return compare_with_reference(gated_mlp, gated_mlp_reference, [x, *ws, *bs],
                                          ["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"])
        return Check("gated_mlp silu", dtype, f"M={M} K={K} N={N} D={D}", run)

    checks = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for act in ACTIVATION_NAMES:
            checks.append(linear_check(dtype, act, 37, 75, 131))
        checks.append(mlp_check(dtype, 45, (40, 96, 72)))
        checks.append(gated_check(dtype, 37, 40, 72, 29))
    return checks


# ----------------------------------------------------------------------------------------------
# Gated MLP (SwiGLU / GeGLU): down(act(gate(x)) * up(x))
# ----------------------------------------------------------------------------------------------
# Forward: 2 launches. The gate and up products share one A tile and one epilogue (act(g) * u), which
# also saves g and u for backward. Backward, given dY:
#   dW_down = dY^T @ H, db_down = sum dY           one GEMM + one reduction
#   [dG | dU] = epilogue(dY @ W_down)              one GEMM: dG = dH * u * act'(g), dU = dH * act(g)
#   [dW_gate; dW_up] = [dG | dU]^T @ X, [db_gate | db_up] = sum [dG | dU]    one GEMM + one reduction
#   dX = dG @ W_gate + dU @ W_up                   one GEMM over two K sources
def gated_mlp_reference(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation="silu"):
    """``down(act(gate(x)) * up(x))`` in plain PyTorch, as transformers' SwiGLU MLPs write it."""
    return F.linear(apply_activation_reference(F.linear(x, w_gate, b_gate), activation) * F.linear(x, w_up, b_up),
                    w_down, b_down)


@custom_op("mmfuse::gated_mlp_fwd", mutates_args=())
def gated_mlp_fwd_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     b_gate: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                     activation: str, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, gu): h = act(g) * u (the down projection's input) and gu = [g | u], when saved."""
    h, gu = K.gated_fwd(x, w_gate, w_up, b_gate, b_up, activation, store_preact=save)
    y, _ = K.linear_fwd(h, w_down, b_down)
    return y, (h if save else _nothing(x)), (gu if save else _nothing(x))


@gated_mlp_fwd_op.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, save):
    M, N = x.shape[0], w_gate.shape[0]
    y = x.new_empty(M, w_down.shape[0])
    return y, (x.new_empty(M, N) if save else _nothing(x)), (x.new_empty(M, 2 * N) if save else _nothing(x))


@custom_op("mmfuse::gated_mlp_bwd", mutates_args=())
def gated_mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, gu: torch.Tensor, w_gate: torch.Tensor,
                     w_up: torch.Tensor, w_down: torch.Tensor, activation: str, need_x: bool, need_gate_up: bool,
                     need_down: bool, need_b_gate_up: bool, need_b_down: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_gate_up (2N, K) = [dW_gate; dW_up], dW_down, db_gate_up (2N,), db_down)."""
    dwd, dbd = _nothing(x), _nothing(x)
    if need_down:
        dwd, dbd = K.weight_grad(dy, h, with_bias=need_b_down)
        dbd = dbd if need_b_down else _nothing(x)
    elif need_b_down:
        dbd = _acc_sum_rows(dy)
    dwgu, dbgu, dx = _nothing(x), _nothing(x), _nothing(x)
    if need_x or need_gate_up or need_b_gate_up:
        dgu = K.gate_grad(dy, w_down, gu, activation)
        if need_gate_up:
            dwgu, dbgu = K.weight_grad(dgu, x, with_bias=need_b_gate_up)
            dbgu = dbgu if need_b_gate_up else _nothing(x)
        elif need_b_gate_up:
            dbgu = _acc_sum_rows(dgu)
        if need_x:
            dx = K.gated_input_grad(dgu, w_gate, w_up)
    return dx, dwgu, dwd, dbgu, dbd


@gated_mlp_bwd_op.register_fake
def _(dy, x, h, gu, w_gate, w_up, w_down, activation, need_x, need_gate_up, need_down, need_b_gate_up,
      need_b_down):
    N, Kin = w_gate.shape
    return (x.new_empty(x.shape) if need_x else _nothing(x),
            x.new_empty(2 * N, Kin) if need_gate_up else _nothing(x),
            w_down.new_empty(w_down.shape) if need_down else _nothing(x),
            x.new_empty(2 * N) if need_b_gate_up else _nothing(x),
            w_down.new_empty(w_down.shape[:1]) if need_b_down else _nothing(x))


def _gated_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.needs = (x.requires_grad, w_gate.requires_grad, w_up.requires_grad, w_down.requires_grad,
                 b_gate is not None and b_gate.requires_grad, b_up is not None and b_up.requires_grad,
                 b_down is not None and b_down.requires_grad)
    _, h, gu = output
    ctx.save_for_backward(x, h, gu, w_gate, w_up, w_down)


def _gated_backward(ctx, dy, _h, _gu):
    if dy is None:
        return (None,) * 9
    x, h, gu, w_gate, w_up, w_down = ctx.saved_tensors
    nx, ng, nu, nd, nbg, nbu, nbd = ctx.needs
    dx, dwgu, dwd, dbgu, dbd = call_op(gated_mlp_bwd_op, dy, x, h, gu, w_gate, w_up, w_down, ctx.activation, nx,
                                       ng or nu, nd, nbg or nbu, nbd)
    N = w_gate.shape[0]
    # Views of one buffer each: gate rows first (the kernel's [g | u] order).
    return (dx if nx else None, dwgu[:N] if ng else None, dwgu[N:] if nu else None, dwd if nd else None,
            dbgu[:N] if nbg else None, dbgu[N:] if nbu else None, dbd if nbd else None, None, None)


register_autograd(gated_mlp_fwd_op, _gated_backward, _gated_setup)

GATE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
              b_down: torch.Tensor | None = None, activation: str = "silu") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: SwiGLU (``"silu"``) or GeGLU (``"gelu"``, ``"gelu_tanh"``).

    x (..., K); w_gate, w_up (N, K); w_down (D, N); biases (N,), (N,), (D,) or None. The gate and up
    products run as one GEMM (one read of x, act(g) * u in its epilogue), the down projection as a
    second. A weight stored chunked (Aya Vision's ``linear_1``: one (2N, K) weight) passes its halves
    as views: ``w[N:], w[:N]`` for "up first, then gate"."""
    _check_x(x)
    check_choice("activation", activation, GATE_ACTIVATIONS)
    if backend_for(x) == REFERENCE:
        _check_gated(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
        return gated_mlp_reference(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation)
    x, w_gate, w_up, w_down, b_gate, b_up, b_down = autocast_inputs(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    _check_gated(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if (b_gate is None) != (b_up is None):  # the kernel adds both biases or neither
        b_gate = b_gate if b_gate is not None else torch.zeros_like(b_up)
        b_up = b_up if b_up is not None else torch.zeros_like(b_gate)
    lead = x.shape[:-1]
    y, _, _ = call_op(gated_mlp_fwd_op, x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down, b_gate, b_up, b_down,
                      activation, _needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down))
    return y.reshape(*lead, w_down.shape[0])


def _check_gated(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
    _check_layer(x, w_gate, b_gate, x.shape[-1], wname="w_gate", bname="b_gate")
    _check_layer(x, w_up, b_up, x.shape[-1], wname="w_up", bname="b_up")
    check_size("w_up", "shape[0] (the gate's out_features)", w_up.shape[0], w_gate.shape[0])
    _check_layer(x, w_down, b_down, w_gate.shape[0], wname="w_down", bname="b_down")
