"""Where the time of each mmfuse case goes on a GPU: per-kernel times, compiled kernel resources, and
the GEMM tile sweep (``mmfuse gpu-check``'s last step; ``python -m mmfuse.bench.kernel_profile``).

The quick benchmark says *that* a case is slow; this says *which launch* and *why*, in one pass:

1. ``kernels``: every mmfuse case of the quick profile under ``torch.profiler``: each kernel's device
   time and launches per step, and the step's wall time minus the summed kernel time (host overhead and
   gaps: what a launch-bound small case loses).
2. ``compiled``: every Triton kernel the run compiled, with its constexprs, warps, stages, registers,
   spills and shared memory, read from Triton's own cache objects (the compile check predicts these
   without a GPU: ``mmfuse report`` / bench/NOTES.md).
3. ``gemm_tiles``: the three GEMMs of a projector layer (forward with GELU + aux, dX with act', dW) at
   LLaVA-1.5 with 1 and 8 images and the Qwen2.5-VL merger (``SWEEP_SHAPES``), timed under every
   tile of the pointer kernel and of the TMA kernel (flattened or not), next to ``torch.mm`` of the same layout: whether the wave
   model and the launcher's defaults pick the right variant, and how far each is from cuBLAS.

4. ``attention_pipeline``: the cross-attention kernels' device time at 2, 3 and 4 pipeline stages
   (and 4 or 8 warps, 64 or 128 query rows per program in the forward: 128 packs two grouped heads)
   for Idefics2's resampler at batch 1, 8 and 64 and BLIP-2's at batch 8, beside SDPA with
   ``enable_gqa`` (``attention_pipeline_sweep``; session 20 timed the first set and moved the forward
   to 4 warps: these rows watch that choice and the packed tile, which won at batch 8 only). The
   backward rows at Idefics2 batch 8 give dQ tiles of its own (64 x 32 at 4 warps: wgmma on sm_90; 32 x
   64 at 4) and time each backward kernel apart: session 21's predictions (bench/NOTES.md).

4a. ``attention_vs_sdpa``: the cross-attention at its defaults against SDPA with ``enable_gqa`` at every
   resampler shape and batch 1 / 8 / 64, forward and forward + backward, device time and wall time per
   call (``attention_against_sdpa``: issue 13's table; session 20 took it with a probe of its own).

4b. ``attention_splits``: the cross-attention forward at batch 1 of each resampler shape
   (``ATTENTION_SHAPES``), where the key split decides: the split merged by a second launch, merged in
   the split kernel at the in-kernel model's split count (``MMFUSE_SPLIT_COMBINE=kernel``) and at the
   launch model's ("auto", the default; checked bit for bit against the merge launch), each with its
   device time, and SDPA's flash and memory-efficient backends
   on the inputs transformers feeds them; in bf16, then in fp32 (IEEE: mmfuse's FMA tiles; SDPA's
   flash backend takes no fp32 and records its error).

5. ``dynamic_m``: the LLaVA-1.5 projector's training step (forward + backward) over 50 distinct token
   counts in a row, as dynamic-resolution training sees them, timed end to end from the first call
   (Triton's compiles included: the first pass) and again over the same counts (the second pass), for
   mmfuse's default tile policy, with ``MMFUSE_AUTOTUNE=1`` (timing once per octave of M: the number
   of timing rounds is recorded), and eager PyTorch (addmm + GELU): issue 13's "no re-tuning per token
   count", measured.

6. ``mapped_forms``: the merged projector's first GEMM at InternVL2-8B's and Qwen2.5-VL's shapes taken
   apart (``mapped_gemm_forms``): the unmapped GEMM of its size, the token gather alone, the gather with
   the norm in the load, the gather with an RMSNorm folded into W: what the 2.5x of session 14 is made of.

Results: ``<out-dir>/kernel-profile-<gpu>-<date>.json`` and a markdown summary beside it. Each part
catches its own failure (recorded in the JSON), so one broken part leaves the others.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import time
import traceback

import torch

#: Tiles swept beyond GEMM_TILES: the larger shapes the Triton tutorials use on Hopper.
EXTRA_TILES = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3),
               (128, 128, 32, 4, 4), (128, 256, 64, 8, 4))


def _device_spans(prof) -> list[tuple[str, float]]:
    """(kernel name, µs) of every device event a torch.profiler run recorded: each kernel's span."""
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]


