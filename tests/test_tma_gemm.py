"""The Hopper GEMM path (``tma_gemm_kernel``: TMA descriptor loads, persistent programs) against the
references, through the public ops. Interpreted here (Triton's interpreter runs host descriptors);
on a GPU (``MMFUSE_TEST_DEVICE=cuda``, what ``mmfuse gpu-check`` sets) the same tests run the compiled
kernel, which needs compute capability 9.x."""

import pytest
import torch
import triton
import triton.language as tl

import mmfuse
from mmfuse.kernels._common import round_to_tf32
from mmfuse.kernels import linear as KL
from mmfuse.testing import assert_matches_reference
from _tf32 import assert_rounds_like, nearest_tf32_bits, tf32_linear

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture
def tma(monkeypatch):
    """Every eligible GEMM on the TMA kernel, with 3 persistent programs (each walks several tiles)."""
    if not mmfuse.INTERPRET and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA kernel is compiled for compute capability 9.x")
    monkeypatch.setattr(KL, "TMA", "always")
    monkeypatch.setattr(KL, "TMA_PROGRAMS", 3)


def _gemm_launches(launches):
    return [n for n in launches if n in ("tma_gemm_kernel", "fused_gemm_kernel")]


def _returns(monkeypatch, module, name) -> list:
    """What ``module.name`` returns at each call from now on (the launchers' path decisions), in order."""
    seen, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: seen.append(real(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forward_and_backward_on_tma(tma, dtype):
    # M = 37 ragged rows; K = 72 and N = 136 keep rows 16-byte aligned (TMA's rule) without being
    # multiples of any block. Forward (B = W^T through a descriptor over W), dX, dW (A = dH^T
    # through a descriptor over dH).
    x, w, b = torch.randn(37, 72, dtype=dtype), (torch.randn(136, 72) / 9).to(dtype), torch.randn(136, dtype=dtype)
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation="gelu"),
                             lambda *t: mmfuse.linear_reference(*t, activation="gelu"), [x, w, b],
                             ["x", "weight", "bias"])


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_mlp_on_tma_including_dx_times_act_grad(tma, activation):
    x = torch.randn(41, 24, dtype=torch.float16)
    ws = [(torch.randn(88, 24) / 5).to(torch.float16), (torch.randn(40, 88) / 9).to(torch.float16)]
    bs = [torch.randn(88, dtype=torch.float16), torch.randn(40, dtype=torch.float16)]
    assert_matches_reference(lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation=activation),
                             lambda x, *p: mmfuse.mlp_reference(x, p[:2], p[2:], activation=activation),
                             [x, *ws, *bs], ["x", "w0", "w1", "b0", "b1"])


def test_transposed_input_reads_through_a_transposed_descriptor(tma):
    # x (40, 72) with stride (1, 40): contiguous along M, so A's descriptor is over x^T (A_TRANS).
    x = torch.randn(72, 40, dtype=torch.float16).t()
    w, b = (torch.randn(56, 72) / 9).to(torch.float16), torch.randn(56, dtype=torch.float16)
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation="gelu"),
                             lambda *t: mmfuse.linear_reference(*t, activation="gelu"), [x, w, b],
                             ["x", "weight", "bias"])


def test_every_gemm_of_a_layer_takes_the_tma_kernel(tma, launches):
    x = torch.randn(37, 72, dtype=torch.float16, requires_grad=True)
    w = (torch.randn(136, 72) / 9).to(torch.float16).requires_grad_()
    b = torch.randn(136, dtype=torch.float16, requires_grad=True)
    mmfuse.linear(x, w, b, "gelu").sum().backward()
    assert _gemm_launches(launches) == ["tma_gemm_kernel"] * 3  # forward, dX, dW (+db)


def test_layouts_tma_cannot_read_fall_back_to_the_pointer_kernel(tma, launches):
    # K = 75: a row of 150 bytes breaks TMA's 16-byte stride rule; a stride-2 slice has no unit stride.
    for x in (torch.randn(37, 75, dtype=torch.float16), torch.randn(37, 144, dtype=torch.float16)[:, ::2]):
        w = (torch.randn(24, x.shape[1]) / 9).to(torch.float16)
        launches.clear()
        assert_matches_reference(lambda *t: mmfuse.linear(*t), lambda *t: mmfuse.linear_reference(*t), [x, w],
                                 ["x", "weight"])
        assert "fused_gemm_kernel" in launches
    # fp32 without TF32 (torch's default) and fp64 never take it (no wgmma form; IEEE fp32 spilled on it).
    launches.clear()
    assert not torch.backends.cuda.matmul.allow_tf32
    mmfuse.linear(torch.randn(8, 16), torch.randn(8, 16))
    mmfuse.linear(torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))
    assert _gemm_launches(launches) == ["fused_gemm_kernel"] * 2


