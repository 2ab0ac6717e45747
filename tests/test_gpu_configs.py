"""Every config the compile check compiles is also executed here, interpreted.

The list comes from the same source as tests/test_aot.py: ``mmfuse._aot.all_specs()``, built from each
kernel module's ``aot_specs()``. Each spec is assigned to a *run*: a call of the public op, forward and
backward, under ``kernels._common.gpu_config`` (the launchers then take the GPU's block sizes: attention
its ``gpu_blocks``, a GEMM the spec's tile with ``block_k_for`` applied; the ``EVEN_*`` heuristics are
evaluated by the launchers as on the GPU). Sizes are derived from the spec's blocks: at least two tiles
in every dimension of the launch, ragged edges, and a reduction length that is (or is not) a multiple of
BLOCK_K exactly as the spec's EVEN_K says. Values and gradients are checked under the project's rule
(``mmfuse.testing``), and the run records every interpreted launch (kernel name, constexprs, pointer
dtypes, num_warps, num_stages) and fails unless each of its specs was launched exactly so. A spec that
no run knows how to execute fails ``test_every_spec_is_executed``: a config cannot be compiled without
also being run.

The other direction: ``test_every_launchable_config_is_compiled`` enumerates every config the launchers
can pick on a GPU, from their own block and tile functions (``launchable_configs``), and fails on one that
no spec compiles, unless ``KNOWN_UNCOMPILED`` names it with the reason (measured spills, or CI time);
``test_uncompiled_config_runs`` executes each of those, so every launchable config runs interpreted.

Not compared: integer arguments the GPU's JIT specialises (a stride equal to 1 becomes a constexpr);
the interpreter does not specialise, so the same source runs either way.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import mmfuse
from mmfuse._aot import all_specs
from mmfuse.kernels import _common
from mmfuse.kernels import cross_attention as KA
from mmfuse.ops.cross_attention import cross_attention_reference
from mmfuse.ops.linear import gated_mlp_reference, linear_reference, mlp_reference
from mmfuse.ops.merged import merged_mlp_reference
from mmfuse.ops.patch_embed import patch_embed_reference
from mmfuse.testing import assert_close, assert_matches_reference

SPECS = all_specs()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp32-tf32": torch.float32,
          "fp64": torch.float64}
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
       torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}
#: Triton's launch defaults on CUDA, for launches that pass no num_warps / num_stages.
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3
RAGGED = 11  # added to a tile multiple: odd, and no multiple of any block
ACT_NAMES = {code: name for name, code in _common.ACTIVATIONS.items()}


def _cx(spec):
    return dict(spec.constexprs)


def _fn_name(spec):
    return spec.kernel.split("/", 1)[1]


# ----------------------------------------------------------------------------------------------
# Spec -> run. A run is (family, hashable parameters); runs shared by several specs execute once.
# ----------------------------------------------------------------------------------------------
def run_key(spec):
    cx, name = _cx(spec), _fn_name(spec)
    # Tiles as the kernel modules' tables write them: BLOCK_K for 2-byte dtypes (halved for 4-byte
    # ones, quartered for fp64).
    bk2 = cx.get("BLOCK_K", 0) * (4 if spec.dtype == "fp64" else 2 if spec.dtype.startswith("fp32") else 1)
    if name in ("fused_gemm_kernel", "tma_gemm_kernel"):
        tile = (cx["BLOCK_M"], cx["BLOCK_N"], bk2, spec.num_warps, spec.num_stages)
        # Which GEMM of a Linear / MLP this is, from its epilogue flags (not from the variant's words).
        # dW is the GEMM whose A (dH^T) runs along M in memory: unit stride_am, or a transposed descriptor.
        dw = dict(spec.args).get("stride_am") == 1 or cx.get("A_TRANS", False)
        kind = "dW" if dw else "dX*act'" if cx["ACT_GRAD"] else "fwd+aux" if cx["STORE_AUX"] else "fwd"
        # The gated MLP's own GEMMs (its dW GEMMs are plain dW launches).
        kind = "gated fwd" if cx.get("GATED") else "gate grad" if cx.get("GATE_GRAD") else \
            "gated dX" if cx.get("TWO_K_SOURCES") else kind
        bias = True if kind == "dW" else cx["HAS_BIAS"]  # dW runs in a Linear with a bias (db: a reduction)
        # The TMA kernel has no EVEN_K (the copy engine zero-fills the K tail): its runs take a tail.
        even_k = cx.get("EVEN_K", False)
        return ("linear", kind, ACT_NAMES[cx["ACTIVATION"]], bias, spec.dtype, tile, even_k, name)
    if name == "mapped_gemm_kernel":
        bk = cx["BLOCK_K"] * {"fp64": 4, "fp32": 2, "fp32-tf32": 2}.get(spec.dtype, 1)
        tile = (cx["BLOCK_M"], cx["BLOCK_N"], bk, spec.num_warps, spec.num_stages)
        return ("merged", cx["MAPPED"], cx["NORM"] or cx["FOLDED"], cx["NORM_POST"], spec.dtype, tile, cx["ALIGNED"],
                cx["EVEN_K"], cx["TABLE"], cx["GATED"]) + (("TMA",) if cx.get("TMA") else ()) \
            + (("FOLDED",) if cx["FOLDED"] else ())
    if name in ("norm_stats_kernel", "norm_bwd_kernel"):
        post = dict(spec.args)["G"] > 1
        # CENTER is a compile-time flag: an unfolded RMSNorm has runs of its own (a folded one is always RMS)
        return ("merged", None, True, post, spec.dtype, None, cx["ALIGNED"], None, cx["TABLE"], False) \
            + (("FOLDED",) if cx.get("FOLD") else () if cx["CENTER"] else ("RMS",))
    if name == "norm_rows_kernel":  # the normalised operand: the backward's (from FOLD_MIN_ROWS rows), or the
        # forward's with its statistics (STATS: ``written_forward_applies``, forced in the run)
        return ("merged", None, True, cx["NORM_POST"], spec.dtype, None, cx["ALIGNED"], None, cx["TABLE"], False,
                "WRITTEN" if cx.get("STATS") else "MATERIALISED") + (() if cx["CENTER"] else ("RMS",))
    if name in ("pool_norm_fwd_kernel", "pool_norm_bwd_kernel"):
        return ("pooled", spec.dtype, cx["NORM"])
    if name == "act_grad_kernel":
        return ("linear", "act'", ACT_NAMES[cx["ACTIVATION"]], True, spec.dtype, (cx["BLOCK_M"], cx["BLOCK_N"]),
                None, name)
    if name.startswith("patch_embed_") and name.endswith("_kernel") and "EVEN_K" in cx:
        args = dict(spec.args)
        T, P, run = cx["T"], cx["P"], cx.get("RUN", None)
        C = args["K"] // (T * P * (run or P))
        tile = (cx["BLOCK_M"], cx["BLOCK_N"], bk2, spec.num_warps, spec.num_stages)
        # The last field, the GEMM's variant: "split", dW's token loop split into fp32 partials (then
        # summed by dw_combine_kernel); "TMA", the Hopper core (descriptors, persistent programs).
        variant = (("split",) if name == "patch_embed_dw_kernel" and args.get("dw_ptr") == "*fp32" else ()) \
            + (("TMA",) if cx.get("TMA") else ())
        return ("patch_embed", name, spec.dtype, tile, cx["EVEN_K"], (C, T, P, cx["PIX_ALIGN"]), variant)
    if name == "dw_combine_kernel":
        return ("patch_embed", "patch_embed_dw_kernel", spec.dtype, None, None, None, ("split",))
    if name == "batch_sum_kernel":
        return ("patch_embed", name, spec.dtype, (cx["BLOCK_N"], cx["BLOCK_D"]), None, None, ())
    if name in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_combine_kernel",
                "attn_delta_kernel"):
        even = bool(cx.get("EVEN_N", False))
        short = name == "attn_fwd_kernel" and dict(spec.args)["Lq"] <= 32  # the forward's tile for <= 32 queries
        # one launch with padding (no split partials), or dQ of queries per sample (no batch loop)
        unsplit = name == "attn_fwd_kernel" and not cx["PARTIAL"] and cx["HAS_LENS"]
        per_sample = name == "attn_bwd_dq_kernel" and dict(spec.args)["stride_qb"] != 0
        # the single-pass backward (dQ's program also writes dK, dV), per tile
        single = f"single pass {cx['BLOCK_M']}x{cx['BLOCK_N']}" if cx.get("SINGLE_PASS") else None
        # (The in-kernel combine, COMBINE, runs inside its split twin's run: ``run_cross_attention``.)
        return ("cross_attention", dict(spec.args)["D"], spec.dtype, even, bool(cx.get("TWO_SOURCES", False)),
                short, "unsplit" if unsplit else "per sample" if per_sample else single)
    return ("unknown", spec.label)


RUNS: dict = {}
for _s in SPECS:
    RUNS.setdefault(run_key(_s), []).append(_s)
# The combine of dW's split partials runs inside every split dW run: assign it to the first one.
_combine = RUNS.pop(("patch_embed", "patch_embed_dw_kernel", "fp16", None, None, None, ("split",)), [])
if _combine:
    RUNS[min((k for k in RUNS if k[:2] == ("patch_embed", "patch_embed_dw_kernel") and k[-1] == ("split",)),
             key=repr)] += _combine


def test_every_spec_is_executed():
    """Every compile-check spec maps to a run of this file (a new kernel or variant needs one here)."""
    unknown = [specs[0].label for key, specs in RUNS.items() if key[0] == "unknown"]
    assert not unknown, f"compiled but never executed (add a run to tests/test_gpu_configs.py): {unknown}"
    assert sum(len(v) for v in RUNS.values()) == len(SPECS)


# ----------------------------------------------------------------------------------------------
# Recording interpreted launches
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def recorded(monkeypatch):
    from triton.runtime import interpreter

    out = []
    real = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)
        ptrs = {n: PTR.get(v.dtype) for n, v in named.items() if isinstance(v, torch.Tensor)}
        ptrs.update({n: f"tensordesc<{PTR[v.base.dtype][1:]}[{', '.join(map(str, v.block_shape))}]>"
                     for n, v in named.items() if isinstance(v, TensorDescriptor)})
        ints = {n: v for n, v in named.items() if isinstance(v, int) and not isinstance(v, bool)
                and n not in self.constexprs}
        ordered = tuple((n, ptrs[n] if n in ptrs else ints[n]) for n in named if n in ptrs or n in ints)
        out.append(dict(name=self.fn.__name__, cx={n: named.get(n) for n in self.constexprs}, ptrs=ptrs,
                        args=ordered, warps=kwargs.get("num_warps", DEFAULT_WARPS),
                        stages=kwargs.get("num_stages", DEFAULT_STAGES),
                        options={n: kwargs.get(n) for n in _common.LAUNCH_OPTIONS}))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    return out


def _launched(spec, launches) -> bool:
    want_cx = _cx(spec)
    want_ptrs = {n: v for n, v in spec.args if isinstance(v, str)}
    for rec in launches:
        # the compile options too: the compile check compiles with LAUNCH_OPTIONS (FMA fusion stated)
        if rec["name"] != _fn_name(spec) or (rec["warps"], rec["stages"]) != (spec.num_warps, spec.num_stages) \
                or rec["options"] != _common.LAUNCH_OPTIONS:
            continue
        if all(rec["cx"].get(n) == v for n, v in want_cx.items()) and \
                all(rec["ptrs"].get(n) == v for n, v in want_ptrs.items()):
            return True
    return False


def _closest(spec, launches):
    same = [r for r in launches if r["name"] == _fn_name(spec)]
    if not same:
        return f"no launch of {_fn_name(spec)}"
    want = _cx(spec)
    diffs = []
    for r in same:
        d = {n: (r["cx"].get(n), v) for n, v in want.items() if r["cx"].get(n) != v}
        d.update({n: (r["ptrs"].get(n), v) for n, v in spec.args if isinstance(v, str) and r["ptrs"].get(n) != v})
        if (r["warps"], r["stages"]) != (spec.num_warps, spec.num_stages):
            d["warps/stages"] = ((r["warps"], r["stages"]), (spec.num_warps, spec.num_stages))
        diffs.append(d)
    return "closest launch differs in (launched, compiled): " + str(min(diffs, key=len))


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _block_k(tile, dtype):
    from mmfuse.kernels.linear import block_k_for

    return block_k_for(tile[2], torch.empty((), dtype=dtype).element_size())


def _values_and_grads(fn, ref_fn, inputs, names, grad_of):
    """The error rule on the output and on the gradients of the inputs named in ``grad_of`` only (the
    others are constants of both functions): a run launches the backward kernels it checks, no more."""
    if not grad_of:
        with torch.no_grad():
            out = fn(*inputs)
            if out.dtype == torch.float64:  # no higher precision: see below
                ref = ref_fn(*inputs)
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
            else:
                assert_close("out", out, ref_fn(*[t.double() for t in inputs]), ref_fn(*inputs))
        return
    idx = [names.index(n) for n in grad_of]

    def bind(f):
        def call(*diff):
            full = [t.to(diff[0].dtype) for t in inputs]
            for i, t in zip(idx, diff):
                full[i] = t
            return f(*full)
        return call

    diff = [inputs[i] for i in idx]
    if diff[0].dtype == torch.float64:
        # fp64 (the gradcheck path) has no higher precision to measure the reference's own error
        # against, so the error rule degenerates to its floor; a summation-order difference of
        # 1e-15 is not a failure. A relative 1e-10 still catches any wrong value.
        outs = []
        for f in (fn, ref_fn):
            leaves = [t.detach().clone().requires_grad_() for t in diff]
            y = bind(f)(*leaves)
            outs.append([y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())
        return
    assert_matches_reference(bind(fn), bind(ref_fn), diff, list(grad_of))


def _red(block_k, even_k):
    """A reduction length of two BLOCK_K steps, with a tail when the spec's EVEN_K is False."""
    return 2 * block_k + (0 if even_k else RAGGED)