def kernel_times(selected, steps: int = 10) -> list[dict]:
    """Per case: device time per kernel name and launches per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from mmfuse.bench.suite import prepare

    out = []
    for case in selected:
        row = {"case": case.name}
        try:
            sets, step = prepare(case, "cuda")
            for i in range(3):
                step(sets[i % len(sets)])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(steps):
                    step(sets[i % len(sets)])
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) * 1e6 / steps
            per = collections.defaultdict(lambda: [0.0, 0])
            for name, us in _device_spans(prof):
                per[name][0] += us
                per[name][1] += 1
            kernels = sorted(({"kernel": k, "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps}
                              for k, v in per.items()), key=lambda r: -r["us_per_step"])
            row.update(kernels=kernels, wall_us_per_step=wall_us,
                       kernel_us_per_step=sum(k["us_per_step"] for k in kernels))
        except Exception:
            row["error"] = traceback.format_exc(limit=3)
        out.append(row)
    return out


def _jit_functions():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from mmfuse.kernels import cross_attention, linear, merged_gemm, patch_embed

    for mod in (linear, merged_gemm, patch_embed, cross_attention):
        for name, obj in vars(mod).items():
            # (an InterpretedFunction under TRITON_INTERPRET=1: no compiled variants, same names)
            if isinstance(obj, (JITFunction, InterpretedFunction)) and getattr(obj.fn, "__module__", "") == mod.__name__:
                yield f"{mod.__name__.rsplit('.', 1)[1]}.{name}", obj


def compiled_kernels() -> list[dict]:
    """Every compiled variant in Triton's in-process caches: resources per constexpr set."""
    rows = []
    for name, fn in _jit_functions():
        for cache in getattr(fn, "device_caches", {}).values():
            kernel_cache = cache[0] if isinstance(cache, tuple) else cache
            for kernel in list(getattr(kernel_cache, "values", lambda: [])()):
                row = {"kernel": name}
                try:
                    if hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                    md = kernel.metadata
                    row.update(num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                               n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None))
                    consts = getattr(getattr(kernel, "src", None), "constants", None)
                    if consts:
                        row["constexprs"] = {str(k): repr(v) for k, v in consts.items()
                                             if not str(k).startswith("stride")}
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
    return rows


def gemm_tile_sweep(M: int = 8 * 576, K: int = 1024, N: int = 4096, device: str = "cuda", bench=None,
                    device_timer=None) -> list[dict]:
    """The three GEMMs of a Linear(K, N) + GELU layer at M tokens, under each tile of each kernel
    (the pointer kernel; the TMA kernel flattened or not), and torch.mm of the same operand layouts.
    Each row also carries its device time alone (``device_timer``: ``device_ms`` on a GPU): at one image
    the GEMMs take 14-130 us, do_bench's per-call time is then the host's, and session 17 saw the same
    kernel move 3.6x between runs (bench/NOTES.md, "Fifth GPU session")."""
    from mmfuse.kernels import _common
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels._tuning import largest_tile

    if bench is None:
        import triton.testing

        bench = triton.testing.do_bench
    if device_timer is None and device == "cuda":
        device_timer = device_ms
    dt = torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dt)
    w = torch.randn(N, K, device=device, dtype=dt) / K ** 0.5
    b = torch.randn(N, device=device, dtype=dt)
    h = torch.randn(M, N, device=device, dtype=dt)
    dh = torch.randn(M, N, device=device, dtype=dt)
    w2 = torch.randn(N, N, device=device, dtype=dt) / N ** 0.5
    y = torch.empty(M, N, device=device, dtype=dt)
    aux = torch.empty(M, N, device=device, dtype=dt)
    dx = torch.empty(M, N, device=device, dtype=dt)
    dw = torch.empty(N, K, device=device, dtype=dt)
    launch = KL._launch_gemm
    gemms = {
        # name: (mmfuse launch, torch.mm of the same operand layouts, flops, output dims, act')
        "fwd y=gelu(xW^T+b), aux": (lambda: launch(x, w.t(), y, bias=b, aux=aux, activation=1, store_aux=True),
                                    lambda: torch.mm(x, w.t(), out=y), 2 * M * N * K, (M, N), False),
        "dX dH2 W2 * gelu'(h)": (lambda: launch(dh, w2, dx, aux=h, activation=1, act_grad=True),
                                 lambda: torch.mm(dh, w2, out=dx), 2 * M * N * N, (M, N), True),
        "dW dH^T X": (lambda: launch(dh.t(), x, dw), lambda: torch.mm(dh.t(), x, out=dw), 2 * M * N * K, (N, K),
                      False),
    }
    # cuBLAS with the epilogue as a separate pass (what mmfuse's fused epilogue must beat; session 17 measured
    # torch.mm 1.3-2x faster than mmfuse's best tile at every size, before the epilogue's pass)
    unfused = {"fwd y=gelu(xW^T+b), aux": lambda: torch.nn.functional.gelu(torch.addmm(b, x, w.t(), out=aux)),
               "dX dH2 W2 * gelu'(h)": lambda: torch.ops.aten.gelu_backward(torch.mm(dh, w2, out=dx), h)}
    sms = _common.num_sms(x.device)
    variants = [("pointer", t, None) for t in dict.fromkeys(KL.GEMM_TILES + EXTRA_TILES[:1])]
    variants += [("tma", t, flat) for t in KL.GEMM_TILES for flat in (True, False)]
    # 128x256 and 256x128 on the TMA kernel: dW compiles clean at both, the act epilogues spill (56-1200 B
    # on sm_90, Triton 3.9): timed to see whether the wider tile still closes the gap to cuBLAS.
    variants += [("tma", t, False) for t in EXTRA_TILES[:2]]
    rows = []
    for gname, (ours, ref, flops, dims, act_grad) in gemms.items():
        baselines = [("torch.mm", ref)] + ([("torch.mm + epilogue pass", unfused[gname])] if gname in unfused else [])
        for label, fn in baselines:
            ms = bench(fn)
            rows.append({"gemm": gname, "tile": label, "ms": ms, "tflops": flops / ms / 1e9})
            if device_timer is not None:
                rows[-1]["device_ms"] = device_timer(fn)
        chosen = {"pointer": largest_tile(KL.candidate_tiles(*dims, sms)),
                  "tma": largest_tile(KL.candidate_tiles(*dims, sms, KL.tma_tiles(act_grad)))}
        for kernel, tile, flat in variants:
            label = f"{kernel} {'x'.join(map(str, tile))}" + ("" if flat is None else f" flatten={flat}")
            default = tile == chosen[kernel] and (flat is None or flat == KL.tma_flatten(act_grad))  # (bf16)
            row = {"gemm": gname, "tile": label, "chosen": default}
            old = (KL.TMA, KL.tma_flatten)
            try:
                KL.TMA = "always" if kernel == "tma" else "never"
                if flat is not None:
                    KL.tma_flatten = lambda *args, flat=flat, **kw: flat
                with _common.gpu_config({f"{'tma' if kernel == 'tma' else 'fused'}_gemm_kernel": tile}):
                    ms = bench(ours)
                    if device_timer is not None:
                        row["device_ms"] = device_timer(ours)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                KL.TMA, KL.tma_flatten = old
            rows.append(row)
    return rows


