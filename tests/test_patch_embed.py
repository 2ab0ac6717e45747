"""mmfuse.patch_embed through the Triton interpreter: odd geometries, layouts and dtypes, outputs and
gradients against conv2d/conv3d (fp64 and same-precision, the flash-attention rule), gradcheck,
determinism, and argument errors."""

import pytest
import torch

import mmfuse
from mmfuse.kernels import patch_embed as K
from mmfuse.ops.patch_embed import patch_embed_with_class, patch_embed_with_class_reference
from mmfuse.testing import compare_with_reference


def _layout(kind):
    """(make the leaf from a contiguous tensor, view the leaf as the kernel's input)."""
    if kind == "nchw":
        return (lambda x: x), (lambda x: x)
    if kind == "channels_last":
        fmt = lambda x: torch.channels_last if x.dim() == 4 else torch.channels_last_3d  # noqa: E731
        return (lambda x: x.contiguous(memory_format=fmt(x))), (lambda x: x)
    if kind == "sliced":
        # A bigger buffer: one extra leading channel, 3 extra rows on top, every other column.
        def make(x):
            big = torch.randn(x.shape[0], x.shape[1] + 1, *x.shape[2:-2], x.shape[-2] + 3, 2 * x.shape[-1],
                              dtype=x.dtype)
            big[:, 1:, ..., 3:, ::2] = x
            return big
        return make, (lambda big: big[:, 1:, ..., 3:, ::2])
    raise ValueError(kind)


