"""``mmfuse report``: the figures that can be known exactly without a GPU, as markdown.

1. Per kernel config and arch (sm_80, sm_90), from Triton's ahead-of-time compiler: registers, spill
   bytes, shared memory, tensor-core instruction, 128-bit global loads (16-byte cp.async / v4 / TMA)
   and the occupancy bound (CTAs per SM from registers and shared memory).
2. Per op x real model shape (``mmfuse.bench.shapes``): the launch grid the launchers would choose on
   an H100 (132 SMs) and its wave efficiency.

Every number is computed, none is timed: the same commit prints the same report on any machine.
3. HBM bytes and launches against eager (``mmfuse.traffic``, checked against interpreted runs): MLP
   projectors in training, patch embedding and cross-attention forward; and the roofline time and
   predicted speedup they imply on an H100.
"""

from __future__ import annotations

import sys

from mmfuse.bench.shapes import ATTENTION_SHAPES, MLP_SHAPES, PATCH_SHAPES

SMS = 132
PEAK_FLOPS = 800e12   # H100 SXM, bf16 dense, as measured on one (DESIGN.md)
PEAK_BYTES = 3.0e12   # H100 HBM3, B/s, as measured
LAUNCH_US = 3.0       # a kernel launch's fixed cost, µs (assumed, stated in the table)


def roofline_us(flops: float, hbm_bytes: float, launches: int) -> float:
    """Lower-bound time on an H100: the binding one of compute and HBM, plus a fixed cost per launch.
    (FLOPs and bytes are taken together over the launches: a bound, not a schedule.)"""
    return max(flops / PEAK_FLOPS, hbm_bytes / PEAK_BYTES) * 1e6 + launches * LAUNCH_US


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
             f"Roofline time on an H100: max(FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s, HBM bytes / "
             f"{PEAK_BYTES / 1e12:.1f} TB/s) over the GEMM launches, plus {LAUNCH_US:.0f} µs per launch; eager's "
             "GEMM-free kernels (GELU, GELU', bias-gradient sum) add their bytes at bandwidth. The predicted "
             "speedup is eager's time over mmfuse's (a model, not a measurement).", "",
             "| shape | images | fwd MB eager → mmfuse (L2 MB) | fwd launches | bwd MB eager → mmfuse (L2 MB) "
             "| bwd launches | fwd+bwd roofline µs eager → mmfuse | predicted speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in MLP_SHAPES:
        for images in (1, 8):
            M = s.tokens * images
            tile = max(KL.candidate_tiles(M, s.widths[1], SMS), key=lambda t: t[0] * t[1])[:2]
            t = mlp_traffic(M, s.widths, tile, 2)
            flops = 3 * sum(2 * M * k * n for k, n in zip(s.widths, s.widths[1:]))  # fwd + dX + dW
            elementwise = t["eager_elementwise_hbm"]
            eager = (roofline_us(flops, t["eager_fwd"]["hbm"] + t["eager_bwd"]["hbm"] - elementwise,
                                 t["eager_fwd"]["launches"] + t["eager_bwd"]["launches"])
                     + elementwise / PEAK_BYTES * 1e6)
            fused = roofline_us(flops, t["fwd"]["hbm"] + t["bwd"]["hbm"], t["fwd"]["launches"] + t["bwd"]["launches"])
            lines.append(
                f"| {s.name} | {images} | {t['eager_fwd']['hbm'] / 1e6:.1f} → {t['fwd']['hbm'] / 1e6:.1f} "
                f"({t['fwd']['l2'] / 1e6:.0f}) | {t['eager_fwd']['launches']} → {t['fwd']['launches']} "
                f"| {t['eager_bwd']['hbm'] / 1e6:.1f} → {t['bwd']['hbm'] / 1e6:.1f} ({t['bwd']['l2'] / 1e6:.0f}) "
                f"| {t['eager_bwd']['launches']} → {t['bwd']['launches']} | {eager:.0f} → {fused:.0f} "
                f"| {eager / fused:.2f}x |")
    return lines


