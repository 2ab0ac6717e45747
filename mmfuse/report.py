"""``mmfuse report``: the figures that can be known exactly without a GPU, as markdown.

1. Per kernel config and arch (sm_80, sm_90), from Triton's ahead-of-time compiler: registers, spill
   bytes, shared memory, tensor-core instruction, 128-bit global loads (16-byte cp.async / v4 / TMA)
   and the occupancy bound (CTAs per SM from registers and shared memory).
2. Per op x real model shape (``mmfuse.bench.shapes``), forward and backward: the launch grids the
   launchers would choose on an H100 (132 SMs) and their wave efficiency.
3. HBM bytes and launches against eager, in training (``mmfuse.traffic``, checked launch by launch
   against interpreted runs) for the MLP projectors, patch embedding and cross-attention; and the
   roofline time and predicted speedup they imply on an H100, each launch's compute capped by the
   SMs its grid keeps busy.

Every number is computed, none is timed: the same commit prints the same report on any machine.
"""

from __future__ import annotations

import sys

from mmfuse.bench.shapes import ATTENTION_SHAPES, GATED_SHAPES, MERGED_SHAPES, MLP_SHAPES, PATCH_SHAPES

SMS = 132
# H100 SXM bf16 dense FLOP/s and HBM B/s as measured on one (DESIGN.md), a launch's fixed cost in µs
# (assumed, stated in the table): the same figures the launchers' split rules model with.
from mmfuse.kernels._common import LAUNCH_US, PEAK_BYTES, PEAK_FLOPS  # noqa: E402


def launch_us(flops: float, hbm_bytes: float, sm_efficiency: float = 1.0) -> float:
    """One launch's lower-bound time on an H100: the binding one of compute and HBM, plus the fixed
    launch cost. ``sm_efficiency``: the share of the 132 SMs' work its grid can keep busy (wave
    efficiency, one program per SM at a time): a grid of 32 programs can use 32 SMs at most."""
    return max(flops / (PEAK_FLOPS * sm_efficiency), hbm_bytes / PEAK_BYTES) * 1e6 + LAUNCH_US


def grid_efficiency(programs: int, sms: int = SMS) -> float:
    """Programs of equal work over the waves they occupy, one per SM at a time."""
    from mmfuse.kernels._common import cdiv

    return programs / (cdiv(programs, sms) * sms) if programs else 1.0


def _step_times(base_fwd, base_bwd, ours_fwd, ours_bwd) -> tuple[float, float, float, float]:
    """(baseline forward, baseline forward+backward, mmfuse forward, mmfuse forward+backward) in µs.
    Launches: the baseline's (FLOPs, bytes) on a full GPU, mmfuse's (FLOPs, bytes, share of SMs busy)."""
    def step(launches):
        return sum(launch_us(*x) for x in launches)

    return step(base_fwd), step(base_fwd) + step(base_bwd), step(ours_fwd), step(ours_fwd) + step(ours_bwd)


def _hbm(traffic: dict) -> int:
    return sum(t.unique + t.stored for t in traffic.values())


def _l2(traffic: dict) -> int:
    return sum(t.loaded + t.stored for t in traffic.values())


_PER_LAUNCH_RULE = (f"Roofline per launch: max(FLOPs / ({PEAK_FLOPS / 1e12:.0f} TFLOP/s × the share of SMs its grid "
                    f"keeps busy), HBM bytes / {PEAK_BYTES / 1e12:.1f} TB/s) + {LAUNCH_US:.0f} µs, summed over a "
                    "step's launches; mmfuse's grids are the launchers' own, the baseline's kernels are assumed to "
                    "fill the GPU. Predicted speedup = baseline time / mmfuse time: a model, not a measurement.")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _largest(tiles):
    """The tile the launchers choose among the kept ones (kernels/_tuning.py): the largest."""
    from mmfuse.kernels._tuning import largest_tile

    return largest_tile(list(tiles))


def _patch_gemms(s, batch: int) -> dict[str, tuple[int, int]]:
    """Output (rows, cols) of the patch-embedding GEMMs' grids: forward (tokens x D), dpixels and dW
    (tokens x K, D x K) with K in the forward's run order, C·T·P·next_pow2(P) (dW stores its
    C·T·P·P real columns)."""
    from mmfuse.kernels._common import next_pow2

    M = s.tokens * batch
    k_runs = s.channels * s.temporal * s.patch * next_pow2(s.patch)
    return {"fwd": (M, s.dim), "dx": (M, k_runs), "dw": (s.dim, k_runs)}


def _attention_grids(s, batch: int) -> dict:
    """The grids the cross-attention launchers choose for shape ``s`` at ``batch`` (shared queries):
    the forward's programs before and after the key split, dK/dV's programs, dQ's programs (query
    blocks x heads, looping over the batch) and its batch split, with their wave efficiencies."""
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.kernels._common import cdiv

    blk = KA.gpu_blocks(s.queries, s.head_dim)
    bblk = KA.gpu_blocks(s.queries, s.head_dim, backward=True)
    programs = cdiv(s.queries, blk["BLOCK_M"]) * batch * s.heads
    key_blocks = cdiv(s.keys, blk["BLOCK_N"])
    splits = KA.choose_fwd_splits(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim, 2, SMS)
    dkdv = cdiv(s.keys, bblk["BLOCK_N"]) * batch * s.kv_heads
    dq = cdiv(s.queries, bblk["BLOCK_M"]) * s.heads
    dq_key_blocks = cdiv(s.keys, bblk["BLOCK_N"])
    sblk = KA.single_pass_blocks(s.queries, s.head_dim, gpu=True)
    single, dq_splits, dq_key_splits = KA.bwd_plan(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim, 2,
                                                   bblk, sblk, SMS)
    if single:  # dQ's programs at the single pass's tile (and no dK/dV launch)
        bblk = sblk
        dq = cdiv(s.queries, bblk["BLOCK_M"]) * s.heads
    dq_eff = KA.dq_efficiency(dq, batch, dq_key_blocks, dq_splits, dq_key_splits, SMS)
    return dict(blocks=(blk["BLOCK_M"], blk["BLOCK_N"]), bwd_blocks=(bblk["BLOCK_M"], bblk["BLOCK_N"]),
                programs=programs, unsplit_eff=KA.split_efficiency(programs, key_blocks, 1, SMS), splits=splits,
                launched=programs * cdiv(key_blocks, cdiv(key_blocks, splits)),
                fwd_eff=KA.split_efficiency(programs, key_blocks, splits, SMS),
                dkdv=dkdv, dkdv_eff=grid_efficiency(dkdv),
                dq=dq, dq_splits=dq_splits, dq_key_splits=dq_key_splits, dq_eff=dq_eff, single_pass=single)