def _check_case(B, C, image, P, D, dtype, layout, with_bias, pos_shape, T=None):
    video = T is not None
    x = torch.randn(B, C, *image, dtype=dtype)
    kernel = (T, P, P) if video else (P, P)
    w = (torch.randn(D, C, *kernel) / (C * P * P * (T or 1)) ** 0.5).to(dtype)
    make, view = _layout(layout)
    leaf_x = make(x)
    assert not view(leaf_x).is_contiguous() or layout != "sliced"
    n = (image[0] // T if video else 1) * (image[-2] // P) * (image[-1] // P)
    inputs, names = [leaf_x, w], ["pixels", "weight"]
    if with_bias:
        inputs.append(torch.randn(D, dtype=dtype))
        names.append("bias")
    if pos_shape is not None:
        shape = tuple({"N": n, "D": D, "B": B}.get(s, s) for s in pos_shape)
        inputs.append(torch.randn(shape, dtype=dtype))
        names.append("pos_embed")

    def call(fn):
        def run(x, w, *rest):
            b = rest[0] if with_bias else None
            pos = rest[-1] if pos_shape is not None else None
            return fn(view(x), w, b, pos)
        return run

    out = mmfuse.patch_embed(view(leaf_x), *inputs[1:2], inputs[2] if with_bias else None,
                             inputs[-1] if pos_shape is not None else None)
    assert out.shape == (B, n, D) and out.dtype == dtype
    for c in compare_with_reference(call(mmfuse.patch_embed), call(mmfuse.patch_embed_reference), inputs, names):
        assert c.ok, str(c)


# Each case: (B, C, image, P, D, dtype, layout, bias, pos shape). Together they cover P in {2, 14, 16},
# C in {1, 3, 4}, square and non-square images, B in {1, 3}, D not a multiple of 16, every layout and
# dtype, with and without bias and pos_embed (pos as (N, D), (1, N, D), (B, N, D), (D,)).
IMAGE_CASES = [
    (3, 1, (6, 10), 2, 20, torch.float32, "nchw", True, ("N", "D")),
    (1, 3, (28, 42), 14, 40, torch.float16, "channels_last", False, (1, "N", "D")),
    (3, 4, (32, 16), 16, 24, torch.bfloat16, "sliced", True, None),
    (3, 3, (42, 28), 14, 33, torch.float32, "sliced", False, ("B", "N", "D")),
    (1, 4, (4, 6), 2, 17, torch.float16, "nchw", True, ("N", "D")),
    (3, 1, (16, 48), 16, 40, torch.bfloat16, "channels_last", True, ("N", "D")),
    (3, 3, (28, 28), 14, 20, torch.float16, "sliced", True, ("N", "D")),
    (1, 3, (14, 28), 14, 36, torch.bfloat16, "nchw", False, ("N", "D")),
    (3, 4, (16, 32), 16, 20, torch.float32, "channels_last", True, ("D",)),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: f"B{c[0]}-C{c[1]}-{c[2][0]}x{c[2][1]}-P{c[3]}-D{c[4]}-"
                         f"{str(c[5])[6:]}-{c[6]}-{'bias' if c[7] else 'nobias'}-pos{c[8]}")
def test_image_matches_conv2d(case):
    _check_case(*case)


VIDEO_CASES = [
    (2, 3, (4, 28, 28), 14, 24, torch.float32, "nchw", True, ("N", "D"), 2),
    (1, 1, (2, 4, 6), 2, 17, torch.float16, "channels_last", False, (1, "N", "D"), 2),
    (2, 3, (3, 16, 16), 16, 20, torch.bfloat16, "sliced", True, None, 1),
]


@pytest.mark.parametrize("case", VIDEO_CASES, ids=lambda c: f"B{c[0]}-C{c[1]}-{'x'.join(map(str, c[2]))}-T{c[9]}"
                         f"P{c[3]}-{str(c[5])[6:]}-{c[6]}")
def test_video_matches_conv3d(case):
    _check_case(*case)


def test_class_token_matches_cat():
    B, C, P, D = 3, 3, 14, 20
    x = torch.randn(B, C, 28, 42)
    w = torch.randn(D, C, P, P) / 24
    pos = torch.randn(7, D)
    cls = torch.randn(D)
    for c in compare_with_reference(lambda x, w, p, c: patch_embed_with_class(x, w, None, p, c),
                                    lambda x, w, p, c: patch_embed_with_class_reference(x, w, None, p, c),
                                    [x, w, pos, cls], ["pixels", "weight", "pos_embed", "class_embedding"]):
        assert c.ok, str(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_class_token_bias_grad_comes_from_the_batch_sum(dtype, launches):
    """CLIP's backward: bias, pos_embed (L, D) and class token all trained. db is summed from the batch
    sum's fp32 column sums over the patch rows only (row 0 is the class token's), here across two
    32-row blocks (6 x 7 patches + 1 = 43 rows): no other kernel reads dOut for it; bitwise repeatable."""
    B, C, P, D = 2, 3, 4, 19
    x = torch.randn(B, C, 24, 28, dtype=dtype)
    w = (torch.randn(D, C, P, P) / (C * P * P) ** 0.5).to(dtype)
    b, pos, cls = torch.randn(D, dtype=dtype), torch.randn(43, D, dtype=dtype), torch.randn(D, dtype=dtype)
    for c in compare_with_reference(patch_embed_with_class, patch_embed_with_class_reference, [x, w, b, pos, cls],
                                    ["pixels", "weight", "bias", "pos_embed", "class_embedding"]):
        assert c.ok, str(c)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, pos, cls)]
    dy = torch.randn(B, 43, D, dtype=dtype)[:, :, None].expand(B, 43, 2, D)[:, :, 1]  # a strided dOut
    launches.clear()
    first = torch.autograd.grad(patch_embed_with_class(*leaves), leaves, dy)
    assert sorted(launches) == ["batch_sum_kernel", "patch_embed_dw_kernel", "patch_embed_dx_kernel",
                                "patch_embed_fwd_kernel"]
    second = torch.autograd.grad(patch_embed_with_class(*leaves), leaves, dy)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second))
    # db equals the fp32 sum over the patch rows, rounded once (the class row is not in it).
    want = dy[:, 1:].double().sum((0, 1))
    assert (first[2].double() - want).abs().max() <= 2 * want.abs().max() * torch.finfo(dtype).eps


def test_gradcheck_fp64():
    torch.manual_seed(1)
    # The full Jacobian (two interpreted runs per input element): 2 images of 2 x 2 patches, D = 3.
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mmfuse.patch_embed, (x, w, b, pos))
    xv = torch.randn(1, 1, 4, 2, 4, dtype=torch.float64, requires_grad=True)
    wv = torch.randn(3, 1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    posv = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, p: mmfuse.patch_embed(x, w, None, p), (xv, wv, posv), fast_mode=True)


