"""``mmfuse report``: the figures that can be known exactly without a GPU, as markdown.

1. Per kernel config and arch (sm_80, sm_90), from Triton's ahead-of-time compiler: registers, spill
   bytes, shared memory, tensor-core instruction, 128-bit global loads (16-byte cp.async / v4 / TMA)
   and the occupancy bound (CTAs per SM from registers and shared memory).
2. Per op x real model shape (``mmfuse.bench.shapes``): the launch grid the launchers would choose on
   an H100 (132 SMs) and its wave efficiency.

Every number is computed, none is timed: the same commit prints the same report on any machine.
(The GPU benchmark suite and the byte counter checked against interpreted runs are issue 5's
remaining work; see bench/NOTES.md.)
"""

from __future__ import annotations

import sys

from mmfuse.bench.shapes import ATTENTION_SHAPES, MLP_SHAPES, PATCH_SHAPES

SMS = 132


def compile_section(reports) -> list[str]:
    lines = ["## Compiled kernel configs (Triton AOT, no GPU)", "",
             "| kernel | variant | dtype | config | arch | regs | spill B | smem KB | tensor cores "
             "| 128-bit loads | CTAs/SM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (_, arch), r in sorted(reports.items(), key=lambda kv: kv[0]):
        s = r.spec
        wide = "TMA" if r.tma else ("cp.async 16B" if r.cp_async_16B else ("v4" if r.vec128_loads else "no"))
        lines.append(f"| {s.kernel} | {s.variant} | {s.dtype} | {s.config} | sm_{arch} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes / 1024:.0f} | {r.tensor_core_instr} | {wide} | "
                     f"{r.max_ctas_per_sm()} |")
    return lines


def waves_section() -> list[str]:
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.kernels._common import cdiv

    lines = ["## Launch grids and wave efficiency on 132 SMs (model)", "",
             "### MLP projectors (`fused_gemm_kernel`, forward, per layer; tiles kept for autotuning)", "",
             "| shape | images | layer | M x N | tiles kept (tiles, wave efficiency) |",
             "| --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            for i, (k, n) in enumerate(zip(s.widths, s.widths[1:])):
                kept = KL.candidate_tiles(M, n, SMS)
                cells = ", ".join(f"{t[0]}x{t[1]} ({cdiv(M, t[0]) * cdiv(n, t[1])}, "
                                  f"{KL.wave_efficiency(M, n, t[0], t[1], SMS):.0%})" for t in kept)
                lines.append(f"| {s.name} | {images} | {i} ({k}->{n}) | {M} x {n} | {cells} |")
    lines += ["", "### Patch embedding (`patch_embed_fwd_kernel`, forward)", "",
              "| shape | batch | tokens x D | tiles kept (tiles, wave efficiency) |", "| --- | --- | --- | --- |"]
    for s in PATCH_SHAPES:
        for batch in (1, 64):
            M = s.tokens * batch
            kept = KP.candidate_tiles("fwd", M, s.dim, SMS)
            cells = ", ".join(f"{t[0]}x{t[1]} ({cdiv(M, t[0]) * cdiv(s.dim, t[1])}, "
                              f"{KL.wave_efficiency(M, s.dim, t[0], t[1], SMS):.0%})" for t in kept)
            lines.append(f"| {s.name} | {batch} | {M} x {s.dim} | {cells} |")
    lines += ["", "### Cross-attention (`attn_fwd_kernel`, split-KV)", "",
              "| shape | batch | programs without split (efficiency) | splits | programs (efficiency) |",
              "| --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            blk = KA.gpu_blocks(s.queries, s.head_dim)
            programs = cdiv(s.queries, blk["BLOCK_M"]) * batch * s.heads
            key_blocks = cdiv(s.keys, blk["BLOCK_N"])
            splits = KA.choose_splits(programs, key_blocks, SMS)
            launched = programs * cdiv(key_blocks, cdiv(key_blocks, splits))
            lines.append(f"| {s.name} | {batch} | {programs} ({KA.split_efficiency(programs, key_blocks, 1, SMS):.0%})"
                         f" | {splits} | {launched} ({KA.split_efficiency(programs, key_blocks, splits, SMS):.0%}) |")
    return lines


def traffic_section() -> list[str]:
    from mmfuse.kernels import linear as KL
    from mmfuse.traffic import mlp_traffic

    lines = ["## HBM bytes and launches, MLP projectors in training (bf16; model, checked against "
             "interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse: the distinct bytes of each launch (re-reads of A/B tiles counted as L2 traffic, shown "
             "apart); eager: PyTorch's addmm + GELU + autograd, every kernel reading its inputs once and "
             "writing its outputs once. Tile: the largest one the autotuner keeps.", "",
             "| shape | images | fwd MB eager → mmfuse (L2 MB) | fwd launches | bwd MB eager → mmfuse (L2 MB) "
             "| bwd launches | fwd+bwd at 3.0 TB/s, µs eager → mmfuse |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            tile = max(KL.candidate_tiles(M, s.widths[1], SMS), key=lambda t: t[0] * t[1])[:2]
            t = mlp_traffic(M, s.widths, tile, 2)
            eager = t["eager_fwd"]["hbm"] + t["eager_bwd"]["hbm"]
            fused = t["fwd"]["hbm"] + t["bwd"]["hbm"]
            lines.append(
                f"| {s.name} | {images} | {t['eager_fwd']['hbm'] / 1e6:.1f} → {t['fwd']['hbm'] / 1e6:.1f} "
                f"({t['fwd']['l2'] / 1e6:.0f}) | {t['eager_fwd']['launches']} → {t['fwd']['launches']} "
                f"| {t['eager_bwd']['hbm'] / 1e6:.1f} → {t['bwd']['hbm'] / 1e6:.1f} ({t['bwd']['l2'] / 1e6:.0f}) "
                f"| {t['eager_bwd']['launches']} → {t['bwd']['launches']} | {eager / 3e6:.0f} → {fused / 3e6:.0f} |")
    return lines


def render(reports=None) -> str:
    """The whole report as markdown (``reports``: ``mmfuse._aot.compile_all()`` by default)."""
    if reports is None:
        from mmfuse._aot import compile_all

        reports = compile_all()
    head = ["# mmfuse report: exact figures without a GPU", "",
            "Computed, not timed: compile figures from Triton's AOT compiler for sm_80 / sm_90, launch grids "
            "from the launchers' own tile and split rules on an H100's 132 SMs.", ""]
    return "\n".join(head + compile_section(reports) + [""] + waves_section() + [""] + traffic_section()) + "\n"


def main(out: str | None = None) -> int:
    text = render()
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"mmfuse report: written to {out}")
    else:
        sys.stdout.write(text)
    return 0
