"""mmfuse.cross_attention: values and gradients against SDPA on expanded inputs (flash-attention rule),
split-KV invariance, masks, empty rows, numerical safety, gradcheck, determinism, bad input."""

import math

import pytest
import torch

import mmfuse
from mmfuse.kernels import cross_attention as KA
from mmfuse.ops.cross_attention import cross_attention, cross_attention_reference, cross_attention_term_scales
from mmfuse.testing import assert_matches_reference, compare


def _qkv(Bq, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, scale=1.0):
    q = torch.randn(Bq, Hq, Lq, D, dtype=dtype) * scale
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype) * scale
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    return q, k, v


def _check(q, k, v, splits=0, **masks):
    return assert_matches_reference(
        lambda q, k, v: cross_attention(q, k, v, _splits=splits, **masks),
        lambda q, k, v: cross_attention_reference(q, k, v, **masks), [q, k, v], ["q", "k", "v"],
        term_scales=lambda inputs, do: cross_attention_term_scales(*inputs, do, scale=masks.get("scale")))


# Every listed value appears at least once: Lq {1, 17, 64}, Lk {1, 63, 577, 1000}, D {32, 64, 96, 128},
# B {1, 3}, Bq {1, B}, Hq/Hkv {1, 4}; dtypes fp32 / fp16 / bf16.
CASES = [
    # Bq, B, Hq, Hkv, Lq, Lk, D, dtype
    (1, 1, 1, 1, 1, 1, 32, torch.float32),
    (1, 3, 4, 1, 17, 63, 64, torch.float32),
    (3, 3, 4, 4, 17, 63, 96, torch.float16),
    (1, 3, 4, 1, 64, 63, 128, torch.bfloat16),
    (1, 1, 4, 1, 17, 577, 32, torch.float16),
    (3, 3, 1, 1, 1, 1000, 32, torch.float32),
    (1, 1, 2, 2, 64, 40, 96, torch.float16),
    (1, 2, 4, 2, 17, 64, 32, torch.float16),  # Lk a multiple of the key block, no padding: EVEN_N
]