# ----------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------
def run_linear(kind, act, bias, dtype, tile, even_k, ragged=RAGGED):
    """One Linear (or a 2-layer MLP for the hidden layer's dX * act'(h)) whose targeted GEMM spans two
    ragged tiles of ``tile`` in its output and reduces over 2 BLOCK_K (+ a tail unless EVEN_K)."""
    if kind == "act'":  # act_grad_kernel: its block is fixed; a Linear + activation backward launches it
        M, N, K = tile[0] + ragged, tile[1] + ragged, 24
    else:
        bm, bn, bk = tile[0], tile[1], _block_k(tile, dtype)
        rows, cols, red = bm + ragged, bn + ragged, 2 * bk + (0 if even_k else ragged)
        # GEMM (rows, cols, red) is (M, N, K) forward, (N, K, M) for dW, (M, N1, N2) for the MLP's dX.
        M, N, K = {"fwd": (rows, cols, red), "fwd+aux": (rows, cols, red), "dW": (red, rows, cols),
                   "dX*act'": (rows, cols, red)}[kind]
    if kind == "dX*act'":
        M, N1, N2 = M, N, K
        x = torch.randn(M, 24, dtype=dtype)
        ws = [torch.randn(N1, 24, dtype=dtype) / 24 ** 0.5, torch.randn(N2, N1, dtype=dtype) / N1 ** 0.5]
        bs = [torch.randn(N1, dtype=dtype), torch.randn(N2, dtype=dtype)]
        names = ["x", "w0", "w1", "b0", "b1"]
        return _values_and_grads(lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation=act),
                                 lambda x, *p: mlp_reference(x, p[:2], p[2:], activation=act), [x, *ws, *bs],
                                 names, names)
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K ** 0.5
    inputs = [x, w, torch.randn(N, dtype=dtype)] if bias else [x, w]
    names = ["x", "weight", "bias"][:len(inputs)]
    # A forward that stores no pre-activation is the inference forward: values only, no autograd.
    _values_and_grads(lambda *t: mmfuse.linear(*t, activation=act), lambda *t: linear_reference(*t, activation=act),
                      inputs, names, () if kind == "fwd" else tuple(names))


