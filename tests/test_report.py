"""mmfuse report: deterministic, one row per compiled config and arch, grids and waves as worked by hand."""

import pytest

from mmfuse import report
from mmfuse._aot import ARCHS, all_specs, checked_archs, compile_all

pytestmark = pytest.mark.xdist_group("aot")  # reuse the compile results of tests/test_aot.py


def test_report_is_deterministic_and_complete(tmp_path):
    text = report.render(compile_all())
    assert text == report.render(compile_all())
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | sm_" in line]
    archs = set(checked_archs())
    assert len(rows) == sum(len(set(s.archs) & archs) for s in all_specs())
    assert all(set(s.archs) <= set(ARCHS) for s in all_specs())
    assert not any(" | no | " in row and "| none |" not in row for row in rows)  # tensor-core configs load wide
    # LLaVA-1.5-7B, one image: 64x64 tiles -> 9 x 64 = 576 tiles, 5 waves of 132: 576 / 660 = 87%.
    assert "| llava-1.5-7b | 1 | 0 (1024->4096) | 576 x 4096 |" in text and "64x64 (576, 87%)" in text
    # Idefics2 at batch 1: 1 query block x 16 heads = 16 programs over 78 key blocks: 16/132 = 12%.
    assert "| idefics2-resampler | 1 | 16 (12%) |" in text
    # Its backward: dK/dV over ceil(4964 / 64) = 78 key blocks x 4 KV heads = 312 programs in 3 waves
    # (312 / 396 = 79%); dQ over 2 query blocks x 16 heads = 32 programs, with one sample nothing to split
    # (32 / 132); at 8 samples split 4 ways, 2 samples each: 128 programs in one wave (128 / 132 = 97%).
    # The forward's split minimises the modelled time: 6 splits of 13 key blocks, 96 programs in one wave
    # (16 x 78 / (132 x 13) = 73%): 8 splits (95%) would cost more in partials than they save. dQ at
    # batch 1 splits its keys 4 ways (20 blocks each): 128 programs, 32 x 78 / (132 x 20) = 95%.
    assert "| idefics2-resampler | 1 | 16 (12%) | 6 | 96 (73%) | 312 (79%) | 32 x 1 x 4 key splits (95%) |" in text
    assert "| idefics2-resampler | 8 | 128 (97%) | 1 | 128 (97%) | 2496 (100%) | 32 x 4 (97%) |" in text
    # The persistent forward at one image: 576 x 4096 at 128x64 is 5 x 64 = 320 tiles, 3 rounds of 132
    # programs; the last round keeps 320 - 264 = 56 SMs busy, as the last wave would.
    assert "| llava-1.5-7b | 1 | 0 (1024->4096) | 576 x 4096 | 128x64 | 320 | 3 | 56/132 (42%) |" in text
    for section in ("MLP projectors in training", "gated MLPs in training", "merged projectors",
                    "patch embedding in training",
                    "cross-attention in training"):
        assert f"## HBM bytes and launches, {section}" in text
    out = tmp_path / "report.md"
    assert report.main(str(out)) == 0 and out.read_text() == text


def test_launch_time_is_limited_by_the_sms_its_grid_can_use():
    # 8e9 FLOPs = 10 µs on all 132 SMs; a grid of 33 programs keeps a quarter of them busy: 40 µs.
    assert report.grid_efficiency(33) == pytest.approx(0.25)
    assert report.grid_efficiency(264) == 1.0 and report.grid_efficiency(133) == pytest.approx(133 / 264)
    assert report.launch_us(8e9, 6e6, report.grid_efficiency(33)) == pytest.approx(40 + 3)
    assert report.launch_us(8e6, 6e8, 0.25) == pytest.approx(200 + 3)  # bandwidth-bound either way


