"""Host overhead per call (bench/NOTES.md, "Host overhead per call"): the tile and split choices are
cached per distinct shape and choose exactly what the uncached model chose; the measurement script
runs. No wall-clock thresholds: what is checked is counted, not timed."""

from __future__ import annotations

import hashlib
import inspect
import itertools

import pytest
import torch

from mmfuse.kernels import _common
from mmfuse.kernels import cross_attention as KA
from mmfuse.kernels import linear as KL
from mmfuse.kernels import patch_embed as KP
from mmfuse.kernels._tuning import largest_tile

SMS = (132, 108, 78)  # H100 SXM, A100, a partitioned GPU


def _attention_shapes():
    """(B, Bq, Hq, Hkv, Lq, Lk, D, elem): the resamplers of bench/shapes.py and a spread around them."""
    for B, (Lq, Lk, Hq, Hkv, D), elem in itertools.product(
            (1, 2, 8, 33), ((64, 4964, 16, 4, 96), (64, 321, 8, 8, 64), (32, 257, 12, 12, 64), (7, 1000, 4, 2, 256),
                            (129, 77, 2, 1, 40), (1, 16384, 32, 8, 128), (16, 300, 1, 1, 64), (33, 600, 2, 2, 128)), (2, 4)):
        for Bq in (1, B):
            yield B, Bq, Hq, Hkv, Lq, Lk, D, elem


def _gemm_shapes():
    return itertools.product((1, 63, 576, 2304, 4608, 9217, 23040), (588, 1024, 1152, 3584, 4096, 5120))


def _decisions(uncached: bool) -> list:
    """Every tile and split choice over the spread, through the public functions or their uncached
    originals."""
    def plain(f):
        return f.__wrapped__ if uncached else f

    out = []
    for sms in SMS:
        for M, N in _gemm_shapes():
            out.append(tuple(plain(KL.candidate_tiles)(M, N, sms)))
            for gemm in ("fwd", "dx", "dw"):
                out.append(tuple(plain(KP.candidate_tiles)(gemm, M, N, sms)))
            tile = largest_tile(plain(KP.candidate_tiles)("dw", N, M, sms))
            for elem in (2, 4):
                out.append(plain(KP.dw_splits)(N, M, M * 7, tile, elem, sms))
        for B, Bq, Hq, Hkv, Lq, Lk, D, elem in _attention_shapes():
            for blocks in (None, KA.gpu_blocks(Lq, D, elem_bytes=elem), dict(KA.INTERPRETER_BLOCKS)):
                args = (B, Bq, Hq, Hkv, Lq, Lk, D, elem, sms)
                blk = blocks or KA.gpu_blocks(Lq, D, elem_bytes=elem)
                out.append(plain(KA._fwd_splits)(*args, blk["BLOCK_M"], blk["BLOCK_N"]) if uncached
                           else KA.choose_fwd_splits(*args, blocks))
            bwd = KA.gpu_blocks(Lq, D, backward=True, elem_bytes=elem)
            out.append(plain(KA._dq_splits)(B, Bq, Hq, Hkv, Lq, Lk, D, elem, bwd["BLOCK_M"], bwd["BLOCK_N"], sms)[:2]
                       if uncached else KA.dq_splits_for(B, Bq, Hq, Hkv, Lq, Lk, D, elem, bwd, sms))
    return out


def _plans(uncached: bool) -> list:
    """The backward plans (single pass or not, dQ's splits) over the attention spread, with the query
    heads ungrouped too (where the single pass is allowed)."""
    out = []
    for sms in SMS:
        for B, Bq, Hq, Hkv, Lq, Lk, D, elem in _attention_shapes():
            for hkv in (Hkv, Hq):
                bwd = KA.gpu_blocks(Lq, D, backward=True, elem_bytes=elem)
                one = KA.single_pass_blocks(Lq, D, elem, gpu=True)
                args = (B, Bq, Hq, hkv, Lq, Lk, D, elem)
                out.append(KA._bwd_plan.__wrapped__(*args, bwd["BLOCK_M"], bwd["BLOCK_N"], one["BLOCK_M"],
                                                    one["BLOCK_N"], sms) if uncached
                           else KA.bwd_plan(*args, bwd, one, sms))
    return out


#: sha256 of repr(_decisions(...)) as computed by the code before the caches existed (commit db31ecd):
#: a changed choice anywhere in the spread changes it. Updated for issue 15's 4-byte attention tiles
#: (one forward query tile; 16-query dK/dV past D = 64), which change the split choices they feed,
#: and for patch dW's 64x128 tile at 4 stages (its tile tuple changed, no choice did).
DECISIONS_DIGEST = "7ff6d6c8b3cbd2a2e0dfb25a4e77b4b9"


def _digest(decisions) -> str:
    return hashlib.sha256(repr(decisions).encode()).hexdigest()[:32]