def run_gated(kind, act, dtype, tile, even_k, ragged=RAGGED):
    """A gated MLP whose targeted GEMM spans two ragged tiles of ``tile`` and reduces over 2 BLOCK_K
    (+ a tail unless EVEN_K): the gate/up forward is (M, N, K), [dG | dU] (M, N, D), dX (M, K, N)
    for x (M, K), hidden width N, output width D. Values and every gradient. ``ragged`` 8 keeps
    every row 16-byte aligned (TMA's rule)."""
    rows, cols = tile[0] + ragged, tile[1] + ragged
    red = 2 * _block_k(tile, dtype) + (0 if even_k else ragged)
    M, K, N, D = {"gated fwd": (rows, red, cols, 24), "gate grad": (rows, 24, cols, red),
                  "gated dX": (rows, cols, red, 24)}[kind]
    x = torch.randn(M, K, dtype=dtype)
    wg, wu = (torch.randn(N, K, dtype=dtype) / K ** 0.5 for _ in range(2))
    wd = torch.randn(D, N, dtype=dtype) / N ** 0.5
    bs = [torch.randn(n, dtype=dtype) for n in (N, N, D)]
    names = ["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"]
    act = act or "silu"  # the dX GEMM has no epilogue activation of its own
    _values_and_grads(lambda *t: mmfuse.gated_mlp(*t, activation=act),
                      lambda *t: gated_mlp_reference(*t, activation=act), [x, wg, wu, wd, *bs], names, names)


def run_merged(mapped, norm, post, dtype, tile, aligned, even_k, table, gated=False, ragged=RAGGED, folded=False,
               materialised=False, written=False, rms=False):
    """A merged projector (``mmfuse.merged_mlp``, G = 2 tokens per row, a shuffled token table or none
    (``table``: adjacent rows, Qwen's view merge), LayerNorm
    per token or per merged row, or none) whose targeted mapped GEMM spans two tiles of ``tile`` and
    reduces over 2 BLOCK_K (+ a tail unless EVEN_K); C a multiple of the block along the merged
    columns when ALIGNED, else 40. ``mapped`` None: the row-wise kernels at GPU blocks (GEMMs at the
    interpreter's tile). ``gated``: the first layer a SwiGLU on one chunked weight (its forward GEMM's
    N is the gate's width). ``ragged``: 8 for the Hopper core (rows of dH stay 16-byte aligned, TMA's
    rule). ``folded``: an RMSNorm, folded into the first weight at any row count; ``materialised``: the
    backward's normalised operand written at any row count; ``written``: the forward's too
    (``MMFUSE_MERGED_FORWARD=written``: its statistics in the same launch where a program owns its
    rows); ``rms``: an RMSNorm, not folded. Values and every gradient."""
    G = 2
    if mapped is None:  # C a multiple of the row-wise BLOCK_C (128) when ALIGNED
        C, M, N1 = (128 if aligned else 40), 21, 24
    else:
        bm, bn, bk = tile[0], tile[1], _block_k(tile, dtype)
        red = 2 * bk + (0 if even_k else ragged)
        C = {0: bk, 1: bn, 2: bn}[mapped] if aligned else 40
        M, N1 = {0: (bm + ragged, bn + ragged), 1: (red, bm + ragged), 2: (bm + ragged, red)}[mapped]
        if mapped == 0 and not aligned:
            assert (G * C) % bk != 0 or even_k
    T = G * M
    x = torch.randn(T, C, dtype=dtype)
    tmap = torch.randperm(T).view(M, G) if table else None
    width = G * C if post else C
    halves = 2 if gated else 1
    ws = [torch.randn(halves * N1, G * C, dtype=dtype) / (G * C) ** 0.5, torch.randn(16, N1, dtype=dtype) / N1 ** 0.5]
    bs = [torch.randn(halves * N1, dtype=dtype), torch.randn(16, dtype=dtype)]
    norm_kw = dict(norm=("rms" if folded or rms else "layer") if norm else None, norm_after_merge=post)
    extra = [(1 + 0.2 * torch.randn(width)).to(dtype), torch.randn(width, dtype=dtype)][:1 if folded or rms else 2] \
        if norm else []
    names = ["x", "w1", "w2", "b1", "b2"] + ["gamma", "beta"][:len(extra)]

    def call(f):
        return lambda x, w1, w2, b1, b2, *nb: f(x, [w1, w2], [b1, b2], "silu" if gated else "gelu", group=G,
                                               token_map=tmap, norm_weight=nb[0] if nb else None,
                                               norm_bias=nb[1] if len(nb) > 1 else None, eps=1e-5,
                                               gate_half=1 if gated else None, **norm_kw)

    from mmfuse.kernels import merged_gemm as KM

    with _patched(KM, "FOLD_MIN_ROWS", 0 if folded or materialised else 1 << 30), \
            _patched(KM, "MERGED_FORWARD", "written" if written else "in-load"):
        _values_and_grads(call(mmfuse.merged_mlp), call(merged_mlp_reference), [x, *ws, *bs, *extra], names, names)