def test_tma_mode_is_checked(monkeypatch):
    monkeypatch.setattr(KL, "TMA", "sometimes")
    with pytest.raises(ValueError, match=r"MMFUSE_TMA: expected one of \('auto', 'never', 'always'\), got 'sometimes'"):
        mmfuse.linear(torch.randn(4, 8, dtype=torch.float16), torch.randn(8, 8, dtype=torch.float16))


def test_auto_mode_keeps_the_interpreter_and_cpu_on_the_pointer_kernel(launches):
    assert KL.TMA == "auto"
    mmfuse.linear(torch.randn(16, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16))
    assert _gemm_launches(launches) == ["fused_gemm_kernel"]


def test_every_tile_the_launcher_can_take_is_compiled():
    """The TMA kernel's tiles per GEMM kind (``tma_tiles``) are exactly the compiled specs' tiles, with
    the launcher's FLATTEN: a tile the launcher could take without a compile check would be unseen."""
    from mmfuse._aot import all_specs

    compiled = {}
    for s in all_specs():
        if s.kernel == "linear/tma_gemm_kernel" and s.dtype in ("fp16", "fp32-tf32"):
            cx = dict(s.constexprs)
            elem = 4 if s.dtype == "fp32-tf32" else 2
            assert cx["INPUT_PRECISION"] == ("tf32" if elem == 4 else "ieee")
            tile = (cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"] * (2 if elem == 4 else 1), s.num_warps, s.num_stages)
            gate = KL.gated_kind(cx["GATED"], cx["GATE_GRAD"]) if cx["GATED"] or cx["GATE_GRAD"] or \
                cx["TWO_K_SOURCES"] else None
            compiled.setdefault((gate or cx["ACT_GRAD"], elem), set()).add(tile)
            assert cx["FLATTEN"] == KL.tma_flatten(cx["ACT_GRAD"], gate is not None, elem == 4) and s.archs == (90,)
            assert cx["EPILOGUE_SPLIT"] == KL.tma_epilogue_split(cx["ACT_GRAD"], cx["BLOCK_N"], gate is not None)
    for elem in (2, 4):
        for act_grad in (False, True):
            assert compiled[act_grad, elem] == set(KL.tma_tiles(act_grad, elem))
        for kind in KL.TMA_GATED_TILES:
            assert compiled.get((kind, elem), set()) == set(KL.tma_gated_tiles(kind, elem))
    # TF32: dX * act' drops 128x64 and [dG | dU] takes only 64x64 w8 (the others spilled); everything else
    # as 16-bit.
    assert set(KL.tma_tiles(False, 4)) == set(KL.GEMM_TILES) and len(KL.tma_tiles(True, 4)) == len(KL.GEMM_TILES) - 1
    assert KL.tma_gated_tiles("gate_grad", 4) == ((64, 64, 64, 8, 4),)
    assert KL.tma_gated_tiles("gated", 4) == KL.TMA_GATED_TILES["gated"]
    # dX * act' at 128x128: subtiled (it spilled whole)
    assert (128, 128, 64, 8, 4) in KL.tma_tiles(True) and KL.tma_epilogue_split(True, 128) == 2


@triton.jit
def _round_to_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, round_to_tf32(x), mask=offs < n)