def test_cached_choices_equal_the_uncached_model():
    cached, uncached = _decisions(False), _decisions(True)
    assert cached == uncached
    assert _digest(uncached) == DECISIONS_DIGEST
    assert _decisions(False) == cached  # served from the caches the first pass filled
    plans = _plans(False)
    assert plans == _plans(True) and any(p[0] for p in plans) and not all(p[0] for p in plans)


CACHED = (KL.candidate_tiles, KP.candidate_tiles, KP.dw_splits, KA._fwd_splits, KA._dq_splits, KA._bwd_plan)


def test_models_are_computed_once_per_shape():
    """A second forward+backward of every op at the same shapes recomputes no tile or split choice."""
    from mmfuse.bench import host_overhead as H

    for f in CACHED:
        f.cache_clear()
    with H.kernels_recorded(decisions="gpu") as log:
        steps = [H.step_for(make, "fwd+bwd") for make in H.cases(tiny=True).values()]
        for step in steps:
            step()
        first = {f: f.cache_info() for f in CACHED}
        launched = len(log)
        for step in steps:
            step()
    assert len(log) == 2 * launched > 0
    for f in CACHED:
        info = f.cache_info()
        assert info.misses == first[f].misses > 0, f  # asked on the first pass, never computed again
        assert info.hits > first[f].hits, f


def test_num_sms_queries_a_device_once(monkeypatch):
    calls = []

    class Props:
        multi_processor_count = 132

    def props(index):
        calls.append(index)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(_common, "_SMS_BY_INDEX", {})
    device = torch.device("cuda", 0)
    assert [_common.num_sms(device) for _ in range(3)] == [132] * 3
    assert calls == [0]
    assert _common.num_sms(torch.device("cpu")) == _common.H100_SMS


@pytest.mark.parametrize("decisions", ["gpu", "interpreter"])
def test_overhead_script_runs_and_restores_the_kernels(decisions):
    from mmfuse.bench import host_overhead as H

    before = {mod: dict(vars(mod)) for mod in H._kernel_modules()}
    rows = H.measure(decisions=decisions, calls=2, rounds=1, warmup=1, tiny=True)
    assert len(rows) == 2 * len(H.cases(tiny=True))
    assert all(r["us_per_call"] > 0 and r["launches"] for r in rows)
    fwd = {r["case"]: r["launches"] for r in rows if r["mode"] == "fwd"}
    assert fwd["linear llava-1.5-7b[0] gelu"] == ["fused_gemm_kernel"]
    assert fwd["patch_embed clip-l-14-336"] == ["patch_embed_fwd_kernel"]
    for mod, attrs in before.items():
        assert all(vars(mod)[k] is v for k, v in attrs.items())
    assert "cross_attention" in H.profile("blip2", calls=2, top=3)


def test_inference_calls_skip_torch_library_only_where_nothing_can_tell(monkeypatch):
    """``call_op`` runs an op's implementation directly for inference on plain tensors (the same result,
    bit for bit), in the backward's engine, and under its own autograd formula where autograd records it,
    and the op itself wherever a dispatch mode or the profiler would see it (torch.compile:
    tests/test_compile_autocast_distributed.py)."""
    import mmfuse
    from mmfuse.ops import cross_attention as ops_attn
    from mmfuse.ops import linear as ops_linear
    from torch.utils._python_dispatch import TorchDispatchMode

    direct = []
    for op in (ops_linear.linear_fwd_op, ops_attn.cross_attention_fwd_op):
        impl = op._mmfuse_impl
        monkeypatch.setattr(op, "_mmfuse_impl", lambda *a, impl=impl, op=op: direct.append(op) or impl(*a))

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, w, b = torch.randn(5, 24), torch.randn(40, 24), torch.randn(40)
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    with torch.no_grad():
        y1, o1 = mmfuse.linear(x, w, b, "gelu"), mmfuse.cross_attention(q, k, v)
    assert len(direct) == 2
    with torch.no_grad(), Record() as mode:
        y2, o2 = mmfuse.linear(x, w, b, "gelu"), mmfuse.cross_attention(q, k, v)
    assert len(direct) == 2 and any("mmfuse.linear_fwd" in op for op in mode.ops)
    assert any("mmfuse.cross_attention_fwd" in op for op in mode.ops)
    assert torch.equal(y1, y2) and torch.equal(o1, o2)
    y3 = mmfuse.linear(x, w.requires_grad_(), b, "gelu")  # autograd records the op's own formula
    assert len(direct) == 3 and _eager_recorded(y3) and torch.equal(y3.detach(), y1)
    with Record() as mode:  # ... and the op itself where a mode watches
        y4 = mmfuse.linear(x, w, b, "gelu")
    assert len(direct) == 3 and not _eager_recorded(y4)
    assert any("mmfuse.linear_fwd" in op for op in mode.ops) and torch.equal(y4.detach(), y1)
    with torch.no_grad(), torch.profiler.profile() as prof:  # the profiler sees the op
        mmfuse.linear(x, w, b, "gelu")
    assert len(direct) == 3 and any("mmfuse::linear_fwd" in e.name for e in prof.events())

    # The backward's op, inside the autograd engine with grad off, is called directly too.
    bwd = ops_linear.linear_bwd_op
    monkeypatch.setattr(bwd, "_mmfuse_impl", lambda *a, impl=bwd._mmfuse_impl: direct.append(bwd) or impl(*a))
    y3.sum().backward()
    assert direct[-1] is bwd and w.grad is not None