def test_backward_is_deterministic():
    x = torch.randn(3, 3, 28, 28, requires_grad=True)
    w = torch.randn(20, 3, 14, 14, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    pos = torch.randn(4, 20, requires_grad=True)
    dy = torch.randn(3, 4, 20)
    first = torch.autograd.grad(mmfuse.patch_embed(x, w, b, pos), (x, w, b, pos), dy)
    second = torch.autograd.grad(mmfuse.patch_embed(x, w, b, pos), (x, w, b, pos), dy)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_frozen_weight_still_gives_bias_grad():
    x = torch.randn(1, 3, 28, 14, requires_grad=True)
    w = torch.randn(18, 3, 14, 14)
    b = torch.randn(18, requires_grad=True)
    dy = torch.randn(1, 2, 18)
    gx, gb = torch.autograd.grad(mmfuse.patch_embed(x, w, b), (x, b), dy)
    rx, rb = torch.autograd.grad(mmfuse.patch_embed_reference(x.double(), w.double(), b.double()), (x, b), dy.double())
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)


def test_kernel_launches_and_no_patch_tensor(launches):
    """Forward is one launch; backward with every gradient is three (dpixels, dW+db, dpos)."""
    x = torch.randn(3, 3, 28, 28, requires_grad=True)
    w = torch.randn(20, 3, 14, 14, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    pos = torch.randn(4, 20, requires_grad=True)
    y = mmfuse.patch_embed(x, w, b, pos)
    assert len(launches) == 1
    y.backward(torch.randn_like(y))
    assert len(launches) == 4


def test_large_offsets_refused():
    x = torch.empty(1, 1, 1, 2**16, 2**16, device="meta")  # 2^32 elements: 32-bit offsets would wrap
    with pytest.raises(ValueError, match="pixels.*32-bit"):
        K.patch_embed_fwd(x, torch.empty(4, 1, 1, 2, 2, device="meta"))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _px(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD = [
    ("H not a multiple of P", lambda: (_px(1, 3, 30, 28), _px(8, 3, 14, 14), None, None), ValueError, r"pixels.*14"),
    ("W not a multiple of P", lambda: (_px(1, 3, 28, 27), _px(8, 3, 14, 14), None, None), ValueError, r"pixels.*14"),
    ("channel mismatch", lambda: (_px(1, 3, 28, 28), _px(8, 4, 14, 14), None, None), ValueError,
     r"weight.*in_channels.*3.*got 4"),
    ("non-square patch", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 7), None, None), ValueError, r"weight.*square"),
    ("pos_embed wrong length", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 14), None, _px(5, 8)), ValueError,
     r"pos_embed.*\(1, 4, 8\).*\(5, 8\)"),
    ("pos_embed wrong width", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 14), None, _px(4, 7)), ValueError,
     r"pos_embed"),
    ("bias wrong shape", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 14), _px(7), None), ValueError, r"bias.*\(8,\)"),
    ("weight dtype", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 14, dtype=torch.float16), None, None), TypeError,
     r"weight.*float32.*float16"),
    ("pos_embed dtype", lambda: (_px(1, 3, 28, 28), _px(8, 3, 14, 14), None, _px(4, 8, dtype=torch.float64)),
     TypeError, r"pos_embed"),
    ("integer pixels", lambda: (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), _px(8, 3, 14, 14), None, None),
     TypeError, r"pixels.*uint8"),
    ("3-D pixels", lambda: (_px(3, 28, 28), _px(8, 3, 14, 14), None, None), ValueError, r"pixels.*4-D"),
    ("weight rank", lambda: (_px(1, 3, 28, 28), _px(8, 3, 2, 14, 14), None, None), ValueError, r"weight.*4-D"),
    ("frames not a multiple of T", lambda: (_px(1, 3, 3, 28, 28), _px(8, 3, 2, 14, 14), None, None), ValueError,
     r"pixels.*frames"),
    ("weight device", lambda: (_px(1, 3, 28, 28), torch.empty(8, 3, 14, 14, device="meta"), None, None), ValueError,
     r"weight.*device"),
]