def test_round_to_tf32_is_round_to_nearest_on_every_kind_of_value():
    """The rounding the GEMMs apply to fp32 operands under TF32 (kernels/_common.py, ``mma``; compiled
    into every TF32 GEMM config, tests/test_aot.py), run through the interpreter here and compiled on a
    GPU: bit for bit against an int64 rounding of the bit pattern, and against fp64 arithmetic."""
    torch.manual_seed(0)
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    # exactly halfway between two TF32 values: subnormal, and normal (1.0 + half a unit, and the carry into
    # the exponent: 0x3FFFF000, just below 2.0, rounds up to 2.0)
    ties = torch.cat([torch.arange(1, 200, dtype=torch.int32) << 13 | 0x1000,
                      torch.tensor([0x3F801000, 0x3FFFF000, 0x4B7FF000, 0x00FFF000], dtype=torch.int32)]
                     ).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, tiny, -tiny, tiny / 3, -tiny / 7, big, -big,
                             float("inf"), float("-inf"), float("nan")])
    nan_high = torch.tensor([0x7FFFFFFF, -1, 0x7FFFF000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.randn(3000) * torch.logspace(-30, 30, 3000), ties, -ties, ties.nextafter(torch.zeros(1)),
                   specials, nan_high]).contiguous()
    y = torch.full_like(x, 7.0)
    _round_to_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y.cpu().view(torch.int32), nearest_tf32_bits(x.cpu()))
    # and what the bits mean: finite values land on 10-bit mantissas within half a TF32 unit
    x64, y64 = x.cpu().double(), y.cpu().double()
    fin = torch.isfinite(x64) & torch.isfinite(y64) & (x64 != 0)
    unit = torch.exp2((torch.floor(torch.log2(x64[fin].abs())) - 10).clamp(min=-136))  # subnormals: 2^-149 * 2^13
    assert ((y64[fin] - x64[fin]).abs() <= unit / 2).all()
    assert ((y.cpu()[fin.nonzero().squeeze(1)].view(torch.int32) & 0x1FFF) == 0).all()
    assert torch.isnan(y.cpu()[torch.isnan(x.cpu())]).all()  # NaN stays NaN, whatever its payload
    assert (y.cpu()[x.cpu() == big] == float("inf")).all()  # past TF32's largest: inf, as cvt.rna
    below_two = torch.tensor(0x3FFFF000, dtype=torch.int32, device="cpu").view(torch.float32)
    assert y.cpu()[x.cpu() == below_two].eq(2.0).all()


@pytest.fixture
def tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("core", ["pointer", "tma"])
def test_tf32_rounds_both_operands_of_every_gemm(core, tf32, monkeypatch):
    """The rounding switched on under the interpreter (on a GPU it is always on): every GEMM of the MLP
    (forward, dX * act', dX, dW), of the gated MLP (gate / up, down, [dG | dU], dX over two sources, dW)
    and of the patch embedding (forward, dpixels, dW) then matches a reference in which every matmul rounds
    both of its operands (``assert_rounds_like``: operands computed in the kernel, dH = dY W * act', may
    round one TF32 unit apart from the reference's in a few elements; an unrounded operand is off nearly
    everywhere)."""
    if not mmfuse.INTERPRET:
        pytest.skip("the GPU rounds always; the switch is the interpreter's (tests above run it on a GPU)")
    from mmfuse.kernels import _common

    if core == "tma":
        monkeypatch.setattr(KL, "TMA", "always")
        monkeypatch.setattr(KL, "TMA_PROGRAMS", 3)
    monkeypatch.setattr(_common, "ROUND_TF32_OPERANDS", tl.constexpr(True))
    F = torch.nn.functional
    x = torch.randn(37, 24)
    ws, bs = [torch.randn(88, 24) / 5, torch.randn(40, 88) / 9], [torch.randn(88), torch.randn(40)]
    assert_rounds_like(
        lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation="gelu"),
        lambda x, *p: tf32_linear(F.gelu(tf32_linear(x, p[0], p[2])), p[1], p[3]),
        [x, *ws, *bs], ["x", "w0", "w1", "b0", "b1"])
    gw = [torch.randn(72, 24) / 5, torch.randn(72, 24) / 5, torch.randn(40, 72) / 9]
    assert_rounds_like(
        lambda *t: mmfuse.gated_mlp(*t),
        lambda x, wg, wu, wd: tf32_linear(F.silu(tf32_linear(x, wg)) * tf32_linear(x, wu), wd),
        [x, *gw], ["x", "w_gate", "w_up", "w_down"])
    px, pw, pb = torch.randn(2, 3, 42, 70), torch.randn(40, 3, 14, 14) / 20, torch.randn(40)
    assert_rounds_like(mmfuse.patch_embed, lambda *t: _patch_gemm_reference(*t, linear=tf32_linear),
                             [px, pw, pb], ["pixels", "weight", "bias"])