def test_triton_launch_path_mode_runs_tritons_own_launch_path():
    # `--launch triton-full`: each launch goes through Triton's JITFunction (compiled for sm_90 on the first
    # call, no GPU) to a stand-in driver's launcher, which counts it; the script restarts itself without
    # the interpreter.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "mmfuse.bench.host_overhead", "--launch", "triton-full", "--tiny",
                          "--calls", "2", "--rounds", "1", "--modes", "fwd", "--only", "linear"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Triton's launch path" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("linear"))
    assert float(row.split()[-3]) > 0 and row.endswith("1: fused_gemm_kernel"), row
    # `--profile` with `--launch triton` profiles mmfuse's launches (it once ran the PyTorch reference
    # instead): after the warm-up, kept launchers replayed, no JITFunction.run
    out = subprocess.run([sys.executable, "-m", "mmfuse.bench.host_overhead", "--launch", "triton", "--tiny",
                          "--calls", "3", "--profile", "linear", "--sort", "cumtime"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "linear" in out.stdout and "(launch_kernel)" in out.stdout and "(run)" not in out.stdout, out.stdout
    assert "linear_reference" not in out.stdout, out.stdout


def test_triton_launch_path_refuses_the_interpreter():
    from mmfuse.bench import host_overhead as H

    with pytest.raises(RuntimeError, match="interpreter off"):
        with H.triton_launch_path():
            pass


def _eager_recorded(t) -> bool:
    """Whether the op behind ``t`` (past the views and reshapes the functional API puts after it) was
    recorded by ``_EagerAutograd`` rather than torch.library's autograd."""
    node = t.grad_fn
    while node is not None and "EagerAutograd" not in type(node).__name__ and node.next_functions:
        if not any(w in type(node).__name__ for w in ("View", "Reshape", "Transpose", "Unsafe", "Permute", "Slice")):
            return False
        node = node.next_functions[0][0]
    return node is not None and "EagerAutograd" in type(node).__name__


def _training_cases():
    """(name, inputs, call) of every op with an autograd formula: small shapes, odd sizes, fp32."""
    from mmfuse.ops.merged import merged_mlp
    import mmfuse

    def r(*shape):
        return torch.randn(*shape)

    x, w1, b1, w2, b2 = r(5, 24), r(40, 24), r(40), r(8, 40), r(8)
    wg, wu, wd = r(16, 24), r(16, 24), r(8, 16)
    q, k, v, k2, v2 = r(1, 2, 3, 16), r(2, 1, 9, 16), r(2, 1, 9, 16), r(2, 1, 4, 16), r(2, 1, 4, 16)
    px, pw, pb, pos = r(2, 3, 8, 12), r(24, 3, 4, 4), r(24), r(6, 24)
    tokens, gamma, beta, mw = r(16, 6), r(6), r(6), r(10, 24)
    tmap = torch.randperm(16).reshape(4, 4)
    return [
        ("linear", [x, w1, b1], lambda x, w, b: mmfuse.linear(x, w, b, "gelu")),
        ("mlp", [x, w1, b1, w2, b2], lambda x, w1, b1, w2, b2: mmfuse.mlp(x, [w1, w2], [b1, b2])),
        ("gated_mlp", [x, wg, wu, wd], lambda x, wg, wu, wd: mmfuse.gated_mlp(x, wg, wu, wd)),
        ("merged_mlp", [tokens, mw, gamma, beta],
         lambda t, w, g, b: merged_mlp(t, [w], None, "gelu", group=4, token_map=tmap, norm="layer",
                                       norm_weight=g, norm_bias=b)),
        ("merged_mlp, pooled", [tokens, r(10, 6), gamma],
         lambda t, w, g: merged_mlp(t, [w], None, "gelu", group=4, token_map=tmap, norm="rms", norm_weight=g,
                                    norm_after_merge=True, pool=True)),
        ("patch_embed", [px, pw, pb, pos], lambda *a: mmfuse.patch_embed(*a)),
        ("cross_attention, two sources", [q, k, v, k2, v2],
         lambda q, k, v, k2, v2: mmfuse.cross_attention(q, (k, k2), (v, v2))),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _training_cases()])
def test_training_calls_run_the_ops_autograd_formula_without_torch_library(case, monkeypatch):
    """With autograd recording, ``call_op`` runs the op's registered formula (setup_context and backward)
    as a plain autograd.Function (``_EagerAutograd``): outputs and every input's gradient equal, bit for bit,
    those of the op through torch.library (taken here by making ``_nothing_watches`` say no), for every op
    that has a formula, tensor-list arguments and outputs included (mlp's weights, merged_mlp's hidden)."""
    from mmfuse import _dispatch

    torch.manual_seed(case)
    name, inputs, call = _training_cases()[case]
    results = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(_dispatch, "_nothing_watches", lambda tensors: False)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = call(*leaves)
        assert _eager_recorded(out) == eager, name
        grad = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, leaves, grad)
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2), name
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert torch.equal(a, b), (name, i)