@pytest.mark.parametrize("make, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        mmfuse.patch_embed(*make())


def test_bad_input_reference_path_raises_the_same():
    """The reference path (CPU without the interpreter) validates with the same messages."""
    from mmfuse.ops import patch_embed as ops

    with pytest.raises(ValueError, match=r"weight.*in_channels"):
        ops._check(_px(1, 3, 28, 28), _px(8, 4, 14, 14), None, None)


def test_tile_pruning_for_clip_l():
    """Wave-efficiency pruning on 132 SMs (bench/NOTES.md): one CLIP-L/14-336 image (576 tokens,
    D = 1024) fills no tile well, so the best two remain; 64 images keep every forward tile."""
    keep = lambda *a: [t[:2] for t in K.candidate_tiles(*a)]  # noqa: E731
    assert keep("fwd", 576, 1024, 132) == [(128, 64), (64, 64)]
    assert keep("fwd", 64 * 576, 1024, 132) == [(128, 128), (128, 64), (64, 64)]
    # dpixels: 576 tokens x 672 run-ordered columns; only 64x64 reaches 0.70 (99 tiles, one wave).
    assert keep("dx", 576, 672, 132) == [(64, 64)]


# ----------------------------------------------------------------------------------------------
# dW + db split over tokens (fp32 partials summed in split order; issue 13)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dw_split_over_tokens_matches_reference_and_is_bitwise_repeatable(dtype, launches):
    from mmfuse.testing import assert_close

    # 2 images of 5 x 15 patches = 150 tokens: three 64-token chunks, the last one partial; D = 37
    # and K = 3*4*4 = 48 are no multiples of the 32x32 tile; channels-last pixels, a strided dOut.
    px = torch.randn(2, 20, 60, 3, dtype=dtype).permute(0, 3, 1, 2).unsqueeze(2)  # (2, 3, 1, 20, 60)
    g = torch.randn(2, 75, 74, dtype=dtype)[..., ::2]  # (2, 75, 37), not contiguous
    wshape = (37, 3, 1, 4, 4)

    def ref(dt):
        x = px.squeeze(2).to(dt)
        cols = torch.nn.functional.unfold(x, 4, stride=4)  # (B, K, N)
        dw = torch.einsum("bnd,bkn->dk", g.to(dt), cols)
        return dw, g.to(dt).sum((0, 1))

    launches.clear()
    runs = [K.patch_embed_dw(g, px, wshape, with_bias=True, splits=3) for _ in range(2)]
    assert launches.count("patch_embed_dw_kernel") == 2 and launches.count("dw_combine_kernel") == 2
    (dw, db), (dw2, db2) = runs
    assert torch.equal(dw, dw2) and torch.equal(db, db2)  # bitwise: no atomics, a fixed order
    (r64, rb64), (rlp, rblp) = ref(torch.float64), ref(dtype)
    assert_close("dW", dw, r64, rlp)
    assert_close("db", db, rb64, rblp)
    one, one_b = K.patch_embed_dw(g, px, wshape, with_bias=True, splits=1)
    assert_close("dW one split", one, r64, rlp)
    dw_nb, db_nb = K.patch_embed_dw(g, px, wshape, with_bias=False, splits=3)
    assert db_nb is None and torch.equal(dw_nb, dw)


def test_dw_split_rule_minimises_the_modelled_time():
    """CLIP-L/14-336 dW (1024 x 588): one image has 9 token blocks, and partials would cost more than
    the ~2 µs GEMM, so no split; 64 images split 3 ways: 80 -> 240 programs, 61% -> 91% of 132 SMs."""
    tile = (64, 128, 64, 4, 3)
    assert K.dw_splits(1024, 588, 576, tile, 2, 132) == 1
    assert K.dw_splits(1024, 588, 64 * 576, tile, 2, 132) == 3
    assert K.dw_token_chunk(64 * 576, 3) == 12288 and K.dw_token_chunk(150, 3) == 64
    us = [K.dw_modelled_us(1024, 588, 64 * 576, tile, s, 2, 132) for s in range(1, 17)]
    assert min(us) == us[2] and us[2] < 0.8 * us[0]