def test_tf32_mlp_and_gated_mlp_on_tma(tma, tf32, launches):
    """fp32 with TF32 on the TMA kernel (MMFUSE_TMA=always): every GEMM of a two-layer MLP (forward,
    dX * act', dX, dW) and every GEMM of the gated MLP (gate/up, down, [dG | dU], dX, dW); values and
    gradients under the error rule."""
    x = torch.randn(37, 24)
    ws, bs = [torch.randn(88, 24) / 5, torch.randn(40, 88) / 9], [torch.randn(88), torch.randn(40)]
    assert_matches_reference(lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation="gelu"),
                             lambda x, *p: mmfuse.mlp_reference(x, p[:2], p[2:], activation="gelu"),
                             [x, *ws, *bs], ["x", "w0", "w1", "b0", "b1"])
    used = _gemm_launches(launches)
    assert "fused_gemm_kernel" not in used and used.count("tma_gemm_kernel") >= 6  # 2 forward, dX*act', dX, 2 dW
    launches.clear()
    gw = [torch.randn(72, 24) / 5, torch.randn(72, 24) / 5, torch.randn(40, 72) / 9]
    assert_matches_reference(lambda *t: mmfuse.gated_mlp(*t), lambda *t: mmfuse.gated_mlp_reference(*t), [x, *gw],
                             ["x", "w_gate", "w_up", "w_down"])
    used = _gemm_launches(launches)
    assert "fused_gemm_kernel" not in used and used.count("tma_gemm_kernel") >= 6