def run_pooled(dtype, norm):
    """Average pooling then the norm (``mmfuse.merged_mlp(pool=True)``, Gemma 3's form: RMSNorm scaled by
    1 + weight), the row-wise kernels at their GPU blocks: two programs of rows and two channel blocks,
    both ragged; 4 tokens per window through a shuffled table. Values and every gradient."""
    from mmfuse.kernels import merged_gemm as KM

    with _common.gpu_config({}):
        br, bc = KM.pool_blocks(dtype)
    M, C, G = br + RAGGED, 2 * bc + RAGGED, 4
    x = torch.randn(M * G, C, dtype=dtype)
    tmap = torch.randperm(M * G).view(M, G)
    w = torch.randn(16, C, dtype=dtype) / C ** 0.5
    extra = [(0.3 * torch.randn(C)).to(dtype)] if norm else []
    names = ["x", "w"] + ["gamma"] * len(extra)

    def call(f):
        return lambda x, w, *g: f(x, [w], None, None, group=G, token_map=tmap, pool=True, norm="rms" if norm else None,
                                  norm_weight=g[0] if g else None, norm_after_merge=True,
                                  norm_weight_offset=1.0 if norm else 0.0)

    _values_and_grads(call(mmfuse.merged_mlp), call(merged_mlp_reference), [x, w, *extra], names, names)