def patch_traffic_section() -> list[str]:
    from mmfuse.kernels import patch_embed as KP
    from mmfuse.traffic import patch_embed_fwd_traffic

    lines = ["## HBM bytes and launches, patch embedding forward (bf16, bias and a shared pos_embed; model, "
             "checked against interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse: one launch, the distinct bytes it touches, with the packed weight cached (as the modules "
             "do; the functional call packs it first when P is not a power of two). Eager: conv2d (+bias) "
             "reading pixels and weight once and writing (B, D, N), then `+ pos_embed` reading that and "
             "writing (B, N, D). Tile: the largest one the autotuner keeps. Roofline as above.", "",
             "| shape | batch | MB eager → mmfuse (L2 MB) | launches | roofline µs eager → mmfuse "
             "| predicted speedup |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in PATCH_SHAPES:
        for batch in (1, 64):
            F = s.frames
            tokens = (F // s.temporal) * (s.image[0] // s.patch) * (s.image[1] // s.patch)
            M, e = batch * tokens, 2
            tile = max(KP.candidate_tiles("fwd", M, s.dim, SMS), key=lambda t: t[0] * t[1])[:3]
            t = patch_embed_fwd_traffic(batch, s.channels, *s.image, s.patch, s.dim, tile, e, T=s.temporal, F=F)
            fused = sum(x.unique + x.stored for x in t.values())
            l2 = sum(x.loaded + x.stored for x in t.values())
            pixels = batch * s.channels * F * s.image[0] * s.image[1] * e
            weight = s.dim * s.channels * s.temporal * s.patch ** 2 * e
            conv_out = M * s.dim * e
            eager_gemm = pixels + weight + s.dim * e + conv_out
            eager_add = conv_out + tokens * s.dim * e + conv_out
            flops = 2 * M * s.dim * s.channels * s.temporal * s.patch ** 2
            t_eager = roofline_us(flops, eager_gemm, 2) + eager_add / PEAK_BYTES * 1e6
            t_fused = roofline_us(flops, fused, 1)
            lines.append(f"| {s.name} | {batch} | {(eager_gemm + eager_add) / 1e6:.1f} → {fused / 1e6:.1f} "
                         f"({l2 / 1e6:.0f}) | 2 → 1 | {t_eager:.0f} → {t_fused:.0f} | {t_eager / t_fused:.2f}x |")
    return lines


def attention_traffic_section() -> list[str]:
    from mmfuse.kernels import cross_attention as KA
    from mmfuse.kernels._common import cdiv
    from mmfuse.traffic import attention_fwd_traffic

    lines = ["## HBM bytes and launches, cross-attention forward (bf16, shared queries, no padding; model, "
             "checked against interpreted runs at small sizes in tests/test_traffic.py)", "",
             "mmfuse: `attn_fwd_kernel` with the split count the launcher chooses, plus the combine kernel when "
             "it splits; distinct bytes per launch. Baseline: SDPA (flash) on keys and values repeated to the "
             "query heads (`repeat_interleave`, one copy each when grouped) and the queries expanded over the "
             "batch, each kernel reading its inputs once. Roofline as above.", "",
             "| shape | batch | splits | MB SDPA → mmfuse | launches | roofline µs SDPA → mmfuse | predicted speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in ATTENTION_SHAPES:
        for batch in (1, 8, 64):
            e, group = 2, s.heads // s.kv_heads
            blk = KA.gpu_blocks(s.queries, s.head_dim)
            programs = cdiv(s.queries, blk["BLOCK_M"]) * batch * s.heads
            splits = KA.choose_splits(programs, cdiv(s.keys, blk["BLOCK_N"]), SMS)
            t = attention_fwd_traffic(batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim,
                                      (blk["BLOCK_M"], blk["BLOCK_N"]), splits, e)
            fused = sum(x.unique + x.stored for x in t.values())
            launches = 2 if "o_partial" in t else 1
            kv, kv_rep = batch * s.kv_heads * s.keys * s.head_dim * e, batch * s.heads * s.keys * s.head_dim * e
            q_o = batch * s.heads * s.queries * s.head_dim * e
            repeat = 2 * (kv + kv_rep) if group > 1 else 0
            sdpa = q_o + 2 * kv_rep + q_o + batch * s.heads * s.queries * 4
            flops = 4 * batch * s.heads * s.queries * s.keys * s.head_dim
            t_sdpa = roofline_us(flops, sdpa, 1) + (repeat / PEAK_BYTES * 1e6 + 2 * LAUNCH_US if repeat else 0)
            t_fused = roofline_us(flops, fused, launches)
            lines.append(f"| {s.name} | {batch} | {splits} | {(sdpa + repeat) / 1e6:.2f} → {fused / 1e6:.2f} | "
                         f"{3 if repeat else 1} → {launches} | {t_sdpa:.0f} → {t_fused:.0f} | "
                         f"{t_sdpa / t_fused:.2f}x |")
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
                     + [""] + patch_traffic_section() + [""] + attention_traffic_section()) + "\n"


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