def testtf32_linear_on_tma_matches_the_reference(tma, tf32):
    x, w, b = torch.randn(37, 72), torch.randn(136, 72) / 9, torch.randn(136)
    assert_matches_reference(lambda *t: mmfuse.linear(*t, activation="gelu"),
                             lambda *t: mmfuse.linear_reference(*t, activation="gelu"), [x, w, b],
                             ["x", "weight", "bias"])


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp_on_tma(tma, activation, monkeypatch):
    """SwiGLU / GeGLU with every GEMM on the TMA kernel: gate and up from one A tile (two weight
    descriptors), [dG | dU] in the epilogue, dX over two K sources, and the dW GEMMs; values and every
    gradient under the error rule, at sizes no block divides (rows kept 16-byte aligned)."""
    descriptors, real = [], KL._tma_operand
    monkeypatch.setattr(KL, "_tma_operand", lambda *a: descriptors.append(a[0].shape) or real(*a))
    M, K, N, D = 37, 40, 72, 24
    x = torch.randn(M, K, dtype=torch.float16)
    wg, wu = ((torch.randn(N, K) / K ** 0.5).to(torch.float16) for _ in range(2))
    wd = (torch.randn(D, N) / N ** 0.5).to(torch.float16)
    bs = [torch.randn(n, dtype=torch.float16) for n in (N, N, D)]
    names = ["x", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"]
    assert_matches_reference(lambda *t: mmfuse.gated_mlp(*t, activation=activation),
                             lambda *t: mmfuse.gated_mlp_reference(*t, activation=activation),
                             [x, wg, wu, wd, *bs], names)
    assert len(descriptors) >= 2 * 5  # every GEMM (gate/up, down, [dG | dU], dX, the dW GEMMs) on descriptors


def test_gated_mlp_on_tma_equals_the_pointer_kernel_bitwise(tma, monkeypatch, launches):
    """The same blocks in the same order (dX: all of dG @ Wg, then dU @ Wu): bitwise equal outputs
    and gradients, interpreted."""
    x = torch.randn(37, 40, dtype=torch.float16, requires_grad=True)
    ws = [(torch.randn(*shape) / 8).to(torch.float16).requires_grad_() for shape in ((72, 40), (72, 40), (24, 72))]
    bs = [torch.randn(n, dtype=torch.float16, requires_grad=True) for n in (72, 72, 24)]
    g = torch.randn(37, 24, dtype=torch.float16)

    def run():
        y = mmfuse.gated_mlp(x, *ws, *bs)
        return (y, *torch.autograd.grad(y, (x, *ws, *bs), g))

    on_tma = run()
    assert set(_gemm_launches(launches)) == {"tma_gemm_kernel"}
    launches.clear()
    monkeypatch.setattr(KL, "TMA", "never")
    for a, b in zip(on_tma, run()):
        assert torch.equal(a, b)
    assert set(_gemm_launches(launches)) == {"fused_gemm_kernel"}


def test_gated_gemms_stay_on_the_pointer_kernel_under_auto(monkeypatch, launches):
    monkeypatch.setattr(KL, "TMA", "auto")
    x = torch.randn(37, 40, dtype=torch.float16)
    ws = [(torch.randn(*shape) / 8).to(torch.float16) for shape in ((72, 40), (72, 40), (24, 72))]
    mmfuse.gated_mlp(x, *ws, None, None, None)
    assert "tma_gemm_kernel" not in launches


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_subtiled_act_grad_epilogue_at_128x128(tma, activation, monkeypatch):
    """The dX * act' GEMM on a 128x128 tile, whose epilogue runs on two 64-column halves: values under
    the error rule at sizes with ragged halves (N = 136: the last tile's right half is all edge)."""
    from mmfuse.kernels import _common

    splits = _returns(monkeypatch, KL, "tma_epilogue_split")

    x = torch.randn(37, 136, dtype=torch.float16)
    ws = [(torch.randn(136, 136) / 12).to(torch.float16), (torch.randn(24, 136) / 12).to(torch.float16)]
    bs = [torch.randn(136, dtype=torch.float16), torch.randn(24, dtype=torch.float16)]
    with _common.gpu_config({"tma_gemm_kernel": (128, 128, 64, 8, 4)}):
        assert_matches_reference(lambda x, *p: mmfuse.mlp(x, p[:2], p[2:], activation=activation),
                                 lambda x, *p: mmfuse.mlp_reference(x, p[:2], p[2:], activation=activation),
                                 [x, *ws, *bs], ["x", "w0", "w1", "b0", "b1"])
    assert 2 in splits  # the launcher asked the TMA kernel for the split epilogue


def test_auto_takes_the_tma_kernel_only_where_it_was_measured_faster():
    # bench/NOTES.md "First GPU measurements": the forward's layout (B = W^T read through W) only.
    assert KL.tma_preferred(a_trans=False, b_trans=True, act_grad=False)
    assert not KL.tma_preferred(a_trans=False, b_trans=True, act_grad=True)   # dX * act'
    assert not KL.tma_preferred(a_trans=True, b_trans=False, act_grad=False)  # dW
    assert not KL.tma_preferred(a_trans=False, b_trans=False, act_grad=False)  # dX (unmeasured)


def test_pointer_kernel_tiles_drop_only_the_spilling_fp32_ones():
    # fp32 dX * act' keeps the 64-row tiles (the 128-row ones spill with TF32), IEEE fp32's only 64x128;
    # IEEE fp32 dW (A read M-major) drops 128x64; everything else keeps all.
    assert KL.pointer_tiles(True, 4) == tuple(t for t in KL.GEMM_TILES if t[0] == 64)
    assert KL.pointer_tiles(True, 4, ieee=True) == tuple(t for t in KL.GEMM_TILES if t[:2] == (64, 128))
    assert KL.pointer_tiles(False, 4, ieee=True, a_trans=True) == tuple(t for t in KL.GEMM_TILES
                                                                       if t[:2] != (128, 64))
    assert KL.pointer_tiles(True, 2) == KL.pointer_tiles(False, 4) == KL.GEMM_TILES
    assert KL.pointer_tiles(False, 4, ieee=True) == KL.pointer_tiles(False, 2, ieee=True, a_trans=True) == KL.GEMM_TILES


def test_launcher_passes_precision_and_layout_to_the_tile_set(monkeypatch):
    """IEEE fp32's spilling tiles are dropped only if the launcher tells pointer_tiles which GEMM it runs:
    an fp32 MLP's forward, dX * act' and dW (A = dH^T, read M-major) under the GPU's own choice, and
    an empty reduction (K = 0), which takes the set's last tile."""
    from mmfuse.kernels import _common

    seen = []
    real = KL.pointer_tiles
    monkeypatch.setattr(KL, "pointer_tiles", lambda *a: seen.append(a) or real(*a))
    launched = []
    real_gemm = KL.fused_gemm_kernel

    class Recording:
        def __getitem__(self, grid):
            # (tile, A read M-major (a.stride(0) == 1, after a, b and the 8 outputs and M, N, K), ACT_GRAD)
            return lambda *a, **kw: (launched.append(((kw["BLOCK_M"], kw["BLOCK_N"]), a[13] == 1, kw["ACT_GRAD"])),
                                     real_gemm[grid](*a, **kw))
    monkeypatch.setattr(KL, "fused_gemm_kernel", Recording())
    x = torch.randn(5, 16, requires_grad=True)
    w1, w2 = torch.randn(24, 16, requires_grad=True), torch.randn(8, 24, requires_grad=True)
    with _common.gpu_config({}):
        mmfuse.mlp(x, [w1, w2], [None, None]).sum().backward()
        assert {(act_grad, ieee, m_major) for act_grad, elem, ieee, m_major in seen} >= {
            (False, True, False), (True, True, False), (False, True, True)}, seen
        assert {(m_major, act_grad) for _, m_major, act_grad in launched} == {(False, False), (True, False),
                                                                             (False, True)}, launched
        assert not [t for t, m_major, act_grad in launched if (m_major and t == (128, 64))
                    or (act_grad and t != (64, 128))], launched
        seen.clear()
        KL.linear_fwd(torch.randn(3, 0), torch.randn(4, 0))
        assert [a[:3] for a in seen] == [(False, 4, True)] and launched[-1][0] == real(*seen[0])[-1][:2]
        # dX * act' over an empty reduction: IEEE fp32 keeps only 64x128 there (64x64 spilled)
        KL.input_grad(torch.randn(3, 0), torch.randn(0, 4), h_prev=torch.randn(3, 4), activation_prev="gelu")
    assert launched[-1] == ((64, 128), True, True), launched[-1]


# ----------------------------------------------------------------------------------------------
# The patch-embedding GEMMs on the same core (kernels/patch_embed.py, TMA / NUM_PROGRAMS): the forward's
# packed weight, dpixels' dOut and weight, dW's dOut^T by TMA; the pixel gather (forward, dW) and the
# pixel scatter (dpixels) stay on pointers; persistent programs everywhere
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [((2, 3, 42, 70), (40, 3, 14, 14)),          # P = 14: runs padded to 16
                                      ((3, 3, 2, 32, 48), (56, 3, 2, 16, 16))],   # video, T = 2, P = 16
                         ids=["image P14", "video T2 P16"])
