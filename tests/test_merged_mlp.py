"""mmfuse.merged_mlp: a norm and a token merge read inside the first GEMM. Values and gradients against
the reference (flash-attention rule), every form (norm none / LayerNorm / RMSNorm, before or after the
merge, with a token table or the adjacent-rows merge), gradcheck, determinism, launches, the bytes an
interpreted run stores (the merged operand and the norm's output never written), the choice of
normalising in the load at large |mean|, edge cases and bad input. Kernels run in Triton's interpreter."""

import pytest
import torch
from triton.runtime import interpreter

import mmfuse
from mmfuse.ops.merged import merged_mlp, merged_mlp_reference, norm_merge_reference
from mmfuse.testing import assert_matches_reference, compare

C, G = 24, 4  # C: no multiple of the interpreter's 32-wide blocks (the per-element token gather)


def _case(dtype, norm, post, use_map, T=52, widths=(40, 17), C=C, G=G):
    x = torch.randn(T, C, dtype=dtype)
    tmap = torch.randperm(T)[: (T // G) * G].reshape(-1, G) if use_map else None
    width = G * C if post else C
    gamma = (1 + 0.3 * torch.randn(width)).to(dtype) if norm else None
    beta = torch.randn(width, dtype=dtype) if norm == "layer" else None
    ws = [torch.randn(widths[0], G * C, dtype=dtype) / (G * C) ** 0.5,
          torch.randn(widths[1], widths[0], dtype=dtype) / widths[0] ** 0.5]
    bs = [torch.randn(n, dtype=dtype) for n in widths]
    inputs = [x, *ws, *bs] + [t for t in (gamma, beta) if t is not None]
    names = ["x", "W1", "W2", "b1", "b2"] + ["gamma"] * (gamma is not None) + ["beta"] * (beta is not None)
    kw = dict(group=G, token_map=tmap, norm=norm, eps=1e-5, norm_after_merge=post)

    def call(f):
        def run(x, w1, w2, b1, b2, *nb):
            return f(x, [w1, w2], [b1, b2], "gelu", norm_weight=nb[0] if nb else None,
                     norm_bias=nb[1] if len(nb) > 1 else None, **kw)
        return run

    return inputs, names, call(merged_mlp), call(merged_mlp_reference)


FORMS = [(None, False), ("layer", False), ("rms", False), ("layer", True), ("rms", True)]


@pytest.mark.parametrize("norm,post", FORMS)
@pytest.mark.parametrize("use_map", [False, True], ids=["adjacent", "table"])
def test_every_form_matches_reference_fp32(norm, post, use_map):
    inputs, names, fn, ref = _case(torch.float32, norm, post, use_map)
    assert_matches_reference(fn, ref, inputs, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm,post,use_map", [("rms", False, False), ("layer", True, True), (None, False, True)])
def test_half_precision(dtype, norm, post, use_map):
    inputs, names, fn, ref = _case(dtype, norm, post, use_map)
    assert_matches_reference(fn, ref, inputs, names)


def test_channels_aligned_to_the_blocks():
    # C = 64: every 32-wide block lies in one token's channels (the ALIGNED path: one token per row;
    # with a table, the forward looks the tokens up once per slot, outside its channel loop).
    for norm, post, use_map in (("layer", False, True), ("rms", True, True), (None, False, True),
                                ("rms", False, False), ("layer", True, False)):
        inputs, names, fn, ref = _case(torch.float32, norm, post, use_map, T=36, C=64)
        assert_matches_reference(fn, ref, inputs, names)


def test_non_contiguous_views():
    # x a strided view (every other channel of a wider buffer, transposed storage), weights transposed,
    # gamma / beta strided, the token table int64 and transposed.
    T = 52
    x = torch.randn(2 * C, T).t()[:, ::2]
    tmap = torch.randperm(T).reshape(G, -1).t()
    w1 = (torch.randn(G * C, 40) / 10).t()
    w2 = (torch.randn(40, 17) / 6).t()
    b1, b2 = torch.randn(80)[::2], torch.randn(17)
    gamma, beta = torch.randn(2 * C)[::2], torch.randn(1).expand(C)
    inputs = [x, w1, w2, b1, b2, gamma, beta]
    assert not any(t.is_contiguous() for t in (x, tmap, w1, w2, b1, gamma, beta))

    def fn(x_, w1_, w2_, b1_, b2_, g_, be_, f=merged_mlp):
        return f(x_, [w1_, w2_], [b1_, b2_], "gelu", group=G, token_map=tmap, norm="layer", norm_weight=g_,
                 norm_bias=be_, eps=1e-5)

    assert_matches_reference(fn, lambda *t: fn(*t, f=merged_mlp_reference), inputs,
                             ["x", "W1", "W2", "b1", "b2", "gamma", "beta"])


@pytest.mark.parametrize("norm,post", [("layer", False), ("rms", True)])
def test_gradcheck_fp64(norm, post):
    inputs, names, fn, _ = _case(torch.float64, norm, post, True, T=8, widths=(5, 3), C=3, G=2)
    inputs = [t.requires_grad_() for t in inputs]
    # fast_mode: a random projection of the Jacobian, a few interpreted launches per check
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_backward_is_deterministic():
    inputs, names, fn, _ = _case(torch.float16, "layer", False, True, T=80)
    leaves = [t.requires_grad_() for t in inputs]
    dy = torch.randn(20, 17, dtype=torch.float16)
    runs = [torch.autograd.grad(fn(*leaves), leaves, dy) for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_launch_counts(launches):
    inputs, names, fn, _ = _case(torch.float32, "rms", False, True)
    leaves = [t.requires_grad_() for t in inputs]
    y = fn(*leaves)
    # norm statistics, then one GEMM per layer: GEMMs + 1, no norm or merge pass.
    assert launches == ["norm_stats_kernel", "mapped_gemm_kernel", "fused_gemm_kernel"]
    launches.clear()
    y.sum().backward()
    # layer 2's dW and dX * gelu'; layer 1's dW (the merged operand read through the table again) and
    # dA stored through the table; one row-wise norm backward. Bias gradients are torch sums.
    assert launches == ["fused_gemm_kernel", "fused_gemm_kernel", "mapped_gemm_kernel", "mapped_gemm_kernel",
                        "norm_bwd_kernel"]


@pytest.mark.skipif(not mmfuse.INTERPRET, reason="counts the interpreter's stores")
def test_forward_writes_neither_the_merged_operand_nor_the_norm_output():
    # An interpreted training forward stores exactly y, the hidden layer (with its pre-activation) and
    # 8 bytes of statistics per token: nothing of size T x C (the norm's output) or M x G*C (the merge).
    T, widths = 64, (40, 17)
    inputs, names, fn, _ = _case(torch.float32, "layer", False, True, T=T, widths=widths)
    M = T // G
    assert _bytes_stored(fn, [t.requires_grad_() for t in inputs]) == 4 * (2 * T + 2 * M * widths[0] + M * widths[1])


def _bytes_stored(fn, inputs) -> int:
    """Bytes the interpreted kernels store during ``fn(*inputs)``."""
    import numpy as np

    stored = []
    real = interpreter.InterpreterBuilder.create_masked_store

    def count(self, ptrs, value, mask, *a):
        stored.append(int(np.asarray(mask.data, dtype=bool).sum()) * value.data.itemsize)
        return real(self, ptrs, value, mask, *a)

    interpreter.InterpreterBuilder.create_masked_store = count
    try:
        fn(*inputs)
    finally:
        interpreter.InterpreterBuilder.create_masked_store = real
    return sum(stored)


def test_normalising_in_the_load_is_exact_at_large_mean():
    """bf16 tokens at |mean| ~ 1000 with std ~ 1: the kernel normalises x in fp32 as it loads it, so it
    passes the rule. Folding gamma into W and applying mean / rstd in the epilogue (y = rstd * (x @ (gamma
    W)^T) - rstd * mean * (W gamma)) multiplies the raw bf16 x, whose ulp (4 at 1000) is bigger than the
    signal: that method's error is ~100x the rule's allowance, so it is not what the kernel does."""
    T, Cl = 32, 64
    x = (1000 + torch.randn(T, Cl)).to(torch.bfloat16)
    gamma = (1 + 0.1 * torch.randn(Cl)).to(torch.bfloat16)
    w = (torch.randn(24, G * Cl) / 16).to(torch.bfloat16)
    kw = dict(group=G, norm="rms", norm_weight=gamma, eps=1e-6)
    kw["norm"] = "layer"
    kw["norm_bias"] = torch.zeros(Cl, dtype=torch.bfloat16)
    ours = merged_mlp(x, [w], None, None, **kw)
    ref64 = merged_mlp_reference(x.double(), [w.double()], None, None, **{**kw, "norm_weight": gamma.double(),
                                                                        "norm_bias": kw["norm_bias"].double()})
    ref16 = merged_mlp_reference(x, [w], None, None, **kw)
    assert compare("out", ours, ref64, ref16).ok
    # The folded method, in the same precision (bf16 operands, fp32 accumulation).
    xm = x.view(-1, G, Cl).float()
    mean, rstd = xm.mean(-1, keepdim=True), (xm.var(-1, unbiased=False, keepdim=True) + 1e-6).rsqrt()
    w_fold = (w.view(24, G, Cl) * gamma).to(torch.bfloat16).float()
    folded = torch.einsum("mgc,ngc->mgn", x.view(-1, G, Cl).float(), w_fold)
    folded = (rstd * folded - rstd * mean * w_fold.sum(-1).T[None]).sum(1).to(torch.bfloat16)
    assert not compare("out", folded, ref64, ref16).ok


def _norm_statistics(x, norm, eps, where):
    """(stats, the rows they describe, the normalised rows) of x's tokens (gamma 1, beta 0) by each kernel
    that computes a norm's statistics: ``where`` = "stats" (``norm_stats``, then ``normalised_rows``),
    "rows" (``normalised_rows`` taking its own statistics) or "pool" (``pool_norm_fwd`` over token pairs,
    whose rows are the pooled ones)."""
    from mmfuse.kernels import merged_gemm as KM

    C = x.shape[1]
    ones, zeros = torch.ones(C), torch.zeros(C)
    if where == "pool":  # two tokens pooled per row: the norm's input is the rounded mean of the pair
        table = torch.arange(x.shape[0], dtype=torch.int32).view(-1, 2)
        out, pooled, stats = KM.pool_norm_fwd(x, table, 2, norm, ones, zeros, eps, save=True)
        return stats, pooled, out
    merge = KM.Merge(x, 1, None, norm, False, ones, zeros, eps)
    if where == "stats":
        KM.norm_stats(merge)
        out = KM.normalised_rows(merge)
    else:
        assert KM.rows_take_stats(merge)
        out = KM.normalised_rows(merge, stats=True)
    return merge.stats, x, out


@pytest.mark.parametrize("C", [3, 24, 100])
@pytest.mark.parametrize("where", ["stats", "rows", "pool"])
def test_layernorm_mean_is_the_rows_mean_to_half_an_ulp(C, where):
    """Found by a 1500-example property run (fp32, LayerNorm over 3 channels at mean 3): (x - mean) * rstd
    multiplies the stored mean's error by rstd, and the mean taken as a rounded sum / width was off by up
    to ~1.5 ulps, so the normalised operand came out at 13x PyTorch's error where std << |mean|. The
    statistics' second pass now adds back the mean of the centred values: the stored mean is the fp64
    mean to half an ulp (plus the centred sum's own rounding, far smaller), in the statistics' launch,
    in the rows' launch that takes its own statistics, and in the pooling kernel's."""
    torch.manual_seed(C)
    x = 3.0 + 0.02 * torch.randn(64, C)
    stats, rows, _ = _norm_statistics(x, "layer", 1e-5, where)
    mean64 = rows.double().mean(-1)
    ulp = torch.finfo(torch.float32).eps * 2.0  # at |mean| in [2, 4)
    assert (stats[:, 0].double() - mean64).abs().max().item() <= 0.5 * ulp * 1.01


# ----------------------------------------------------------------------------------------------
# The folded RMSNorm forward: gamma * W written by the statistics' launch, x read raw, rstd scaling the
# accumulator per slot (a norm per token) or per row (per merged row). kernels/merged_gemm.py,
# ``fold_applies``; why: bench/NOTES.md, "RMSNorm folded into the weight".
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def folded_launches(monkeypatch):
    """FOLDED of every mapped GEMM launch, in order (the kernel object wrapped, not the interpreter)."""
    from mmfuse.kernels import merged_gemm as KM

    flags, real = [], KM.mapped_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                flags.append((kw["MAPPED"], kw["FOLDED"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(KM, "mapped_gemm_kernel", Spy())
    return flags


@pytest.fixture
def always_fold(monkeypatch):
    from mmfuse.kernels import merged_gemm as KM

    monkeypatch.setattr(KM, "FOLD_MIN_ROWS", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("post,use_map,C_",
                         [(False, False, 64), (False, True, 64), (True, True, 64), (True, False, 24)],
                         ids=["per-token-view", "per-token-table", "per-row-table", "per-row-view-C24"])
def test_folded_rmsnorm_matches_reference(dtype, post, use_map, C_, always_fold, folded_launches):
    # Values and every gradient (the backward is the unfolded one: dW and dA read x normalised in their
    # loads); a norm per token folds only where every K step lies in one token's channels (C = 64 and
    # the interpreter's 32-wide steps), a norm over the merged row at any C.
    inputs, names, fn, ref = _case(dtype, "rms", post, use_map, T=44, C=C_)
    assert_matches_reference(fn, ref, inputs, names)
    assert folded_launches[0] == (0, True) and all(not f for m, f in folded_launches if m != 0)


def test_where_the_forward_folds(launches, folded_launches):
    # RMSNorm from FOLD_MIN_ROWS merged rows; never a LayerNorm (its mean would cancel), a gated first
    # layer, a norm per token whose channels straddle a K step, or fewer rows.
    from mmfuse.kernels import merged_gemm as KM

    def folds(norm, post, C_, T, gated=False):
        folded_launches.clear()
        x = torch.randn(T, C_)
        width = 2 * C_ if post else C_
        w1 = torch.randn(2 * 8 if gated else 8, 2 * C_) / 8
        with torch.no_grad():
            mmfuse.merged_mlp(x, [w1, torch.randn(4, 8)], None, "silu" if gated else "gelu", group=2, norm=norm,
                              norm_weight=torch.rand(width) + 0.5, norm_bias=torch.zeros(width) if norm == "layer"
                              else None, norm_after_merge=post, gate_half=1 if gated else None)
        return folded_launches[0][1]

    rows = KM.FOLD_MIN_ROWS
    assert folds("rms", False, 32, 2 * rows) and folds("rms", True, 24, 2 * rows)
    assert launches[-3:] == ["norm_stats_kernel", "mapped_gemm_kernel", "fused_gemm_kernel"]  # still GEMMs + 1
    assert not folds("rms", False, 32, 2 * rows - 2)   # one row short
    assert not folds("rms", False, 24, 2 * rows)       # C = 24: a 32-wide K step straddles two tokens
    assert not folds("layer", False, 32, 2 * rows) and not folds("layer", True, 32, 2 * rows)
    assert not folds("rms", True, 32, 2 * rows, gated=True)
    # no channels: nothing to fold (the statistics of an empty row are NaN; unfolded, no K step reads them)
    assert not KM.fold_applies(KM.Merge(torch.randn(2 * rows, 0), 2, norm="rms", gamma=torch.randn(0)))
    # fp16: gamma * W would round into its subnormals (from 6e-5); bf16 has fp32's range
    for dtype, expected in ((torch.float16, False), (torch.bfloat16, True)):
        merge = KM.Merge(torch.randn(2 * rows, 32, dtype=dtype), 2, norm="rms", gamma=torch.ones(32, dtype=dtype))
        assert KM.fold_applies(merge) == expected
    # the folded weight serves the weight it came from only
    merge = KM.Merge(torch.randn(2 * rows, 32), 2, norm="rms", gamma=torch.ones(32))
    w = torch.randn(8, 64)
    KM.norm_stats(merge, fold=w)
    with pytest.raises(ValueError, match="weight"):
        KM.mapped_fwd(merge, w.clone())


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "in the load"])
def test_a_token_whose_squares_overflow_fp32_keeps_its_row_finite(fold, monkeypatch):
    # |x| ~ 1e20: x^2 overflows fp32, so a plain sum of squares gives rstd = 0 (PyTorch's fp32 RMSNorm
    # zeroes the token), and the folded forward, dividing by rstd, would make the row NaN. The statistics
    # sum squares relative to the row's largest value: the token normalises as in fp64.
    from mmfuse.kernels import merged_gemm as KM

    monkeypatch.setattr(KM, "FOLD_MIN_ROWS", 0 if fold else 1 << 30)
    x = torch.randn(64, 64)
    x[5] *= 1e20
    gamma = 1 + 0.2 * torch.randn(64)
    w = torch.randn(24, 128) / 11
    kw = dict(group=2, norm="rms", eps=1e-6)
    ours = merged_mlp(x, [w], None, None, norm_weight=gamma, **kw)
    ref64 = merged_mlp_reference(x.double(), [w.double()], None, None, norm_weight=gamma.double(), **kw)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["stats", "rows", "pool"])
def test_an_rmsnorm_row_whose_sum_overflows_keeps_mean_zero(where):
    # |x| ~ 1e37, all of one sign: the row's sum overflows fp32. An RMSNorm's mean is 0 whatever the row
    # holds; the LayerNorm's mean correction (the centred values' sum, the row's sum for an RMSNorm) must
    # not reach it (0 * inf was NaN: found in review, session 19).
    x = torch.randn(64, 64)
    x[5] = 1e37 * (1 + torch.rand(64))
    stats, _, out = _norm_statistics(x, "rms", 1e-6, where)
    assert torch.equal(stats[:, 0], torch.zeros_like(stats[:, 0])) and torch.isfinite(out).all()


@pytest.mark.skipif(not mmfuse.INTERPRET, reason="counts the interpreter's stores")
def test_folded_forward_stores_only_the_folded_weight_beside_its_outputs(always_fold):
    # What the folded training forward writes: y, the hidden layer and its pre-activation, 8 bytes of
    # statistics per token, and gamma * W (N1 x K): still nothing of the merged operand or the norm's output.
    T, widths, C_ = 64, (40, 17), 64
    inputs, names, fn, _ = _case(torch.float32, "rms", False, False, T=T, widths=widths, C=C_)
    M = T // G
    assert _bytes_stored(fn, [t.requires_grad_() for t in inputs]) == \
        4 * (2 * T + 2 * M * widths[0] + M * widths[1] + widths[0] * G * C_)


@pytest.mark.parametrize("post", [False, True], ids=["per-token", "per-row"])
def test_folded_gradcheck_fp64(post, always_fold, folded_launches):
    inputs, names, fn, _ = _case(torch.float64, "rms", post, not post, T=8, widths=(5, 3), C=32, G=2)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert (0, True) in folded_launches


def test_folded_rmsnorm_holds_at_large_mean(always_fold, folded_launches):
    """An RMSNorm has no mean to subtract, so folding gamma into W cancels nothing: at |mean| ~ 1000 and
    std ~ 1 (x's bf16 ulp 4) the folded forward passes the rule as the unfolded one does (the fold
    rounds gamma * W once, where eager rounds x * rstd * gamma once)."""
    T, Cl = 32, 64
    x = (1000 + torch.randn(T, Cl)).to(torch.bfloat16)
    gamma = (1 + 0.1 * torch.randn(Cl)).to(torch.bfloat16)
    w = (torch.randn(24, G * Cl) / 16).to(torch.bfloat16)
    kw = dict(group=G, norm="rms", eps=1e-6)
    ours = merged_mlp(x, [w], None, None, norm_weight=gamma, **kw)
    ref64 = merged_mlp_reference(x.double(), [w.double()], None, None, norm_weight=gamma.double(), **kw)
    ref16 = merged_mlp_reference(x, [w], None, None, norm_weight=gamma, **kw)
    assert compare("out", ours, ref64, ref16).ok
    assert folded_launches == [(0, True)]


def test_folded_forward_reads_strided_weights_and_gamma(always_fold, folded_launches):
    # The fold reads W and gamma through their strides (a transposed weight, every other gamma) and is
    # bitwise reproducible.
    T = 40
    x = torch.randn(T, 64)
    w1, w2 = (torch.randn(128, 24) / 11).t(), (torch.randn(24, 9) / 5).t()
    gamma = (torch.rand(128) + 0.5)[::2]
    assert not any(t.is_contiguous() for t in (w1, w2, gamma))

    def fn(x_, w1_, w2_, g_, f=merged_mlp):
        return f(x_, [w1_, w2_], None, "gelu", group=2, norm="rms", norm_weight=g_, eps=1e-5)

    assert_matches_reference(fn, lambda *t: fn(*t, f=merged_mlp_reference), [x, w1, w2, gamma],
                             ["x", "W1", "W2", "gamma"])
    assert torch.equal(fn(x, w1, w2, gamma), fn(x, w1, w2, gamma))
    assert folded_launches[0] == (0, True)


# The backward's dW from the normalised operand written once (``materialise_applies``: a norm, from
# FOLD_MIN_ROWS merged rows): one row-wise launch, then an unmapped GEMM.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm,post,use_map", [("layer", False, False), ("layer", False, True), ("layer", True, True),
                                               ("rms", True, False)])
def test_materialised_backward_matches_reference(dtype, norm, post, use_map, always_fold):
    inputs, names, fn, ref = _case(dtype, norm, post, use_map, T=44)
    assert_matches_reference(fn, ref, inputs, names)


def test_materialised_backward_launches(launches, always_fold):
    inputs, names, fn, _ = _case(torch.float32, "layer", True, True)
    leaves = [t.requires_grad_() for t in inputs]
    y = fn(*leaves)
    launches.clear()
    y.sum().backward()
    # layer 2's dW and dX * gelu'; layer 1's normalised operand, its dW as an unmapped GEMM, dA stored
    # through the table; the norm backward.
    assert launches == ["fused_gemm_kernel", "fused_gemm_kernel", "norm_rows_kernel", "fused_gemm_kernel",
                        "mapped_gemm_kernel", "norm_bwd_kernel"]


def test_materialised_gated_backward_and_gradcheck(always_fold):
    # Aya Vision's form (a SwiGLU on one chunked weight after a pixel shuffle and a LayerNorm over the
    # merged row): its dW over [dG | dU] from the written operand; and a gradcheck in fp64.
    T, C_, G_ = 40, 8, 2
    x = torch.randn(T, C_, dtype=torch.float64)
    tmap = torch.randperm(T).view(-1, G_)
    w1, w2 = torch.randn(2 * 6, G_ * C_, dtype=torch.float64) / 4, torch.randn(5, 6, dtype=torch.float64) / 3
    gamma, beta = 1 + 0.2 * torch.randn(G_ * C_, dtype=torch.float64), torch.randn(G_ * C_, dtype=torch.float64)

    def fn(x, w1, w2, g, b, f=merged_mlp):
        return f(x, [w1, w2], None, "silu", group=G_, token_map=tmap, norm="layer", norm_weight=g, norm_bias=b,
                 norm_after_merge=True, gate_half=1)

    inputs = [t.requires_grad_() for t in (x, w1, w2, gamma, beta)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert_matches_reference(fn, lambda *t: fn(*t, f=merged_mlp_reference), [t.float().detach() for t in inputs],
                             ["x", "W1", "W2", "gamma", "beta"])


# The forward's first GEMM on the operand written once (``written_forward_applies``: large GEMMs, where an
# H100 measured the in-load gather and norm at 1.3-2.8x an unmapped GEMM): norm_rows_kernel, then the
# unmapped GEMM. Forced here ("written"): the rule picks it only at model sizes.
@pytest.fixture
def written_forward(monkeypatch):
    from mmfuse.kernels import merged_gemm as KM

    monkeypatch.setattr(KM, "MERGED_FORWARD", "written")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm,post,use_map", [("layer", False, False), ("layer", True, True), ("rms", False, True),
                                               ("rms", True, False)])
def test_written_forward_matches_reference(dtype, norm, post, use_map, written_forward, launches):
    inputs, names, fn, ref = _case(dtype, norm, post, use_map, T=44)
    with torch.no_grad():
        fn(*inputs)
    # the statistics in the operand's own launch (GEMMs + 1), except per token through a table (its
    # tokens are no range a program owns): then norm_stats_kernel first
    first = ["norm_rows_kernel"] if post or not use_map else ["norm_stats_kernel", "norm_rows_kernel"]
    assert launches == first + ["fused_gemm_kernel", "fused_gemm_kernel"]
    assert_matches_reference(fn, ref, inputs, names)


def test_written_forward_gradcheck_and_determinism(written_forward):
    T, C_, G_ = 24, 6, 2
    x = torch.randn(T, C_, dtype=torch.float64)
    tmap = torch.randperm(T).view(-1, G_)
    w1, w2 = torch.randn(7, G_ * C_, dtype=torch.float64) / 3, torch.randn(5, 7, dtype=torch.float64) / 3
    gamma, beta = 1 + 0.2 * torch.randn(C_, dtype=torch.float64), torch.randn(C_, dtype=torch.float64)

    def fn(x, w1, w2, g, b):
        return merged_mlp(x, [w1, w2], None, "gelu", group=G_, token_map=tmap, norm="layer", norm_weight=g,
                          norm_bias=b)

    inputs = [t.requires_grad_() for t in (x, w1, w2, gamma, beta)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    runs = [torch.autograd.grad(fn(*inputs).square().sum(), inputs) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm,post,use_map", [("layer", True, True), ("rms", True, False), ("layer", False, False),
                                               ("rms", False, False)])
def test_the_rows_launch_stores_the_statistics_norm_stats_would(dtype, norm, post, use_map):
    """``normalised_rows(stats=True)``: each program's statistics, then its rows from them — the same bits
    as ``norm_stats`` followed by the rows launch (tokens and rows not a multiple of the blocks: 13 merged
    rows of 4 tokens, C = 24)."""
    from mmfuse.kernels import merged_gemm as KM

    T, C_, G_ = 52, 24, 4
    x = torch.randn(T, C_, dtype=dtype) * 3 + 1
    tmap = torch.randperm(T).view(-1, G_).to(torch.int32) if use_map else None
    width = G_ * C_ if post else C_
    gamma = (1 + 0.3 * torch.randn(width)).to(dtype)
    beta = torch.randn(width, dtype=dtype) if norm == "layer" else None

    def merge():
        return KM.Merge(x, G_, tmap, norm, post, gamma, beta, 1e-5)

    one = merge()
    rows_one = KM.normalised_rows(one, stats=True)
    two = merge()
    KM.norm_stats(two)
    rows_two = KM.normalised_rows(two)
    assert one.stats.shape == two.stats.shape == ((T // G_ if post else T), 2)
    assert torch.equal(one.stats, two.stats) and torch.equal(rows_one, rows_two)
    assert torch.allclose(rows_one.double(), norm_merge_reference(x.double(), G_, tmap, norm, gamma.double(),
                                                                  None if beta is None else beta.double(), 1e-5,
                                                                  post).double(),
                          rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)  # (bf16: its rounding)


def test_the_rows_launch_refuses_statistics_it_cannot_own():
    from mmfuse.kernels import merged_gemm as KM

    x = torch.randn(8, 4)
    merge = KM.Merge(x, 2, torch.arange(8).view(4, 2).to(torch.int32), "rms", False, torch.ones(4))
    assert not KM.rows_take_stats(merge)
    with pytest.raises(ValueError, match="stats=True needs a norm per merged row, or per token without a table"):
        KM.normalised_rows(merge, stats=True)
    assert KM.rows_take_stats(KM.Merge(x, 2, None, "rms", False, torch.ones(4)))
    # fp64 (the gradchecks'): two launches (its fused launch spilled on sm_90)
    assert not KM.rows_take_stats(KM.Merge(x.double(), 2, None, "rms", False, torch.ones(4, dtype=torch.float64)))


def test_written_forward_gradcheck_with_a_norm_per_merged_row(written_forward, launches):
    T, C_, G_ = 24, 6, 2
    x = torch.randn(T, C_, dtype=torch.float64)
    w1, w2 = torch.randn(7, G_ * C_, dtype=torch.float64) / 3, torch.randn(5, 7, dtype=torch.float64) / 3
    gamma, beta = 1 + 0.2 * torch.randn(G_ * C_, dtype=torch.float64), torch.randn(G_ * C_, dtype=torch.float64)

    def fn(x, w1, w2, g, b):
        return merged_mlp(x, [w1, w2], None, "gelu", group=G_, norm="layer", norm_weight=g, norm_bias=b,
                          norm_after_merge=True)

    with torch.no_grad():
        fn(x, w1, w2, gamma, beta)
    assert launches == ["norm_stats_kernel", "norm_rows_kernel", "fused_gemm_kernel", "fused_gemm_kernel"]  # fp64
    inputs = [t.requires_grad_() for t in (x, w1, w2, gamma, beta)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_where_the_forward_writes_its_operand(monkeypatch):
    """The rule at real shapes (bf16, 8 images or tiles): the Qwen2.5-VL merger (RMSNorm folded, the view
    merge) and InternVL2-8B's mlp1 (LayerNorm in the load, the pixel-shuffle table) write it; one image
    of LLaVA-OneVision-size rows, no norm, gated, fp64 and fewer than FOLD_MIN_ROWS rows do not; the
    switch forces either way."""
    from mmfuse.kernels import merged_gemm as KM

    def merge(T, C, G_, norm, table, dtype=torch.bfloat16, post=False):
        x = torch.empty(T, C, dtype=dtype)
        tmap = torch.arange(T).view(-1, G_).to(torch.int32) if table else None
        width = G_ * C if post else C
        return KM.Merge(x, G_, tmap, norm, post, torch.ones(width, dtype=dtype),
                        torch.zeros(width, dtype=dtype) if norm == "layer" else None)

    qwen = merge(8 * 4096, 1280, 4, "rms", False)
    internvl = merge(8 * 1024, 1024, 4, "layer", True, post=True)
    monkeypatch.setattr(KM, "INTERPRET", False)  # the GPU's tile rule (the fold's BLOCK_K check)
    assert KM.written_forward_applies(qwen, 5120) and KM.written_forward_applies(internvl, 4096)
    # the model's figures: saved device time, µs (the mapped GEMM's excess against the pass and its launch)
    assert KM.written_forward_saves_us(8192, 5120, 5120, 2, "rms", False, True) == pytest.approx(
        0.41 * 2 * 8192 * 5120 * 5120 / 540e6 - 2 * 8192 * 5120 * 2 / 2.9e6 - 20)
    assert KM.written_forward_saves_us(2048, 4096, 4096, 2, "layer", True, False) > 100
    assert not KM.written_forward_applies(merge(4 * 192, 64, 4, "layer", True), 32)  # small: the pass costs more
    assert not KM.written_forward_applies(merge(4 * 191 * 8, 1280, 8 * 4, "rms", False), 5120)  # < 192 rows
    assert not KM.written_forward_applies(merge(8 * 4096, 1280, 4, None, False), 5120)  # no norm to write
    assert not KM.written_forward_applies(qwen, 5120, gated=True)
    assert not KM.written_forward_applies(merge(8 * 4096, 1280, 4, "rms", False, dtype=torch.float64), 5120)
    monkeypatch.setattr(KM, "MERGED_FORWARD", "in-load")
    assert not KM.written_forward_applies(qwen, 5120)
    monkeypatch.setattr(KM, "MERGED_FORWARD", "written")
    assert KM.written_forward_applies(merge(8, 4, 4, "rms", False), 3)
    monkeypatch.setattr(KM, "MERGED_FORWARD", "always")
    with pytest.raises(ValueError, match=r"MMFUSE_MERGED_FORWARD: expected one of \('auto', 'in-load', 'written'\), "
                                         r"got 'always'"):
        KM.written_forward_applies(qwen, 5120)


def test_empty_and_inference():
    inputs, names, fn, _ = _case(torch.float32, "layer", True, False, T=0)
    leaves = [t.requires_grad_() for t in inputs]
    y = fn(*leaves)
    assert y.shape == (0, 17)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, C)
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves[1:3])
    inputs, names, fn, _ = _case(torch.float32, "layer", False, False)
    with torch.no_grad():
        assert fn(*inputs).shape == (13, 17)


def test_tokens_no_merged_row_reads_get_zero_gradient():
    # A table that leaves 4 of 56 tokens out: their dx is exactly 0 (and the rule holds for the rest).
    inputs, names, fn, ref = _case(torch.float32, "layer", False, True, T=56)
    x = inputs[0]
    tmap = torch.randperm(56)[:52].reshape(-1, G)
    out = merged_mlp(x.requires_grad_(), inputs[1:3], inputs[3:5], "gelu", group=G, token_map=tmap, norm="layer",
                     norm_weight=inputs[5], norm_bias=inputs[6])
    out.sum().backward()
    left = sorted(set(range(56)) - set(tmap.flatten().tolist()))
    assert torch.equal(x.grad[left], torch.zeros(4, C))


class TestBadInput:
    def _args(self):
        return torch.randn(8, C), [torch.randn(5, G * C)]

    def test_group_width_mismatch(self):
        x, ws = self._args()
        with pytest.raises(ValueError, match=r"weights\[0\]: expected shape\[1\] \(in_features\) == 72, got 96"):
            merged_mlp(x, ws, group=3, token_map=torch.arange(6).view(2, 3))

    def test_tokens_not_divisible(self):
        with pytest.raises(ValueError, match=r"x: expected a token count divisible by group == 4.*got 7"):
            merged_mlp(torch.randn(7, C), [torch.randn(5, G * C)], group=G)

    def test_table_shape_and_dtype(self):
        x, ws = self._args()
        with pytest.raises(ValueError, match=r"token_map: expected shape\[1\] \(group\) == 4, got 2"):
            merged_mlp(x, ws, group=G, token_map=torch.arange(8).view(4, 2))
        with pytest.raises(TypeError, match="token_map: expected an int32 or int64 tensor"):
            merged_mlp(x, ws, group=G, token_map=torch.zeros(2, 4, dtype=torch.int16))

    def test_norm_weight(self):
        x, ws = self._args()
        with pytest.raises(ValueError, match=r"norm_weight: expected shape\[0\] \(the normalised width\) == 96"):
            merged_mlp(x, ws, group=G, norm="rms", norm_weight=torch.ones(C), norm_after_merge=True)
        with pytest.raises(ValueError, match="norm: expected one of"):
            merged_mlp(x, ws, group=G, norm="batch")
        with pytest.raises(TypeError, match="norm_bias: expected a torch.Tensor"):
            merged_mlp(x, ws, group=G, norm="layer", norm_weight=torch.ones(C))

    @pytest.mark.skipif(not mmfuse.INTERPRET, reason="on a GPU the check is a device-side assert (next test)")
    def test_table_values(self):
        x, ws = self._args()
        with pytest.raises(ValueError, match=r"token_map: expected token indices in \[0, 8\).*got 8"):
            merged_mlp(x, ws, group=G, token_map=torch.tensor([[0, 1, 2, 8], [4, 5, 6, 7]]))
        with pytest.raises(ValueError, match="token_map: expected each token at most once"):
            merged_mlp(x, ws, group=G, token_map=torch.tensor([[0, 1, 2, 3], [3, 5, 6, 7]]))

    @pytest.mark.skipif(mmfuse.INTERPRET, reason="the GPU's device-side assert (CPU: the test above)")
    def test_table_values_on_a_gpu_stop_the_process(self):
        # A device-side assert poisons the CUDA context, so it runs in a child process.
        import subprocess
        import sys

        code = ("import torch, mmfuse; x = torch.randn(8, 24, device='cuda'); w = torch.randn(5, 96, device='cuda');"
                "mmfuse.merged_mlp(x, [w], group=4, token_map=torch.tensor([[0, 1, 2, 3], [3, 5, 6, 7]], "
                "device='cuda')); torch.cuda.synchronize()")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out = proc.stderr + proc.stdout
        assert proc.returncode != 0 and ("token_map" in out or "device-side assert" in out), out[-2000:]

    def test_the_device_check_of_table_values_decides_like_the_rule(self):
        """The GPU's check (one flag for a device-side assert, ``_token_values_ok``) against the rule on
        random tables: permutations and partial ones, repeats, indices below 0 and from T, int32's and
        int64's extremes, empty; and the ATen ops it takes (each a launch: host time on a GPU)."""
        from mmfuse.ops.merged import _token_values_ok
        from mmfuse.testing import OpNames

        gen = torch.Generator().manual_seed(5)  # (CPU tensors throughout: the rule's logic, on any device)

        def rule(table, T):
            vals = table.reshape(-1).tolist()
            return all(0 <= v < T for v in vals) and len(set(vals)) == len(vals)

        cases = []
        for T in (1, 2, 7, 64):
            for dtype in (torch.int32, torch.int64):
                perm = torch.randperm(T, generator=gen, device="cpu").to(dtype)
                cases.append((perm.view(-1, 1), T))
                cases.append((perm[: T - T % 2].view(-1, 2) if T > 1 else perm.view(1, 1), T))
                for bad in (-1, T, T + 5, -T - 3, torch.iinfo(dtype).max, torch.iinfo(dtype).min):
                    t = perm.clone()
                    t[int(torch.randint(T, (1,), generator=gen, device="cpu"))] = bad
                    cases.append((t.view(-1, 1), T))
                if T > 1:
                    t = perm.clone()
                    t[0] = t[-1]
                    cases.append((t.view(-1, 1), T))
                    cases.append((torch.randint(T, (T, 2), generator=gen, device="cpu").to(dtype), T))
            cases.append((torch.empty(0, 4, dtype=torch.int32, device="cpu"), T))
        cases.append((torch.arange(12, device="cpu").view(3, 4).t(), 12))  # a strided view
        got = [bool(_token_values_ok(t, T)) for t, T in cases]
        assert got == [rule(t, T) for t, T in cases] and any(got) and not all(got)

        table = torch.randperm(64, device="cpu").view(16, 4).to(torch.int32)
        with OpNames() as mode:
            _token_values_ok(table, 64)
        kernels = [op for op in mode.names if op not in ("view", "reshape", "slice")]
        assert len(kernels) <= 8, mode.names  # (with torch._assert_async: 9, against 13 before)

    def test_group(self):
        x, ws = self._args()
        with pytest.raises(ValueError, match="group: expected a positive int, got 0"):
            merged_mlp(x, ws, group=0)


# ----------------------------------------------------------------------------------------------
# Gated: SwiGLU / GeGLU on one chunked weight after the merge (Aya Vision, Command A)
# ----------------------------------------------------------------------------------------------
def _gated_case(dtype, norm, post, use_map, gate_half, T=52, N=20, D=17, C=C, act="silu", transposed=False):
    x = torch.randn(T, C, dtype=dtype)
    tmap = torch.randperm(T)[: (T // G) * G].reshape(-1, G) if use_map else None
    width = G * C if post else C
    gamma = (1 + 0.3 * torch.randn(width)).to(dtype) if norm else None
    beta = torch.randn(width, dtype=dtype) if norm == "layer" else None
    w1 = torch.randn(2 * N, G * C, dtype=dtype) / (G * C) ** 0.5
    w2 = torch.randn(D, N, dtype=dtype) / N ** 0.5
    if transposed:  # non-contiguous weights: views of transposed storage (the halves then strided too)
        w1, w2 = w1.t().contiguous().t(), w2.t().contiguous().t()
    b1, b2 = torch.randn(2 * N, dtype=dtype), torch.randn(D, dtype=dtype)
    inputs = [x, w1, w2, b1, b2] + [t for t in (gamma, beta) if t is not None]
    names = ["x", "W1", "W2", "b1", "b2"] + ["gamma"] * (gamma is not None) + ["beta"] * (beta is not None)
    kw = dict(group=G, token_map=tmap, norm=norm, eps=1e-5, norm_after_merge=post, gate_half=gate_half)

    def call(f):
        def run(x, w1, w2, b1, b2, *nb):
            return f(x, [w1, w2], [b1, b2], act, norm_weight=nb[0] if nb else None,
                     norm_bias=nb[1] if len(nb) > 1 else None, **kw)
        return run

    return inputs, names, call(merged_mlp), call(merged_mlp_reference)


#: (norm, post, table): Aya Vision (pixel shuffle, LayerNorm over the merged row), Command A (pixel
#: shuffle, no norm), and a per-token RMSNorm with the view merge.
GATED_FORMS = [("layer", True, True), (None, False, True), ("rms", False, False)]


@pytest.mark.parametrize("gate_half", [0, 1])
@pytest.mark.parametrize("norm,post,use_map", GATED_FORMS)
def test_gated_matches_reference_fp32(norm, post, use_map, gate_half):
    inputs, names, fn, ref = _gated_case(torch.float32, norm, post, use_map, gate_half)
    assert_matches_reference(fn, ref, inputs, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_half_precision(dtype):
    inputs, names, fn, ref = _gated_case(dtype, "layer", True, True, 1, act="gelu_tanh")
    assert_matches_reference(fn, ref, inputs, names)


def test_gated_aligned_channels_and_non_contiguous_weights():
    # C = 64: the table forward's per-slot token lookup (both products from one A tile); the chunked
    # weight a view of transposed storage, so each half is a strided view.
    for norm, post, use_map in (("layer", True, True), ("rms", False, False)):
        inputs, names, fn, ref = _gated_case(torch.float32, norm, post, use_map, 1, T=36, C=64, transposed=True)
        assert not inputs[1].is_contiguous()
        assert_matches_reference(fn, ref, inputs, names)


def test_gated_gradcheck_fp64():
    inputs, names, fn, _ = _gated_case(torch.float64, "layer", True, True, 1, T=8, N=3, D=2, C=3)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gated_launch_counts_and_determinism(launches):
    inputs, names, fn, _ = _gated_case(torch.float16, "layer", True, True, 1, T=80)
    leaves = [t.requires_grad_() for t in inputs]
    y = fn(*leaves)
    # the merged row's statistics, the gated GEMM (gate and up from one A tile), the down GEMM
    assert launches == ["norm_stats_kernel", "mapped_gemm_kernel", "fused_gemm_kernel"]
    launches.clear()
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    # down's dW; [dG | dU] (act' and the product rule in the epilogue); the chunked weight's dW and dA,
    # both reading [dG | dU] as one operand; the norm backward.
    assert launches == ["fused_gemm_kernel", "fused_gemm_kernel", "mapped_gemm_kernel", "mapped_gemm_kernel",
                        "norm_bwd_kernel"]
    again = torch.autograd.grad(fn(*leaves), leaves, dy)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_gated_bad_input():
    x = torch.randn(8, C)
    w1, w2 = torch.randn(10, G * C), torch.randn(3, 5)
    with pytest.raises(ValueError, match="gate_half: expected one of"):
        merged_mlp(x, [w1, w2], activation="silu", group=G, gate_half=2)
    with pytest.raises(ValueError, match="weights: expected two weights with gate_half.*got 1"):
        merged_mlp(x, [w1], activation="silu", group=G, gate_half=0)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected an even shape\[0\].*got 9"):
        merged_mlp(x, [torch.randn(9, G * C), w2], activation="silu", group=G, gate_half=0)
    with pytest.raises(ValueError, match="activation: expected one of"):
        merged_mlp(x, [w1, w2], activation="relu2", group=G, gate_half=0)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape\[1\] \(in_features\) == 5, got 10"):
        merged_mlp(x, [w1, torch.randn(3, 10)], activation="silu", group=G, gate_half=0)


# ----------------------------------------------------------------------------------------------
# Average pooling (Gemma 3): one pool-and-norm kernel, then the GEMMs
# ----------------------------------------------------------------------------------------------
def _pool_case(dtype, norm, use_map=True, T=80, C=37, G=16, widths=(11,), offset=None, bias=False):
    """x (T, C) pooled G tokens a row (a table leaving T % G... tokens out, or adjacent rows), the norm
    over the pooled row (Gemma's 1 + weight when ``offset``), then Linear layers (GELU between)."""
    x = torch.randn(T, C, dtype=dtype)
    tmap = torch.randperm(T)[: (T // G) * G - (G if use_map else 0)].reshape(-1, G) if use_map else None
    offset = (1.0 if norm == "rms" else 0.0) if offset is None else offset
    gamma = ((0.3 if offset else 1) * torch.randn(C) + (0 if offset else 1)).to(dtype) if norm else None
    beta = torch.randn(C, dtype=dtype) if norm == "layer" else None
    ks = (C, *widths[:-1])
    ws = [torch.randn(n, k, dtype=dtype) / k ** 0.5 for k, n in zip(ks, widths)]
    bs = [torch.randn(n, dtype=dtype) for n in widths] if bias else []
    inputs = [x, *ws, *bs] + [t for t in (gamma, beta) if t is not None]
    names = ["x"] + [f"W{i}" for i in range(len(ws))] + [f"b{i}" for i in range(len(bs))] + \
        ["gamma"] * (gamma is not None) + ["beta"] * (beta is not None)
    n = len(ws)
    kw = dict(group=G, token_map=tmap, norm=norm, eps=1e-6, norm_after_merge=True, pool=True,
              norm_weight_offset=offset)

    def call(f):
        def run(*t):
            ws_, rest = list(t[1:1 + n]), list(t[1 + n:])
            bs_ = rest[:n] if bias else None
            nb = rest[n:] if bias else rest
            return f(t[0], ws_, bs_, "gelu", norm_weight=nb[0] if nb else None,
                     norm_bias=nb[1] if len(nb) > 1 else None, **kw)
        return run

    return inputs, names, call(merged_mlp), call(merged_mlp_reference)


@pytest.mark.parametrize("norm", [None, "rms", "layer"])
@pytest.mark.parametrize("use_map", [True, False], ids=["table", "adjacent"])
def test_pool_matches_reference_fp32(norm, use_map):
    inputs, names, fn, ref = _pool_case(torch.float32, norm, use_map, widths=(11, 6), bias=True)
    assert_matches_reference(fn, ref, inputs, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pool_half_precision_gemma(dtype):
    # Gemma 3's form: RMSNorm scaled by 1 + weight in fp32, one weight matmul, no bias.
    inputs, names, fn, ref = _pool_case(dtype, "rms")
    assert_matches_reference(fn, ref, inputs, names)


def test_pool_non_contiguous_views():
    T, C, G = 48, 20, 4
    x = torch.randn(2 * C, T).t()[:, ::2]
    tmap = torch.randperm(T).reshape(G, -1).t()
    w = (torch.randn(C, 9) / 5).t()
    gamma, beta = torch.randn(2 * C)[::2], torch.randn(1).expand(C)
    assert not any(t.is_contiguous() for t in (x, tmap, w, gamma, beta))

    def fn(x_, w_, g_, b_, f=merged_mlp):
        return f(x_, [w_], None, None, group=G, token_map=tmap, pool=True, norm="layer", norm_weight=g_,
                 norm_bias=b_, norm_after_merge=True, eps=1e-5)

    assert_matches_reference(fn, lambda *t: fn(*t, f=merged_mlp_reference), [x, w, gamma, beta],
                             ["x", "W", "gamma", "beta"])


@pytest.mark.parametrize("norm", [None, "layer"])
def test_pool_gradcheck_fp64(norm):
    inputs, names, fn, _ = _pool_case(torch.float64, norm, T=12, C=3, G=4, widths=(2,), offset=0.5 if norm else 0)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_pool_launch_counts_and_determinism(launches):
    inputs, names, fn, _ = _pool_case(torch.float16, "rms")
    leaves = [t.requires_grad_() for t in inputs]
    y = fn(*leaves)
    # pooling and the norm in one kernel, then the GEMM: GEMMs + 1
    assert launches == ["pool_norm_fwd_kernel", "fused_gemm_kernel"]
    launches.clear()
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    # dW, dA, then the norm's backward spread to each window's tokens
    assert sorted(launches) == ["fused_gemm_kernel", "fused_gemm_kernel", "pool_norm_bwd_kernel"]
    assert launches[-1] == "pool_norm_bwd_kernel"
    again = torch.autograd.grad(fn(*leaves), leaves, dy)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    # the table leaves G tokens out: their gradient is exactly 0
    assert int((grads[0] == 0).all(dim=1).sum()) >= 16


def test_pool_bad_input():
    x, w = torch.randn(32, C), torch.randn(5, C)
    with pytest.raises(ValueError, match="norm_after_merge: expected True with pool=True"):
        merged_mlp(x, [w], group=G, pool=True, norm="rms", norm_weight=torch.ones(C))
    with pytest.raises(ValueError, match="gate_half: expected None with pool=True"):
        merged_mlp(x, [torch.randn(10, C), torch.randn(3, 5)], activation="silu", group=G, pool=True, gate_half=0)
    with pytest.raises(ValueError, match="norm_weight_offset: expected 0.0 without pool=True, got 1.0"):
        merged_mlp(x, [torch.randn(5, G * C)], group=G, norm="rms", norm_weight=torch.ones(C), norm_weight_offset=1.0)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected shape\[1\] \(in_features\) == 24, got 96"):
        merged_mlp(x, [torch.randn(5, G * C)], group=G, pool=True)


def test_pool_and_gated_with_no_rows():
    # An empty table or no tokens: (0, N) out, zero gradients of the right shapes, no launch fails.
    w, g = torch.randn(3, 5, requires_grad=True), torch.zeros(5, requires_grad=True)
    for x, tmap in ((torch.randn(8, 5), torch.zeros(0, 4, dtype=torch.long)), (torch.randn(0, 5), None)):
        x.requires_grad_()
        y = merged_mlp(x, [w], None, None, group=4, token_map=tmap, pool=True, norm="rms", norm_weight=g,
                       norm_after_merge=True, norm_weight_offset=1.0)
        assert y.shape == (0, 3)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(g.grad, torch.zeros(5))
    x = torch.randn(0, 6, requires_grad=True)
    w1, w2 = torch.randn(8, 24, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    y = merged_mlp(x, [w1, w2], None, "silu", group=4, gate_half=1, norm="layer", norm_weight=torch.ones(24),
                   norm_bias=torch.zeros(24), norm_after_merge=True)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 6) and torch.equal(w1.grad, torch.zeros_like(w1))


def test_final_activation(launches):
    # Llama 4's vision adapter: GELU after the last Linear too, in its epilogue; its backward starts
    # with one act' pass. fp32 values and gradients, launches, gradcheck in fp64.
    inputs, names, _, _ = _case(torch.float32, None, False, True)
    kw = dict(group=G, token_map=torch.randperm(52)[:52].reshape(-1, G), final_activation=True)

    def call(f):
        return lambda x, w1, w2, b1, b2: f(x, [w1, w2], [b1, b2], "gelu", **kw)

    assert_matches_reference(call(merged_mlp), call(merged_mlp_reference), inputs[:5], names[:5])
    leaves = [t.detach().requires_grad_() for t in inputs[:5]]
    launches.clear()
    y = call(merged_mlp)(*leaves)
    assert launches == ["mapped_gemm_kernel", "fused_gemm_kernel"]
    launches.clear()
    y.sum().backward()
    assert launches[0] == "act_grad_kernel" and len(launches) == 5
    small, _, _, _ = _case(torch.float64, None, False, True, T=8, widths=(5, 3), C=3, G=2)
    kw.update(group=2, token_map=torch.randperm(8).reshape(-1, 2))
    assert torch.autograd.gradcheck(call(merged_mlp), [t.requires_grad_() for t in small[:5]], fast_mode=True)
    with pytest.raises(ValueError, match="final_activation: expected False with pool=True or gate_half"):
        merged_mlp(torch.randn(8, C), [torch.randn(5, C)], group=G, pool=True, final_activation=True)


def test_final_activation_without_an_activation_is_a_plain_mlp():
    x, w = torch.randn(8, C, requires_grad=True), torch.randn(5, G * C, requires_grad=True)
    y = merged_mlp(x, [w], None, None, group=G, final_activation=True)
    y.sum().backward()
    assert torch.allclose(y, merged_mlp_reference(x, [w], None, None, group=G), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,post,use_map", [("layer", False, False), ("rms", True, True)])
def test_tf32_rounds_both_operands_of_every_gemm(norm, post, use_map, monkeypatch):
    """As tests/test_tma_gemm.py's test of the same name, for the mapped GEMM (the normalised, merged A
    operand rounded in registers; dW; dA through the table) and the MLP's second GEMM: the rounding
    switched on under the interpreter, against a reference whose every matmul rounds both operands
    (``assert_rounds_like``: the normalised operand is computed, so a few elements may round apart)."""
    from _tf32 import assert_rounds_like, tf32_linear

    from mmfuse.kernels import _common

    monkeypatch.setattr(_common, "ROUND_TF32_OPERANDS", _common.tl.constexpr(True))
    inputs, names, fn, ref = _case(torch.float32, norm, post, use_map)

    def tf32_ref(*t):
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "linear", tf32_linear)
            return ref(*t)

    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
    try:
        assert_rounds_like(fn, tf32_ref, inputs, names)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
