"""The tile-by-tile traffic model of fused_gemm_kernel against the bytes an interpreted run touches."""

import pytest
import torch

import mmfuse
from mmfuse.kernels import linear as KL
from mmfuse.traffic import Traffic, fused_gemm_traffic, linear_traffic, measure

TILE = KL.INTERPRETER_TILE[:2]


@pytest.mark.parametrize("M,K,N", [(37, 75, 45), (64, 32, 64), (5, 40, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_forward_traffic_matches_an_interpreted_run(M, K, N, dtype):
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype)
    saved = {}

    def run():
        y, h = KL.linear_fwd(x.detach(), w, b, "gelu", store_preact=True)
        saved["h"] = h
        return y

    y, got = measure(run, {"x": x, "weight": w, "bias": b, "y": lambda y: y, "h": lambda _: saved["h"]})
    want = linear_traffic(M, K, N, TILE, x.element_size(), bias=True, activation=True, training=True)
    assert got == want, (got, want)


def test_measure_follows_the_tma_kernel(monkeypatch):
    """The recorder's hooks take the interpreter's arguments by keyword too (a TMA descriptor's load names
    its cache policy): the Hopper core's forward is measured, x, W and y each moved at least once."""
    monkeypatch.setattr(KL, "TMA", "always")
    x, w = torch.randn(40, 64, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
    launched = []
    real = KL._launch_gemm

    def spy(*args, **kwargs):
        launched.append(KL._tma_layout(args[0]) is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(KL, "_launch_gemm", spy)
    (y, _), got = measure(lambda: KL.linear_fwd(x, w), {"x": x, "w": w, "y": lambda r: r[0]})
    assert launched and KL._wants_tma(x)
    assert got["x"].loaded >= x.numel() * 2 and got["w"].loaded >= w.numel() * 2
    assert got["y"].stored == y.numel() * 2


def test_dw_and_act_grad_epilogues():
    M, K, N = 29, 40, 33
    dh = torch.randn(M, N)
    x = torch.randn(M, K)
    w = torch.randn(N, K)
    h = torch.randn(M, K)
    (dw, db), got = measure(lambda: KL.weight_grad(dh, x, with_bias=True),
                            {"dh": dh, "x": x, "dw": lambda r: r[0], "db": lambda r: r[1]})
    # dW = dH^T @ X: GEMM (N, K) with reduction over M tokens. db is a torch reduction beside it (not
    # an interpreted launch, so not measured here): the kernel reads dH only as dW's A operand.
    model = fused_gemm_traffic(N, K, M, TILE, 4)
    assert got["dh"] == model["a"] and got["x"] == model["b"]
    assert got["dw"] == model["c"] and got["db"].loaded == got["db"].stored == 0
    _, got = measure(lambda: KL.input_grad(dh, w, h_prev=h, activation_prev="gelu"), {"h": h})
    assert got["h"] == fused_gemm_traffic(M, K, N, TILE, 4, act_grad=True)["aux"]


@pytest.mark.parametrize("M,N", [(70, 45), (64, 128)])
def test_act_grad_traffic_matches_an_interpreted_run(M, N):
    from mmfuse.traffic import act_grad_traffic

    dy, h = torch.randn(M, N, dtype=torch.float16), torch.randn(M, N, dtype=torch.float16)
    _, got = measure(lambda: KL.act_grad(dy, h, "gelu"), {"dy": dy, "h": h, "dh": lambda r: r})
    assert got == act_grad_traffic(M, N, 2)


def test_unique_bytes_are_the_tensor_sizes_and_rereads_the_tiles():
    t = fused_gemm_traffic(576, 4096, 1024, (128, 128), 2, bias=True)
    assert t["a"].unique == 576 * 1024 * 2 and t["b"].unique == 4096 * 1024 * 2
    # 5 x 32 programs: each loads 128 rows of A and 128 columns of B over K.
    assert t["a"].loaded == 160 * 128 * 1024 * 2 and t["b"].loaded == 160 * 128 * 1024 * 2
    assert Traffic(1, 2, 3) + Traffic(1, 1, 1) == Traffic(2, 3, 4)


def test_measure_needs_the_interpreter(monkeypatch):
    import mmfuse._dispatch as d

    monkeypatch.setattr(d, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="interpreter"):
        measure(lambda: None, {})
    assert mmfuse.INTERPRET


def test_mlp_traffic_matches_the_hand_counts_in_notes():
    # bench/NOTES.md (Linear section), LLaVA-1.5-7B, 1 image, bf16, counted by hand from the formulas
    # MK + NK + N^2 + 4MN (fused fwd, training) and 9MN + 2MK + 2NK + 2N^2 (fused bwd: the two bias
    # reductions read dH once more each), plus biases (db: fp32 sums, then the cast).
    from mmfuse.traffic import mlp_traffic

    M, K, N = 576, 1024, 4096
    t = mlp_traffic(M, (K, N, N), (64, 64), 2)
    assert t["fwd"]["hbm"] == 2 * (M * K + N * K + N * N + 4 * M * N + 2 * N)
    assert t["bwd"]["hbm"] == 2 * (9 * M * N + 2 * M * K + 2 * N * K + 2 * N * N + 6 * N)
    assert round(t["fwd"]["hbm"] / 1e6, 1) == 62.0 and round(t["bwd"]["hbm"] / 1e6, 1) == 128.8
    assert round(t["eager_fwd"]["hbm"] / 1e6, 1) == 66.7
    assert (t["fwd"]["launches"], t["bwd"]["launches"], t["eager_bwd"]["launches"]) == (2, 6, 7)
    # eager's GEMM-free kernels: GELU (2MN), two bias-gradient sums (MN + N each), GELU' of layer 1 (3MN).
    assert t["eager_elementwise_hbm"] == 2 * (2 * M * N + 2 * (M * N + N) + 3 * M * N)
    # The per-launch figures the report's roofline uses add up to the totals, launch for launch.
    d = t["per_launch"]
    for step in ("fwd", "bwd", "eager_fwd", "eager_bwd"):
        assert len(d[step]) == t[step]["launches"] and sum(x["hbm"] for x in d[step]) == t[step]["hbm"]
    flops = 2 * M * (K * N + N * N)
    assert sum(x["flops"] for x in d["fwd"]) == sum(x["flops"] for x in d["eager_fwd"]) == flops
    assert sum(x["flops"] for x in d["bwd"]) == sum(x["flops"] for x in d["eager_bwd"]) == 2 * flops
    # dW2, db2, dX2, dW1, db1, dX1
    assert [(x["rows"], x["cols"]) for x in d["bwd"]] == [(N, N), (None, None), (M, N), (N, K), (None, None), (M, K)]


@pytest.mark.parametrize("B,C,H,W,P,D", [(2, 3, 28, 42, 14, 40), (1, 2, 16, 16, 8, 33), (1, 3, 10, 15, 5, 20)])
def test_patch_embed_forward_traffic_matches_an_interpreted_run(B, C, H, W, P, D):
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.traffic import patch_embed_fwd_traffic

    px = torch.randn(B, C, 1, H, W)
    w = torch.randn(D, C, 1, P, P)
    b, pos = torch.randn(D), torch.randn(1, (H // P) * (W // P), D)
    packed = KP.pack_weight(w)
    _, got = measure(lambda: KP.patch_embed_fwd(px, w, b, pos.expand(B, -1, -1), packed=packed),
                     {"pixels": px, "weight": packed[0], "bias": b, "pos": pos, "out": lambda out: out})
    want = patch_embed_fwd_traffic(B, C, H, W, P, D, KP.INTERPRETER_TILE[:3], 4, bias=True, pos_batched=False)
    assert got == want, (got, want)


@pytest.mark.parametrize("B,Bq,Hq,Hkv,Lq,Lk,D,splits", [(2, 1, 4, 2, 20, 70, 24, 1), (2, 2, 2, 1, 16, 97, 16, 3)])
def test_attention_forward_traffic_matches_an_interpreted_run(B, Bq, Hq, Hkv, Lq, Lk, D, splits, monkeypatch):
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.traffic import attention_fwd_traffic

    allocated = []  # o, lse, then (with splits) the partial o and lse buffers, in the launcher's order

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    monkeypatch.setattr(KA, "empty", recording_empty)
    q = torch.randn(Bq, Hq, Lq, D)
    k, v = torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    named = {"q": q, "k": k, "v": v, "o": lambda r: r[0], "lse": lambda r: r[1]}
    if splits > 1:
        named.update(o_partial=lambda r: allocated[2], lse_partial=lambda r: allocated[3])
    _, got = measure(lambda: KA.attention_fwd(q, k, v, None, None, D ** -0.5, splits=splits), named)
    blocks = (KA.INTERPRETER_BLOCKS["BLOCK_M"], KA.INTERPRETER_BLOCKS["BLOCK_N"])
    want = attention_fwd_traffic(B, Bq, Hq, Hkv, Lq, Lk, D, blocks, splits, 4)
    assert got == want, (got, want)


def test_attention_forward_in_kernel_combine_traffic(monkeypatch):
    """The in-kernel combine moves the bytes of the split kernel and attn_combine_kernel together (the
    model's figures), in one launch: the last split of a query block reads every partial back."""
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.traffic import attention_fwd_traffic

    allocated = []

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    monkeypatch.setattr(KA, "empty", recording_empty)
    B, Bq, Hq, Hkv, Lq, Lk, D, splits = 2, 1, 4, 2, 20, 97, 24, 3
    q = torch.randn(Bq, Hq, Lq, D)
    k, v = torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    named = {"q": q, "k": k, "v": v, "o": lambda r: r[0], "lse": lambda r: r[1],
             "o_partial": lambda r: allocated[2], "lse_partial": lambda r: allocated[3]}
    _, got = measure(lambda: KA.attention_fwd(q, k, v, None, None, D ** -0.5, splits=splits, combine="kernel"),
                     named, by_launch=True)
    assert list(got) == ["attn_fwd_kernel"]
    blocks = (KA.INTERPRETER_BLOCKS["BLOCK_M"], KA.INTERPRETER_BLOCKS["BLOCK_N"])
    assert got["attn_fwd_kernel"] == attention_fwd_traffic(B, Bq, Hq, Hkv, Lq, Lk, D, blocks, splits, 4)


def _touched(per_launch):
    """{kernel: {tensor: Traffic}} without the tensors a launch did not touch."""
    return {k: {n: t for n, t in ts.items() if t != Traffic()} for k, ts in per_launch.items()}


@pytest.mark.parametrize("B,C,F,H,W,T,P,D", [(2, 3, 1, 28, 42, 1, 14, 40), (1, 2, 4, 10, 15, 2, 5, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_patch_embed_backward_traffic_matches_an_interpreted_run(B, C, F, H, W, T, P, D, dtype, monkeypatch):
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.traffic import patch_embed_bwd_traffic

    px = torch.randn(B, C, F, H, W, dtype=dtype)
    w = torch.randn(D, C, T, P, P, dtype=dtype)
    tokens = (F // T) * (H // P) * (W // P)
    g = torch.randn(B, tokens, D, dtype=dtype)
    packed = KP.pack_weight(w)
    allocated = []  # dpixels, dW, then the batch sum's dpos and db's column sums

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    def backward():  # as the autograd op runs it: db from the batch sum, not from the dW launcher
        dx = KP.patch_embed_dx(g, w, tuple(px.shape), packed=packed)
        dw, _ = KP.patch_embed_dw(g, px, tuple(w.shape), with_bias=False)
        return dx, dw, *KP.batch_sum(g, bias_from=0)

    monkeypatch.setattr(KP, "empty", recording_empty)
    (_, _, _, db), got = measure(backward, {"dout": g, "weight": packed[0], "pixels": px,
                                            "pixels_grad": lambda r: r[0], "weight_grad": lambda r: r[1],
                                            "pos_grad": lambda r: r[2], "bias_grad_partial": lambda _: allocated[3]},
                                 by_launch=True)
    tile = KP.INTERPRETER_TILE[:3]
    want = patch_embed_bwd_traffic(B, C, H, W, P, D, {"dx": tile, "dw": tile}, g.element_size(), T=T, F=F,
                                   batch_rows=KP.BATCH_SUM_BLOCK[0])
    names = {"dx": "patch_embed_dx_kernel", "dw": "patch_embed_dw_kernel", "batch_sum": "batch_sum_kernel"}
    # db's sum of the column sums is a torch reduction (no interpreted launch): what it reads is what the
    # batch sum stored.
    assert _touched(got) == {names[k]: v for k, v in want.items() if k in names}
    assert want["bias_sum"]["bias_grad"].loaded == allocated[3].numel() * 4 == got["batch_sum_kernel"][
        "bias_grad_partial"].stored
    assert db.shape == (D,)


@pytest.mark.parametrize("B,Bq,Hq,Hkv,Lq,Lk,D", [(2, 1, 4, 2, 20, 70, 24), (3, 3, 2, 1, 16, 97, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_backward_traffic_matches_an_interpreted_run(B, Bq, Hq, Hkv, Lq, Lk, D, dtype, monkeypatch):
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.traffic import attention_bwd_traffic

    q = torch.randn(Bq, Hq, Lq, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, Lk, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype)
    o, lse = KA.attention_fwd(q, k, v, None, None, D ** -0.5)
    do = torch.randn_like(o)
    allocated = []  # delta, dk, dv, dq, then the fp32 dQ partials when the batch loop splits

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    monkeypatch.setattr(KA, "empty", recording_empty)
    blocks = (KA.INTERPRETER_BLOCKS["BLOCK_M"], KA.INTERPRETER_BLOCKS["BLOCK_N"])
    # The launcher's rule; the second shape is forced to split its keys too (both paths covered).
    dq_splits, dq_key_splits = KA.dq_splits_for(B, Bq, Hq, Hkv, Lq, Lk, D, q.element_size(),
                                                KA.INTERPRETER_BLOCKS, 132)
    if Bq > 1:
        dq_splits, dq_key_splits = 1, 2
    named = {"q": q, "k": k, "v": v, "o": o, "do": do, "lse": lse, "delta": lambda _: allocated[0],
             "dq": lambda r: r[0], "dk": lambda r: r[1], "dv": lambda r: r[2]}
    if dq_splits * dq_key_splits > 1:
        named["dq_partial"] = lambda _: allocated[4]
    _, got = measure(lambda: KA.attention_bwd(do, q, k, v, o, lse, None, None, D ** -0.5,
                                              dq_splits=(dq_splits, dq_key_splits)), named, by_launch=True)
    want = attention_bwd_traffic(B, Bq, Hq, Hkv, Lq, Lk, D, blocks, q.element_size(), dq_splits=dq_splits,
                                 dq_key_splits=dq_key_splits)
    assert (dq_splits > 1) == (Bq == 1)  # batch splits (first shape) and key splits (second) both covered
    names = {"delta": "attn_delta_kernel", "dkdv": "attn_bwd_dkdv_kernel", "dq": "attn_bwd_dq_kernel"}
    # dq_sum is a torch reduction, not a Triton launch: the interpreter sees the three kernels.
    assert _touched(got) == {names[k]: v for k, v in want.items() if k in names}


@pytest.mark.parametrize("B,Bq,H,Lq,Lk,D,splits", [(3, 1, 3, 13, 70, 24, (2, 1)), (3, 3, 2, 16, 97, 16, (1, 2)),
                                                    (2, 1, 2, 5, 40, 16, (1, 1))])
def test_single_pass_backward_traffic_matches_an_interpreted_run(B, Bq, H, Lq, Lk, D, splits, monkeypatch):
    # One launch: q once per split, dO, O and lse once per key chunk, K and V once, dK and dV stored once.
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.traffic import attention_bwd_traffic

    q = torch.randn(Bq, H, Lq, D, dtype=torch.float16)
    k, v = torch.randn(B, H, Lk, D, dtype=torch.float16), torch.randn(B, H, Lk, D, dtype=torch.float16)
    o, lse = KA.attention_fwd(q, k, v, None, None, D ** -0.5)
    do = torch.randn_like(o)
    allocated = []  # delta (unused), dk, dv, dq, then the fp32 dQ partials when split

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    monkeypatch.setattr(KA, "empty", recording_empty)
    blocks = (KA.INTERPRETER_BLOCKS["BLOCK_M"], KA.INTERPRETER_BLOCKS["BLOCK_N"])
    named = {"q": q, "k": k, "v": v, "o": o, "do": do, "lse": lse, "delta": lambda _: allocated[0],
             "dq": lambda r: r[0], "dk": lambda r: r[1], "dv": lambda r: r[2]}
    if splits != (1, 1):
        named["dq_partial"] = lambda _: allocated[4]
    _, got = measure(lambda: KA.attention_bwd(do, q, k, v, o, lse, None, None, D ** -0.5, dq_splits=splits,
                                              single_pass=True), named, by_launch=True)
    want = attention_bwd_traffic(B, Bq, H, H, Lq, Lk, D, blocks, 2, dq_splits=splits[0], dq_key_splits=splits[1],
                                 single_pass=True)
    assert set(want) == ({"dq", "dq_sum"} if splits != (1, 1) else {"dq"})
    assert _touched(got) == {"attn_bwd_dq_kernel": want["dq"]}
    with pytest.raises(ValueError, match="single_pass needs Hq == Hkv"):
        attention_bwd_traffic(B, Bq, H, 1, Lq, Lk, D, blocks, 2, single_pass=True)


def test_measure_by_launch_refuses_a_kernel_launched_twice():
    x = torch.randn(8, 16)
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="more than once"):
        measure(lambda: (KL.linear_fwd(x, w), KL.linear_fwd(x, w)), {"x": x}, by_launch=True)


def test_patch_embed_dw_split_traffic_matches_an_interpreted_run(monkeypatch):
    """dW split three ways over 150 tokens: fp32 partials stored, then read once by the combine."""
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.traffic import patch_embed_bwd_traffic

    B, C, H, W, P, D = 2, 3, 20, 60, 4, 37
    px = torch.randn(B, C, 1, H, W, dtype=torch.float16)
    g = torch.randn(B, (H // P) * (W // P), D, dtype=torch.float16)
    allocated = []  # dw, then the partials (db: a torch sum, no Triton launch)

    def recording_empty(*args, **kw):
        allocated.append(torch.empty(*args, **kw))
        return allocated[-1]

    monkeypatch.setattr(KP, "empty", recording_empty)
    _, got = measure(lambda: KP.patch_embed_dw(g, px, (D, C, 1, P, P), with_bias=True, splits=3),
                     {"dout": g, "pixels": px, "weight_grad": lambda _: allocated[0],
                      "weight_grad_partial": lambda _: allocated[1]}, by_launch=True)
    tile = KP.INTERPRETER_TILE[:3]
    want = patch_embed_bwd_traffic(B, C, H, W, P, D, {"dx": tile, "dw": tile}, 2, dw_splits=3, pos=False)
    names = {"dw": "patch_embed_dw_kernel", "dw_combine": "dw_combine_kernel"}
    assert _touched(got) == {names[k]: v for k, v in want.items() if k in names}


def test_gated_gemm_traffic_matches_interpreted_runs():
    # The gated MLP's three GEMMs, launch by launch, at odd sizes (interpreter tile 32 x 32).
    from mmfuse.traffic import gated_mlp_traffic

    M, K, N, D = 45, 37, 70, 29
    x = torch.randn(M, K)
    wg, wu, bg, bu = torch.randn(N, K), torch.randn(N, K), torch.randn(N), torch.randn(N)
    (h, gu), got = measure(lambda: KL.gated_fwd(x, wg, wu, bg, bu, "silu", store_preact=True),
                           {"x": x, "wg": wg, "wu": wu, "bg": bg, "bu": bu, "h": lambda r: r[0], "gu": lambda r: r[1]})
    model = fused_gemm_traffic(M, N, K, TILE, 4, bias=True, store_aux=True, gated=True)
    assert (got["x"], got["wg"], got["wu"], got["bg"], got["bu"], got["h"]) == \
        (model["a"], model["b"], model["b2"], model["bias"], model["bias2"], model["c"])
    assert got["gu"] == model["aux"] + model["aux2"]
    dy, wd = torch.randn(M, D), torch.randn(D, N)
    dgu, got = measure(lambda: KL.gate_grad(dy, wd, gu, "silu"), {"dy": dy, "wd": wd, "gu": gu, "dgu": lambda r: r})
    model = fused_gemm_traffic(M, N, D, TILE, 4, gate_grad=True)
    assert (got["dy"], got["wd"]) == (model["a"], model["b"])
    assert got["gu"] == model["aux"] + model["aux2"] and got["dgu"] == model["c"] + model["c2"]
    dx, got = measure(lambda: KL.gated_input_grad(dgu, wg, wu), {"dgu": dgu, "wg": wg, "wu": wu, "dx": lambda r: r})
    model = fused_gemm_traffic(M, K, N, TILE, 4, two_k=True)
    assert got["dgu"] == model["a"] + model["a2"] and (got["wg"], got["wu"]) == (model["b"], model["b2"])
    assert got["dx"] == model["c"]
    # The training step's launches as the model counts them: 2 forward, 4 backward GEMMs + 2 reductions.
    t = gated_mlp_traffic(M, K, N, D, TILE, 4)
    assert (t["fwd"]["launches"], t["bwd"]["launches"], t["eager_fwd"]["launches"], t["eager_bwd"]["launches"]) \
        == (2, 6, 5, 13)


def test_gated_mlp_traffic_hand_counts():
    # Qwen2.5-VL-7B's vision MLP (1280 -> 3420 -> 1280, SwiGLU with biases), one 896px image (4096
    # patches), bf16, at a 64 x 64 tile, counted by hand (bench/NOTES.md "Gated MLP"):
    #   fwd  MK + 2NK + 2N + MN (h) + 2MN (g, u);  down: MN (h again) + DN + D + MD
    #   bwd  dW_down: MD + MN + DN;  db_down: MD + D(4+2)/2;  [dG|dU]: MD + DN + 2MN + 2MN;
    #        [dW_g; dW_u]: 2MN + MK + 2NK;  db: 2MN + 2N(4+2)/2;  dX: 2MN + 2NK + MK
    from mmfuse.traffic import gated_mlp_traffic

    M, K, N, D = 4096, 1280, 3420, 1280
    t = gated_mlp_traffic(M, K, N, D, (64, 64), 2)
    assert t["fwd"]["hbm"] == 2 * (M * K + 2 * N * K + 2 * N + 4 * M * N + D * N + D + M * D)
    assert t["bwd"]["hbm"] == 2 * (3 * M * D + 2 * D * N + 11 * M * N + 2 * M * K + 4 * N * K) + D * 6 + 2 * N * 6
    assert t["eager_fwd"]["hbm"] == 2 * (2 * (M * K + N * K + N + M * N) + 5 * M * N + M * N + D * N + D + M * D)


@pytest.mark.parametrize("norm,post,use_table", [("layer", False, True), ("rms", True, True), (None, False, True),
                                                 ("rms", False, False)])
def test_mapped_gemm_traffic_matches_interpreted_runs(norm, post, use_table):
    # The three mapped GEMMs launch by launch (C = 64: channel blocks aligned, the GPU's case), and the
    # forward's total stores: y, the hidden layer and its pre-activation, the statistics, nothing else.
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import mapped_gemm_traffic

    T, C, G, N = 96, 64, 2, 40
    M, K = T // G, G * C
    x = torch.randn(T, C)
    table = torch.randperm(T, dtype=torch.int32).view(M, G) if use_table else KM._no_table(x.device)
    width = K if post else C
    gamma, beta = torch.randn(width), torch.randn(width)
    merge = KM.Merge(x, G, table if use_table else None, norm, post, gamma if norm else None, beta if norm == "layer" else None)
    if norm:
        KM.norm_stats(merge)
    rows_norm = (M if post else T) if norm else 0
    w, b = torch.randn(N, K), torch.randn(N)
    tensors = {"x": x, "table": table, "weight": w, "bias": b}
    if norm:
        tensors.update(stats=merge.stats, gamma=gamma, beta=merge.beta)
    (y, h), got = measure(lambda: KM.mapped_fwd(merge, w, b, activation=1, store_preact=True),
                          {**tensors, "y": lambda r: r[0], "h": lambda r: r[1]})
    model = mapped_gemm_traffic(M, N, K, (32, 32, 32), 4, mapped=0, C=C, G=G, rows_norm=rows_norm,
                                norm_width=width, bias=True, store_aux=True, table=use_table)
    assert (got["x"], got["table"], got["weight"], got["bias"], got["y"], got["h"]) == \
        (model["x"], model["table"], model["b"], model["bias"], model["c"], model["aux"])
    if norm:
        assert got["stats"] == model["stats"] and got["gamma"] + got["beta"] == model["gamma_beta"]
    dh = torch.randn(M, N)
    _, got = measure(lambda: KM.mapped_weight_grad(dh, merge), {**tensors, "dh": dh, "dw": lambda r: r})
    model = mapped_gemm_traffic(N, K, M, (32, 32, 32), 4, mapped=1, C=C, G=G, rows_norm=rows_norm, norm_width=width,
                                table=use_table)
    assert (got["x"], got["table"], got["dh"], got["dw"]) == (model["x"], model["table"], model["a"], model["c"])
    if norm:
        assert got["stats"] == model["stats"] and got["gamma"] + got["beta"] == model["gamma_beta"]
    _, got = measure(lambda: KM.mapped_input_grad(dh, w, merge), {"dh": dh, "w": w, "table": table,
                                                                     "da": lambda r: r})
    model = mapped_gemm_traffic(M, K, N, (32, 32, 32), 4, mapped=2, C=C, G=G, table=use_table)
    assert (got["dh"], got["w"], got["table"], got["da"]) == (model["a"], model["b"], model["table"], model["x_grad"])


@pytest.mark.parametrize("use_table", [True, False], ids=["table", "view"])
def test_mapped_gated_traffic_matches_interpreted_runs(use_table):
    # Aya Vision's form (a LayerNorm over the merged row, a pixel shuffle's table): the gated forward
    # reads the merged operand once for gate and up, one chunked weight and bias, and stores h and
    # [u | g]; then the training step's launches as the model counts them.
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import mapped_gemm_traffic, merged_mlp_traffic

    T, C, G, N, D = 96, 64, 2, 40, 24
    M, K = T // G, G * C
    x = torch.randn(T, C)
    table = torch.randperm(T, dtype=torch.int32).view(M, G) if use_table else KM._no_table(x.device)
    gamma, beta = torch.randn(K), torch.randn(K)
    merge = KM.Merge(x, G, table if use_table else None, "layer", True, gamma, beta)
    KM.norm_stats(merge)
    w, b = torch.randn(2 * N, K), torch.randn(2 * N)
    tensors = {"x": x, "table": table, "weight": w, "bias": b, "stats": merge.stats, "gamma": gamma, "beta": beta}
    _, got = measure(lambda: KM.mapped_gated_fwd(merge, w, 1, b, activation=4, store_preact=True),
                     {**tensors, "h": lambda r: r[0], "gu": lambda r: r[1]})
    model = mapped_gemm_traffic(M, N, K, (32, 32, 32), 4, mapped=0, C=C, G=G, rows_norm=M, norm_width=K, bias=True,
                                store_aux=True, table=use_table, gated=True)
    assert (got["x"], got["table"], got["stats"], got["h"]) == (model["x"], model["table"], model["stats"], model["c"])
    assert got["weight"] == model["b"] + model["b2"] and got["bias"] == model["bias"] + model["bias2"]
    assert got["gu"] == model["aux"] + model["aux2"] and got["gamma"] + got["beta"] == model["gamma_beta"]
    t = merged_mlp_traffic(T, C, G, (N, D), (32, 32), 4, norm="layer", post=True, table=use_table, bk=32, gated=True)
    # mmfuse: statistics, the gated GEMM, down; backward: dW_down, db_down, [dG | dU], the chunked
    # weight's dW and db, dA, the norm backward and its partials' sum (tests/test_merged_mlp.py counts
    # the Triton launches among them). Eager: LayerNorm, the shuffle's two copies (none for a view), linear_1,
    # act, mul, linear_2; backward 10 + the copies' and the norm's.
    copies = 2 if use_table else 0
    assert (t["fwd"]["launches"], t["bwd"]["launches"]) == (3, 8)
    assert (t["eager_fwd"]["launches"], t["eager_bwd"]["launches"]) == (5 + copies, 11 + copies)
    # The forward, counted by hand: x once per kernel (the table's 4 bytes per token with it), the
    # statistics stored, then read; the weight, bias, gamma and beta; h and [g | u] stored; down.
    e, tab = 4, 4 * T if use_table else 0
    assert t["fwd"]["hbm"] == (T * C * e + tab + 2 * M * 4) + (T * C * e + tab + 2 * M * 4 + 2 * N * K * e + 2 * N * e
                                                                + 2 * K * e + 3 * M * N * e) + (M * N + D * N + D + M * D) * e


@pytest.mark.parametrize("norm", ["rms", "layer", None])
def test_pool_norm_traffic_matches_interpreted_runs(norm):
    # Gemma 3's pooling kernels operand by operand (odd M and C: ragged programs and column blocks), and
    # the projector's launches as the model counts them.
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import pool_norm_bwd_traffic, pool_norm_fwd_traffic, pooled_projector_traffic

    M, C, G = 13, 45, 4
    x = torch.randn(M * G, C, dtype=torch.float16)
    table = torch.randperm(M * G, dtype=torch.int32).view(M, G)
    gamma, beta = torch.randn(C, dtype=torch.float16), torch.randn(C, dtype=torch.float16)
    blocks = KM.INTERPRETER_ROWWISE
    (out, pooled, stats), got = measure(
        lambda: KM.pool_norm_fwd(x, table, G, norm, gamma, beta, 1e-6, 1.0, save=True),
        {"x": x, "table": table, "gamma": gamma, "beta": beta, "out": lambda r: r[0],
         **({"pooled": lambda r: r[1], "stats": lambda r: r[2]} if norm else {})})
    model = pool_norm_fwd_traffic(M, C, G, 2, norm=norm, blocks=blocks)
    assert {k: got[k] for k in model} == model
    if norm != "layer":
        assert got["beta"] == Traffic()
    da = torch.randn(M, C, dtype=torch.float16)
    _, got = measure(lambda: KM.pool_norm_bwd(da, M * G, table, G, norm, gamma, pooled, stats, 1.0),
                     {"da": da, "table": table, "dx": lambda r: r[0],
                      **({"pooled": pooled, "stats": stats, "gamma": gamma} if norm else {})})
    model = pool_norm_bwd_traffic(M, C, G, 2, norm=norm, blocks=blocks)
    assert {k: got[k] for k in model if k != "partials"} == {k: v for k, v in model.items() if k != "partials"}
    if norm == "rms":
        t = pooled_projector_traffic(M * G, C, G, 24, (32, 32), 2, blocks=blocks)
        # pool + norm, the GEMM; dW, dA, the pool backward and its partials' sum. Eager: copy, pool, 8
        # RMSNorm kernels, matmul; backward 15.
        assert (t["fwd"]["launches"], t["bwd"]["launches"], t["eager_fwd"]["launches"],
                t["eager_bwd"]["launches"]) == (2, 4, 11, 15)


@pytest.mark.parametrize("post", [False, True])
def test_norm_rowwise_traffic_matches_interpreted_runs(post):
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import norm_bwd_traffic, norm_stats_traffic

    T, C, G = 96, 64, 2
    M = T // G
    x = torch.randn(T, C)
    table = torch.randperm(T, dtype=torch.int32).view(M, G)
    width = G * C if post else C
    merge = KM.Merge(x, G, table, "layer", post, torch.randn(width), torch.randn(width))
    R, g, uses_table = merge.rows
    assert uses_table == post  # per source token: row r is token r, no table read
    _, got = measure(lambda: KM.norm_stats(merge), {"x": x, "table": table, "stats": lambda r: r})
    blocks = KM.INTERPRETER_ROWWISE
    assert got == norm_stats_traffic(R, C, g, 4, center=True, blocks=blocks, table=post)
    da = torch.randn(T, C)
    (dx, _, _), got = measure(lambda: KM.norm_bwd(da, merge),
                              {"x": x, "da": da, "stats": merge.stats, "gamma": merge.gamma, "table": table,
                               "dx": lambda r: r[0]})
    model = norm_bwd_traffic(R, C, g, 4, post=post, blocks=blocks, table=post)
    assert {k: got[k] for k in ("x", "da", "stats", "gamma", "table", "dx")} == \
        {k: model[k] for k in ("x", "da", "stats", "gamma", "table", "dx")}


@pytest.mark.parametrize("post,use_table", [(False, False), (False, True), (True, True), (True, False)],
                         ids=["per-token-view", "per-token-table", "per-row-table", "per-row-view"])
def test_folded_forward_traffic_matches_interpreted_runs(post, use_table):
    # The folded RMSNorm forward launch by launch: the statistics' launch also reads W once and gamma per
    # program and column step and writes gamma * W; the GEMM reads gamma * W and x raw, with only rstd
    # per row and slot (per token) or per row (per merged row), no gamma / beta.
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import fold_gamma_traffic, mapped_gemm_traffic, norm_stats_traffic

    T, C, G, N = 96, 64, 2, 40
    M, K = T // G, G * C
    x = torch.randn(T, C)
    table = torch.randperm(T, dtype=torch.int32).view(M, G) if use_table else KM._no_table(x.device)
    width = K if post else C
    gamma = torch.rand(width) + 0.5
    merge = KM.Merge(x, G, table if use_table else None, "rms", post, gamma)
    w, b = torch.randn(N, K), torch.randn(N)
    R, g, uses_table = merge.rows
    _, got = measure(lambda: KM.norm_stats(merge, fold=w),
                     {"x": x, "table": table, "stats": lambda r: r, "w": w, "gamma": gamma,
                      "wf": lambda r: merge.folded})
    blocks = KM.INTERPRETER_ROWWISE
    model = {**norm_stats_traffic(R, C, g, 4, center=False, blocks=blocks, table=use_table and post),
             **fold_gamma_traffic(N, K, width, 4, blocks=blocks)}
    assert got == model
    rows_norm = M if post else T
    tensors = {"x": x, "table": table, "wf": merge.folded, "bias": b, "stats": merge.stats, "gamma": gamma}
    (y, h), got = measure(lambda: KM.mapped_fwd(merge, w, b, activation=1, store_preact=True),
                          {**tensors, "y": lambda r: r[0], "h": lambda r: r[1]})
    model = mapped_gemm_traffic(M, N, K, (32, 32, 32), 4, mapped=0, C=C, G=G, rows_norm=rows_norm, norm_width=width,
                                bias=True, store_aux=True, table=use_table, folded=True, post=post)
    assert (got["x"], got["table"], got["wf"], got["bias"], got["y"], got["h"], got["stats"]) == \
        (model["x"], model["table"], model["b"], model["bias"], model["c"], model["aux"], model["stats"])
    assert got["gamma"] == Traffic() and "gamma_beta" not in model


@pytest.mark.parametrize("norm,post,use_table,stats", [
    ("rms", False, False, False), ("layer", False, True, False), ("layer", True, True, False),
    ("layer", True, True, True), ("rms", True, False, True), ("layer", False, False, True), ("rms", False, False, True)],
    ids=["rms-per-token-view", "ln-per-token-table", "ln-per-row-table", "stats-ln-per-row-table",
         "stats-rms-per-row-view", "stats-ln-per-token-view", "stats-rms-per-token-view"])
def test_normalised_rows_traffic_matches_interpreted_runs(norm, post, use_table, stats):
    # The normalised operand written once for an unmapped GEMM: x once through the map, a table entry and
    # a (mean, rstd) pair per row and column step, gamma and beta per program and step. ``stats`` (the
    # forward's launch): first the statistics' passes over each program's rows (from L2), their (mean,
    # rstd) stored, then read back.
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import norm_rows_traffic

    T, C, G = 96, 64, 2
    M, K = T // G, G * C
    x = torch.randn(T, C)
    table = torch.randperm(T, dtype=torch.int32).view(M, G) if use_table else KM._no_table(x.device)
    width = K if post else C
    merge = KM.Merge(x, G, table if use_table else None, norm, post, torch.randn(width),
                     torch.randn(width) if norm == "layer" else None)
    if not stats:
        KM.norm_stats(merge)
    a, got = measure(lambda: KM.normalised_rows(merge, stats=stats),
                     {"x": x, "table": table, "stats": lambda r: merge.stats, "gamma": merge.gamma,
                      "beta": merge.beta, "out": lambda r: r})
    model = norm_rows_traffic(M, C, G, 4, post=post, table=use_table, blocks=KM.INTERPRETER_ROWWISE, stats=stats,
                              center=norm == "layer")
    assert (got["x"], got["table"], got["stats"], got["gamma"] + got["beta"], got["out"]) == \
        (model["x"], model["table"], model["stats"], model["gamma_beta"], model["out"])
    from mmfuse.ops.merged import norm_merge_reference
    ref = norm_merge_reference(x, G, table if use_table else None, norm, merge.gamma,
                               merge.beta if norm == "layer" else None, 1e-6, post)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_eager_pixel_shuffle_makes_two_copies_each_way():
    """The eager side of merged_mlp_traffic: a pixel shuffle materialises two permutes forward and two
    in its gradient (InternVL's model-level shuffle, Idefics3's connector, Aya Vision's projector, where
    the second forward copy is LayerNorm's own contiguous copy of the permuted rows)."""
    transformers = pytest.importorskip("transformers")
    from mmfuse.testing import OpNames

    M = transformers.models
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64)
    internvl = M.internvl.modeling_internvl.InternVLModel(M.internvl.InternVLConfig(vision_config=vision,
                                                                                   text_config=text))
    idefics3 = M.idefics3.modeling_idefics3.Idefics3Connector(M.idefics3.Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=2))
    aya = M.aya_vision.modeling_aya_vision.AyaVisionMultiModalProjector(M.aya_vision.AyaVisionConfig(
        vision_config=dict(vision, model_type="siglip_vision_model"), text_config=text, downsample_factor=2,
        alignment_intermediate_size=20))
    cases = {  # name: (input (class token dropped for InternVL, as its model does), the eager code)
        "internvl": (lambda x: x[:, 1:].reshape(2, 8, 8, 16),
                     lambda x: internvl.multi_modal_projector(internvl.pixel_shuffle(x, 0.5).reshape(2, -1, 64))),
        "idefics3": (lambda x: x[:, 1:], idefics3),
        "aya": (lambda x: x[:, 1:], aya),
    }
    for name, (view, run) in cases.items():
        x = torch.randn(2, 65, 16, requires_grad=True)
        with OpNames() as fwd:
            out = run(view(x))
        with OpNames() as bwd:
            out.sum().backward()
        forward_copies = fwd.names.count("clone") + fwd.names.count("clone.default")
        if name == "aya":  # LayerNorm reads the permuted shuffle: it copies it to contiguous rows first
            assert not aya.pixel_shuffle(view(x)).is_contiguous()
            forward_copies += 1
        backward_copies = bwd.names.count("clone") + bwd.names.count("clone.default")
        assert (forward_copies, backward_copies) == (2, 2), (name, fwd.names, bwd.names)


def test_merged_connector_without_norm_or_bias_hand_count():
    # Idefics3's connector (bench/shapes.py): pixel shuffle to 4 tokens a row, one Linear, no bias, no
    # norm. mmfuse: one mapped GEMM forward (x through the table: the table's 4 bytes per token, W, y);
    # backward its dW and dA through the table. Eager: the shuffle's two copies and mm; backward the
    # mm's dW and dX, then the copies' two.
    from mmfuse.traffic import merged_mlp_traffic

    T, C, G, N, e = 676 * 8, 1152, 4, 4096, 2
    M, K = T // G, G * C
    t = merged_mlp_traffic(T, C, G, (N,), (128, 128), e, norm=None, post=False, table=True, bias=False)
    assert t["fwd"]["hbm"] == T * C * e + 4 * T + N * K * e + M * N * e
    assert (t["fwd"]["launches"], t["bwd"]["launches"], t["eager_fwd"]["launches"], t["eager_bwd"]["launches"]) \
        == (1, 2, 3, 4)
    assert t["eager_fwd"]["hbm"] == 2 * 2 * T * C * e + (M * K + N * K + M * N) * e
    with_bias = merged_mlp_traffic(T, C, G, (N,), (128, 128), e, norm=None, post=False, table=True)
    assert with_bias["fwd"]["hbm"] - t["fwd"]["hbm"] == N * e  # the bias, read once
    assert with_bias["bwd"]["launches"] == t["bwd"]["launches"] + 1  # its gradient's reduction