def run_patch_embed(name, dtype, tile, even_k, geometry, tma=False):
    """``tma``: sizes that keep dOut's rows 16-byte aligned (D ragged by 8, TMA's rule), as the
    Hopper core needs to take the GEMM."""
    if name == "batch_sum_kernel":  # dpos of a shared table, db from its sums: B = 2, N and D past one block
        C, T, P, B, grid, D, align = 3, 1, 4, 2, (1, 6, 6), tile[1] + RAGGED, 16
    else:
        C, T, P, align = geometry
        bm, bn, bk = tile[0], tile[1], _block_k(tile, dtype)
        # Tokens span two row tiles (ragged) except where they are dW's reduction (EVEN_K: 2 x BLOCK_K).
        ragged = 8 if tma else RAGGED
        if name == "patch_embed_dw_kernel":
            D, tokens = bm + ragged, _red(bk, even_k)
            B = 2 if tokens % 2 == 0 else 1
        else:
            B, tokens = 2, bm + RAGGED
            D = bn + ragged if name == "patch_embed_fwd_kernel" else 2 * bk + (0 if even_k else ragged)
        per_image = -(-tokens // B)
        gw = max(2, int(per_image ** 0.5))
        if name == "patch_embed_dx_kernel":
            # dpixels is allocated contiguous: its row (gw * P pixels) sets PIX_ALIGN, so gw carries
            # the spec's power of two that P lacks.
            unit = max(1, align // (P & -P))
            gw = unit * max(1, round(gw / unit))
        grid = (1, -(-per_image // gw), gw)
        if name == "patch_embed_dw_kernel":  # the reduction length must be exactly ``tokens``
            grid = (1, 1, tokens // B)
        else:
            M = B * grid[1] * grid[2]
            assert M > bm and M % bm, f"{M} tokens: not two ragged tiles of {bm}"
    F = grid[0] * T
    video = T > 1
    shape = (B, C, F, grid[1] * P, grid[2] * P) if video else (B, C, grid[1] * P, grid[2] * P)
    # Rows pitched so that the pixel strides' largest common power of two is the spec's PIX_ALIGN.
    pitch = -(-shape[-1] // align)
    pitch = (pitch + 1 - pitch % 2) * align
    x = torch.randn((*shape[:-1], pitch), dtype=dtype)[..., :shape[-1]]
    w = torch.randn((D, C, T, P, P) if video else (D, C, P, P), dtype=dtype) / (C * T * P * P) ** 0.5
    b = torch.randn(D, dtype=dtype)
    pos = torch.randn(grid[0] * grid[1] * grid[2], D, dtype=dtype)
    grad_of = {"patch_embed_fwd_kernel": (), "patch_embed_dx_kernel": ("pixels",),
               "patch_embed_dw_kernel": ("weight", "bias"), "batch_sum_kernel": ("pos_embed", "bias")}[name]
    _values_and_grads(mmfuse.patch_embed, patch_embed_reference, [x, w, b, pos],
                      ["pixels", "weight", "bias", "pos_embed"], grad_of)


def run_cross_attention(D, dtype, even, two=False, short=False, form=None):
    """Broadcast queries (Bq = 1), 4 query heads over 2 KV heads, batch 2. Padded: kv_lens (int32) and
    key_mask, keys split 2 ways (fp32 partials + combine, then the forward again with the merge in the
    split kernel, 16-bit and fp32); even: no padding, Lk two whole key blocks.
    ``two``: the keys come from two sources (the perceiver's media and latents), never concatenated."""
    elem = torch.empty((), dtype=dtype).element_size()
    ieee = elem == 4 and _common.dot_precision(dtype) == "ieee"  # fp32's FMA tiles
    fwd = KA.gpu_blocks(64, D, elem_bytes=elem, ieee=ieee)
    bwd = KA.gpu_blocks(64, D, backward=True, elem_bytes=4 if ieee else 2, ieee=ieee)
    if form and form.startswith("single pass"):
        return run_single_pass(D, dtype, *map(int, form.split()[-1].split("x")))
    # > 32: the GPU's 64-query forward tile, 2 tiles; 3 backward tiles. ``short``: 27 queries, the
    # 32-query forward tile.
    Lq = 32 - 5 if short else fwd["BLOCK_M"] + RAGGED
    B, Hq, Hkv = 2, 4, 2
    Lk = 2 * max(fwd["BLOCK_N"], bwd["BLOCK_N"]) + (0 if even else RAGGED)
    # ``form``: "unsplit" (padding, one forward launch) or "per sample" (queries per sample).
    q = torch.randn(B if form == "per sample" else 1, Hq, Lq, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, Lk, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype)
    kw, splits = {}, 1
    if not even:
        kw = dict(kv_lens=torch.tensor([Lk, Lk - 2 * RAGGED], dtype=torch.int32), key_mask=torch.rand(B, Lk) > 0.2)
        splits = 1 if form == "unsplit" else 2
    if two:  # the second source: the last 7 keys (the seam inside a key block); the mask covers the first
        L1 = Lk - 7
        mask1 = kw.pop("key_mask")[:, :L1]
        full = torch.cat([mask1, torch.ones(B, Lk - L1, dtype=torch.bool)], 1)

        def ours(q, k, v):
            return mmfuse.cross_attention(q, (k[:, :, :L1], k[:, :, L1:]), (v[:, :, :L1], v[:, :, L1:]),
                                          key_mask=mask1, _splits=splits, **kw)

        def ref(q, k, v):
            return cross_attention_reference(q, k, v, key_mask=full, **kw)
    else:
        def ours(q, k, v):
            return mmfuse.cross_attention(q, k, v, _splits=splits, **kw)

        def ref(q, k, v):
            return cross_attention_reference(q, k, v, **kw)
    # Values and gradients with the partials merged by their own launch (the split kernel's partial form and
    # attn_combine_kernel; what CUDA-graph capture takes). (fp64, the gradchecks' dtype, is compared as
    # _values_and_grads says: no higher precision exists.)
    with _patched(KA, "SPLIT_COMBINE", "launch"):
        _values_and_grads(ours, ref, [q, k, v], ["q", "k", "v"], ("q", "k", "v"))
    if splits > 1 and dtype != torch.float64:
        # The split forward with its merge in the same launch (the default outside capture; at its own warps
        # where they differ, ``gpu_blocks``): the same bits as the merge launch just checked.
        with torch.no_grad():
            with _patched(KA, "SPLIT_COMBINE", "launch"):
                launched = ours(q, k, v)
            with _patched(KA, "SPLIT_COMBINE", "kernel"):
                merged = ours(q, k, v)
        assert torch.equal(merged, launched)


def run_single_pass(D, dtype, block_m, block_n):
    """The single-pass backward at the tile (block_m x block_n): no head groups (2 heads), broadcast
    queries filling most of one block, batch 2 with kv_lens and key_mask, dQ's batch loop split 2 ways."""
    Lq = block_m - 5 if block_m > 32 else block_m - 3
    ieee = _common.dot_precision(dtype) == "ieee"
    assert KA.single_pass_blocks(Lq, D, torch.empty((), dtype=dtype).element_size(), ieee=ieee)["BLOCK_M"] == block_m
    B, H, Lk = 2, 2, 2 * block_n + RAGGED
    q = torch.randn(1, H, Lq, D, dtype=dtype)
    k, v = torch.randn(B, H, Lk, D, dtype=dtype), torch.randn(B, H, Lk, D, dtype=dtype)
    kw = dict(kv_lens=torch.tensor([Lk, Lk - 2 * RAGGED], dtype=torch.int32), key_mask=torch.rand(B, Lk) > 0.2)
    with _patched(KA, "bwd_plan", lambda *a, **k: (True, 2, 1)):
        return _values_and_grads(
            lambda q, k, v: mmfuse.cross_attention(q, k, v, **kw),
            lambda q, k, v: cross_attention_reference(q, k, v, **kw), [q, k, v], ["q", "k", "v"], ("q", "k", "v"))


def _execute(key):
    family, *params = key
    if family == "linear":
        from mmfuse.kernels import linear as KL

        kind, act, bias, dtype_name, tile, even_k, kernel = params
        tiles = {kernel: tile} if len(tile) == 5 else {}
        tma = kernel == "tma_gemm_kernel"
        # The TMA kernel as the GPU launches it (132 persistent programs), on operands whose row
        # strides keep TMA's 16-byte alignment (ragged by 8 elements instead of 11).
        with _tf32(dtype_name == "fp32-tf32"), _common.gpu_config(tiles), \
                _patched(KL, "TMA", "always" if tma else "never"), _patched(KL, "TMA_PROGRAMS", 132 if tma else None):
            if kind.startswith("gate"):
                run_gated(kind, act, DTYPES[dtype_name], tile, even_k, ragged=8 if tma else RAGGED)
            else:
                run_linear(kind, act, bias, DTYPES[dtype_name], tile, even_k, ragged=8 if tma else RAGGED)
    elif family == "merged":
        from mmfuse.kernels import linear as KL

        mapped, norm, post, dtype_name, tile, aligned, even_k, table, gated, *flags = params
        tma = "TMA" in flags
        # The Hopper core (the weight and dH by TMA) as a GPU launches it: 132 persistent programs.
        with _tf32(dtype_name == "fp32-tf32"), _common.gpu_config({"mapped_gemm_kernel": tile} if tile else {}), \
                _patched(KL, "TMA", "always" if tma else "never"), _patched(KL, "TMA_PROGRAMS", 132 if tma else None):
            run_merged(mapped, norm, post, DTYPES[dtype_name], tile, aligned, even_k, table, gated,
                       ragged=8 if tma else RAGGED, folded="FOLDED" in flags, materialised="MATERIALISED" in flags,
                       written="WRITTEN" in flags, rms="RMS" in flags)
    elif family == "pooled":
        dtype_name, norm = params
        with _common.gpu_config({}):
            run_pooled(DTYPES[dtype_name], norm)
    elif family == "patch_embed":
        from mmfuse.kernels import patch_embed as KP

        from mmfuse.kernels import linear as KL

        name, dtype_name, tile, even_k, geometry, variant = params
        split, tma = "split" in variant, "TMA" in variant
        # dW's split count as the spec compiled it (2 ways into fp32 partials, or none), not the model's
        # choice at these test sizes; the forward on the TMA core as the GPU launches it (132 programs).
        with _tf32(dtype_name == "fp32-tf32"), _common.gpu_config({name: tile} if len(tile) == 5 else {}), \
                _patched(KP, "dw_splits", lambda *a, **k: 2 if split else 1), \
                _patched(KL, "TMA", "always" if tma else "never"), _patched(KL, "TMA_PROGRAMS", 132 if tma else None):
            run_patch_embed(name, DTYPES[dtype_name], tile, even_k, geometry, tma=tma)
    elif family == "cross_attention":
        D, dtype_name, even, two, short, form = params
        # "per sample": dQ unsplit as the spec compiled it, not the split rule's choice at these sizes.
        with _tf32(dtype_name == "fp32-tf32"), _common.gpu_config(), \
                _patched(KA, "dq_splits_for", (lambda *a, **k: (1, 1)) if form else KA.dq_splits_for):
            run_cross_attention(D, DTYPES[dtype_name], even, two, short, form)
    else:
        pytest.fail(f"no run executes {params[0]}")


KEYS = sorted((k for k in RUNS if k[0] != "unknown"), key=repr)


@pytest.mark.parametrize("key", KEYS, ids=[RUNS[k][0].label if len(RUNS[k]) == 1 else
                                           f"{k[0]} {' '.join(map(str, k[1:]))}" for k in KEYS])
def test_gpu_config_runs(key, recorded):
    """The run's values and gradients pass the error rule, and every spec assigned to it was launched
    with exactly its constexprs, pointer dtypes, warps and stages."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))
    _execute(key)
    missing = [f"{s.label}: {_closest(s, recorded)}" for s in RUNS[key] if not _launched(s, recorded)]
    assert not missing, "compiled configs not executed:\n" + "\n".join(missing)
# ----------------------------------------------------------------------------------------------
# Coverage: every configuration a GPU launcher can choose is a compile-check spec
# ----------------------------------------------------------------------------------------------
#: The dtype classes a launcher tells apart: (operand bytes, INPUT_PRECISION, accumulator). fp16 and
#: bf16 are one class: the launchers pick the same tile, warps and constexprs for both (only the MMA's
#: operand type differs), so a spec in either covers the class.
_F32, _F64 = "fp32", "fp64"
DTYPE_CLASSES = {  # class -> (torch dtype, TF32 on)
    (2, "ieee", _F32): (torch.float16, False),
    (4, "ieee", _F32): (torch.float32, False),
    (4, "tf32", _F32): (torch.float32, True),
    (8, "ieee", _F64): (torch.float64, False),
}
_ELEM = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}


def _acc_name(acc) -> str:
    return _F64 if acc == tl.float64 else _F32


def launchable_configs() -> dict:
    """{config key: where a launcher takes it}, enumerated from the launchers' own tables and functions
    (attention: ``block_d``, ``gpu_blocks``, ``rowwise_blocks`` over every head dim 1..256 and both
    query-count classes; GEMMs: ``pointer_tiles`` / ``tma_tiles`` / ``FP64_TILE`` / the patch ``TILES``,
    every tile of which ``candidate_tiles`` may keep, with ``block_k_for``), in every dtype class.
    A key: (kernel, block sizes, num_warps, num_stages, dtype class[, the GEMM's role]). Flags that
    change neither the tile nor the dtype (padding, two sources, split partials, the epilogue's
    activation) are not part of it: the specs vary them at representative configs."""
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.kernels import patch_embed as KP

    out = {}
    for (elem, prec, acc), (dtype, _) in DTYPE_CLASSES.items():
        cls = (elem, prec, acc)
        for D in range(1, 257):
            bd = KA.block_d(D, gpu=True)
            for Lq in (1, 32, 33, 4096):
                for name, backward in (("attn_fwd_kernel", False), ("attn_bwd_dkdv_kernel", True),
                                       ("attn_bwd_dq_kernel", True), ("single pass", True)):
                    ieee = prec == "ieee"
                    if name == "single pass":
                        forms = [(KA.single_pass_blocks(Lq, D, elem, gpu=True, ieee=ieee), ())]
                        name = "attn_bwd_dq_kernel"
                    else:
                        forms = [(KA.gpu_blocks(Lq, D, backward=backward, elem_bytes=elem, ieee=ieee), ())]
                        if name == "attn_bwd_dkdv_kernel":
                            forms = [(dict(forms[0][0], num_stages=KA.dkdv_stages(forms[0][0])), ())]
                        if name == "attn_fwd_kernel" and elem <= 4:  # the in-kernel combine (not fp64)
                            forms.append((KA.gpu_blocks(Lq, D, elem_bytes=elem, combine=True, ieee=ieee),
                                          ("combine",)))
                    for b, flag in forms:
                        key = (name, (b["BLOCK_M"], b["BLOCK_N"], bd), b["num_warps"], b["num_stages"], cls, *flag)
                        out.setdefault(key, f"cross_attention {dtype} D={D} Lq={Lq}")
            rb = KA.rowwise_blocks(D, gpu=True)
            for name in ("attn_combine_kernel", "attn_delta_kernel"):  # fp32 or fp64 rows, whatever the input
                out.setdefault((name, (rb["BLOCK_M"], rb["BLOCK_D"]), rb["num_warps"], 1, acc),
                               f"cross_attention {dtype} D={D}")
        # The linear GEMMs: the forward (any epilogue; also the plain dX = dH W), dX * act'(h), dW.
        for role, act_grad in (("fwd", False), ("dX*act'", True), ("dW", False)):
            tiles = [KL.FP64_TILE] if elem == 8 else KL.pointer_tiles(act_grad, elem, prec == "ieee", role == "dW")
            for bm, bn, bk, warps, stages in tiles:
                out.setdefault(("fused_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls, role),
                               f"linear {dtype} {role}")
            if elem == 2 or prec == "tf32":  # the Hopper kernel: 16-bit operands and TF32
                for bm, bn, bk, warps, stages in KL.tma_tiles(act_grad, elem):
                    out.setdefault(("tma_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls, role),
                                   f"linear {dtype} {role} TMA")
        bm, bn = KL.ACT_GRAD_BLOCKS[elem]
        out.setdefault(("act_grad_kernel", (bm, bn), 4, 1, acc), f"linear {dtype} act'")
        for gemm, tiles in KP.TILES.items():
            for bm, bn, bk, warps, stages in tiles:
                out.setdefault((KP._kernels[gemm].__name__, (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls),
                               f"patch_embed {dtype} {gemm}")
            # The Hopper core: 16-bit and TF32.
            for bm, bn, bk, warps, stages in (KP.TMA_TILES[elem][gemm] if elem == 2 or prec == "tf32" else ()):
                out.setdefault((KP._kernels[gemm].__name__, (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls,
                                "TMA"), f"patch_embed {dtype} {gemm} TMA")
        # The gated MLP's own GEMMs (its dW GEMMs are the linear dW above), and on the TMA kernel in 16 bits.
        for kind, role in (("gated", "gated fwd"), ("gate_grad", "gate grad"), ("two_k", "gated dX")):
            for bm, bn, bk, warps, stages in ([KL.FP64_TILE] if elem == 8 else KL.GATED_TILES[kind, elem]):
                out.setdefault(("fused_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls, role),
                               f"gated mlp {dtype} {role}")
            for bm, bn, bk, warps, stages in (KL.tma_gated_tiles(kind, elem) if elem == 2 or prec == "tf32" else ()):
                out.setdefault(("tma_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls, role),
                               f"gated mlp {dtype} {role} TMA")
        # The merged projector: its three mapped GEMMs, and the row-wise norm kernels (their input dtype
        # is the class; no dot, so TF32 or not is the same kernel).
        # Channel counts the blocks divide (ALIGNED) take every tile; others the gather tile. (C = 2^16
        # is divided by every block; C = 1176 by none.)
        # The gated forward (Aya Vision, Command A) has tiles of its own.
        for mapped, gated in ((0, False), (1, False), (2, False), (0, True)):
            for C, aligned in ((1 << 16, True), (1176, False)):
                for bm, bn, bk, warps, stages in KM.mapped_tiles(elem, prec, C, mapped, gated):
                    out.setdefault(("mapped_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls,
                                    mapped, aligned, gated),
                                   f"merged mlp {dtype} mapped={mapped} aligned={aligned} gated={gated}")
                # the Hopper core (the weight / dH by TMA): 16-bit and TF32
                for bm, bn, bk, warps, stages in (KM.mapped_tiles(elem, prec, C, mapped, gated, tma=True)
                                                  if elem == 2 or prec == "tf32" else ()):
                    out.setdefault(("mapped_gemm_kernel", (bm, bn, KL.block_k_for(bk, elem)), warps, stages, cls,
                                    mapped, aligned, gated, "TMA"),
                                   f"merged mlp {dtype} mapped={mapped} aligned={aligned} gated={gated} TMA")
        for blocks in (KM.ROWWISE, KM.ROWWISE_GATHER):
            for name in ("norm_stats_kernel", "norm_bwd_kernel", "norm_rows_kernel"):
                out.setdefault((name, blocks, 4, 1, (elem, "ieee", acc)), f"merged mlp {dtype} norm")
        for name in ("pool_norm_fwd_kernel", "pool_norm_bwd_kernel"):
            blocks = KM.POOL_ROWWISE_FP64 if elem == 8 else KM.POOL_ROWWISE
            out.setdefault((name, blocks, 4, 1, (elem, "ieee", acc)), f"merged mlp {dtype} pool")
        out.setdefault(("dw_combine_kernel", KP.COMBINE_BLOCK, 4, 1, acc), f"patch_embed {dtype} dW split")
        out.setdefault(("batch_sum_kernel", KP.BATCH_SUM_BLOCK, 4, 1, acc), f"patch_embed {dtype} dpos")
    return out


def spec_config(spec):
    """The config key of a compile-check spec (``launchable_configs``' form)."""
    cx, args, name = _cx(spec), dict(spec.args), _fn_name(spec)
    acc = _acc_name(cx["ACC_DTYPE"])
    if name in ("attn_combine_kernel", "attn_delta_kernel", "dw_combine_kernel", "batch_sum_kernel",
                "act_grad_kernel"):
        blocks = tuple(cx[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K") if b in cx)
        return (name, blocks, spec.num_warps, spec.num_stages, acc)
    first_ptr = next(v for v in args.values() if isinstance(v, str))
    elem = _ELEM.get(first_ptr) or {"fp16": 2, "bf16": 2, "fp32": 4}[first_ptr.split("<")[1].split("[")[0]]
    cls = (elem, cx.get("INPUT_PRECISION", "ieee"), acc)
    blocks = tuple(cx[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K", "BLOCK_R", "BLOCK_C") if b in cx)
    key = (name, blocks, spec.num_warps, spec.num_stages, cls)
    if name in ("fused_gemm_kernel", "tma_gemm_kernel"):
        dw = args.get("stride_am") == 1 or cx.get("A_TRANS", False)
        role = "dW" if dw else "dX*act'" if cx["ACT_GRAD"] else "fwd"
        role = "gated fwd" if cx.get("GATED") else "gate grad" if cx.get("GATE_GRAD") else \
            "gated dX" if cx.get("TWO_K_SOURCES") else role
        key += (role,)
    if name == "mapped_gemm_kernel":
        key += (cx["MAPPED"], cx["ALIGNED"], cx["GATED"])
    if cx.get("TMA") is True:  # a patch GEMM on the Hopper core
        key += ("TMA",)
    if cx.get("COMBINE"):  # the attention forward merging its splits in the kernel (its own registers)
        key += ("combine",)
    return key


#: Configs a GPU launcher can choose that no spec compiles yet, each rule with its reason. Every rule must
#: match at least one such config (a gap closed is a rule deleted), and no config may fall outside them.
KNOWN_UNCOMPILED = [
    ("fp32 attention's dK/dV at BLOCK_D 256 without TF32 (the default: torch's allow_tf32 is off)",
     lambda k: k[0] == "attn_bwd_dkdv_kernel" and k[1][2] == 256 and k[4] == (4, "ieee", _F32),
     "spills on every tile tried (320-400 B at 16x16 w8 on Triton 3.6-3.9): the FMA dot holds whole operand "
     "rows per thread (bench/NOTES.md); IEEE fp32's other attention tiles (gpu_blocks' ieee) are compiled"),
    ("fp64 attention dK/dV past BLOCK_D 64 and dQ at 256",
     lambda k: k[-1] == (8, "ieee", _F64) and ((k[0] == "attn_bwd_dkdv_kernel" and k[1][2] > 64)
                                               or (k[0] == "attn_bwd_dq_kernel" and k[1][2] == 256)),
     "spill on every tile tried on some Triton of 3.6-3.9 (dK/dV at 128: 8-24 B on 3.6 at 16x16 w8, 32 B "
     "on 3.8/3.9 at 16x32; at 256: 400-4000 B; dQ at 256: 8-1336 B): Q and dO are MMA A operands of "
     "8 fp64 rows x D per warp"),
    ("fp32-TF32 attention forward at BLOCK_D 256 (with either merge)", lambda k: k[0] == "attn_fwd_kernel"
     and k[1][2] == 256 and k[4] == (4, "tf32", _F32), "spills 64 B on sm_90 (Triton 3.9.0) at 64x32x256 w8"),
    ("the merged projector's GEMMs in fp32 / fp64 with C no block divides (the per-element token gather)",
     lambda k: k[0] == "mapped_gemm_kernel" and not k[6] and k[4][0] in (4, 8),
     "not compiled for CI time; their aligned twins and the bf16 gather are (no spills)"),
    ("patch_embed GEMMs in fp32 (IEEE: dX, dW, two forward tiles; TF32: dX, dW) and every fp64 kernel",
     lambda k: k[0] in ("patch_embed_fwd_kernel", "patch_embed_dx_kernel", "patch_embed_dw_kernel",
                        "dw_combine_kernel", "batch_sum_kernel")
     and k[-1] in (_F64, (8, "ieee", _F64), (4, "ieee", _F32), (4, "tf32", _F32)),
     "not compiled for CI time (25 configs, ~20 s of compiles per Triton version); not checked for spills"),
]


def test_every_launchable_config_is_compiled():
    """Each configuration a GPU launcher can choose (enumerated from the launchers' own block and tile
    functions, not copied) is a compile-check spec: compiled for sm_80 / sm_90 without spills by
    tests/test_aot.py, and executed interpreted by ``test_gpu_config_runs`` above."""
    compiled = {spec_config(s) for s in SPECS}
    missing = {k: where for k, where in launchable_configs().items() if k not in compiled}
    known = {k for k in missing if any(rule(k) for _, rule, _ in KNOWN_UNCOMPILED)}
    unknown = {k: where for k, where in missing.items() if k not in known}
    assert not unknown, f"{len(unknown)} GPU configs never compiled (nor executed):\n" + "\n".join(
        f"{k} ({where})" for k, where in sorted(unknown.items(), key=repr))
    stale = [what for what, rule, _ in KNOWN_UNCOMPILED if not any(rule(k) for k in missing)]
    assert not stale, f"KNOWN_UNCOMPILED rules that match no uncompiled config (delete them): {stale}"


def test_launchable_configs_are_enumerated():
    """The enumeration sees what the launchers pick (a check on the check): Idefics2's fp16 forward tile,
    fp64's attention tile at the gradchecks' D = 3, and every linear tile of fp32's dW."""
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.kernels import linear as KL

    configs = launchable_configs()
    assert ("attn_fwd_kernel", (64, 64, 128), 4, KA.TENSOR_CORE_STAGES, (2, "ieee", _F32)) in configs
    assert ("attn_fwd_kernel", (32, 16, 64), 4, 2, (8, "ieee", _F64)) in configs
    for bm, bn, bk, warps, stages in KL.GEMM_TILES:
        assert ("fused_gemm_kernel", (bm, bn, bk // 2), warps, stages, (4, "tf32", _F32), "dW") in configs


# ----------------------------------------------------------------------------------------------
# The configs no spec compiles are executed too: every launchable config runs at least once
# ----------------------------------------------------------------------------------------------
def launch_config(rec):
    """The config key (``launchable_configs``' form) of one recorded interpreted launch."""
    import types

    spec = types.SimpleNamespace(kernel=f"launch/{rec['name']}", constexprs=tuple(rec["cx"].items()),
                                 args=rec["args"], num_warps=rec["warps"], num_stages=rec["stages"])
    return spec_config(spec)


_CLASS_DTYPE = {(2, "ieee", _F32): "bf16", (4, "ieee", _F32): "fp32", (4, "tf32", _F32): "fp32-tf32",
                (8, "ieee", _F64): "fp64", _F32: "fp32", _F64: "fp64"}


def _uncompiled() -> dict:
    """{config key: where} of the launchable configs that no spec compiles (``KNOWN_UNCOMPILED``)."""
    compiled = {spec_config(s) for s in SPECS}
    return {k: w for k, w in launchable_configs().items() if k not in compiled}


def uncompiled_run(key):
    """A run (``RUNS``' key form) whose launches include the uncompiled config ``key``: the op at a
    size spanning two ragged tiles, with the config's tile forced where a launcher picks it by shape
    (as the GPU launchers would pick it), or the head dim that makes attention's launcher take it."""
    name, blocks, warps, stages, cls = key[:5]
    dtype = _CLASS_DTYPE[cls]
    scale = {"fp64": 4, "fp32": 2, "fp32-tf32": 2}.get(dtype, 1)  # the tables' BLOCK_K is 2-byte's
    if name.startswith("attn_"):
        D = blocks[2] - 3
        if name == "attn_bwd_dq_kernel" and KA.gpu_blocks(32, D, backward=True, elem_bytes=cls[0],
                                                          ieee=cls[1] == "ieee")["BLOCK_N"] != \
                blocks[1]:  # a tile only the single-pass backward takes
            return ("cross_attention", D, dtype, False, False, False, f"single pass {blocks[0]}x{blocks[1]}")
        return ("cross_attention", D, dtype, False, False, False, None)  # the in-kernel combine too
    if name == "act_grad_kernel":
        return ("linear", "act'", "gelu", True, dtype, blocks, None, name)
    if name == "batch_sum_kernel":
        return ("patch_embed", name, dtype, blocks, None, None, ())
    tile = (blocks[0], blocks[1], blocks[2] * scale if len(blocks) > 2 else None, warps, stages)
    if name == "fused_gemm_kernel":
        return ("linear", key[5], "gelu", True, dtype, tile, True, name)
    if name == "mapped_gemm_kernel":  # one run launches all three mapped GEMMs at the forced tile
        return ("merged", 0, True, False, dtype, tile, key[6], True, False, key[7]) + (("TMA",) if key[-1] == "TMA" else ())
    if name == "dw_combine_kernel":
        # Inside a split dW run: a compiled one's sizes, its BLOCK_K scaled so the token loop still spans
        # two SPLIT_ALIGN chunks in this dtype (the dW tile is only the vehicle here).
        run = min((k for k in RUNS if k[:2] == ("patch_embed", "patch_embed_dw_kernel") and k[-1] == ("split",)),
                  key=repr)
        bm, bn, bk, w, st = run[3]
        return (*run[:2], dtype, (bm, bn, bk * scale, w, st), *run[4:])
    run = min((k for k in RUNS if k[:2] == ("patch_embed", name) and k[4] is not None and not k[-1]), key=repr)
    return ("patch_embed", name, dtype, tile, run[4], run[5], ())


UNCOMPILED_RUNS: dict = {}
for _k in sorted(_uncompiled(), key=repr):
    UNCOMPILED_RUNS.setdefault(uncompiled_run(_k), []).append(_k)
_UNCOMPILED_KEYS = sorted(UNCOMPILED_RUNS, key=repr)


@pytest.mark.parametrize("run", _UNCOMPILED_KEYS, ids=[" ".join(map(str, r)) for r in _UNCOMPILED_KEYS])
def test_uncompiled_config_runs(run, recorded):
    """Each launchable config that no spec compiles (``KNOWN_UNCOMPILED``: spills, or CI time) is still
    executed, interpreted, under the error rule: with the compiled specs, every config a GPU launcher
    can choose runs at least once in the suite. (Configs one run launches together share it.)"""
    torch.manual_seed(zlib.crc32(repr(run).encode()))
    _execute(run)
    launched = {launch_config(r) for r in recorded}
    missing = [k for k in UNCOMPILED_RUNS[run] if k not in launched]
    assert not missing, f"{run} did not launch {missing}; it launched {sorted(launched, key=repr)}"