def test_patch_embed_on_tma(tma, dtype, geometry, monkeypatch):
    """Values and gradients under the error rule, 3 persistent programs over ragged tiles (D = 40 / 56:
    TMA zero-fills past D; token counts no block divides), and every GEMM took the descriptor path."""
    from mmfuse.kernels import patch_embed as KP

    taken = _returns(monkeypatch, KP, "on_tma")
    pixel_shape, weight_shape = geometry
    x = torch.randn(pixel_shape, dtype=dtype)
    w = (torch.randn(weight_shape) / 20).to(dtype)
    b = torch.randn(weight_shape[0], dtype=dtype)
    assert_matches_reference(mmfuse.patch_embed, mmfuse.patch_embed_reference, [x, w, b], ["pixels", "weight", "bias"])
    assert len(taken) >= 3 and all(taken)  # forward, dpixels, dW (each run of the check)


@pytest.mark.parametrize("geometry", [((2, 3, 42, 70), (40, 3, 14, 14)), ((3, 3, 2, 32, 48), (56, 3, 2, 16, 16))],
                         ids=["image P14", "video T2 P16"])
def test_patch_embed_tf32_on_tma(tma, tf32, geometry, monkeypatch):
    """fp32 under torch's TF32 switch on the core: the forward, dpixels and dW each take it (TF32 wgmma;
    the same descriptors in 4-byte elements, BLOCK_K halved), values and gradients under the error rule
    against the TF32 reference."""
    from mmfuse.kernels import patch_embed as KP

    taken = _returns(monkeypatch, KP, "on_tma")
    pixel_shape, weight_shape = geometry
    x, w, b = torch.randn(pixel_shape), torch.randn(weight_shape) / 20, torch.randn(weight_shape[0])
    # The same-precision reference is a TF32 GEMM: the convolution form follows cuDNN's own choice, which
    # on the H100 run computed the video case in full fp32 (error 8e-06 against TF32's 4e-03).
    ref = [t.double() for t in (x, w, b)]
    torch.testing.assert_close(_patch_gemm_reference(*ref), mmfuse.patch_embed_reference(*ref))
    assert_matches_reference(mmfuse.patch_embed, _patch_gemm_reference, [x, w, b], ["pixels", "weight", "bias"])
    assert len(taken) >= 3 and all(taken)