def test_flash_split_heuristic_as_worked_by_hand():
    """FlashAttention-2's forward split count, restated in ``report.flash_fwd_splits`` (264 slots: 2 x 132)."""
    # OpenFlamingo at batch 1: 8 heads x 1 block of 64 queries, 321 keys in 2 blocks of 256: 1 split keeps
    # 8/264 busy, 2 splits 16/264 (the best): 2.
    assert report.flash_fwd_splits(8, 264, 2) == 2
    # Idefics2 at batch 1: 16 programs, 4964 keys in 39 blocks of 128. Counts that do not change the blocks
    # per split are skipped (11, 12: 4 blocks, as 10); 13 (3 blocks each) keeps 208/264 = 79% busy, the
    # best any count reaches (39: 624 in 3 waves of 264 = 79% too), and no smaller one reaches 85% of it
    # (10: 160/264 = 61%): 13.
    assert report.flash_fwd_splits(16, 264, 39) == 13
    assert report.flash_fwd_splits(212, 264, 39) == 1  # 80% of the slots already: no split
    assert report.flash_fwd_splits(8, 264, 1) == 1     # one key block: nothing to split


def test_in_kernel_combine_section():
    lines = report.attention_combine_section()
    text = "\n".join(lines)
    assert "## Cross-attention forward: the in-kernel combine" in text
    # Idefics2 at batch 1: the same 6 splits, the merge's launch gone (2 -> 1); SDPA's flash splits 13 ways
    # (worked above). The times, from the traffic model launch by launch, agree with the launcher's own
    # model of the same forward (``fwd_modelled_us``, a separate formula); the README quotes them.
    from mmfuse.kernels import cross_attention as KA

    shape = (1, 1, 16, 4, 64, 4964, 96, 2, 6, 132)
    before, after = KA.fwd_modelled_us(*shape), KA.fwd_modelled_us(*shape, combine_in_kernel=True)
    assert (f"{before:.1f}", f"{after:.1f}") == ("10.3", "7.3")
    assert f"| idefics2-resampler | 1 | 6 → 6 | 2 → 1 | {before:.1f} → {after:.1f} |" in text and "(13)" in text
    rows = [line for line in lines if line.startswith("| ") and line.split("|")[2].strip().isdigit()]
    assert len(rows) == 9
    for row in rows:  # never slower than the combine launch, and never below SDPA as it launches
        cells = [c.strip() for c in row.strip("|").split("|")]
        before, after = map(float, cells[4].split(" → "))
        launched = [float(c.strip().rstrip("x")) for c in cells[7].split(",")]
        assert after <= before and min(launched) >= 1.0 and launched[1] >= launched[0]


def test_attention_baseline_reads_grouped_keys_in_place():
    """The cross-attention table's baseline is SDPA with ``enable_gqa`` (transformers' route without a mask):
    no copies of K and V. Worked by hand for Idefics2's resampler at batch 8 (16 query heads over 4 kv
    heads, 64 latents, 4964 keys, D = 96, bf16): q and o 2 x 8 x 16 x 64 x 96 x 2 B = 3.15 MB, K and V
    2 x 8 x 4 x 4964 x 96 x 2 B = 61.00 MB, lse 8 x 16 x 64 x 4 B = 0.03 MB: 64.18 MB. On repeated K, V
    (the old baseline, kept in the last column) the copies alone read 61 MB and write 244 MB."""
    lines = report.attention_traffic_section()
    text = "\n".join(lines)
    assert "| idefics2-resampler | 8 | 1 | 64.18 → " in text
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| ") and line.split("|")[2].strip().isdigit()}
    assert len(rows) == 9
    for (name, batch), cells in rows.items():
        fwd, all_ = float(cells[8].rstrip("x")), float(cells[10].rstrip("x"))
        rep_fwd, rep_all = (float(c.strip().rstrip("x")) for c in cells[11].split(","))
        if name == "idefics2-resampler":  # grouped: the copies made the old baseline slower
            assert rep_fwd > fwd and rep_all > all_
        else:  # nothing grouped: the two routes are one
            assert (rep_fwd, rep_all) == (fwd, all_)
    # the gqa route's backward still sums dK, dV over each head group (FlashAttention-2 writes them per
    # query head): its bytes exceed the forward's K and V
    s = next(x for x in report.ATTENTION_SHAPES if x.name == "idefics2-resampler")
    gqa, rep = report._sdpa_bwd_launches(s, 8, gqa=True), report._sdpa_bwd_launches(s, 8)
    kv, kv_rep = 8 * 4 * 4964 * 96 * 2, 8 * 16 * 4964 * 96 * 2
    assert len(gqa) == len(rep) == 6 and sum(x[1] for x in rep) - sum(x[1] for x in gqa) == 2 * (kv_rep - kv)