#: (label, M, K, N) of the sweep: one Linear(K, N) + GELU layer and the N x N second layer's dX, at the
#: shapes issue 14 names. The Qwen2.5-VL merger's second layer is 5120 -> 3584; its dX is swept at
#: 5120 x 5120 (the sweep keeps one N).
SWEEP_SHAPES = (("llava-1.5-7b, 1 image", 576, 1024, 4096), ("llava-1.5-7b, 8 images", 4608, 1024, 4096),
                ("qwen2.5-vl-7b-merger, 8 images", 8192, 5120, 5120))

def device_ms(fn, calls: int = 20, by_kernel: bool = False):
    """Milliseconds of device (kernel) time per call of ``fn``: the CUDA kernels torch.profiler records
    over ``calls`` calls, summed, whatever the host spent around them. ``by_kernel``: {kernel name: ms
    per call} instead (each backward kernel of the attention sweep apart)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = _device_spans(prof)
    if not spans:  # a profiler that saw no kernel must not read as "no device time"
        raise RuntimeError("device_ms: expected CUDA kernel events from torch.profiler, got none")
    if by_kernel:
        named = {}
        for name, us in spans:
            named[name] = named.get(name, 0.0) + us / calls / 1e3
        return named
    return sum(us for _, us in spans) / calls / 1e3


def attention_split_sweep(batch: int = 1, device: str = "cuda", bench=None, shapes=None, dtype=None,
                          device_timer=None) -> list[dict]:
    """Forward time of each resampler shape at ``batch`` under the two split merges and SDPA's fused
    backends (shared queries; ``shapes``: ``ATTENTION_SHAPES`` by default; ``dtype``: bf16 on a GPU by
    default; fp32 runs IEEE, torch's default, on its own FMA tiles). mmfuse's rows also carry their
    device time alone (``device_timer``: ``device_ms`` on a GPU): session 14 measured the in-kernel merge
    at 1.23 ms against 0.088 ms for the same kernel plus a merge launch, and whether that was the host
    or the device was never taken."""
    import torch.nn.functional as F

    from mmfuse.bench.shapes import ATTENTION_SHAPES
    from mmfuse.kernels import _common
    from mmfuse.kernels import cross_attention as KA

    if bench is None:
        import triton.testing

        bench = triton.testing.do_bench
    if device_timer is None and device == "cuda":
        device_timer = device_ms
    dt = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    elem, dname = torch.empty((), dtype=dt).element_size(), str(dt).split(".")[-1]
    ieee = _common.dot_precision(dt) == "ieee"
    rows = []
    for s in shapes or ATTENTION_SHAPES:
        q = torch.randn(1, s.heads, s.queries, s.head_dim, device=device, dtype=dt)
        k = torch.randn(batch, s.kv_heads, s.keys, s.head_dim, device=device, dtype=dt)
        v = torch.randn_like(k)
        scale = s.head_dim ** -0.5
        sms = _common.num_sms(q.device)
        args = (batch, 1, s.heads, s.kv_heads, s.queries, s.keys, s.head_dim, elem, sms)
        for combine in ("launch", "kernel", "auto"):  # ("auto": split as for the launch, merged in the kernel)
            # the split count at the tiles the launcher takes (IEEE fp32 has its own)
            blocks = KA.blocks_for(s.queries, s.head_dim, elem_bytes=elem, combine=combine == "kernel", ieee=ieee)
            splits = KA.choose_fwd_splits(*args, blocks=blocks, in_kernel=combine == "kernel")
            fn = (lambda splits=splits, combine=combine:
                  KA.attention_fwd(q, k, v, None, None, scale, splits=splits, combine=combine))
            rows.append({"shape": s.name, "batch": batch, "dtype": dname, "impl": f"mmfuse, merge by {combine}",
                         "splits": splits, "ms": bench(fn)})
            if device_timer is not None:
                rows[-1]["device_ms"] = device_timer(fn)
        # The in-kernel merge against the merge launch at the same split count (at least 2, or both
        # would take the unsplit kernel): the same bits. (On the "auto" row: the last.)
        merged = KA.attention_fwd(q, k, v, None, None, scale, splits=max(2, splits), combine="kernel")
        launched = KA.attention_fwd(q, k, v, None, None, scale, splits=max(2, splits), combine="launch")
        rows[-1]["equal"] = all(torch.equal(a, b) for a, b in zip(merged, launched))
        group = s.heads // s.kv_heads
        qe, ke, ve = q.expand(batch, -1, -1, -1), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qe, ke, ve)
                try:
                    rows.append({"shape": s.name, "batch": batch, "dtype": dname, "impl": name, "ms": bench(sdpa)})
                except RuntimeError as e:  # a backend that does not take this shape / dtype (flash: fp32)
                    rows.append({"shape": s.name, "batch": batch, "dtype": dname, "impl": name, "error": str(e)[:200]})
                    continue
                if device_timer is not None:  # SDPA's device time too: its per-call time is host-bound here
                    try:
                        rows[-1]["device_ms"] = device_timer(sdpa)
                    except RuntimeError as e:
                        rows[-1]["device_error"] = str(e)[:200]
    return rows


#: (shape name, batch, forward (stages, warps, query rows per program[, key splits]) forms, backward
#: forms: stages, or {"stages", "dq_tile": (dQ's query rows, keys per block, warps), "dq_splits": (batch
#: splits, key splits) forced}) of
#: ``attention_pipeline_sweep``. 128 rows: two of Idefics2's grouped query heads per program, each
#: warpgroup on 64 rows of its own (at 64 rows and 8 warps both warpgroups compute the same Q.K^T and
#: softmax: the TTGIR's layout is 8 warps along 64 rows; bench/NOTES.md, session 18). dQ at 64 rows takes
#: wgmma on sm_90 (32 rows cannot); 64 x 32 at 4 warps and 32 x 64 at 4 compile without spills or
#: duplicated products on Triton 3.6-3.9 (bench/NOTES.md, session 21).
PIPELINE_CASES = (("idefics2-resampler", 8, ((3, 4, 64), (3, 8, 64), (4, 4, 64), (3, 8, 128), (3, 4, 64, 2),
                                             (3, 4, 64, 3)),
                   (3, {"stages": 3, "dq_tile": (64, 32, 4)}, {"stages": 3, "dq_tile": (32, 64, 4)})),
                  ("idefics2-resampler", 1, ((3, 4, 64), (3, 8, 64), (3, 8, 128), (3, 4, 64, 12), (3, 4, 64, 16)),
                   ()),
                  ("idefics2-resampler", 64, ((3, 4, 64), (3, 8, 128)), ()),
                  ("blip2-qformer-xattn", 8, ((2, 4, 32), (3, 4, 32)), (2, 3)),
                  # the single pass at batch 1 on 8 / 12 programs, and its keys split (dQ's fp32 partials)
                  ("openflamingo-resampler", 1, ((3, 4, 64),),
                   (3, {"stages": 3, "dq_splits": (1, 2)}, {"stages": 3, "dq_splits": (1, 4)})),
                  ("blip2-qformer-xattn", 1, ((3, 4, 32),), (3, {"stages": 3, "dq_splits": (1, 3)})))


def attention_pipeline_sweep(device: str = "cuda", cases=PIPELINE_CASES, timer=None, shapes=None) -> list[dict]:
    """Device time of the cross-attention kernels (bf16, shared queries, the launcher's split count) at
    each pipeline depth and warp count of ``cases``: session 18 found from the TTGIR that 2 stages wait
    for every copy at the top of each key block (``KA.TENSOR_CORE_STAGES``) and moved the tensor-core
    tiles to 3 untimed; this measures 2 / 3 / 4 (and 4 / 8 warps in the forward), with SDPA's flash kernel
    on ``enable_gqa`` (no repeat copies) as the reference. Tiles are overridden by wrapping
    ``KA.gpu_blocks``, the one place the launchers take them from."""
    from unittest import mock

    import torch.nn.functional as F

    from mmfuse.bench.shapes import ATTENTION_SHAPES
    from mmfuse.kernels import cross_attention as KA

    timer = timer or device_ms
    shapes = {s.name: s for s in shapes or ATTENTION_SHAPES}
    original = KA.gpu_blocks

    def timed(row, fn, tiles=original):
        with mock.patch.object(KA, "gpu_blocks", tiles):
            try:
                row["device_ms"] = timer(fn)
            except Exception as e:  # a config that fails to compile or launch is a finding, not a stop
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        return row

    rows = []
    for name, batch, fwd_forms, bwd_stages in cases:
        s = shapes[name]
        q = torch.randn(1, s.heads, s.queries, s.head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, s.kv_heads, s.keys, s.head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        scale = s.head_dim ** -0.5
        for stages, warps, block_m, *splits in fwd_forms:
            splits = splits[0] if splits else None  # None: the launcher's split rule
            def tiles(Lq, D, backward=False, *a, stages=stages, warps=warps, block_m=block_m, **kw):
                blk = original(Lq, D, backward, *a, **kw)
                return blk if backward else dict(blk, num_stages=stages, num_warps=warps, BLOCK_M=block_m)

            # a tile taller than one head's queries holds several grouped heads (PACK_GQA)
            pack = block_m > s.queries and s.heads > s.kv_heads
            rows.append(timed({"shape": name, "batch": batch, "pass": "fwd", "stages": stages, "warps": warps,
                               "block_m": block_m, "packed": pack, "splits": splits},
                              lambda: KA.attention_fwd(q, k, v, None, None, scale, splits, pack_gqa=pack), tiles))
        if bwd_stages:
            o, lse = KA.attention_fwd(q, k, v, None, None, scale)
            do = torch.randn_like(o)
        for form in bwd_stages:
            form = {"stages": form} if isinstance(form, int) else form
            stages, dq, dq_splits = form["stages"], form.get("dq_tile"), form.get("dq_splits")
            def tiles(Lq, D, backward=False, *a, stages=stages, dq=dq, **kw):
                blk = original(Lq, D, backward, *a, **kw)
                if not backward:
                    return blk
                blk = dict(blk, num_stages=stages, dkdv_num_stages=stages)
                return blk if dq is None else dict(blk, dq=dict(BLOCK_M=dq[0], BLOCK_N=dq[1], num_warps=dq[2]))

            row = {"shape": name, "batch": batch, "pass": "bwd", "stages": stages, "warps": 8 if dq is None else dq[2]}
            if dq is not None:
                row["dq_tile"] = f"{dq[0]}x{dq[1]}"
            if dq_splits is not None:
                row["dq_splits"] = f"{dq_splits[0]}x{dq_splits[1]}"

            def fn(dq_splits=dq_splits):
                return KA.attention_bwd(do, q, k, v, o, lse, None, None, scale, dq_splits=dq_splits)
            rows.append(timed(row, fn, tiles))
            if device == "cuda" and "device_ms" in row:  # each kernel's share (delta, dK/dV, dQ, the sum)
                with mock.patch.object(KA, "gpu_blocks", tiles):
                    row["kernels_ms"] = device_ms(fn, by_kernel=True)
        qe = q.expand(batch, -1, -1, -1)
        rows.append(timed({"shape": name, "batch": batch, "pass": "fwd", "impl": "sdpa enable_gqa"},
                          lambda: F.scaled_dot_product_attention(qe, k, v, enable_gqa=s.heads != s.kv_heads)))
    return rows


#: (label, merged shape name, images, norm and where) of ``mapped_gemm_forms``: the two projectors whose
#: first GEMM session 14 timed at 2.5-2.6x an unmapped GEMM of its size.
MAPPED_SHAPES = (("internvl2-8b-mlp1, 8 tiles", "internvl2-8b-mlp1", 8),
                 ("qwen2.5-vl-7b-merger, 8 images", "qwen2.5-vl-7b-merger", 8))


def mapped_gemm_forms(device: str = "cuda", bench=None, shapes=MAPPED_SHAPES, pixel_shuffle=None) -> list[dict]:
    """The merged projector's first GEMM (Linear + GELU) at each shape, taken apart: the unmapped GEMM of
    the same size (A written, as `mmfuse.linear` reads it), the token gather alone (the shape's table or
    Qwen's view merge, no norm), the gather with the shape's norm normalised in the load, and the gather
    with an RMSNorm folded into W (the statistics precomputed, outside the timing). Session 14 measured
    InternVL2-8B's mapped forward at 273 µs beside its equal-sized unmapped second GEMM at 105 µs, and
    Qwen2.5-VL's at 2197 µs against 838-900 µs: which part of that is the gather and which the
    normalisation in the load decides whether folding a LayerNorm (bench/NOTES.md, session 16) is worth
    building. A table is InternVL's real pixel shuffle (``pixel_shuffle``: its token order), not a
    random permutation."""
    from mmfuse.bench.shapes import MERGED_SHAPES
    from mmfuse.kernels import linear as KL
    from mmfuse.kernels import merged_gemm as KM
    from mmfuse.kernels._common import ACTIVATIONS

    gelu = ACTIVATIONS["gelu"]

    if bench is None:
        import triton.testing

        bench = triton.testing.do_bench
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for label, name, images in shapes:
        s = next(m for m in MERGED_SHAPES if m.name == name) if isinstance(name, str) else name
        T, C, G, N = s.tokens * images, s.channels, s.group, s.widths[0]
        M, K = T // G, G * C
        x = torch.randn(T, C, device=device, dtype=dt)
        w = torch.randn(N, K, device=device, dtype=dt) / K ** 0.5
        b = torch.randn(N, device=device, dtype=dt)
        width = K if s.norm_after_merge else C
        gamma = torch.rand(width, device=device, dtype=dt) + 0.5
        beta = torch.randn(width, device=device, dtype=dt)
        table = (pixel_shuffle or _pixel_shuffle_table)(images, s.tokens, device) if s.table else None
        a = torch.randn(M, K, device=device, dtype=dt)
        y = torch.empty(M, N, device=device, dtype=dt)
        merge_kinds = [("table" if s.table else "view", table)]
        if s.table:
            merge_kinds.append(("view", None))
        forms = [("unmapped GEMM (A written)", lambda: KL._launch_gemm(a, w.t(), y, bias=b, activation=gelu))]
        for kind, tab in merge_kinds:
            def merged(norm, fold=False, tab=tab):
                merge = KM.Merge(x, G, tab, norm, s.norm_after_merge, gamma if norm else None,
                                 beta if norm == "layer" else None)
                if norm is not None:
                    KM.norm_stats(merge, fold=w if fold else None)
                return lambda: KM.mapped_fwd(merge, w, b, activation=gelu)
            forms.append((f"{kind} gather, no norm", merged(None)))
            forms.append((f"{kind} gather + {s.norm} norm in the load", merged(s.norm)))
            forms.append((f"{kind} gather + rms folded into W", merged("rms", fold=True)))
        flops = 2 * M * N * K
        for form, fn in forms:
            row = {"shape": label, "form": form, "M": M, "K": K, "N": N}
            try:
                ms = bench(fn)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    return rows


def _pixel_shuffle_table(images: int, tokens: int, device) -> torch.Tensor:
    """InternVL's pixel shuffle (scale 0.5) as a token table: merged row m's 4 tokens in the order its
    `pixel_shuffle` lays their channels, for ``images`` square grids of ``tokens`` tokens each. Its two
    reshapes and permutes restated (the GPU host need not have transformers, whose own method the
    registry probes); tests/test_bench.py checks it against ``InternVLModel.pixel_shuffle``."""
    side = int(round(tokens ** 0.5))
    ids = torch.arange(images * tokens, device=device).view(images, side, side, 1)
    n, w, h, c = ids.shape
    t = ids.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    t = t.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    return t.reshape(-1, 4).to(torch.int32)


def token_counts(n: int = 50, low: int = 576, high: int = 8 * 576, seed: int = 0) -> list[int]:
    """``n`` distinct token counts in [low, high), in a fixed shuffled order (a dynamic-resolution run)."""
    import random

    return random.Random(seed).sample(range(low, high), n)


def dynamic_m_loop(counts=None, widths=(1024, 4096, 4096), device: str = "cuda", dtype=None, passes: int = 2,
                   clock=None) -> list[dict]:
    """Seconds of a projector's training step over each pass of ``counts`` (``token_counts()`` by
    default) for mmfuse's default tile choice, for ``MMFUSE_AUTOTUNE``'s octave timing (with the number
    of timing rounds it ran) and for eager PyTorch; ``clock``: a function returning seconds after
    waiting for the device (tests pass a CPU one)."""
    import torch.nn.functional as F

    import mmfuse
    from mmfuse.kernels import _tuning

    counts = list(counts or token_counts())
    dt = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if clock is None:
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dt).requires_grad_()
          for k, n in zip(widths, widths[1:])]
    bs = [torch.zeros(n, device=device, dtype=dt, requires_grad=True) for n in widths[1:]]

    def eager(x):
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = F.linear(x, w, b)
            x = F.gelu(x) if i < len(ws) - 1 else x
        return x

    rows = []
    for impl in ("mmfuse", "mmfuse, MMFUSE_AUTOTUNE=1", "eager"):
        timed = []
        saved, bench = _tuning.AUTOTUNE, _tuning._bench
        _tuning.AUTOTUNE = impl.endswith("AUTOTUNE=1")

        def counted(run):
            timed.append(1)
            return bench(run)
        _tuning._bench = counted
        try:
            fn = eager if impl == "eager" else (lambda x: mmfuse.mlp(x, ws, bs))
            for p in range(passes):
                t0 = clock()
                for m in counts:
                    x = torch.randn(m, widths[0], device=device, dtype=dt)
                    fn(x).float().sum().backward()
                seconds = clock() - t0
                rows.append({"impl": impl, "pass": p + 1, "counts": len(counts), "seconds": seconds,
                             "ms_per_step": 1e3 * seconds / len(counts), "timings": len(timed)})
        finally:
            _tuning.AUTOTUNE, _tuning._bench = saved, bench
    return rows


def host_ms(fn, calls: int = 50) -> float:
    """Milliseconds per call of ``fn`` by the wall clock, the device drained before and after: the host's
    time where it is the bound, the device's where that is (``device_ms`` tells which)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


#: The row of ``attention_against_sdpa`` timing mmfuse with every launch through ``JITFunction.run``.
WITHOUT_REPLAY = "mmfuse, Triton's path"


def attention_against_sdpa(device: str = "cuda", shapes=None, batches=(1, 8, 64), timer=None,
                           wall=None) -> list[dict]:
    """mmfuse's cross-attention at its defaults against SDPA with ``enable_gqa`` (transformers' route
    without a mask), forward and forward + backward, at every resampler shape and batch (bf16; shared
    queries): device time (``timer``: ``device_ms``) and wall time per call (``wall``: ``host_ms``). Session
    20 took these with a probe of its own (``h100-2026-11-27-session20/call3``); issue 13's goal is
    this table at >= 1.0x, and session 21's host-time predictions are read from its wall column. The row
    ``WITHOUT_REPLAY`` is the same call with every launch through ``JITFunction.run``
    (``MMFUSE_LAUNCH_REPLAY=0``): wall time only, the kernels being the same (session 22's prediction)."""
    import torch.nn.functional as F

    import mmfuse
    from mmfuse.bench.shapes import ATTENTION_SHAPES
    from mmfuse.kernels import _launch

    timer, wall = timer or device_ms, wall or host_ms
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for s in shapes or ATTENTION_SHAPES:
        for batch in batches:
            q = torch.randn(1, s.heads, s.queries, s.head_dim, device=device, dtype=dt, requires_grad=True)
            k = torch.randn(batch, s.kv_heads, s.keys, s.head_dim, device=device, dtype=dt, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            do = torch.randn(batch, s.heads, s.queries, s.head_dim, device=device, dtype=dt)
            gqa = s.heads != s.kv_heads
            calls = {
                "mmfuse": lambda: mmfuse.cross_attention(q, k, v),
                WITHOUT_REPLAY: lambda: mmfuse.cross_attention(q, k, v),
                "sdpa": lambda: F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v, enable_gqa=gqa),
            }
            for impl, call in calls.items():
                row = {"shape": s.name, "batch": batch, "impl": impl}
                for mode in ("fwd", "fwd+bwd"):
                    def step(call=call, mode=mode):
                        if mode == "fwd":
                            with torch.no_grad():
                                return call()
                        return torch.autograd.grad(call(), (q, k, v), do)
                    replay = _launch.REPLAY
                    try:
                        if impl == WITHOUT_REPLAY:
                            _launch.REPLAY = False
                            row[f"{mode} wall ms"] = wall(step)
                        else:
                            row[f"{mode} device ms"], row[f"{mode} wall ms"] = timer(step), wall(step)
                    except Exception as e:  # a backend that refuses a shape is a finding, not a stop
                        row[f"{mode} error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    finally:
                        _launch.REPLAY = replay
                rows.append(row)
    return rows


PARTS = ("kernels", "compiled", "attention_pipeline", "attention_vs_sdpa", "gemm_tiles", "attention_splits",
         "dynamic_m", "mapped_forms")


def main(out_dir: str, parts=PARTS, print=print) -> int:
    from mmfuse.bench.suite import environment, profile_cases

    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    result = {"gpu": gpu, "date": date, **environment()}
    failed = 0
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"kernel-profile-{gpu.replace(' ', '_')}-{date}")

    def write():  # after every part: a step timeout (gpu-check's budget) keeps what was measured
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(result))

    for part in parts:
        t0 = time.perf_counter()
        try:
            if part == "kernels":
                result[part] = kernel_times([c for c in profile_cases("quick") if c.impl == "mmfuse"])
            elif part == "compiled":
                result[part] = compiled_kernels()
            elif part == "gemm_tiles":
                result[part] = [dict(r, shape=label) for label, M, K, N in SWEEP_SHAPES
                                for r in gemm_tile_sweep(M, K, N)]
            elif part == "attention_splits":
                # bf16, then IEEE fp32 on its own tiles (session 11; no GPU has timed them)
                result[part] = attention_split_sweep() + attention_split_sweep(dtype=torch.float32)
            elif part == "attention_pipeline":
                result[part] = attention_pipeline_sweep()
            elif part == "attention_vs_sdpa":
                result[part] = attention_against_sdpa()
            elif part == "dynamic_m":
                result[part] = dynamic_m_loop()
            elif part == "mapped_forms":
                result[part] = mapped_gemm_forms()
            else:
                raise ValueError(f"parts: expected names from {PARTS}, got {part!r}")
        except Exception:
            result[part] = {"error": traceback.format_exc(limit=4)}
            failed += 1
        print(f"kernel_profile: {part} in {time.perf_counter() - t0:.0f} s")
        write()
    print(markdown(result))
    return 1 if failed else 0


def _table_head(title: str, *columns: str) -> list[str]:
    """A markdown section's title and its table's header rows."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def markdown(result: dict) -> str:
    lines = [f"# mmfuse kernel profile, {result['gpu']}, {result['date']} (measured)", "",
             f"torch {result.get('torch')}, Triton {result.get('triton')}", ""]
    kern = result.get("kernels")
    if isinstance(kern, list):
        lines += ["## Device time per kernel (us per step)", ""]
        for row in kern:
            if "error" in row:
                lines.append(f"- {row['case']}: failed: {row['error'].splitlines()[-1]}")
                continue
            lines.append(f"- **{row['case']}**: wall {row['wall_us_per_step']:.0f} us/step, kernels "
                         f"{row['kernel_us_per_step']:.0f} us/step")
            for k in row["kernels"][:8]:
                lines.append(f"  - {k['us_per_step']:8.1f} us  x{k['launches_per_step']:.0f}  {k['kernel'][:110]}")
        lines.append("")
    comp = result.get("compiled")
    if isinstance(comp, list):
        lines += _table_head("Compiled kernels", "kernel", "warps", "stages", "regs", "spills", "shared", "constexprs")
        for r in comp:
            consts = ", ".join(f"{k}={v}" for k, v in sorted(r.get("constexprs", {}).items())
                               if k.startswith("BLOCK") or k.isupper())
            lines.append(f"| {r['kernel']} | {r.get('num_warps')} | {r.get('num_stages')} | {r.get('n_regs')} | "
                         f"{r.get('n_spills')} | {r.get('shared')} | {consts[:200]} |")
        lines.append("")
    tiles = result.get("gemm_tiles")
    if isinstance(tiles, list):
        for shape in dict.fromkeys(r.get("shape", "LLaVA-1.5 layer, M=4608") for r in tiles):
            lines += _table_head(f"GEMM tiles (bf16, {shape})", "GEMM", "kernel and tile", "ms", "TFLOP/s",
                                 "device ms", "launcher default")
            for r in tiles:
                if r.get("shape", "LLaVA-1.5 layer, M=4608") != shape:
                    continue
                dev = f"{r['device_ms']:.4f}" if "device_ms" in r else ""
                if "ms" in r:
                    lines.append(f"| {r['gemm']} | {r['tile']} | {r['ms']:.4f} | {r['tflops']:.0f} | {dev} | "
                                 f"{'yes' if r.get('chosen') else ''} |")
                else:
                    lines.append(f"| {r['gemm']} | {r['tile']} | failed: {r.get('error', '')[:120]} | | | |")
            lines.append("")
    pipe = result.get("attention_pipeline")
    if isinstance(pipe, list):
        lines += _table_head("Cross-attention pipeline depth and rows per program (bf16, device time; backward: "
                             "warps and tile are dQ's)", "shape", "batch", "pass", "kernel", "stages", "warps",
                             "query rows", "key splits", "device ms", "by kernel (ms)")
        for r in pipe:
            dev = f"{r['device_ms']:.4f}" if "device_ms" in r else f"failed: {r.get('error', '')[:100]}"
            rows_cell = r.get("dq_tile", r.get("block_m", ""))
            parts = ", ".join(f"{k.split('_kernel')[0][:40]} {v:.4f}"  # (ATen's names run long)
                              for k, v in sorted(r.get("kernels_ms", {}).items()))
            lines.append(f"| {r['shape']} | {r['batch']} | {r['pass']} | {r.get('impl', 'mmfuse')} | "
                         f"{r.get('stages', '')} | {r.get('warps', '')} | {rows_cell}"
                         f"{' (packed)' if r.get('packed') else ''} | "
                         f"{(r.get('splits') or 'auto') if r['pass'] == 'fwd' and 'impl' not in r else ''}"
                         f"{r.get('dq_splits', '')} | {dev} | "
                         f"{parts} |")
        lines.append("")
    versus = result.get("attention_vs_sdpa")
    if isinstance(versus, list):
        lines += _table_head("Cross-attention at its defaults against SDPA (enable_gqa), bf16, shared queries: "
                             "device and wall ms per call", "shape", "batch", "implementation", "fwd device",
                             "fwd wall", "fwd+bwd device", "fwd+bwd wall", "x SDPA (device: fwd, fwd+bwd)")
        sdpa = {(r["shape"], r["batch"]): r for r in versus if r["impl"] == "sdpa"}

        def cell(r, key):
            if key in r:
                return f"{r[key]:.4f}"
            return "not timed" if r["impl"] == WITHOUT_REPLAY and "device" in key else "failed"

        for r in versus:
            base = sdpa.get((r["shape"], r["batch"]), {})
            ratio = ", ".join(f"{base[k] / r[k]:.2f}" if k in r and k in base else "-"
                              for k in ("fwd device ms", "fwd+bwd device ms")) if r["impl"] == "mmfuse" else ""
            lines.append(f"| {r['shape']} | {r['batch']} | {r['impl']} | {cell(r, 'fwd device ms')} | "
                         f"{cell(r, 'fwd wall ms')} | {cell(r, 'fwd+bwd device ms')} | {cell(r, 'fwd+bwd wall ms')} | "
                         f"{ratio} |")
        lines.append("")
    splits = result.get("attention_splits")
    if isinstance(splits, list):
        lines += _table_head("Cross-attention forward at batch 1: the split's merge", "shape", "dtype",
                             "implementation", "splits", "ms", "device ms", "same bits as the merge launch")
        for r in splits:
            timing = f"{r['ms']:.4f}" if "ms" in r else f"failed: {r.get('error', '')[:100]}"
            dev = f"{r['device_ms']:.4f}" if "device_ms" in r else ""
            same = "" if "equal" not in r else "yes" if r["equal"] else "**NO**"
            lines.append(f"| {r['shape']} | {r.get('dtype', 'bfloat16')} | {r['impl']} | {r.get('splits', '')} | "
                         f"{timing} | {dev} | {same} |")
        lines.append("")
    forms = result.get("mapped_forms")
    if isinstance(forms, list):
        lines += _table_head("The merged projector's first GEMM taken apart (bf16, Linear + GELU)", "shape", "form",
                             "M x K x N", "ms", "TFLOP/s", "x unmapped")
        base = {r["shape"]: r["ms"] for r in forms if r["form"].startswith("unmapped") and "ms" in r}
        for r in forms:
            if "ms" in r:
                rel = f"{r['ms'] / base[r['shape']]:.2f}" if r["shape"] in base else ""
                lines.append(f"| {r['shape']} | {r['form']} | {r['M']} x {r['K']} x {r['N']} | {r['ms']:.4f} | "
                             f"{r['tflops']:.0f} | {rel} |")
            else:
                lines.append(f"| {r['shape']} | {r['form']} | {r['M']} x {r['K']} x {r['N']} | failed: "
                             f"{r.get('error', '')[:100]} | | |")
        lines.append("")
    dyn = result.get("dynamic_m")
    if isinstance(dyn, list):
        lines += _table_head("Dynamic token counts: a training step at each of 50 distinct counts (LLaVA-1.5 "
                             "projector)", "implementation", "pass", "s in all", "ms per step", "timing rounds so far")
        lines += [f"| {r['impl']} | {r['pass']} | {r['seconds']:.3f} | {r['ms_per_step']:.3f} | {r['timings']} |"
                  for r in dyn]
        lines.append("")
    for part in PARTS:
        if isinstance(result.get(part), dict) and "error" in result[part]:
            lines += ["", f"## {part}: failed", "", "```", result[part]["error"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--parts", nargs="*", default=list(PARTS))
    a = p.parse_args()
    raise SystemExit(main(a.out_dir, a.parts))