@pytest.mark.parametrize("Bq,B,Hq,Hkv,Lq,Lk,D,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(Bq, B, Hq, Hkv, Lq, Lk, D, dtype):
    q, k, v = _qkv(Bq, B, Hq, Hkv, Lq, Lk, D, dtype)
    _check(q, k, v)
    assert cross_attention(q, k, v).shape == (B, Hq, Lq, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kv_lens_key_mask_and_a_fully_masked_sample(dtype):
    q, k, v = _qkv(1, 3, 4, 2, 17, 70, 40, dtype)
    lens = torch.tensor([70, 33, 0])  # sample 2: no key at all
    mask = torch.rand(3, 70) > 0.4
    mask[1, :5] = False
    _check(q, k, v, kv_lens=lens)
    _check(q, k, v, key_mask=mask)
    _check(q, k, v, kv_lens=lens, key_mask=mask, splits=3)
    out = cross_attention(q, k, v, kv_lens=lens)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # zeros, not NaN


def test_fully_masked_rows_have_zero_gradients():
    q, k, v = _qkv(1, 2, 2, 2, 5, 30, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1] = False
    out = cross_attention(q, k, v, key_mask=mask)
    out.square().sum().backward()
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert torch.isfinite(q.grad).all()


def test_even_key_blocks_take_the_mask_free_path(launches, monkeypatch):
    seen = []
    real = KA.attn_fwd_kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs["EVEN_N"])
        return real(*args, **kwargs)

    monkeypatch.setattr(KA.attn_fwd_kernel, "run", spy)
    q, k, v = _qkv(1, 2, 4, 2, 17, 64, 32)
    _check(q, k, v, splits=2)
    cross_attention(q, k, v, kv_lens=torch.tensor([64, 30]))
    assert seen[0] is True and seen[-1] is False  # padding (kv_lens) turns the masks back on


@pytest.mark.parametrize("splits", [1, 2, 5, 32])
def test_split_counts_agree(splits):
    # Forced splits of 1, 2, a few and many (capped at one key block each) give the same answer.
    q, k, v = _qkv(1, 2, 2, 1, 17, 577, 32)
    lens = torch.tensor([577, 300])
    ref = cross_attention(q, k, v, kv_lens=lens, _splits=1)
    out = cross_attention(q, k, v, kv_lens=lens, _splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _check(q, k, v, splits=splits, kv_lens=lens)


def test_non_contiguous_inputs():
    # q broadcast from a (Lq, H, D) parameter view, k/v as head-transposed projections.
    base_q = torch.randn(17, 4, 48)
    q = base_q.permute(1, 0, 2).unsqueeze(0)  # (1, 4, 17, 48), not contiguous
    k = torch.randn(2, 63, 2, 48).transpose(1, 2)
    v = torch.randn(2, 63, 2, 96)[..., ::2].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v)


def test_large_logits_do_not_overflow():
    # fp32 logits of magnitude ~1e4 and fp16 inputs whose logits approach the fp16 limit.
    q, k, v = _qkv(1, 2, 2, 2, 9, 50, 16, torch.float32, scale=30.0)  # |q.k| * scale ~ 1e4
    out = cross_attention(q, k, v)
    assert torch.isfinite(out).all()
    _check(q, k, v)
    q, k, v = _qkv(1, 2, 2, 2, 9, 50, 16, torch.float16)
    q = q * 60
    k = k * 60  # q.k up to ~6e4 before scaling: fp16 would overflow if the dot were rounded to fp16
    out = cross_attention(q, k, v)
    assert torch.isfinite(out).all()
    ref64 = cross_attention_reference(q.double(), k.double(), v.double())
    assert (out.double() - ref64).abs().max() < 2e-2


def test_custom_scale():
    q, k, v = _qkv(1, 2, 2, 1, 7, 20, 24)
    ref = cross_attention_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(cross_attention(q, k, v, scale=0.3), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cross_attention(q, k, v), cross_attention_reference(q, k, v, scale=24 ** -0.5),
                               rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64():
    # Tiny (each perturbed element re-runs the interpreted kernels): GQA 2:1, broadcast queries,
    # a padded sample, two key splits.
    q, k, v = _qkv(1, 2, 2, 1, 2, 5, 3, torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lens = torch.tensor([5, 2])
    # fast_mode (a random projection of the Jacobian, checked against its numerical estimate): the full
    # Jacobian took 17 s of CI; tests/test_patch_embed.py keeps a full-Jacobian gradcheck
    assert torch.autograd.gradcheck(lambda q, k, v: cross_attention(q, k, v, kv_lens=lens, _splits=2), (q, k, v),
                                    fast_mode=True)


def test_backward_is_deterministic():
    q, k, v = _qkv(1, 3, 4, 2, 17, 63, 32, torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(3, 4, 17, 32, dtype=torch.float16)
    runs = [torch.autograd.grad(cross_attention(q, k, v, _splits=2), [q, k, v], do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dq_splits", [1, 2, 5, (2, 2)])
def test_dq_of_shared_queries_split_over_the_batch(dq_splits, monkeypatch):
    # Shared queries over 5 samples: dQ's batch loop in 1, 2 (3 + 2 samples) or 5 fp32 partials summed in
    # split order, or 2 x 2 with the keys split too: one key block and 8 more keys, so two chunks under
    # the launcher's blocks (40 keys interpreted, 72 on a GPU, whose 64-key blocks took 40 in one);
    # every split count gives dQ to rounding, and dK / dV bit for bit (they never split).
    q, k, v = _qkv(1, 5, 4, 2, 17, KA.blocks_for(17, 24, backward=True)["BLOCK_N"] + 8, 24)
    o, lse = KA.attention_fwd(q, k, v, None, None, 24 ** -0.5)
    do = torch.randn_like(o)
    allocated = []
    real_empty = KA.empty

    def recording_empty(shape, **kw):
        allocated.append((tuple(shape), kw["dtype"]))
        return real_empty(shape, **kw)

    monkeypatch.setattr(KA, "empty", recording_empty)
    dq, dk, dv = KA.attention_bwd(do, q, k, v, o, lse, None, None, 24 ** -0.5, dq_splits=dq_splits)
    dq1, dk1, dv1 = KA.attention_bwd(do, q, k, v, o, lse, None, None, 24 ** -0.5, dq_splits=1)
    partials = [shape for shape, dtype in allocated if len(shape) == 5]
    total = dq_splits[0] * dq_splits[1] if isinstance(dq_splits, tuple) else dq_splits  # (batch, key) splits
    assert partials == ([] if total == 1 else [(total, 1, 4, 17, 24)])
    torch.testing.assert_close(dq, dq1, rtol=1e-5, atol=1e-6)
    assert torch.equal(dk, dk1) and torch.equal(dv, dv1)
    # Left to the launcher, 2 query blocks x 4 heads = 8 programs on 132 SMs split the 5 samples 5 ways.
    assert KA.choose_splits(8, 5, 132) == 5


# The single-pass backward: one dQ program owns each (sample, head, key block), so it writes dK / dV too.
SINGLE_PASS_CASES = [
    # Bq, B, H, Lq, Lk, D, dtype, padding, dq_splits, two sources
    (1, 3, 2, 13, 70, 24, torch.float32, False, None, False),         # shared queries, the batch loop
    (3, 3, 2, 16, 70, 24, torch.float16, True, None, False),          # queries per sample, kv_lens + mask
    (1, 3, 2, 9, 50, 20, torch.bfloat16, True, (2, 2), False),        # batch and key splits: fp32 partials
    (1, 2, 3, 7, 45, 40, torch.float32, True, None, True),            # media ‖ latents, seam in a block
]


@pytest.mark.parametrize("Bq,B,H,Lq,Lk,D,dtype,padding,dq_splits,two", SINGLE_PASS_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_single_pass_backward_matches_the_two_pass_one(Bq, B, H, Lq, Lk, D, dtype, padding, dq_splits, two,
                                                       launches):
    # Every query in one backward block and no head groups: delta + dK/dV + dQ (three launches) become
    # one, with the same products in the same order (bit for bit interpreted). Keys past kv_lens and
    # masked keys get dK = dV = 0 written by the program that owns them (outputs are NaN-poisoned).
    q, k, v = _qkv(Bq, B, H, H, Lq, Lk, D, dtype)
    kw = {}
    if padding:
        kw = dict(kv_lens=torch.tensor([Lk, Lk - 30, 0][:B], dtype=torch.int32), key_mask=torch.rand(B, Lk) > 0.3)
    k2 = v2 = None
    if two:
        k, k2, v, v2 = k[:, :, :Lk - 9], k[:, :, Lk - 9:], v[:, :, :Lk - 9], v[:, :, Lk - 9:]
        if padding:
            kw["key_mask"] = kw["key_mask"][:, :Lk - 9]
    scale = D ** -0.5
    o, lse = KA.attention_fwd(q, k, v, kw.get("kv_lens"), kw.get("key_mask"), scale, k2=k2, v2=v2)
    do = torch.randn_like(o)
    args = (do, q, k, v, o, lse, kw.get("kv_lens"), kw.get("key_mask"), scale)
    del launches[:]
    one = KA.attention_bwd(*args, dq_splits=dq_splits, k2=k2, v2=v2, single_pass=True)
    assert launches == ["attn_bwd_dq_kernel"]
    three = KA.attention_bwd(*args, dq_splits=dq_splits, k2=k2, v2=v2, single_pass=False)
    assert launches[1:] == ["attn_delta_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"]
    flat = lambda grads: [t for g in grads for t in (g if isinstance(g, tuple) else (g,))]  # noqa: E731
    for a, b in zip(flat(one), flat(three)):
        assert torch.equal(a, b)
    if padding:  # the zeros past kv_lens are stores of their own, not left-over memory
        dk = torch.cat(one[1], 2) if two else one[1]
        assert torch.equal(dk[1, :, Lk - 30:], torch.zeros_like(dk[1, :, Lk - 30:]))


def test_single_pass_is_the_plan_where_it_is_allowed_and_faster(launches):
    # Through autograd: an eligible shape (Hq = Hkv, every query in one block) runs one backward launch
    # and matches the reference; grouped heads, or more queries than a block, keep the three launches.
    q, k, v = _qkv(1, 3, 2, 2, 11, 50, 24)
    del launches[:]
    _check(q, k, v)
    assert launches.count("attn_bwd_dq_kernel") == launches.count("attn_fwd_kernel") > 0
    assert "attn_bwd_dkdv_kernel" not in launches and "attn_delta_kernel" not in launches
    for shape in ((1, 3, 4, 2, 11, 50, 24), (1, 3, 2, 2, 40, 50, 24)):
        del launches[:]
        _check(*_qkv(*shape))
        assert "attn_bwd_dkdv_kernel" in launches
    # The model's verdict at the report's shapes (H100, bf16, shared queries): BLIP-2 (32 queries) and
    # OpenFlamingo (64 queries: the single pass's 64-query tile at D = 64) have no head groups and take
    # it at every batch; Idefics2 (4 query heads per KV head) cannot.
    def plan(B, H, Hkv, Lq, Lk, D):
        return KA.bwd_plan(B, 1, H, Hkv, Lq, Lk, D, 2, KA.gpu_blocks(Lq, D, backward=True),
                           KA.single_pass_blocks(Lq, D, 2, gpu=True), 132)[0]

    assert KA.single_pass_blocks(64, 64, 2, gpu=True)["BLOCK_M"] == 64
    assert KA.single_pass_blocks(64, 96, 2, gpu=True)["BLOCK_M"] == 32  # D > 64: two blocks, not allowed
    for B in (1, 8, 64):
        assert plan(B, 12, 12, 32, 257, 64) and plan(B, 8, 8, 64, 321, 64)
        assert not plan(B, 16, 4, 64, 4964, 96) and not plan(B, 8, 8, 64, 321, 96)


def test_single_pass_gradcheck_and_bad_input():
    q, k, v = _qkv(1, 2, 2, 2, 3, 5, 3, torch.float64)
    lens = torch.tensor([5, 2])
    o, lse = KA.attention_fwd(q, k, v, lens, None, 3 ** -0.5)
    assert KA.bwd_plan(2, 1, 2, 2, 3, 5, 3, 8, KA.blocks_for(3, 3, backward=True), KA.single_pass_blocks(3, 3, 8),
                       132)[0]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: cross_attention(q, k, v, kv_lens=lens), (q, k, v),
                                    fast_mode=True)  # as test_gradcheck_fp64: the full Jacobian costs 16 s
    do = torch.randn_like(o)
    for kw, what in ((dict(need_kv=False), "need_kv=False"), (dict(), "Hkv=1")):
        k1, v1 = (k[:, :1], v[:, :1]) if not kw else (k, v)
        with pytest.raises(ValueError, match=f"single_pass=True .*{what}"):
            KA.attention_bwd(do, q.detach(), k1.detach(), v1.detach(), o, lse, lens, None, 1.0, single_pass=True,
                             **kw)


def test_empty_batch_and_no_keys():
    q, k, v = _qkv(1, 0, 2, 2, 5, 7, 16)
    assert cross_attention(q, k, v).shape == (0, 2, 5, 16)
    q, k, v = _qkv(1, 2, 2, 2, 5, 0, 16)
    out = cross_attention(q, k, v)
    assert out.shape == (2, 2, 5, 16) and torch.equal(out, torch.zeros_like(out))


def test_reference_matches_sdpa_on_expanded_inputs():
    # The reference itself, against a hand expansion (valid rows only: SDPA gives NaN elsewhere).
    q, k, v = _qkv(1, 2, 4, 2, 5, 11, 8)
    mask = torch.rand(2, 11) > 0.3
    qe, ke, ve = q.expand(2, -1, -1, -1), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(cross_attention_reference(q, k, v, key_mask=mask), want)


# ----------------------------------------------------------------------------------------------
# The split rule (bench/NOTES.md): numbers worked by hand
# ----------------------------------------------------------------------------------------------
def test_split_efficiency_and_rule():
    # BLIP-2 at batch 1: 1 query block x 12 heads = 12 programs, 257 keys = 5 blocks of 64.
    assert KA.split_efficiency(12, 5, 1, 132) == pytest.approx(12 * 5 / (132 * 5))
    # 5 splits of one block each: 60 programs in one wave, each 1 block: 60/132.
    assert KA.split_efficiency(12, 5, 5, 132) == pytest.approx(60 / 132)
    assert KA.choose_splits(12, 5, 132) == 5  # the most efficient when 85% is out of reach
    # Many programs already fill the machine: no split.
    assert KA.choose_splits(8 * 16 * 1, 78, 132) == KA.choose_splits(8 * 16 * 1, 78, 132)
    assert KA.choose_splits(132 * 4, 78, 132) == 1
    # Idefics2 at batch 1: 16 programs over 78 key blocks; the rule reaches >= 85%.
    s = KA.choose_splits(16, 78, 132)
    assert KA.split_efficiency(16, 78, s, 132) >= KA.TARGET_WAVE_EFFICIENCY


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
class TestBadInput:
    def qkv(self):
        return _qkv(1, 2, 4, 2, 5, 7, 16)

    def test_head_dim_mismatch(self):
        q, k, v = self.qkv()
        with pytest.raises(ValueError, match=r"q: expected head dim \(shape\[3\]\) == 16 .*got 8"):
            cross_attention(q[..., :8], k, v)

    def test_heads_not_a_multiple(self):
        q, k, v = _qkv(1, 2, 3, 2, 5, 7, 16)
        with pytest.raises(ValueError, match=r"q: expected heads \(shape\[1\]\) a multiple of 2 .*got 3"):
            cross_attention(q, k, v)

    def test_query_batch(self):
        q, k, v = _qkv(2, 3, 4, 2, 5, 7, 16)
        with pytest.raises(ValueError, match=r"q: expected batch \(shape\[0\]\) 1 or 3 .*got 2"):
            cross_attention(q, k, v)

    def test_kv_lens(self):
        q, k, v = self.qkv()
        with pytest.raises(ValueError, match=r"kv_lens: expected values in \[0, 7\] \(Lk\), got min 0 and max 8"):
            cross_attention(q, k, v, kv_lens=torch.tensor([8, 0]))
        with pytest.raises(ValueError, match=r"kv_lens: expected values in \[0, 7\]"):
            cross_attention(q, k, v, kv_lens=torch.tensor([-1, 3]))
        with pytest.raises(TypeError, match=r"kv_lens: expected dtype torch.int32 or torch.int64, got torch.float32"):
            cross_attention(q, k, v, kv_lens=torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match=r"kv_lens: expected shape \(2,\)"):
            cross_attention(q, k, v, kv_lens=torch.tensor([1, 2, 3]))

    def test_key_mask(self):
        q, k, v = self.qkv()
        with pytest.raises(ValueError, match=r"key_mask: expected shape \(2, 7\) = \(B, Lk\), got \(2, 6\)"):
            cross_attention(q, k, v, key_mask=torch.ones(2, 6, dtype=torch.bool))
        with pytest.raises(TypeError, match=r"key_mask: expected dtype torch.bool \(True = attend\), got torch.int64"):
            cross_attention(q, k, v, key_mask=torch.ones(2, 7, dtype=torch.long))

    def test_head_dim_too_large(self):
        q, k, v = _qkv(1, 1, 1, 1, 2, 3, 257)
        with pytest.raises(ValueError, match=r"q: expected a head dim in 1..256, got 257"):
            cross_attention(q, k, v)

    def test_dtype_and_rank(self):
        q, k, v = self.qkv()
        with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float16"):
            cross_attention(q, k.half(), v)
        with pytest.raises(ValueError, match=r"q: expected a 4-D tensor, got 3-D"):
            cross_attention(q[0], k, v)
        with pytest.raises(ValueError, match=r"v: expected the shape of k"):
            cross_attention(q, k, v[:, :, :5])


def test_functional_is_exported():
    assert mmfuse.cross_attention is cross_attention
    assert math.isclose(KA.LOG2E, 1 / math.log(2))
    c = compare("x", torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1))
    assert c.ok


def test_cancelling_gradients_get_a_floor_of_a_few_ulps_of_their_terms():
    # One key: dQ and dK are exactly 0 in exact arithmetic (dP - delta cancels), so a correct kernel
    # returns ulps of |dP| |K| scale, and PyTorch's fp32 reference may or may not round to exactly 0
    # depending on its SIMD path. The floor follows the terms; an error of 8 ulps of them still fails.
    q, k, v = _qkv(1, 1, 1, 1, 1, 1, 32)
    do = 10 * torch.randn(1, 1, 1, 32)  # terms well above 1, so the two floors differ
    terms = cross_attention_term_scales(q, k, v, do)
    expected = 32 ** -0.5 * (do.double() @ v.double().transpose(-1, -2)).abs().max().item() * k.abs().max().item()
    assert terms["grad q"] == pytest.approx(expected)
    zero64, zero32 = torch.zeros(q.shape, dtype=torch.float64), torch.zeros(q.shape)
    ulp = torch.finfo(torch.float32).eps * terms["grad q"]
    assert compare("grad q", torch.full(q.shape, 2 * ulp), zero64, zero32, term_scale=terms["grad q"]).ok
    assert not compare("grad q", torch.full(q.shape, 8 * ulp), zero64, zero32, term_scale=terms["grad q"]).ok
    assert not compare("grad q", torch.full(q.shape, 2 * ulp), zero64, zero32).ok  # without it: 4 ulps of 1


# ----------------------------------------------------------------------------------------------
# Two key/value sources (the perceiver's media ‖ latents, never concatenated)
# ----------------------------------------------------------------------------------------------
def _two_source_check(q, k1, k2, v1, v2, splits=0, **masks):
    """Kernel on the pair against the reference on the concatenation (mask padded with True)."""
    key_mask = masks.pop("key_mask", None)
    full_mask = None if key_mask is None else torch.cat([key_mask, torch.ones(k2.shape[0], k2.shape[2],
                                                                              dtype=torch.bool)], 1)
    return assert_matches_reference(
        lambda q, k1, k2, v1, v2: cross_attention(q, (k1, k2), (v1, v2), key_mask=key_mask, _splits=splits, **masks),
        lambda q, k1, k2, v1, v2: cross_attention_reference(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2),
                                                            key_mask=full_mask, **masks),
        [q, k1, k2, v1, v2], ["q", "k1", "k2", "v1", "v2"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_two_sources_match_the_concatenation(dtype):
    # 45 media keys + 7 latents: the second 32-key block straddles the seam; GQA 2:1, shared queries,
    # media in the projections' (B, L, H, D) layout (head views), media padded by a mask.
    q = torch.randn(7, 4, 24, dtype=dtype).permute(1, 0, 2).unsqueeze(0)
    k1, v1 = (torch.randn(3, 45, 2, 24, dtype=dtype).transpose(1, 2) for _ in range(2))
    # The second source in other layouts than the first: contiguous heads, and a sliced view.
    k2, v2 = torch.randn(3, 2, 7, 24, dtype=dtype), torch.randn(3, 2, 7, 48, dtype=dtype)[..., ::2]
    mask = torch.rand(3, 45) > 0.3
    mask[2] = False  # sample 2 attends to its latents only
    _two_source_check(q, k1, k2, v1, v2, key_mask=mask)
    _two_source_check(q, k1, k2, v1, v2, splits=2, kv_lens=torch.tensor([52, 40, 49]))


def test_two_sources_gradcheck_and_determinism():
    # Tiny: every perturbed element re-runs the interpreted kernel. One masked media key.
    q = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    k1, v1 = (torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k2, v2 = (torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.tensor([[True, False, True]])
    fn = lambda q, k1, k2, v1, v2: cross_attention(q, (k1, k2), (v1, v2), key_mask=mask)  # noqa: E731
    # fast_mode (a random projection of the Jacobian): test_gradcheck_fp64 keeps the full one
    assert torch.autograd.gradcheck(fn, (q, k1, k2, v1, v2), fast_mode=True)
    runs = [torch.autograd.grad(fn(q, k1, k2, v1, v2).sin().sum(), [q, k1, k2, v1, v2]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_two_sources_bad_input():
    q, k, v = _qkv(1, 2, 2, 1, 3, 5, 8)
    with pytest.raises(ValueError, match="k, v: expected both a pair"):
        cross_attention(q, (k, k), v)
    with pytest.raises(ValueError, match=r"k\[1\]: expected shape \(2, 1, L2, 8\)"):
        cross_attention(q, (k, k[:1]), (v, v[:1]))
    with pytest.raises(ValueError, match="key_mask: expected shape"):
        cross_attention(q, (k, k), (v, v), key_mask=torch.ones(2, 10, dtype=torch.bool))


def test_forward_split_rule_minimises_the_modelled_time():
    """Idefics2 at batch 1 (16 programs, 78 key blocks) still splits; OpenFlamingo and BLIP-2 (5-6 key
    blocks) stay in one launch at batch 1 and 8: the partials and the combine launch cost more than
    the idle SMs (bench/NOTES.md, "Forward split rule by modelled time")."""
    assert KA.choose_fwd_splits(1, 1, 16, 4, 64, 4964, 96, 2, 132) == 6
    for B in (1, 8):
        assert KA.choose_fwd_splits(B, 1, 8, 8, 64, 321, 64, 2, 132) == 1
        assert KA.choose_fwd_splits(B, 1, 12, 12, 32, 257, 64, 2, 132) == 1
    us = [KA.fwd_modelled_us(1, 1, 16, 4, 64, 4964, 96, 2, s, 132) for s in (1, 6, 78)]
    assert us[1] < us[0] and us[1] < us[2]


def test_lse_rounding_floor_only_matters_at_huge_logits():
    # The saved fp32 lse rounds at |lse|: a relative error of 2^-24 |lse| in every recomputed P. The
    # rule's floor covers it, and only where it matters: at ordinary logits the fp32 floor of dV stays
    # that of its own magnitude; at |logits| ~ 1e4 it grows to ~|lse| 2^-24 |dV|.
    q, k, v = _qkv(1, 2, 2, 2, 9, 50, 16)
    do = torch.randn(2, 2, 9, 16)
    dv64 = (torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4, -1).transpose(-1, -2) @ do.double().abs())
    # "Of its own magnitude": within 4x of max |dV|. The scale is |P^T| |dO| (a little over max |dV|)
    # times the relative error of P in 4-ulp units, (|lse| / 2 + max |s|) / 4 in fp32: ~2 at these
    # logits (max |s| ~ 4 over 1800 scores; the CUDA run's draw gave 2.1x max |dV|, session 20).
    ordinary = cross_attention_term_scales(q, k, v, do)["grad v"]
    assert ordinary < 4 * dv64.abs().max().item()
    big = cross_attention_term_scales(q * 30, k * 30, v, do)["grad v"]
    # 4 fp32 ulps of that scale: far more than the ordinary floor, what the fp32 lse costs at |logits| ~ 1e4.
    assert big > 50 * ordinary and big * 4 * torch.finfo(torch.float32).eps > 1e-4


@pytest.mark.parametrize("seed", [6, 22, 31])
def test_recomputed_logits_floor_at_large_logits(seed):
    # Found by a 1500-example property run: fp32, one query, scale 1.6, D = 33, logits up to ~27. The
    # backward recomputes s in its own summation order, so P = 2^(s - lse) differs from the forward's by
    # ~an ulp of max |s| (relative), on top of the lse's rounding: dV came out at 1.2-2.7x the floor the
    # lse alone allowed, on these seeds of the kind of input the property drew (PyTorch forms P once).
    # (drawn on the CPU's generator, the one the seeds were found with, then moved to the tests' device)
    g, dev = torch.Generator().manual_seed(seed), torch.get_default_device()
    q, k, v = (torch.randn(*shape, generator=g, device="cpu").to(dev) for shape in
               ((1, 2, 1, 33), (1, 2, 17, 33), (1, 2, 17, 33)))
    lens = torch.randint(1, 18, (1,), generator=g, device="cpu").to(dev).expand(1)
    mask = (torch.rand(1, 17, generator=g, device="cpu") > 0.3).to(dev).expand(1, 17)
    assert_matches_reference(
        lambda q, k, v: cross_attention(q, k, v, scale=1.6, _splits=2, kv_lens=lens, key_mask=mask),
        lambda q, k, v: cross_attention_reference(q, k, v, scale=1.6, kv_lens=lens, key_mask=mask),
        [q, k, v], ["q", "k", "v"], term_scales=lambda i, do: cross_attention_term_scales(*i, do, scale=1.6))


# --- The in-kernel combine (the default outside capture) ------------------------------------------
COMBINE_CASES = [
    # Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two sources, splits
    (1, 3, 4, 2, 17, 577, 24, torch.float32, "lens+mask", False, 5),   # GQA, a fully masked sample
    (3, 3, 2, 2, 33, 97, 40, torch.float16, "lens", False, 3),         # queries per sample, 3 query blocks
    (1, 2, 3, 3, 5, 130, 16, torch.bfloat16, None, False, 4),          # no padding (EVEN_N off: 130 keys)
    (1, 2, 2, 1, 17, 75, 32, torch.float32, "mask", True, 3),          # keys from two sources
]


def _combine_inputs(Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two):
    q, k, v = _qkv(Bq, B, Hq, Hkv, Lq, Lk, D, dtype)
    # Non-contiguous views of every tensor: q column-major, k a slice of wider rows, v head-interleaved.
    k = torch.cat([k, torch.randn_like(k[..., :3])], -1)[..., :D]
    q, v = q.transpose(2, 3).contiguous().transpose(2, 3), v.transpose(1, 2).contiguous().transpose(1, 2)
    lens = torch.tensor([Lk, Lk // 3, 0][:B], dtype=torch.int32) if padding and "lens" in padding else None
    mask = torch.rand(B, Lk - (7 if two else 0)) > 0.3 if padding and "mask" in padding else None
    k2 = v2 = None
    if two:  # the last 7 keys from a second tensor
        k, k2, v, v2 = k[:, :, :-7], k[:, :, -7:], v[:, :, :-7], v[:, :, -7:]
    return q, k, v, lens, mask, k2, v2


@pytest.mark.parametrize("Bq,B,Hq,Hkv,Lq,Lk,D,dtype,padding,two,splits", COMBINE_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_in_kernel_combine_matches_the_combine_launch_bit_for_bit(Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two,
                                                                  splits, request):
    """The split kernel's last program per query block merges the partials in split order from memory:
    the same bits as attn_combine_kernel, in one launch, and the arrival counters are left at zero."""
    launches = request.getfixturevalue("launches") if mmfuse.INTERPRET else None
    q, k, v, lens, mask, k2, v2 = _combine_inputs(Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two)
    acc = torch.float32
    want = KA.attention_fwd(q, k, v, lens, mask, 0.3, splits=splits, acc=acc, k2=k2, v2=v2, combine="launch")
    if launches is not None:
        assert launches == ["attn_fwd_kernel", "attn_combine_kernel"]
        launches.clear()
    got = KA.attention_fwd(q, k, v, lens, mask, 0.3, splits=splits, acc=acc, k2=k2, v2=v2, combine="kernel")
    if launches is not None:
        assert launches == ["attn_fwd_kernel"]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not got[0].isnan().any()
    if lens is not None and B == 3:  # the sample with no keys: o = 0, lse = +inf
        assert torch.equal(got[0][2], torch.zeros_like(got[0][2])) and torch.isinf(got[1][2]).all()
    assert all(not c.any() for c in KA._ARRIVALS.values())


@pytest.mark.skipif(mmfuse.INTERPRET, reason="GPU only: the order in which splits arrive is the GPU's; on CPU "
                    "the interpreter runs programs one by one (the shuffled-order test stands in)")
def test_in_kernel_combine_at_the_report_shapes_on_a_gpu():
    """On a GPU a missing memory ordering would show as an occasional wrong merge, not always: Idefics2 and
    OpenFlamingo at batch 1, at the splits the in-kernel rule takes there, 20 times each, against the
    combine launch bit for bit (run by ``mmfuse gpu-check``'s value tests)."""
    for Hq, Hkv, Lq, Lk, D in ((16, 4, 64, 4964, 96), (8, 8, 64, 321, 64)):
        q, k, v = _qkv(1, 1, Hq, Hkv, Lq, Lk, D, torch.bfloat16)
        # At least 2 splits whatever this GPU's SM count makes the rule choose.
        splits = max(2, KA.choose_fwd_splits(1, 1, Hq, Hkv, Lq, Lk, D, 2, KA.num_sms(q.device), in_kernel=True))
        want = KA.attention_fwd(q, k, v, None, None, D ** -0.5, splits=splits, combine="launch")
        for _ in range(20):
            got = KA.attention_fwd(q, k, v, None, None, D ** -0.5, splits=splits, combine="kernel")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(not c.any() for c in KA._ARRIVALS.values())


@pytest.mark.skipif(not mmfuse.INTERPRET, reason="reorders the interpreter's grid (on a GPU the hardware does)")
def test_in_kernel_combine_does_not_depend_on_which_split_arrives_last(monkeypatch):
    """On a GPU any split of a query block may arrive last and merge. The interpreter runs the grid in
    order (the last split merges); here each launch runs the split axis in a shuffled order, so other
    programs merge, and the bits do not change."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real_dim, real_idx = builder.set_grid_dim, builder.set_grid_idx
    order = {}

    def set_grid_dim(x, y, z):
        order["perm"] = order["make"](z)
        return real_dim(x, y, z)

    def set_grid_idx(x, y, z):
        return real_idx(x, y, order["perm"][z])

    q, k, v, lens, mask, _, _ = _combine_inputs(1, 3, 4, 2, 17, 250, 24, torch.float32, "lens+mask", False)
    want = KA.attention_fwd(q, k, v, lens, mask, 0.3, splits=4, combine="launch")
    monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)
    gen = torch.Generator().manual_seed(7)

    def shuffled(z):  # a random order in which the highest split does not arrive last
        while (perm := torch.randperm(z, generator=gen).tolist())[-1] == z - 1:
            pass
        return perm

    for make in (lambda z: list(range(z))[::-1], shuffled):  # split 0 merges; then another split
        order["make"] = make
        got = KA.attention_fwd(q, k, v, lens, mask, 0.3, splits=4, combine="kernel")
        assert order["perm"][-1] != len(order["perm"]) - 1  # a split other than the last merged
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_in_kernel_combine_through_the_op_values_and_gradients(monkeypatch):
    """Under MMFUSE_SPLIT_COMBINE=kernel the functional API takes it (one forward launch): values and
    gradients by the error rule, gradcheck in fp64."""
    monkeypatch.setattr(KA, "SPLIT_COMBINE", "kernel")
    q, k, v = _qkv(1, 2, 4, 2, 17, 97, 32, torch.float16)
    _check(q, k, v, splits=3, kv_lens=torch.tensor([97, 40]))
    # fp64 gradcheck through q (the numerical side re-runs the merged forward twice per element; K and V
    # would take 2 x 1120 runs, and their gradients come from the same saved o and lse as q's).
    q, k, v = (t.double() for t in _qkv(1, 2, 1, 1, 2, 70, 4))
    lens = torch.tensor([70, 33])
    assert torch.autograd.gradcheck(lambda q: cross_attention(q, k, v, kv_lens=lens, _splits=3),
                                    (q.requires_grad_(),))


def test_in_kernel_combine_switch_and_bad_values(monkeypatch):
    q, k, v = _qkv(1, 1, 1, 1, 3, 70, 16)
    with pytest.raises(ValueError,
                       match=r"combine: expected None or one of \('auto', 'launch', 'kernel'\), got 'both'"):
        KA.attention_fwd(q, k, v, None, None, 0.25, splits=2, combine="both")
    monkeypatch.setattr(KA, "SPLIT_COMBINE", "fused")
    with pytest.raises(ValueError,
                       match=r"MMFUSE_SPLIT_COMBINE: expected one of \('auto', 'launch', 'kernel'\), got 'fused'"):
        cross_attention(q, k, v, _splits=2)
    monkeypatch.setattr(KA, "SPLIT_COMBINE", "launch")
    assert not KA.combine_in_kernel()


def _forward_launches(monkeypatch, q, k, v, splits, combine=None):
    """(each forward launch's COMBINE flag, None for attn_combine_kernel; attention_fwd's result)."""
    launched = []

    class Recorder:  # the real launch, its COMBINE flag noted
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append(meta.get("COMBINE"))
                return self.kernel[grid](*args, **meta)
            return launch

    with monkeypatch.context() as m:
        m.setattr(KA, "attn_fwd_kernel", Recorder(KA.attn_fwd_kernel))
        m.setattr(KA, "attn_combine_kernel", Recorder(KA.attn_combine_kernel))
        out = KA.attention_fwd(q, k, v, None, None, 0.25, splits=splits, combine=combine)
    return launched, out


def test_the_default_merges_in_the_kernel_on_counters_of_its_own_under_capture(monkeypatch):
    """"auto" (the default): one launch that merges its own splits, the merge launch only when asked for
    (the same bits); one split: one launch, nothing to merge. While a CUDA graph is captured
    (``_capturing``, stood in for here: capture needs a GPU, tests/test_cuda_graphs.py captures for real)
    the launch gets fresh zeroed counters, never the cached set, so no two graphs share any."""
    import os
    import subprocess
    import sys

    if "MMFUSE_SPLIT_COMBINE" not in os.environ:  # this process imported mmfuse without it
        assert KA.SPLIT_COMBINE == "auto"
    monkeypatch.setattr(KA, "SPLIT_COMBINE", "auto")
    q, k, v = _qkv(1, 2, 2, 2, 17, 200, 16)
    flags, merged = _forward_launches(monkeypatch, q, k, v, splits=3)
    assert flags == [True]
    assert _forward_launches(monkeypatch, q, k, v, splits=1)[0] == [False]
    flags, launched = _forward_launches(monkeypatch, q, k, v, splits=3, combine="launch")
    assert flags == [False, None]  # the split kernel, then attn_combine_kernel
    assert torch.equal(merged[0], launched[0]) and torch.equal(merged[1], launched[1])
    device = q.device
    cached = KA._arrival_counters(device, 8)
    assert KA._arrival_counters(device, 8) is cached
    monkeypatch.setattr(KA, "_capturing", lambda device: True)
    fresh = [KA._arrival_counters(device, 8) for _ in range(2)]
    assert all(f is not cached and f.data_ptr() != cached.data_ptr() and not f.any() for f in fresh)
    assert fresh[0].data_ptr() != fresh[1].data_ptr()
    seen = []
    real = KA._arrival_counters
    monkeypatch.setattr(KA, "_arrival_counters", lambda device, n: seen.append(real(device, n)) or seen[-1])
    flags, captured = _forward_launches(monkeypatch, q, k, v, splits=3)
    assert flags == [True] and len(seen) == 1 and seen[0] is not cached and not seen[0].any()
    assert torch.equal(captured[0], merged[0]) and torch.equal(captured[1], merged[1])
    for forced, want in (("launch", "False"), ("kernel", "True"), ("auto", "True")):
        env = dict(os.environ, MMFUSE_SPLIT_COMBINE=forced)
        code = "import mmfuse; from mmfuse.kernels import cross_attention as KA; print(KA.combine_in_kernel())"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_auto_splits_by_the_merge_launchs_model(monkeypatch):
    """"auto" chooses the split count as if the merge were a launch (OpenFlamingo at batch 1: 1 split; the
    in-kernel model's 3 measured slower on an H100), "kernel" by its own model."""
    args = (1, 1, 8, 8, 64, 321, 64, 2, 132)
    assert KA.choose_fwd_splits(*args) == 1 and KA.choose_fwd_splits(*args, in_kernel=True) == 3
    q, k, v = _qkv(1, 1, 1, 1, 3, 70, 16)
    seen, real = [], KA.choose_fwd_splits

    def spy(*a, **kw):
        seen.append(a[10] if len(a) > 10 else kw.get("in_kernel", False))
        return real(*a, **kw)

    monkeypatch.setattr(KA, "choose_fwd_splits", spy)
    for mode in ("auto", "launch", "kernel"):
        KA.attention_fwd(q, k, v, None, None, 0.25, combine=mode)
    assert seen == [False, False, True]


def test_arrival_counters_grow_and_stay_zero():
    KA._ARRIVALS.pop((torch.device("cpu"), 0), None)
    small = KA._arrival_counters(torch.device("cpu"), 10)
    assert small.numel() >= 10 and small.dtype == torch.int32 and not small.any()
    assert KA._arrival_counters(torch.device("cpu"), 10) is small  # reused, not reallocated
    big = KA._arrival_counters(torch.device("cpu"), small.numel() + 1)
    assert big.numel() > small.numel() and not big.any()
    # A launch whose grid needs more counters than the set holds (2 query blocks x 6 (sample, head) = 12
    # > 4): a larger zeroed set, and every counter back at zero after the launch.
    device = torch.empty(()).device
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    KA._ARRIVALS[(device, stream)] = torch.zeros(4, dtype=torch.int32, device=device)
    q, k, v = _qkv(1, 3, 2, 2, 17, 200, 16)
    want = KA.attention_fwd(q, k, v, None, None, 0.25, splits=3, combine="launch")
    got = KA.attention_fwd(q, k, v, None, None, 0.25, splits=3, combine="kernel")
    assert KA._ARRIVALS[(device, stream)].numel() >= 12 and not KA._ARRIVALS[(device, stream)].any()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not mmfuse.INTERPRET, reason="interrupts the interpreter's grid part-way")
def test_an_interrupted_in_kernel_combine_leaves_the_counters_at_zero(monkeypatch):
    """A launch stopped after some splits arrived must not leave their counts for the next launch (which
    would then merge early, from partials not yet written)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real_idx, seen = builder.set_grid_idx, []

    def failing(x, y, z):
        seen.append((x, y, z))
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real_idx(x, y, z)

    q, k, v = _qkv(1, 2, 2, 2, 17, 200, 16)
    want = KA.attention_fwd(q, k, v, None, None, 0.25, splits=3, combine="launch")
    monkeypatch.setattr(builder, "set_grid_idx", failing)
    with pytest.raises(KeyboardInterrupt):
        KA.attention_fwd(q, k, v, None, None, 0.25, splits=3, combine="kernel")
    monkeypatch.setattr(builder, "set_grid_idx", real_idx)
    assert all(not c.any() for c in KA._ARRIVALS.values())
    got = KA.attention_fwd(q, k, v, None, None, 0.25, splits=3, combine="kernel")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_in_kernel_combine_split_rule():
    """The model without the combine launch (the same bytes, one launch fewer) and the split count that
    minimises it; OpenFlamingo's 64 latents at batch 1 then split, BLIP-2's 32 queries do not (their
    modelled forward stays in one program per head: partials cost more than the 120 idle SMs gain)."""
    args = (1, 1, 8, 8, 64, 321, 64, 2)
    for s in (2, 3, 6):
        assert KA.fwd_modelled_us(*args, s, 132, combine_in_kernel=True) == pytest.approx(
            KA.fwd_modelled_us(*args, s, 132) - KA.LAUNCH_US)
    assert KA.fwd_modelled_us(*args, 1, 132, combine_in_kernel=True) == KA.fwd_modelled_us(*args, 1, 132)
    for shape in (args, (1, 1, 12, 12, 32, 257, 64, 2), (1, 1, 16, 4, 64, 4964, 96, 2)):
        blk = KA.gpu_blocks(shape[4], shape[6])
        kb = KA.cdiv(shape[5], blk["BLOCK_N"])
        times = {KA.cdiv(kb, KA.cdiv(kb, s)): KA.fwd_modelled_us(*shape, KA.cdiv(kb, KA.cdiv(kb, s)), 132,
                                                                  combine_in_kernel=True) for s in range(1, kb + 1)}
        chosen = KA.choose_fwd_splits(*shape, 132, in_kernel=True)
        assert times[chosen] == min(times.values())
        assert times[chosen] <= KA.fwd_modelled_us(*shape, KA.choose_fwd_splits(*shape, 132), 132)
    assert KA.choose_fwd_splits(*args, 132, in_kernel=True) > 1 == KA.choose_fwd_splits(*args, 132)
    assert KA.choose_fwd_splits(1, 1, 12, 12, 32, 257, 64, 2, 132, in_kernel=True) == 1


# --- Grouped heads packed into a program's rows (PACK_GQA, opt-in: the kernel profile's sweep) ------
PACK_CASES = [
    # Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two sources, splits, combine
    (1, 3, 4, 2, 17, 577, 24, torch.float32, "lens+mask", False, 1, "launch"),  # row blocks straddle heads
    (3, 3, 4, 1, 9, 97, 40, torch.float16, "lens", False, 3, "kernel"),       # queries per sample, 4 heads a block
    (1, 2, 6, 2, 5, 130, 16, torch.bfloat16, None, False, 4, "launch"),       # 3 heads in one 16-row block
    (1, 2, 2, 1, 17, 75, 32, torch.float32, "mask", True, 3, "kernel"),       # keys from two sources
    (1, 2, 8, 2, 1, 40, 16, torch.float32, None, False, 1, "launch"),         # one latent: 4 heads a block
]


@pytest.mark.parametrize("Bq,B,Hq,Hkv,Lq,Lk,D,dtype,padding,two,splits,combine", PACK_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_packed_grouped_heads_give_the_one_head_results(Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two, splits,
                                                        combine, monkeypatch):
    """A program whose rows run over a kv head's query heads computes each row as the one-head program
    does, on fewer programs (the K/V blocks loaded once per group's block): the launch packs (PACK_GQA,
    a grid over kv heads), and o and lse agree with the one-head launch to a few units of the output
    dtype's rounding (the interpreter's matmul is the CPU's BLAS, whose kernels may round a row
    differently by its place in the block: the same bits under one BLAS, not under another)."""
    launched = []
    real = KA.attn_fwd_kernel.run

    def spy(*args, **kwargs):
        launched.append((kwargs["PACK_GQA"], tuple(kwargs["grid"]), kwargs["BLOCK_M"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(KA.attn_fwd_kernel, "run", spy)
    q, k, v, lens, mask, k2, v2 = _combine_inputs(Bq, B, Hq, Hkv, Lq, Lk, D, dtype, padding, two)
    kw = dict(splits=splits, acc=torch.float32, k2=k2, v2=v2, combine=combine)
    want = KA.attention_fwd(q, k, v, lens, mask, 0.3, **kw)
    got = KA.attention_fwd(q, k, v, lens, mask, 0.3, pack_gqa=True, **kw)
    # (the tile the launcher chose: the interpreter's, or the GPU's under MMFUSE_TEST_DEVICE=cuda)
    (one, one_grid, bm), (packed, grid, packed_bm) = launched
    assert not one and one_grid[:2] == (math.ceil(Lq / bm), B * Hq)
    assert packed and grid[:2] == (math.ceil(Hq // Hkv * Lq / packed_bm), B * Hkv) and grid[2] == one_grid[2]
    programs = grid[0] * grid[1]
    assert programs == KA.fwd_programs(B, Hq, Hkv, Lq, packed_bm, True) <= KA.fwd_programs(B, Hq, Hkv, Lq, bm)
    if bm == KA.INTERPRETER_BLOCKS["BLOCK_M"]:  # these cases leave the 16-row tile's rows idle per head
        assert programs < KA.fwd_programs(B, Hq, Hkv, Lq, bm)
    # a few units of the output's rounding at its scale (the rows' sums of products may round apart)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=8 * eps,
                               atol=8 * eps * want[0].float().abs().max().item())
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[0].shape == (B, Hq, Lq, D) and not got[0].isnan().any()


def test_packed_grouped_heads_at_a_gpu_tile_and_in_fp64():
    """The sweep's form, interpreted at the GPU's tile (128 rows: two 64-latent heads per program), against
    the fp64 reference; and fp64's packed rows against the reference at the gradchecks' precision."""
    from mmfuse.kernels import _common

    q, k, v = _qkv(1, 2, 4, 2, 64, 150, 96, torch.float16)
    with _common.gpu_config(), pytest.MonkeyPatch.context() as mp:
        real = KA.gpu_blocks
        mp.setattr(KA, "gpu_blocks", lambda Lq, D, backward=False, *a, **kw: real(Lq, D, backward, *a, **kw)
                   if backward else dict(real(Lq, D, backward, *a, **kw), BLOCK_M=128))
        o, lse = KA.attention_fwd(q, k, v, None, None, 96 ** -0.5, pack_gqa=True)
    ref = cross_attention_reference(q.double(), k.double(), v.double())
    ref16 = cross_attention_reference(q, k, v)
    err, err16 = (o.double() - ref).abs().max().item(), (ref16.double() - ref).abs().max().item()
    assert err <= 3 * err16 + 1e-3, (err, err16)
    q, k, v = _qkv(1, 2, 6, 2, 7, 41, 12, torch.float64)
    o, _ = KA.attention_fwd(q, k, v, None, None, 0.3, acc=torch.float64, pack_gqa=True)
    assert (o - cross_attention_reference(q, k, v, scale=0.3)).abs().max().item() < 1e-12


def test_dq_takes_its_own_tile_where_the_backward_tiles_give_one(monkeypatch):
    """``dq_blocks``: a ``dq`` entry in the backward's tiles (the kernel profile's sweep sets one) reaches
    dQ's launch alone, dK/dV keeping the shared tile; dQ's split rule then counts dQ's programs. The
    gradients match the shared tile's to rounding, and dK, dV bit for bit (their launch is unchanged)."""
    from mmfuse.kernels import _common

    torch.manual_seed(3)
    q, k, v = _qkv(1, 3, 4, 2, 37, 150, 24)
    o, lse = KA.attention_fwd(q, k, v, None, None, 0.3)
    do = torch.randn_like(o)
    launched = {}
    for name in ("attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel"):
        kernel = getattr(KA, name)
        real = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, real=real, name=name, **kw: launched.setdefault(name, []).append(
            (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"])) or real(*a, **kw))
    original = KA.gpu_blocks
    with _common.gpu_config():
        shared = KA.attention_bwd(do, q, k, v, o, lse, None, None, 0.3)
        monkeypatch.setattr(KA, "gpu_blocks", lambda Lq, D, backward=False, *a, **kw: dict(
            original(Lq, D, backward, *a, **kw), dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4)) if backward
            else original(Lq, D, backward, *a, **kw))
        own = KA.attention_bwd(do, q, k, v, o, lse, None, None, 0.3)
    blk = original(37, 24, True, elem_bytes=4, ieee=True)  # (fp32 without TF32: the FMA tiles)
    assert launched["attn_bwd_dkdv_kernel"][0] == launched["attn_bwd_dkdv_kernel"][1]
    assert launched["attn_bwd_dq_kernel"][0] == (blk["BLOCK_M"], blk["BLOCK_N"], blk["num_warps"], blk["num_stages"])
    assert launched["attn_bwd_dq_kernel"][1] == (64, 32, 4, blk["num_stages"])
    torch.testing.assert_close(own[0], shared[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(own[1], shared[1]) and torch.equal(own[2], shared[2])