def test_eager_autograd_path_keeps_the_ops_contract():
    """The eager path fills the op's defaults as torch.library does (the formula's setup_context unpacks every
    argument), takes only what its gradients need (an input without requires_grad gets None), leaves
    ``torch.autograd.gradcheck`` in fp64 passing, and a backward returning the wrong number of gradients is
    an error naming the op."""
    import mmfuse
    from mmfuse import _dispatch
    from mmfuse.ops import cross_attention as ops_attn

    q, k, v = (torch.randn(1, 2, 3, 8, dtype=torch.float64) for _ in range(3))
    q.requires_grad_()
    # cross_attention_fwd_op's last two arguments (k2, v2) have defaults: leave them out
    o, lse = _dispatch.call_op(ops_attn.cross_attention_fwd_op, q, k, v, None, None, 0.3, 0)
    assert _eager_recorded(o)
    (dq,) = torch.autograd.grad(o.sum(), [q])
    assert dq.shape == q.shape and torch.isfinite(dq).all()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: mmfuse.cross_attention(q, k, v), (q, k), eps=1e-6, atol=1e-5)

    class Op:  # an op whose formula returns one gradient too few
        _qualname = "mmfuse::broken"
        _mmfuse_defaults = (inspect.Parameter.empty,) * 2
        _mmfuse_impl = staticmethod(lambda x, y: x * 2)
        _mmfuse_autograd = (lambda ctx, inputs, output: None, lambda ctx, g: (g,))

    x = torch.randn(3, requires_grad=True)
    y = _dispatch.call_op(Op, x, 1.0)
    with pytest.raises(RuntimeError, match="mmfuse::broken: its backward returned 1 gradients, expected 2"):
        y.sum().backward()


def test_eager_autograd_path_hands_the_formula_needs_input_grad_per_argument():
    """A formula reads ``ctx.needs_input_grad`` as torch.library builds it: one entry per argument of the op
    (False for a non-tensor, a list for a list of tensors), not per argument of ``_EagerAutograd``."""
    from mmfuse import _dispatch

    seen = []

    class Listed:  # op(x, s, ws) = x * s + ws[0] * ws[1]
        _qualname = "mmfuse::listed"
        _mmfuse_defaults = (inspect.Parameter.empty,) * 3
        _mmfuse_impl = staticmethod(lambda x, s, ws: x * s + ws[0] * ws[1])
        _mmfuse_autograd = (lambda ctx, inputs, output: seen.append(ctx.needs_input_grad),
                            lambda ctx, g: seen.append(ctx.needs_input_grad) or (g * 2.0, None, [None, g]))

    x, a, b = torch.randn(3, requires_grad=True), torch.randn(3), torch.randn(3, requires_grad=True)
    y = _dispatch.call_op(Listed, x, 2.0, [a, b])
    (gx, gb) = torch.autograd.grad(y.sum(), [x, b])
    assert seen == [(True, False, [False, True])] * 2
    assert torch.equal(gx, torch.full((3,), 2.0)) and torch.equal(gb, torch.ones(3))


def test_batched_gradients_take_the_op():
    """Legacy vmap's batched tensors (``autograd.grad(is_grads_batched=True)``, ``gradcheck``'s batched-grad
    check, ``jacobian(vectorize=True)``) are plain tensors to ``type``: ``_nothing_watches`` tells them
    apart, so the op's batching fallback runs each entry (the kernels take no batched tensor) and the
    gradients equal the unbatched ones, row by row."""
    import mmfuse

    torch.manual_seed(0)
    x, w, b = torch.randn(5, 24, requires_grad=True), torch.randn(40, 24), torch.randn(40)
    y = mmfuse.linear(x, w, b, "gelu")
    grads = torch.randn(3, *y.shape)
    (batched,) = torch.autograd.grad(y, x, grads, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        (one,) = torch.autograd.grad(y, x, grads[i], retain_graph=True)
        torch.testing.assert_close(batched[i], one, rtol=1e-6, atol=1e-6)
