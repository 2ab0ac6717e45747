"""Tile choice with dynamic token counts (kernels/_tuning.py): the GPU path of every GEMM launcher,
driven with 100 distinct token counts on meta tensors, the kernel launch and the timing step replaced
by recorders. No tile is ever timed by default; with MMFUSE_AUTOTUNE=1 each GEMM is timed once per
octave of the token count, however many distinct counts arrive."""

from __future__ import annotations

import random

import pytest
import torch

from mmfuse.kernels import _tuning
from mmfuse.kernels import linear as KL
from mmfuse.kernels import patch_embed as KP

def _token_counts(n=100, lo=64, hi=16384, seed=13):
    """n distinct token counts, log-uniform over [lo, hi], each rows x cols of a patch grid."""
    rng, out = random.Random(seed), set()
    while len(out) < n:
        m = int(lo * (hi / lo) ** rng.random())
        rows = max(1, int(m ** 0.5))
        out.add(rows * max(1, m // rows))
    return sorted(out)


#: 100 distinct token counts of native-resolution images, spread over nine octaves (2^6 .. 2^14).
TOKEN_COUNTS = _token_counts()
OCTAVES = len({(m - 1).bit_length() for m in TOKEN_COUNTS})  # counted here, not by the code under test


class _Recorder:
    """Stands for a jitted kernel: ``kernel[grid](*args, **meta)`` records the launch."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **meta: self.log.append((self.name, grid, meta.get("BLOCK_M"), meta.get("BLOCK_N")))


@pytest.fixture
def gpu_path(monkeypatch):
    """The launchers' GPU path on meta tensors: launches recorded, timings counted."""
    launches, timed = [], []

    def fake_bench(run):
        timed.append(run)
        run()  # the launch being timed
        return float(len(timed) % 3)  # any deterministic figure

    for mod in (KL, KP):
        monkeypatch.setattr(mod, "INTERPRET", False)
    monkeypatch.setattr(KL, "fused_gemm_kernel", _Recorder(launches, "linear"))
    monkeypatch.setattr(KP, "_kernels", {n: _Recorder(launches, n) for n in KP._kernels})
    monkeypatch.setattr(KP, "dw_combine_kernel", _Recorder([], "dw_combine"))  # dW's split-K sum: no tile
    monkeypatch.setattr(_tuning, "_bench", fake_bench)
    monkeypatch.setattr(KL, "TUNER", _tuning.TileChooser("linear"))
    monkeypatch.setattr(KP, "TUNERS", {n: _tuning.TileChooser(n) for n in KP.TUNERS})
    return launches, timed


def _linear_step(M, K=1024, N=4096):
    """Forward with the pre-activation saved, dX and dW + db of one Linear+GELU: three GEMMs."""
    x = torch.empty(M, K, device="meta", dtype=torch.bfloat16)
    w = torch.empty(N, K, device="meta", dtype=torch.bfloat16)
    b = torch.empty(N, device="meta", dtype=torch.bfloat16)
    y, h = KL.linear_fwd(x, w, b, "gelu", store_preact=True)
    KL.input_grad(y, w)
    KL.weight_grad(y, x, with_bias=True)


def _grid_for(M):
    """A native-resolution image of about M patch tokens: (rows, cols) of 14-pixel patches."""
    rows = max(1, int(M ** 0.5))
    return rows, max(1, M // rows)


def _patch_step(M, D=1024, P=14):
    """Forward (bias + pos), dpixels and dW + db of one CLIP-like patch embedding."""
    gh, gw = _grid_for(M)
    pix = torch.empty(1, 3, 1, gh * P, gw * P, device="meta", dtype=torch.bfloat16)
    w = torch.empty(D, 3, 1, P, P, device="meta", dtype=torch.bfloat16)
    b = torch.empty(D, device="meta", dtype=torch.bfloat16)
    pos = torch.empty(1, gh * gw, D, device="meta", dtype=torch.bfloat16).expand(1, -1, -1)
    out = KP.patch_embed_fwd(pix, w, b, pos)
    KP.patch_embed_dx(out, w, pix.shape)
    KP.patch_embed_dw(out, pix, w.shape, with_bias=True)


def test_token_counts_are_distinct_and_span_octaves():
    assert len(set(TOKEN_COUNTS)) == 100 and OCTAVES == 9, (len(set(TOKEN_COUNTS)), OCTAVES)
    assert all(_grid_for(m)[0] * _grid_for(m)[1] == m for m in TOKEN_COUNTS)


@pytest.mark.parametrize("step, gemms", [(_linear_step, 3), (_patch_step, 3)], ids=["linear", "patch_embed"])
def test_default_choice_never_times(gpu_path, monkeypatch, step, gemms):
    launches, timed = gpu_path
    monkeypatch.setattr(_tuning, "AUTOTUNE", False)
    for m in TOKEN_COUNTS:
        step(m)
    assert timed == [] and len(launches) == gemms * 100
    # The model's pick: the largest kept tile (M = 576 keeps 128x64, 64x128 and 64x64 for N = 4096).
    if step is _linear_step:
        launches.clear()
        step(576)
        assert [(bm, bn) for _, _, bm, bn in launches][0] == (128, 64)
        assert _tuning.largest_tile(KL.candidate_tiles(576, 4096, 132))[:2] == (128, 64)


@pytest.mark.parametrize("step", [_linear_step, _patch_step], ids=["linear", "patch_embed"])
def test_autotune_times_once_per_octave(gpu_path, monkeypatch, step):
    launches, timed = gpu_path
    monkeypatch.setattr(_tuning, "AUTOTUNE", True)
    for m in TOKEN_COUNTS:
        step(m)
    tuners = [KL.TUNER] if step is _linear_step else list(KP.TUNERS.values())
    tunings = sum(len(t.cache) for t in tuners)
    # Three GEMMs per step, each tuned at most once per octave of the token count (the dW of the
    # Linear has the tokens as its reduction length: bucketed the same way).
    assert 3 <= tunings <= 3 * OCTAVES
    assert len(timed) <= 4 * tunings  # at most four candidate tiles timed per tuning
    # A second pass over other counts in the same octaves times nothing more.
    before = len(timed)
    for m in TOKEN_COUNTS:
        step(m + 1 if _tuning.m_bucket(m + 1) == _tuning.m_bucket(m) else m)
    assert len(timed) == before


def test_bucket_is_the_next_power_of_two():
    assert [_tuning.m_bucket(m) for m in (0, 1, 2, 3, 576, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