def _patch_gemm_reference(pixels, weight, bias, linear=torch.nn.functional.linear):
    """``patch_embed_reference`` as im2col and one ``F.linear`` (which follows torch's TF32 switch)."""
    B, C, D, P = pixels.shape[0], pixels.shape[1], weight.shape[0], weight.shape[-1]
    T = weight.shape[2] if weight.dim() == 5 else 1
    frames, H, W = (pixels.shape[2] if pixels.dim() == 5 else 1), pixels.shape[-2], pixels.shape[-1]
    patches = pixels.reshape(B, C, frames // T, T, H // P, P, W // P, P).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return linear(patches.reshape(B, -1, C * T * P * P), weight.reshape(D, -1), bias)


def test_patch_embed_dw_split_on_tma(tma, monkeypatch, launches):
    """dW's token loop split 3 ways into fp32 partials: the persistent programs walk every (tile,
    split) pair; the combine sums them in split order, as the pointer kernel's run does, bitwise."""
    from mmfuse.kernels import patch_embed as KP

    taken = _returns(monkeypatch, KP, "on_tma")
    g = torch.randn(2, 96, 40, dtype=torch.float16)  # 192 tokens: chunks of 64 (SPLIT_ALIGN) -> 3 splits
    x = torch.randn(2, 3, 1, 112, 168, dtype=torch.float16)
    assert KP.dw_token_chunk(192, 3) == 64
    on_tma = KP.patch_embed_dw(g, x, (40, 3, 1, 14, 14), with_bias=False, splits=3)[0]
    assert taken == [True] and "dw_combine_kernel" in launches
    monkeypatch.setattr(KL, "TMA", "never")
    assert torch.equal(on_tma, KP.patch_embed_dw(g, x, (40, 3, 1, 14, 14), with_bias=False, splits=3)[0])
    assert taken == [True, False]


def test_patch_embed_tma_equals_the_pointer_kernels_bitwise(tma, monkeypatch):
    """One tile's code either way: the interpreted TMA / persistent GEMMs compute exactly the pointer
    kernels' sums (the same blocks in the same order), forward and backward."""
    from mmfuse.kernels import patch_embed as KP

    taken = _returns(monkeypatch, KP, "on_tma")
    x = torch.randn(2, 3, 56, 42, dtype=torch.float16, requires_grad=True)
    w = (torch.randn(72, 3, 14, 14) / 20).to(torch.float16).requires_grad_()
    b = torch.randn(72, dtype=torch.float16, requires_grad=True)
    g = torch.randn(2, 12, 72, dtype=torch.float16)

    def run():
        out = mmfuse.patch_embed(x, w, b)
        return (out, *torch.autograd.grad(out, (x, w, b), g))

    on_tma = run()
    assert taken == [True] * 3  # forward, dpixels, dW
    monkeypatch.setattr(KL, "TMA", "never")
    for a, b_ in zip(on_tma, run()):
        assert torch.equal(a, b_)


def test_patch_embed_stays_on_pointers_unless_always(monkeypatch):
    """"auto" (the default) does not take the patch GEMMs' TMA path: it is not yet timed on a GPU. Nor
    do layouts TMA cannot read: a dOut whose batch does not fold into its rows (a class-token view)."""
    from mmfuse.kernels import patch_embed as KP

    monkeypatch.setattr(KL, "TMA", "auto")
    w_runs, _ = KP.pack_weight(torch.randn(40, 3, 1, 14, 14, dtype=torch.float16))
    x = torch.randn(1, 3, 1, 28, 28, dtype=torch.float16)
    assert not KP.on_tma(x, w_runs)
    monkeypatch.setattr(KL, "TMA", "always")
    assert KP.on_tma(x, w_runs)
    old = torch.backends.cuda.matmul.allow_tf32
    try:  # fp32 only with TF32 (IEEE fp32 would multiply on CUDA cores from shared memory: it spills)
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not KP.on_tma(x.float(), w_runs.float())
        torch.backends.cuda.matmul.allow_tf32 = True
        assert KP.on_tma(x.float(), w_runs.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not KP.on_tma(x.double(), w_runs.double())
    with_class = torch.randn(2, 5, 40, dtype=torch.float16)[:, 1:]  # (B, N, D) past a class token
    assert KP._token_matrix(with_class) is None and not KP.on_tma(with_class, KP._token_matrix(with_class))
    assert KP._token_matrix(torch.randn(2, 4, 40, dtype=torch.float16)).shape == (8, 40)
    odd_rows = torch.randn(2, 4, 36, dtype=torch.float16)  # 72-byte rows: off TMA's 16-byte rule
    assert not KP.on_tma(odd_rows, KP._token_matrix(odd_rows))


# The merged projector's mapped GEMMs (kernels/merged_gemm.py): the weight and dH by TMA, the merged
# operand (token table or view merge, norm in the load) still gathered by pointers; persistent programs.
MERGED_FORMS = [("layer", True, True, 64), ("rms", False, False, 64), (None, False, True, 24), ("layer", False, True, 24)]


def _merged_case(norm, post, table, C, dtype=torch.float16, T=52, G=4, widths=(40, 24), gated=False):
    x = torch.randn(T, C, dtype=dtype)
    tmap = torch.randperm(T)[: (T // G) * G].reshape(-1, G).to(torch.int32) if table else None
    width = G * C if post else C
    nb = [(1 + 0.3 * torch.randn(width)).to(dtype)] if norm else []
    nb += [torch.randn(width, dtype=dtype)] if norm == "layer" else []
    w1 = (torch.randn(widths[0] * (2 if gated else 1), G * C) / (G * C) ** 0.5).to(dtype)
    w2 = (torch.randn(widths[1], widths[0]) / widths[0] ** 0.5).to(dtype)
    bs = [torch.randn(w1.shape[0], dtype=dtype), torch.randn(widths[1], dtype=dtype)]
    kw = dict(group=G, token_map=tmap, norm=norm, eps=1e-5, norm_after_merge=post)
    if gated:
        kw["gate_half"] = 1

    def call(f):
        return lambda x, w1, w2, b1, b2, *nb: f(x, [w1, w2], [b1, b2], "silu" if gated else "gelu",
                                               norm_weight=nb[0] if nb else None,
                                               norm_bias=nb[1] if len(nb) > 1 else None, **kw)
    names = ["x", "W1", "W2", "b1", "b2", *(["gamma", "beta"][:len(nb)])]
    return [x, w1, w2, *bs, *nb], names, call


@pytest.mark.parametrize("norm,post,table,C,gated", [(*f, False) for f in MERGED_FORMS] + [("layer", True, True, 64, True)],
                         ids=lambda v: str(v))
def test_merged_mlp_gemms_on_tma(tma, norm, post, table, C, gated, monkeypatch, launches):
    from mmfuse.ops.merged import merged_mlp, merged_mlp_reference

    descriptors, real = [], KL._tma_operand
    monkeypatch.setattr(KL, "_tma_operand", lambda *a: descriptors.append(tuple(a[0].shape)) or real(*a))
    inputs, names, call = _merged_case(norm, post, table, C, gated=gated)
    assert_matches_reference(call(merged_mlp), call(merged_mlp_reference), inputs, names)
    assert "mapped_gemm_kernel" in launches and "fused_gemm_kernel" not in launches
    M, K, N1 = 52 // 4, 4 * C, inputs[1].shape[0]
    # forward: W1^T (K, 40), or each half's; dW1: dH1^T (N1, M); dA: dH1 (M, N1) and W1 (N1, K)
    assert {(K, 40), (N1, M), (M, N1), (N1, K)} <= set(descriptors)


def test_merged_mlp_gemms_on_tma_equal_the_pointer_kernel(tma, monkeypatch, launches):
    """The same blocks in the same order, the weight loaded by TMA instead of pointers: bitwise equal
    outputs and gradients, interpreted (fp16; the persistent programs walk several tiles each)."""
    from mmfuse.ops.merged import merged_mlp

    inputs, names, call = _merged_case("layer", True, True, 64, widths=(72, 40))
    inputs = [t.requires_grad_() for t in inputs]
    g = torch.randn(13, 40, dtype=torch.float16)

    def run():
        y = call(merged_mlp)(*inputs)
        return (y, *torch.autograd.grad(y, inputs, g))

    on_tma = run()
    launches.clear()
    monkeypatch.setattr(KL, "TMA", "never")
    for a, b in zip(on_tma, run()):
        assert torch.equal(a, b)


def test_ieee_fp32_patch_embed_stays_on_the_pointer_kernels(tma, monkeypatch):
    """IEEE fp32 (torch's TF32 switch off) keeps the patch-embedding GEMMs on the pointer kernels, as the
    linear's (``_wants_tma``: CUDA-core FMA from shared memory spills on the core); TF32 and fp16 take it."""
    from mmfuse.kernels import patch_embed as KP

    decided = _returns(monkeypatch, KP, "on_tma")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            px = torch.randn(2, 3, 28, 28, dtype=dtype, requires_grad=True)
            w, b = (torch.randn(24, 3, 14, 14) / 24).to(dtype).requires_grad_(), torch.randn(24, dtype=dtype)
            out = mmfuse.patch_embed(px, w, b, torch.randn(4, 24, dtype=dtype))
            out.backward(torch.randn_like(out))  # (a dense dOut: ``sum()``'s is a stride-0 view TMA cannot read)
            on_core = dtype == torch.float16 or tf32
            assert len(decided) == 3 and all(d == on_core for d in decided), (dtype, tf32, decided)
            decided.clear()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