def compile_section(reports) -> list[str]:
    lines = ["## Compiled kernel configs (Triton AOT, no GPU)", "",
             "Duplicated products: tensor-core products whose warps cover more of M or N than the tile holds, "
             "so surplus warps compute copies of it (``mmfuse._aot.replicated_dots``; 0 is the goal). Drained "
             "loops: loops that restart a nested loop's copy pipeline at every iteration "
             "(``mmfuse._aot.drained_loops``: dQ's loop over the batch, per sample).", "",
             "| kernel | variant | dtype | config | arch | regs | spill B | smem KB | tensor cores "
             "| 128-bit loads | grid | CTAs/SM | duplicated products | drained loops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (_, arch), r in sorted(reports.items(), key=lambda kv: kv[0]):
        s = r.spec
        wide = "TMA" if r.tma else ("cp.async 16B" if r.cp_async_16B else ("v4" if r.vec128_loads else "no"))
        if wide == "no" and arch not in s.wide_load_archs:
            wide = "no (known)"
        programs = dict(s.constexprs).get("NUM_PROGRAMS")  # the persistent kernels' program count
        grid = f"persistent ({programs})" if programs else "a program per tile"
        lines.append(f"| {s.kernel} | {s.variant} | {s.dtype} | {s.config} | sm_{arch} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes / 1024:.0f} | {r.tensor_core_instr} | {wide} | {grid} | "
                     f"{r.max_ctas_per_sm()} | {r.replicated_dots} | {r.drained_loops} |")
    return lines


def kept_tiles(tiles, rows: int, cols: int, efficiency) -> str:
    from mmfuse.kernels._common import cdiv

    return ", ".join(f"{t[0]}x{t[1]} ({cdiv(rows, t[0]) * cdiv(cols, t[1])}, "
                     f"{efficiency(rows, cols, t[0], t[1], SMS):.0%})" for t in tiles)


def waves_section() -> list[str]:
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels import patch_embed as KP

    lines = ["## Launch grids and wave efficiency on 132 SMs (model)", "",
             "### MLP projectors (`fused_gemm_kernel`, per layer; tiles kept for autotuning: tile (tiles, wave "
             "efficiency))", "",
             "| shape | images | layer | M x N | forward (M x N) | dX (M x K) | dW (N x K) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            for i, (k, n) in enumerate(zip(s.widths, s.widths[1:])):
                # forward and dX + GELU' (M x N, M x K), dW (N x K; db is a reduction beside it)
                cells = [kept_tiles(KL.candidate_tiles(r, c, SMS), r, c, KL.wave_efficiency)
                         for r, c in ((M, n), (M, k), (n, k))]
                lines.append(f"| {s.name} | {images} | {i} ({k}->{n}) | {M} x {n} | " + " | ".join(cells) + " |")
    lines += ["", "### The persistent (TMA) forward: the wave tail and the epilogue it overlaps (model; issue 14)", "",
              "`tma_gemm_kernel` runs min(132, tiles) programs, each walking every 132nd tile. Persistence does not "
              "shorten the tail: a program still runs ceil(tiles / 132) rounds, so the last round keeps the same "
              "share of SMs busy as the last wave of the one-tile-per-program grid (only splitting tiles, stream-K, "
              "would; not built). What it buys is overlap: with the flattened tile x K loop a program issues the "
              "next tile's loads during this tile's epilogue, hiding every epilogue but the last. Modelled per tile: "
              "mainloop = 2·BM·BN·K / (800 TFLOP/s / 132), epilogue = (C and, for hidden layers, the pre-activation "
              "stored; the bias) / (3 TB/s / 132); gain = hidden epilogues / non-persistent time. Measured once on an "
              "H200 (bench/NOTES.md): 391 against 338 TFLOP/s at LLaVA-1.5 x 8 images' first layer (+16%), where this "
              "model says +30%.", "",
              "| shape | images | layer | M x N | TMA tile | tiles | rounds | last round's SMs busy "
              "| epilogue / mainloop per tile | modelled gain |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            for i, (k, n) in enumerate(zip(s.widths, s.widths[1:])):
                bm, bn = _largest(KL.candidate_tiles(M, n, SMS, KL.tma_tiles(False)))[:2]
                tiles = _cdiv(M, bm) * _cdiv(n, bn)
                rounds = _cdiv(tiles, SMS)
                last = tiles - (rounds - 1) * SMS
                main = 2 * bm * bn * k / (PEAK_FLOPS / SMS)
                aux = i < len(s.widths) - 2  # hidden layers also save their pre-activation
                epi = ((2 if aux else 1) * bm * bn * 2 + bn * 2) / (PEAK_BYTES / SMS)  # bf16 stores, the bias
                gain = (rounds - 1) * epi / (rounds * (main + epi))
                lines.append(f"| {s.name} | {images} | {i} ({k}->{n}) | {M} x {n} | {bm}x{bn} | {tiles} | {rounds} | "
                             f"{last}/{SMS} ({last / SMS:.0%}) | {epi / main:.2f} | {gain:.1%} |")
    lines += ["", "### Patch embedding (`patch_embed_{fwd,dx,dw}_kernel`; tiles kept: tile (tiles, wave efficiency))",
              "", "| shape | batch | tokens x D | forward (tokens x D) | dpixels (tokens x K in run order) "
              "| dW (D x K) |", "| --- | --- | --- | --- | --- | --- |"]
    for s in PATCH_SHAPES:
        for batch in (1, 64):
            gemms = _patch_gemms(s, batch)
            cells = [kept_tiles(KP.candidate_tiles(g, r, c, SMS), r, c, KL.wave_efficiency)
                     for g, (r, c) in gemms.items()]
            (D, K), M = gemms["dw"], gemms["fwd"][0]
            tile = _largest(KP.candidate_tiles("dw", D, K, SMS))
            splits = KP.dw_splits(D, K, M, tile, 2, SMS)
            if splits > 1:  # the launcher's split-K over tokens, at its tile (efficiency with the token chunks)
                programs = _cdiv(D, tile[0]) * _cdiv(K, tile[1]) * splits
                cells[-1] += (f"; {tile[0]}x{tile[1]} split {splits} over tokens: {programs} programs "
                              f"({KP.dw_split_efficiency(D, K, M, tile, splits, SMS):.0%})")
            lines.append(f"| {s.name} | {batch} | {gemms['fwd'][0]} x {s.dim} | " + " | ".join(cells) + " |")
    lines += ["", "### Cross-attention (forward `attn_fwd_kernel` with split-KV; backward `attn_bwd_dkdv_kernel`, "
              "`attn_bwd_dq_kernel`, or the single pass of the latter; shared learnable queries)", "",
              "| shape | batch | fwd programs without split (efficiency) | splits | fwd programs (efficiency) "
              "| dK/dV programs (efficiency) | dQ programs x batch splits (efficiency) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            g = _attention_grids(s, batch)
            lines.append(f"| {s.name} | {batch} | {g['programs']} ({g['unsplit_eff']:.0%}) | {g['splits']} | "
                         f"{g['launched']} ({g['fwd_eff']:.0%}) | "
                         + ("none: single pass | " if g["single_pass"] else f"{g['dkdv']} ({g['dkdv_eff']:.0%}) | ")
                         + f"{g['dq']} x {g['dq_splits']}"
                         + (f" x {g['dq_key_splits']} key splits" if g["dq_key_splits"] > 1 else "")
                         + f" ({g['dq_eff']:.0%}) |")
    return lines


def _step_us(launches, ours: bool, tile_of) -> float:
    """A step's roofline time: the sum of its launches' (``mlp_traffic``-style ``per_launch`` entries);
    mmfuse's GEMMs at the wave efficiency of the tile ``tile_of(launch)`` its launcher picks, the
    baseline's kernels assumed to fill the GPU."""
    from mmfuse.kernels import linear as KL

    total = 0.0
    for x in launches:
        eff = 1.0
        if ours and x["rows"] is not None:
            bm, bn = tile_of(x)
            eff = KL.wave_efficiency(x["rows"], x["cols"], bm, bn, SMS)
        total += launch_us(x["flops"], x["hbm"], eff)
    return total


def traffic_section() -> list[str]:
    from mmfuse.kernels import linear as KL
    from mmfuse.traffic import mlp_traffic

    def largest_kept(rows, cols):
        return _largest(KL.candidate_tiles(rows, cols, SMS))[:2]

    def step_us(launches, ours: bool) -> float:
        return _step_us(launches, ours, lambda x: largest_kept(x["rows"], x["cols"]))

    lines = ["## HBM bytes and launches, MLP projectors in training (bf16; model, checked against "
             "interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse: the distinct bytes of each launch (re-reads of A/B tiles counted as L2 traffic, shown "
             "apart), each GEMM at the tile its launcher picks (the largest it keeps); eager: PyTorch's addmm + GELU + "
             "autograd (dW, db, dX, GELU' per layer), every kernel reading its inputs once and writing its outputs "
             "once.", "", _PER_LAUNCH_RULE, "",
             "| shape | images | fwd MB eager → mmfuse (L2 MB) | bwd MB eager → mmfuse (L2 MB) | launches fwd, bwd "
             "| fwd µs eager → mmfuse | fwd speedup | fwd+bwd µs eager → mmfuse | fwd+bwd speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            t = mlp_traffic(M, s.widths, largest_kept, 2)
            d = t["per_launch"]
            eager_fwd, ours_fwd = step_us(d["eager_fwd"], False), step_us(d["fwd"], True)
            eager_all, ours_all = eager_fwd + step_us(d["eager_bwd"], False), ours_fwd + step_us(d["bwd"], True)
            lines.append(
                f"| {s.name} | {images} | {t['eager_fwd']['hbm'] / 1e6:.1f} → {t['fwd']['hbm'] / 1e6:.1f} "
                f"({t['fwd']['l2'] / 1e6:.0f}) | {t['eager_bwd']['hbm'] / 1e6:.1f} → {t['bwd']['hbm'] / 1e6:.1f} "
                f"({t['bwd']['l2'] / 1e6:.0f}) | {t['eager_fwd']['launches']} → {t['fwd']['launches']}, "
                f"{t['eager_bwd']['launches']} → {t['bwd']['launches']} | {eager_fwd:.0f} → {ours_fwd:.0f} | "
                f"{eager_fwd / ours_fwd:.2f}x | {eager_all:.0f} → {ours_all:.0f} | {eager_all / ours_all:.2f}x |")
    return lines


def gated_traffic_section() -> list[str]:
    from mmfuse.kernels import linear as KL
    from mmfuse.traffic import gated_mlp_traffic

    def largest_kept(rows, cols, kind=None):
        tiles = KL.GATED_TILES[kind, 2] if kind else KL.GEMM_TILES
        return _largest(KL.candidate_tiles(rows, cols, SMS, tiles))[:2]

    def step_us(launches, ours: bool) -> float:
        return _step_us(launches, ours, lambda x: largest_kept(x["rows"], x["cols"], x["kind"]))

    lines = ["## HBM bytes and launches, gated MLPs in training (bf16; model, checked against interpreted runs "
             "at small sizes in tests/test_traffic.py)", "",
             "mmfuse (`mmfuse.gated_mlp`): forward = gate and up in one GEMM (x read once, act(g) * u in the "
             "epilogue, g and u saved) + down; backward = dW_down, db_down, [dG | dU] (dY @ W_down with the "
             "product's backward in its epilogue), [dW_gate; dW_up] (one GEMM), their biases (one reduction), dX "
             "over both sources (one GEMM); each GEMM at the tile its launcher picks (the gated GEMMs from "
             "`GATED_TILES`). Eager: transformers' `down(act(gate(x)) * up(x))` (two addmm, act, product, addmm) "
             "and autograd (down's dW, db, dH; dH * u, dH * a, act'; dW, db, dX of gate and up; dX_gate + "
             "dX_up), every kernel reading its inputs once and writing its outputs once.", "", _PER_LAUNCH_RULE, "",
             "| shape | images | fwd MB eager → mmfuse (ratio) | bwd MB eager → mmfuse (ratio) | launches fwd, bwd "
             "| fwd µs eager → mmfuse | fwd speedup | fwd+bwd µs eager → mmfuse | fwd+bwd speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in GATED_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            t = gated_mlp_traffic(M, s.features, s.hidden, s.out, largest_kept, 2, bias=s.bias)
            d = t["per_launch"]
            eager_fwd, ours_fwd = step_us(d["eager_fwd"], False), step_us(d["fwd"], True)
            eager_all, ours_all = eager_fwd + step_us(d["eager_bwd"], False), ours_fwd + step_us(d["bwd"], True)
            ef, eb, of, ob = (t[k]["hbm"] for k in ("eager_fwd", "eager_bwd", "fwd", "bwd"))
            lines.append(
                f"| {s.name} | {images} | {ef / 1e6:.1f} → {of / 1e6:.1f} ({of / ef:.2f}) | {eb / 1e6:.1f} → "
                f"{ob / 1e6:.1f} ({ob / eb:.2f}) | {t['eager_fwd']['launches']} → {t['fwd']['launches']}, "
                f"{t['eager_bwd']['launches']} → {t['bwd']['launches']} | {eager_fwd:.0f} → {ours_fwd:.0f} | "
                f"{eager_fwd / ours_fwd:.2f}x | {eager_all:.0f} → {ours_all:.0f} | {eager_all / ours_all:.2f}x |")
    return lines


def merged_traffic_section() -> list[str]:
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.traffic import merged_mlp_traffic, pooled_projector_traffic

    lines = ["## HBM bytes and launches, merged projectors (norm and token merge inside the first GEMM; bf16; "
             "model, checked against interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse (`mmfuse.merged_mlp`): the norm statistics (one read of x, 8 bytes per normalised row), the "
             "first GEMM reading x through the token table and normalising in its loads, the rest of the MLP; an "
             "RMSNorm from `FOLD_MIN_ROWS` (192) merged rows is folded instead: the statistics' launch also reads "
             "the first weight and writes gamma * W (2 N K bytes more: a pass over W against the in-load "
             "normalisation's 2.5x GEMM time on an H100), and the GEMM reads x raw, rstd scaling its accumulator; "
             "where the GEMM is large enough (`written_forward_applies`: the gather and the norm in the load "
             "measured 1.3-2.8x an unmapped GEMM on an H100, session 17), the forward instead writes the merged, "
             "normalised operand once (a row-wise pass, 2 M K bytes) and runs the first GEMM unmapped: more "
             "bytes, less time (`MMFUSE_MERGED_FORWARD=in-load` keeps the operand unwritten); "
             "backward: the later layers as `mlp`, the first layer's dW (x through the table again), db, dA "
             "stored through the table, one row-wise norm backward. GEMM tiles 128x128 (the mapped GEMM's "
             "largest); distinct bytes per launch. Eager: the module's code: the norm (F.layer_norm: one kernel; "
             "RMSNorm as transformers writes it: 7 kernels in fp32), the pixel shuffle's two permute copies (Qwen's merge is a "
             "view), the MLP, autograd through all of it. Training forward saves the pre-activation; inference "
             "does not. Aya Vision's gated form: gate and up from one read of the merged operand, [dG | dU] in "
             "the down layer's dX epilogue, one dW and one dA GEMM over both halves; eager runs the chunked "
             "Linear, SiLU, the product and the second Linear. Gemma 3 (average pooling of 16 tokens): one "
             "pool-and-norm kernel writes the (M, C) pooled rows the GEMM reads (gathering 16 tokens inside the "
             "GEMM would load each of them once per output-column tile); eager runs the grid's contiguous copy, "
             "AvgPool2d, Gemma3RMSNorm's fp32 passes and the matmul.", "",
             "| shape | images | fwd MB eager → mmfuse, training (ratio) | inference (ratio) | bwd MB eager → "
             "mmfuse (ratio) | launches fwd, bwd |",
             "| --- | --- | --- | --- | --- | --- |"]
    bk = KM.MAPPED_TILES[0][2]
    for s in MERGED_SHAPES:
        for images in (1, 8):
            kw = dict(norm=s.norm, post=s.norm_after_merge, table=s.table, bk=KM.MAPPED_GATED_TILES[0][2] if s.gated
                      else bk, gated=s.gated, bias=s.bias)
            T = s.tokens * images
            if s.pool:  # Gemma 3: the pool-and-norm kernel, then the GEMM (the same bytes in inference)
                t = inf = pooled_projector_traffic(T, s.channels, s.group, s.widths[0], (128, 128), 2, norm=s.norm)
            else:
                t = merged_mlp_traffic(T, s.channels, s.group, s.widths, (128, 128), 2, **kw)
                inf = merged_mlp_traffic(T, s.channels, s.group, s.widths, (128, 128), 2, training=False, **kw)
            ef, eb = t["eager_fwd"]["hbm"], t["eager_bwd"]["hbm"]
            of, ob, oi = t["fwd"]["hbm"], t["bwd"]["hbm"], inf["fwd"]["hbm"]
            lines.append(
                f"| {s.name} | {images} | {ef / 1e6:.1f} → {of / 1e6:.1f} ({of / ef:.2f}) | {oi / 1e6:.1f} "
                f"({oi / ef:.2f}) | {eb / 1e6:.1f} → {ob / 1e6:.1f} ({ob / eb:.2f}) | "
                f"{t['eager_fwd']['launches']} → {t['fwd']['launches']}, {t['eager_bwd']['launches']} → "
                f"{t['bwd']['launches']} |")
    return lines


def patch_traffic_section() -> list[str]:
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.traffic import patch_embed_bwd_traffic, patch_embed_fwd_traffic

    lines = ["## HBM bytes and launches, patch embedding in training (bf16, bias and a shared pos_embed, every "
             "input requiring grad; model, checked against interpreted runs at small sizes in "
             "tests/test_traffic.py)", "",
             "mmfuse: the distinct bytes of each launch. Forward: one launch, after a copy packing the weight into "
             "16-wide patch rows when P is not a power of two (on every call, as the functional API and the modules "
             "by default do: `cache_packed_weight` keeps it, unsafe under writes through `.data`). Backward: dpixels "
             "(a GEMM over the packed weight, stored as a permutation), dW (one GEMM gathering the patches "
             "again; where the modelled time says so, its token loop split S ways into fp32 partials that one "
             "more launch sums in split order: \"split S\"), dpos (a batch sum, which also stores its blocks' "
             "fp32 column sums) and db (one torch sum of those). The forward and dpixels multiply the run padding too (K = C·T·P·"
             "next_pow2(P): +14% FLOPs at P = 14). Tiles: the one the launcher picks per GEMM (the largest it keeps), with its wave "
             "efficiency. Eager: conv (+bias) reading pixels and weight once and writing (B, D, N), then "
             "`+ pos_embed` reading that and writing (B, N, D); backward: a contiguous copy of the transposed "
             "gradient, cuDNN dgrad and wgrad, the bias-gradient and pos-gradient reductions, each kernel reading "
             "its inputs once and writing its outputs once.", "", _PER_LAUNCH_RULE, "",
             "| shape | batch | fwd MB eager → mmfuse (L2 MB) | bwd MB eager → mmfuse (L2 MB) | launches fwd, bwd "
             "| SMs busy fwd / dpixels / dW | fwd µs eager → mmfuse | fwd speedup | fwd+bwd µs eager → mmfuse "
             "| fwd+bwd speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in PATCH_SHAPES:
        for batch in (1, 64):
            F, T, P, C, D, e = s.frames, s.temporal, s.patch, s.channels, s.dim, 2
            tokens = s.tokens
            gemms = _patch_gemms(s, batch)
            (M, _), (_, k_runs) = gemms["fwd"], gemms["dx"]
            K = C * T * P * P
            tiles, eff = {}, {}
            for gemm, (rows, cols) in gemms.items():
                tiles[gemm] = _largest(KP.candidate_tiles(gemm, rows, cols, SMS))[:3]
                eff[gemm] = KL.wave_efficiency(rows, cols, tiles[gemm][0], tiles[gemm][1], SMS)
            # dW splits its token loop as its launcher does (the modelled-time rule of kernels/patch_embed.py);
            # its efficiency counts the edge tiles and the token chunks too.
            splits = KP.dw_splits(D, k_runs, M, tiles["dw"], e, SMS)
            eff["dw"] = KP.dw_split_efficiency(D, k_runs, M, tiles["dw"], splits, SMS)
            fwd = patch_embed_fwd_traffic(batch, C, *s.image, P, D, tiles["fwd"], e, T=T, F=F)
            bwd = patch_embed_bwd_traffic(batch, C, *s.image, P, D, tiles, e, T=T, F=F, dw_splits=splits)
            x, w, out, pos = batch * C * F * s.image[0] * s.image[1] * e, D * K * e, M * D * e, tokens * D * e
            flops, flops_runs = 2 * M * D * K, 2 * M * D * k_runs
            eager_fwd = [(flops, x + w + D * e + out), (0, 2 * out + pos)]                    # conv, + pos
            eager_bwd = [(0, 2 * out), (flops, out + w + x), (flops, out + x + w), (0, out + D * e),  # copy, dgrad,
                         (0, out + pos)]                                                        # wgrad, db, dpos
            ours_fwd = [(flops_runs, _hbm(fwd), eff["fwd"])]
            pack = 0
            if k_runs != K or K % KP.PACK_ALIGN:  # the weight packed into runs first (a copy: read, write)
                pack = w + D * _cdiv(k_runs, KP.PACK_ALIGN) * KP.PACK_ALIGN * e
                ours_fwd.insert(0, (0, pack, 1.0))
            ours_bwd = [(flops_runs, _hbm(bwd["dx"]), eff["dx"]), (flops, _hbm(bwd["dw"]), eff["dw"]),
                        (0, _hbm(bwd["batch_sum"]), 1.0)]
            if splits > 1:
                ours_bwd.append((0, _hbm(bwd["dw_combine"]), 1.0))
            ours_bwd.append((0, _hbm(bwd["bias_sum"]), 1.0))  # db from the batch sum's column sums
            t_eager_fwd, t_eager, t_fwd, t_all = _step_times(eager_fwd, eager_bwd, ours_fwd, ours_bwd)
            lines.append(
                f"| {s.name} | {batch} | {sum(b for _, b in eager_fwd) / 1e6:.1f} → "
                f"{sum(b for _, b, _ in ours_fwd) / 1e6:.1f} "
                f"({(_l2(fwd) + pack) / 1e6:.0f}) | {sum(b for _, b in eager_bwd) / 1e6:.1f} → "
                f"{sum(_hbm(t) for t in bwd.values()) / 1e6:.1f} ({sum(_l2(t) for t in bwd.values()) / 1e6:.0f}) | "
                f"{len(eager_fwd)} → {len(ours_fwd)}, {len(eager_bwd)} → {len(ours_bwd)} | "
                f"{eff['fwd']:.0%} / {eff['dx']:.0%} / {eff['dw']:.0%}{f' (split {splits})' if splits > 1 else ''} | "
                f"{t_eager_fwd:.0f} → {t_fwd:.0f} | "
                f"{t_eager_fwd / t_fwd:.2f}x | {t_eager:.0f} → {t_all:.0f} | {t_eager / t_all:.2f}x |")
    return lines


def _attention_fwd_launches(fwd: dict, flops: float, eff: float, in_kernel: bool = False):
    """(launches, µs added) of mmfuse's forward from its traffic (``attention_fwd_traffic``): one launch
    unsplit; split, the split kernel writing the fp32 partials, then the merge reading them back and
    writing o and lse, by a second launch or (``in_kernel``) in the same launch's tail, whose bytes are
    added after the roofline of its work (the merge waits for every split of its query block)."""
    if "o_partial" not in fwd:
        return [(flops, _hbm(fwd), eff)], 0.0
    main = sum(fwd[n].unique for n in ("q", "k", "v")) + fwd["o_partial"].stored + fwd["lse_partial"].stored
    tail = fwd["o_partial"].unique + fwd["lse_partial"].unique + fwd["o"].stored + fwd["lse"].stored
    if in_kernel:
        return [(flops, main, eff)], tail / PEAK_BYTES * 1e6
    return [(flops, main, eff), (0, tail, 1.0)], 0.0


def _sdpa_sizes(s, batch: int, e: int):
    """(group, head dim, query rows, K or V bytes, their bytes repeated to the query heads, FLOPs of one
    matrix product) of attention shape ``s`` at ``batch``: what SDPA's launches are counted from."""
    hd = s.head_dim
    return (s.heads // s.kv_heads, hd, batch * s.heads * s.queries, batch * s.kv_heads * s.keys * hd * e,
            batch * s.heads * s.keys * hd * e, 2 * batch * s.heads * s.queries * s.keys * hd)


def _sdpa_fwd_launches(s, batch: int, e: int = 2, acc: int = 4, eff: float = 1.0, gqa: bool = False) -> list:
    """SDPA's forward on transformers' inputs: one fused kernel reading q, K, V once and writing o and lse,
    its grid keeping ``eff`` of the SMs busy. Grouped heads: with ``gqa`` (`enable_gqa=True`, transformers'
    route when no mask is given) the kernel reads each kv head's K and V in place; without it (a mask
    given, or a backend without GQA) the `repeat_interleave` copies of K and V come first, and the kernel
    reads the copies."""
    group, hd, rows, kv, kv_rep, pair = _sdpa_sizes(s, batch, e)
    if gqa or group == 1:
        return [(2 * pair, 2 * rows * hd * e + 2 * kv + rows * acc, eff)]
    return [(0, kv + kv_rep)] * 2 + [(2 * pair, 2 * rows * hd * e + 2 * kv_rep + rows * acc, eff)]


def _sdpa_bwd_launches(s, batch: int, e: int = 2, acc: int = 4, gqa: bool = False) -> list:
    """SDPA's backward as FlashAttention-2 runs it: dO·O with a zeroed fp32 dQ accumulator; the main kernel
    (5 matrix products; its dQ atomics counted as one fp32 read and write) writing dK and dV per query
    head; the dQ conversion; then, grouped, the sum of the per-query-head dK and dV over each group (with
    ``gqa`` FlashAttention-2's own sum of its expanded dK, dV; without, the gradient of `repeat_interleave`:
    the same bytes); and the sum behind the queries' `expand` over the batch. With ``gqa`` the main kernel
    reads K and V in place rather than their copies."""
    group, hd, rows, kv, kv_rep, pair = _sdpa_sizes(s, batch, e)
    q_o, acc_q = rows * hd * e, rows * hd * acc
    kv_read = kv if gqa else kv_rep
    launches = [(0, 2 * q_o + rows * acc + acc_q),                                         # dO·O, zero dQ acc
                (5 * pair, q_o + 2 * kv_read + q_o + 2 * rows * acc + 2 * kv_rep + 2 * acc_q),  # main
                (0, acc_q + q_o)]                                                           # dQ conversion
    launches += [(0, kv_rep + kv)] * (2 if group > 1 else 0)                               # dK, dV group sums
    launches += [(0, q_o + s.heads * s.queries * hd * e)] * (batch > 1)                    # expand's gradient
    return launches


def attention_traffic_section() -> list[str]:
    from mmfuse.traffic import attention_bwd_traffic, attention_fwd_traffic

    lines = ["## HBM bytes and launches, cross-attention in training (bf16, shared learnable queries, no padding; "
             "model, checked against interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse: `attn_fwd_kernel` with the split count the launcher chooses, merging its split partials in "
             "the same launch's tail (the default; the merge's bytes added after its work); backward: delta, dK/dV (one program per key block and KV head: 4 matrix products), dQ (one "
             "program per query block and head, looping over its share of the batch when the queries are shared, "
             "the batch split like the forward's keys: 3 matrix products, recomputing P and dP), plus the sum of "
             "dQ's fp32 partials when split; or, without query-head groups and with every query in one block, "
             "where modelled faster, the single pass (dQ's programs also write dK, dV and form delta: 5 matrix "
             "products, K and V read once; dK/dV column —); distinct bytes per launch. Baseline: SDPA (flash) with "
             "`enable_gqa` (transformers' route when no mask reaches SDPA, on torch >= 2.5: in 5.x's eager forward "
             "without padding; under tracing or with padding a mask is passed; each kv head's K and V read "
             "in place) and the queries expanded over the batch, each kernel reading its inputs once; its backward "
             "as FlashAttention-2 runs it (dO·O with a zeroed fp32 dQ accumulator; the main kernel with 5 matrix "
             "products, its dQ atomics counted as one fp32 read and write, dK and dV written per query head; the "
             "dQ conversion), then the sums of dK and dV over each head group and the sum behind `expand`. Last "
             "column: against SDPA on K and V repeated to the query heads (`repeat_interleave`: transformers' "
             "route when a mask is given; the same when nothing is grouped).", "", _PER_LAUNCH_RULE, "",
             "| shape | batch | splits | fwd MB SDPA → mmfuse | bwd MB SDPA → mmfuse | launches fwd, bwd "
             "| SMs busy fwd / dKdV / dQ | fwd µs SDPA → mmfuse | fwd speedup | fwd+bwd µs SDPA → mmfuse "
             "| fwd+bwd speedup | vs SDPA on repeated K, V: fwd, fwd+bwd |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            e, acc, hd = 2, 4, s.head_dim
            g = _attention_grids(s, batch)
            splits, fwd_eff, dkdv_eff, dq_eff = g["splits"], g["fwd_eff"], g["dkdv_eff"], g["dq_eff"]
            fwd = attention_fwd_traffic(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, hd, g["blocks"], splits, e)
            bwd = attention_bwd_traffic(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, hd, g["bwd_blocks"], e,
                                        dq_splits=g["dq_splits"], dq_key_splits=g["dq_key_splits"],
                                        single_pass=g["single_pass"])
            pair = 2 * batch * s.heads * s.queries * s.keys * hd  # one matrix product, all heads and samples
            sdpa_fwd, sdpa_bwd = _sdpa_fwd_launches(s, batch, e, acc, gqa=True), _sdpa_bwd_launches(s, batch, e, acc, True)
            rep_fwd, rep_bwd = _sdpa_fwd_launches(s, batch, e, acc), _sdpa_bwd_launches(s, batch, e, acc)
            # the default merges split partials in the same launch's tail (MMFUSE_SPLIT_COMBINE=auto)
            ours_fwd, merge_us = _attention_fwd_launches(fwd, 2 * pair, fwd_eff, in_kernel=True)
            if g["single_pass"]:  # one launch: dQ's programs also write dK, dV and form delta
                ours_bwd = [(5 * pair, _hbm(bwd["dq"]), dq_eff)]
            else:
                ours_bwd = [(0, _hbm(bwd["delta"]), 1.0), (4 * pair, _hbm(bwd["dkdv"]), dkdv_eff),
                            (3 * pair, _hbm(bwd["dq"]), dq_eff)]
            if "dq_sum" in bwd:  # the fp32 partials of a batch-split dQ, summed by one torch reduction
                ours_bwd.append((0, _hbm(bwd["dq_sum"]), 1.0))
            t_sdpa_fwd, t_sdpa, t_fwd, t_all = _step_times(sdpa_fwd, sdpa_bwd, ours_fwd, ours_bwd)
            t_rep_fwd, t_rep, _, _ = _step_times(rep_fwd, rep_bwd, ours_fwd, ours_bwd)
            t_fwd, t_all = t_fwd + merge_us, t_all + merge_us
            lines.append(
                f"| {s.name} | {batch} | {splits} | {sum(x[1] for x in sdpa_fwd) / 1e6:.2f} → {_hbm(fwd) / 1e6:.2f} "
                f"| {sum(b for _, b in sdpa_bwd) / 1e6:.2f} → {sum(_hbm(t) for t in bwd.values()) / 1e6:.2f} | "
                f"{len(sdpa_fwd)} → {len(ours_fwd)}, {len(sdpa_bwd)} → {len(ours_bwd)} | "
                f"{fwd_eff:.0%} / {'—' if g['single_pass'] else f'{dkdv_eff:.0%}'} / {dq_eff:.0%} | "
                f"{t_sdpa_fwd:.0f} → {t_fwd:.0f} | "
                f"{t_sdpa_fwd / t_fwd:.2f}x | {t_sdpa:.0f} → {t_all:.0f} | {t_sdpa / t_all:.2f}x | "
                f"{t_rep_fwd / t_fwd:.2f}x, {t_rep / t_all:.2f}x |")
    return lines


def flash_fwd_splits(programs: int, slots: int, key_blocks: int, max_splits: int = 128) -> int:
    """The key splits of FlashAttention-2's forward as PyTorch's SDPA launches it (``flash_api.cpp``:
    ``set_params_splitkv`` calls ``num_splits_heuristic`` with batch x heads x 64-query blocks, twice
    the SM count, key blocks of 256 / 128 / 64 at D <= 64 / 128 / 256), restated: no split when the
    programs fill 80% of the slots; else, among split counts up to min(max_splits, slots, key
    blocks) that change the blocks per split, the fewest reaching 85% of the best wave efficiency."""
    if programs >= 0.8 * slots or key_blocks <= 1:
        return 1
    top = min(max_splits, slots, key_blocks)
    eligible = [n for n in range(1, top + 1) if n == 1 or _cdiv(key_blocks, n) != _cdiv(key_blocks, n - 1)]

    def eff(n):
        waves = programs * n / slots
        return waves / -(-waves // 1)

    best = max(eff(n) for n in eligible)
    return next(n for n in eligible if eff(n) >= 0.85 * best)


def attention_combine_section() -> list[str]:
    """The split forward with its merge in a second launch against the merge in the same launch at the
    in-kernel model's split count (MMFUSE_SPLIT_COMBINE=kernel), against SDPA modelled two ways: the
    idealised kernel of the table above, and its backends as they launch."""
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.traffic import attention_fwd_traffic

    lines = ["## Cross-attention forward: the in-kernel combine, and SDPA as it launches (bf16, shared queries, "
             "no padding; model)", "",
             "mmfuse: the split count the launcher takes with the merge in a second launch "
             "(`MMFUSE_SPLIT_COMBINE=launch`; the default, \"auto\", takes the same count and merges in the "
             "kernel, as the table above models) and with the merge in the split kernel at the in-kernel "
             "model's count (`MMFUSE_SPLIT_COMBINE=kernel`: the last split of each query block merges the fp32 "
             "partials; on an H100 its extra splits measured slower at OpenFlamingo's shape); the in-kernel merge "
             "is the same bytes, read in the launch's tail after its split's work (added, not overlapped), "
             "and no second launch. SDPA, idealised: the table above (one launch filling the GPU). SDPA as "
             "launched, the faster of its two fused backends at these shapes: flash (FlashAttention-2) "
             "splits the keys by its own heuristic (`flash_fwd_splits`) into fp32 partials merged by a "
             "second kernel, its programs 64 queries per split (128 unsplit, 64 past D = 128); "
             "memory-efficient does not split: one program per 64 queries and head. Flash with `enable_gqa` "
             "(K and V in place, as above); memory-efficient on K and V repeated to the query heads when "
             "grouped (`repeat_interleave`: it takes no `enable_gqa` with unequal head counts, so that is the "
             "masked route), and the faster of the two is taken.", "", _PER_LAUNCH_RULE, "",
             "| shape | batch | mmfuse splits, combine launch → in kernel | launches | mmfuse fwd µs, combine "
             "launch → in kernel | SDPA fwd µs: idealised / flash (splits) / mem-efficient | in kernel vs "
             "idealised | vs SDPA as launched: combine launch, in kernel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            e, acc, hd = 2, 4, s.head_dim
            g = _attention_grids(s, batch)
            blk = KA.gpu_blocks(s.queries, hd)
            key_blocks = _cdiv(s.keys, blk["BLOCK_N"])
            pair = 2 * batch * s.heads * s.queries * s.keys * hd
            rows = batch * s.heads * s.queries
            ideal = sum(launch_us(*x) for x in _sdpa_fwd_launches(s, batch, e, acc, gqa=True))
            m_blocks = _cdiv(s.queries, 64)
            fa_splits = flash_fwd_splits(batch * s.heads * m_blocks, 2 * SMS, _cdiv(s.keys, 256 if hd <= 64 else
                                                                                   128 if hd <= 128 else 64))
            if fa_splits == 1:
                unsplit_rows = 128 if hd <= 128 else 64
                flash = _sdpa_fwd_launches(s, batch, e, acc, grid_efficiency(batch * s.heads * _cdiv(s.queries,
                                                                                                     unsplit_rows)),
                                           gqa=True)
            else:  # the split kernel writes fp32 partials instead of o and lse; a second kernel merges them
                partials = fa_splits * rows * (hd + 1) * acc
                [(flops, one, _)] = _sdpa_fwd_launches(s, batch, e, acc, gqa=True)
                flash = [(flops, one - rows * (hd * e + acc) + partials,
                          grid_efficiency(batch * s.heads * m_blocks * fa_splits)),
                         (0, partials + rows * (hd * e + acc), 1.0)]
            t_flash = sum(launch_us(*x) for x in flash)
            t_eff = sum(launch_us(*x) for x in _sdpa_fwd_launches(s, batch, e, acc,
                                                                  grid_efficiency(batch * s.heads * m_blocks)))

            def ours(splits, in_kernel):
                fwd = attention_fwd_traffic(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, hd,
                                            (blk["BLOCK_M"], blk["BLOCK_N"]), splits, e)
                return _attention_fwd_launches(fwd, 2 * pair, KA.split_efficiency(g["programs"], key_blocks, splits,
                                                                                  SMS), in_kernel)

            split_k = KA.choose_fwd_splits(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, hd, 2, SMS, in_kernel=True)
            launches_l, extra_l = ours(g["splits"], False)
            launches_k, extra_k = ours(split_k, True)
            t_l = sum(launch_us(*x) for x in launches_l) + extra_l
            t_k = sum(launch_us(*x) for x in launches_k) + extra_k
            best = min(t_flash, t_eff)
            lines.append(
                f"| {s.name} | {batch} | {g['splits']} → {split_k} | {len(launches_l)} → {len(launches_k)} | "
                f"{t_l:.1f} → {t_k:.1f} | {ideal:.1f} / {t_flash:.1f} ({fa_splits}) / {t_eff:.1f} | "
                f"{ideal / t_k:.2f}x | {best / t_l:.2f}x, {best / t_k:.2f}x |")
    return lines


def attention_block_section() -> list[str]:
    """The forward by the key-block model (``KA.fwd_block_bound_us``) beside its roofline: the roofline was
    ~6x optimistic against the H100 (Idefics2's resampler at batch 8: 24 µs modelled, 144 measured)."""
    from mmfuse.kernels import cross_attention as KA

    lines = ["## Cross-attention forward: the roofline against the key-block model (bf16, shared queries, no "
             "padding; model)", "",
             "Roofline: the tables above (FLOPs at the grid's wave efficiency, or bytes, plus a launch). Key-block "
             "model: waves of programs (one per SM) x the key blocks each walks x µs per block "
             f"(`KEY_BLOCK_US`, by stages and warps: {KA.KEY_BLOCK_US[2, 8]} at 2 stages, "
             f"{KA.KEY_BLOCK_US[3, 8]} / {KA.KEY_BLOCK_US[3, 4]} at 3 with 8 / 4 warps, each fitted to an H100 "
             "measurement at the 64 x 64 x 128 tile), scaled by the tile's multiply-adds, plus a launch, and never "
             "below the roofline. At 2 stages it came within 30% of the other three H100 points (bench/NOTES.md, "
             "session 18). Splits and tiles: the launcher's. One program per SM: at 4 warps two fit (at batch 64 "
             "the model says 583 µs where 403 were measured; bench/NOTES.md, session 20).", "",
             "| shape | batch | splits | roofline µs | key-block model µs, 2 stages | 3 stages (the default) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            blk = KA.gpu_blocks(s.queries, s.head_dim)
            splits = KA.choose_fwd_splits(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim, 2, SMS, blk)
            roof = KA.fwd_modelled_us(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim, 2, splits, SMS,
                                      blk, combine_in_kernel=True)
            tiles = KA.gpu_blocks(s.queries, s.head_dim, combine=splits > 1)  # (the launcher's under "auto")
            t2, t3 = (max(roof, KA.fwd_block_bound_us(batch, s.heads, s.queries, s.keys, s.head_dim, splits, SMS,
                                                      tiles, st)) for st in (2, 3))
            lines.append(f"| {s.name} | {batch} | {splits} | {roof:.1f} | {t2:.1f} | {t3:.1f} |")
    return lines


def render(reports=None, progress=None) -> str:
    """The whole report as markdown (``reports``: ``mmfuse._aot.compile_all()`` by default;
    ``progress`` gets a line now and then while that compiles)."""
    if reports is None:
        from mmfuse._aot import compile_all

        reports = compile_all(progress=progress)
    head = ["# mmfuse report: exact figures without a GPU", "",
            "Computed, not timed: compile figures from Triton's AOT compiler for sm_80 / sm_90, launch grids "
            "from the launchers' own tile and split rules on an H100's 132 SMs.", ""]
    return "\n".join(head + compile_section(reports) + [""] + waves_section() + [""] + traffic_section()
                     + [""] + gated_traffic_section() + [""] + merged_traffic_section() + [""] + patch_traffic_section() + [""] + attention_traffic_section()
                     + [""] + attention_combine_section() + [""] + attention_block_section()) + "\n"


def main(out: str | None = None) -> int:
    # Progress goes to stderr: stdout may be the report itself.
    text = render(progress=lambda line: print(f"mmfuse report: {line}", file=sys.stderr, flush=True))
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"mmfuse report: written to {out}")
    else:
        sys.stdout.write(text)
    return 0
