"""The GPU benchmark suite: every op x real shape x mode x dtype, against every baseline a user would
otherwise pick. ``mmfuse bench`` runs it (``bench/test_bench.py`` exposes the same cases to
pytest-benchmark); without CUDA it writes the exact no-GPU report instead.

Timing (``time_cuda``): warm-up, then the median of many runs timed with CUDA events, cycling through
enough input sets that together they exceed the L2 cache, so no implementation is flattered by a warm
cache. The timer is a parameter of ``run_suite``, so tests drive the whole path with a fake one.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from mmfuse.bench.shapes import ATTENTION_SHAPES, GATED_SHAPES, MERGED_SHAPES, MLP_SHAPES, PATCH_SHAPES

L2_BYTES = 50 * 2**20  # H100: 50 MB of L2; input sets are rotated past it


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                       # "mlp", "patch_embed", "cross_attention"
    shape: str                    # a name from bench/shapes.py
    mode: str                     # "fwd" or "fwd+bwd"
    dtype: str                    # "bfloat16" or "float16"
    impl: str                     # "mmfuse" or a baseline
    flops: float                  # of the forward (fwd+bwd: times 1 + BACKWARD_FLOPS[op])
    make: Callable = dataclasses.field(compare=False, hash=False, repr=False)  # (device, dtype) -> (inputs, fn)

    @property
    def name(self) -> str:
        return f"{self.op}/{self.shape}/{self.mode}/{self.dtype}/{self.impl}"


def _mlp_impls():
    import mmfuse

    def mmfuse_fn(x, ws, bs, act="gelu"):
        return mmfuse.mlp(x, ws, bs, act)

    def eager(x, ws, bs, act="gelu"):
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = F.linear(x, w, b)
            x = F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none") if i < len(ws) - 1 else x
        return x

    def addmm_activation(x, ws, bs, act="gelu"):  # cuBLASLt's GELU epilogue: the tanh approximation, not erf
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = torch._addmm_activation(b, x, w.t(), use_gelu=True) if i < len(ws) - 1 else F.linear(x, w, b)
        return x

    return {"mmfuse": mmfuse_fn, "eager": eager, "torch.compile": torch.compile(eager),
            "torch.compile max-autotune": torch.compile(eager, mode="max-autotune"),
            "addmm_activation": addmm_activation}


def _gated_impls():
    import mmfuse

    def eager(x, w, b):  # transformers' down(act(gate(x)) * up(x))
        return F.linear(F.silu(F.linear(x, w[0], b[0])) * F.linear(x, w[1], b[1]), w[2], b[2])

    def mmfuse_linears(x, w, b):  # mmfuse before the gated GEMM: act fused into the gate's Linear, product in torch
        return mmfuse.linear(mmfuse.linear(x, w[0], b[0], "silu") * mmfuse.linear(x, w[1], b[1]), w[2], b[2])

    return {"mmfuse": lambda x, w, b: mmfuse.gated_mlp(x, *w, *b), "eager": eager,
            "torch.compile": torch.compile(eager), "mmfuse linears": mmfuse_linears}


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A merged case's non-tensor arguments (the token table is an input, not a parameter)."""
    group: int
    table: torch.Tensor | None
    norm: str | None
    post: bool
    gated: bool = False  # SwiGLU on one chunked weight ([up | gate], Aya Vision), then down
    pool: bool = False   # the mean of the group's tokens (Gemma 3's AvgPool2d), its norm scaled by 1 + weight


def _merged_impls():
    import mmfuse

    def glue(x, ws, bs, nw, nb, spec):  # the module's norm and merge in PyTorch
        group, table, norm, post = spec.group, spec.table, spec.norm, spec.post
        C = x.shape[-1]
        if spec.pool:  # the table's windows pooled (a gather and a mean), Gemma3RMSNorm in fp32
            p = x[table].mean(1)
            p32 = p.float()
            return (p32 * torch.rsqrt(p32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + nw.float())).to(x.dtype)

        def norm_(t):
            if norm is None:  # (a connector without a norm: Idefics3)
                return t
            if norm == "layer":
                return F.layer_norm(t, t.shape[-1:], nw, nb, 1e-6)
            t32 = t.float()
            return nw * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(t.dtype)

        if not post:
            x = norm_(x)
        x = (x[table] if table is not None else x).reshape(-1, group * C)
        return norm_(x) if post else x

    def eager(x, ws, bs, nw, nb, spec):
        x = glue(x, ws, bs, nw, nb, spec)
        if spec.gated:  # the module's code: x, gate = linear_1(x).chunk(2); linear_2(act(gate) * x)
            up, gate = F.linear(x, ws[0], bs[0]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, ws[1], bs[1])
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = F.linear(x, w, b)
            x = F.gelu(x) if i < len(ws) - 1 else x
        return x

    def mmfuse_glue(x, ws, bs, nw, nb, spec):  # mmfuse before the merged GEMM: PyTorch glue, fused MLP
        x = glue(x, ws, bs, nw, nb, spec)
        if spec.pool:
            return mmfuse.linear(x, ws[0], bs[0])
        if spec.gated:
            n = ws[0].shape[0] // 2
            return mmfuse.gated_mlp(x, ws[0][n:], ws[0][:n], ws[1], bs[0][n:], bs[0][:n], bs[1], "silu")
        return mmfuse.mlp(x, ws, bs)

    def fused(x, ws, bs, nw, nb, spec):
        group, table, norm, post = spec.group, spec.table, spec.norm, spec.post
        return mmfuse.merged_mlp(x, ws, bs, "silu" if spec.gated else "gelu", group=group, token_map=table,
                                 norm=norm, norm_weight=nw, norm_bias=nb if norm == "layer" else None, eps=1e-6,
                                 norm_after_merge=post, gate_half=1 if spec.gated else None, pool=spec.pool,
                                 norm_weight_offset=1.0 if spec.pool else 0.0)

    return {"mmfuse": fused, "eager": eager, "torch.compile": torch.compile(eager), "mmfuse glue": mmfuse_glue}


def _patch_impls():
    import mmfuse

    def reshape_gemm(px, w, b, pos):  # patchify copy, then one GEMM (Qwen2-VL / vLLM style)
        B, C = px.shape[:2]
        kernel = w.shape[2:]                          # (P, P) or (T, P, P)
        grid = [n // k for n, k in zip(px.shape[2:], kernel)]
        split = [d for g, k in zip(grid, kernel) for d in (g, k)]
        nd = len(kernel)
        order = [0] + [2 + 2 * i for i in range(nd)] + [1] + [3 + 2 * i for i in range(nd)]
        patches = px.reshape(B, C, *split).permute(*order).reshape(B, math.prod(grid), -1)
        return F.linear(patches, w.reshape(w.shape[0], -1), b) + pos

    def eager(px, w, b, pos):  # nn.Conv2d / nn.Conv3d with kernel == stride, as the vision towers run it
        conv = F.conv2d if px.dim() == 4 else F.conv3d
        return conv(px, w, b, stride=w.shape[2:]).flatten(2).transpose(1, 2) + pos

    return {"mmfuse": lambda px, w, b, pos: mmfuse.patch_embed(px, w, b, pos), "eager": eager,
            "reshape+GEMM": reshape_gemm, "torch.compile": torch.compile(eager)}


def _patch_rows_impls():
    """Qwen2-VL / 2.5-VL / 3-VL's patch embedding as those models feed it: pre-cut rows of C*T*P*P pixels."""
    import mmfuse
    from mmfuse._dispatch import plain_gemm

    def eager(rows, w, b):  # transformers' PatchEmbed: each row viewed as a (C, T, P, P) clip, one Conv3d
        return F.conv3d(rows.view(-1, *w.shape[1:]), w, b, stride=w.shape[2:]).view(-1, w.shape[0])

    def fused(rows, w, b):  # mmfuse.patch's Qwen2VLPatchEmbed: one GEMM on the rows, with nothing to fuse
        return plain_gemm(rows, w.reshape(w.shape[0], -1), b)  # (F.linear unless MMFUSE_PLAIN_GEMMS=mmfuse)

    def mmfuse_gemm(rows, w, b):  # the same GEMM on mmfuse's kernel (what MMFUSE_PLAIN_GEMMS=mmfuse runs)
        return mmfuse.linear(rows, w.reshape(w.shape[0], -1), b)

    return {"mmfuse": fused, "eager": eager, "torch.compile": torch.compile(eager), "mmfuse GEMM": mmfuse_gemm}


def _attention_impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mmfuse

    def expanded(q, k, v):  # what the transformers modules feed to attention: repeat_kv, queries per sample
        group = q.shape[1] // k.shape[1]
        return q.expand(k.shape[0], -1, -1, -1), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def eager(q, k, v):  # transformers' eager attention: scores, softmax in fp32, weighted sum
        q, k, v = expanded(q, k, v)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*expanded(q, k, v))
        return fn

    def sdpa_gqa(q, k, v):  # grouped heads without the repeat copies; PyTorch picks the backend
        return F.scaled_dot_product_attention(q.expand(k.shape[0], -1, -1, -1), k, v, enable_gqa=True)

    return {"mmfuse": lambda q, k, v: mmfuse.cross_attention(q, k, v), "eager": eager,
            "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa math": sdpa(SDPBackend.MATH),
            "sdpa enable_gqa": sdpa_gqa}


ATTENTION_IMPLS = ("mmfuse", "eager", "sdpa flash", "sdpa efficient", "sdpa cudnn", "sdpa math", "sdpa enable_gqa")
#: FLOPs of forward + backward over the forward's: a GEMM's backward is two GEMMs of its size; attention's
#: is 2.5 forwards (5 matrix products against 2: the convention of FlashAttention's benchmarks).
BACKWARD_FLOPS = {"mlp": 2.0, "gated_mlp": 2.0, "merged_mlp": 2.0, "patch_embed": 2.0, "patch_rows": 2.0,
                  "cross_attention": 2.5}
PATCH_ROWS_IMPLS = ("mmfuse", "eager", "torch.compile", "mmfuse GEMM")
GATED_IMPLS = ("mmfuse", "eager", "torch.compile", "mmfuse linears")
MERGED_IMPLS = ("mmfuse", "eager", "torch.compile", "mmfuse glue")


def cases(dtypes=("bfloat16", "float16"), modes=("fwd", "fwd+bwd"), images: int = 8) -> list[Case]:
    """Every op x shape x mode x dtype x implementation (baselines built lazily on first use)."""
    out = []
    for s in MLP_SHAPES:
        M = s.tokens * images
        flops = sum(2 * M * k * n for k, n in zip(s.widths, s.widths[1:]))

        def make(device, dtype, s=s, M=M):
            x = torch.randn(M, s.widths[0], device=device, dtype=dtype)
            ws = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for k, n in zip(s.widths, s.widths[1:])]
            bs = [torch.randn(n, device=device, dtype=dtype) for n in s.widths[1:]]
            return [x, ws, bs, s.activation]

        # torch._addmm_activation has no derivative: a forward-only baseline.
        out += [Case("mlp", s.name, m, d, impl, flops, make) for m in modes for d in dtypes
                for impl in ("mmfuse", "eager", "torch.compile", "torch.compile max-autotune", "addmm_activation")
                if not (impl == "addmm_activation" and m != "fwd")]
    for s in GATED_SHAPES:
        M = s.tokens * images
        flops = 2 * M * s.hidden * (2 * s.features + s.out)

        def make(device, dtype, s=s, M=M):
            x = torch.randn(M, s.features, device=device, dtype=dtype)
            ws = [torch.randn(s.hidden, s.features, device=device, dtype=dtype) / s.features ** 0.5 for _ in range(2)]
            ws.append(torch.randn(s.out, s.hidden, device=device, dtype=dtype) / s.hidden ** 0.5)
            bs = [torch.randn(n, device=device, dtype=dtype) if s.bias else None for n in (s.hidden, s.hidden, s.out)]
            return [x, ws, bs]

        out += [Case("gated_mlp", s.name, m, d, impl, flops, make) for m in modes for d in dtypes for impl in GATED_IMPLS]
    for s in MERGED_SHAPES:
        T = s.tokens * images
        widths = (s.channels if s.pool else s.group * s.channels, *s.widths)
        # gated: the first Linear is 2N wide (up and gate), the second reads N
        outs = (2 * s.widths[0], *s.widths[1:]) if s.gated else widths[1:]
        flops = sum(2 * (T // s.group) * k * n for k, n in zip(widths, outs))

        def make(device, dtype, s=s, T=T, widths=widths, outs=outs):
            x = torch.randn(T, s.channels, device=device, dtype=dtype)
            ws = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for k, n in zip(widths, outs)]
            bs = [torch.randn(n, device=device, dtype=dtype) if s.bias else None for n in outs]
            width = widths[0] if s.norm_after_merge else s.channels  # (pooled: C wide)
            nw = torch.randn(width, device=device, dtype=dtype)
            nb = torch.randn(width, device=device, dtype=dtype) if s.norm == "layer" else None
            table = torch.randperm(T, device=device).view(-1, s.group).to(torch.int32) if s.table else None
            return [x, ws, bs, nw, nb, MergeSpec(s.group, table, s.norm, s.norm_after_merge, s.gated, s.pool)]

        out += [Case("merged_mlp", s.name, m, d, impl, flops, make) for m in modes for d in dtypes
                for impl in MERGED_IMPLS]
    for s in PATCH_SHAPES:
        flops = 2 * s.tokens * images * s.dim * s.channels * s.temporal * s.patch * s.patch

        def make(device, dtype, s=s):
            video = s.temporal > 1  # Conv3d: pixels (B, C, F, H, W), weight (D, C, T, P, P)
            frames, kernel = ((s.frames,), (s.temporal,)) if video else ((), ())
            px = torch.randn(images, s.channels, *frames, *s.image, device=device, dtype=dtype)
            w = torch.randn(s.dim, s.channels, *kernel, s.patch, s.patch, device=device, dtype=dtype) * 0.02
            return [px, w, torch.zeros(s.dim, device=device, dtype=dtype),
                    torch.randn(s.tokens, s.dim, device=device, dtype=dtype)]

        out += [Case("patch_embed", s.name, m, d, impl, flops, make) for m in modes for d in dtypes
                for impl in ("mmfuse", "eager", "reshape+GEMM", "torch.compile")]
        if s.temporal > 1:  # the video towers' own input: pre-cut rows (the cuDNN Conv3d of issue 11)

            def make_rows(device, dtype, s=s):
                k = s.channels * s.temporal * s.patch * s.patch
                rows = torch.randn(s.tokens * images, k, device=device, dtype=dtype)
                w = torch.randn(s.dim, s.channels, s.temporal, s.patch, s.patch, device=device, dtype=dtype) * 0.02
                return [rows, w, None]

            out += [Case("patch_rows", s.name, m, d, impl, flops, make_rows) for m in modes for d in dtypes
                    for impl in PATCH_ROWS_IMPLS]
    for s in ATTENTION_SHAPES:
        flops = 4 * images * s.heads * s.queries * s.keys * s.head_dim

        def make(device, dtype, s=s):
            q = torch.randn(1, s.heads, s.queries, s.head_dim, device=device, dtype=dtype)
            k = torch.randn(images, s.kv_heads, s.keys, s.head_dim, device=device, dtype=dtype)
            return [q, k, torch.randn_like(k)]

        out += [Case("cross_attention", s.name, m, d, impl, flops, make) for m in modes for d in dtypes
                for impl in ATTENTION_IMPLS]
    return out


_IMPLS = {"mlp": _mlp_impls, "gated_mlp": _gated_impls, "merged_mlp": _merged_impls, "patch_embed": _patch_impls,
          "patch_rows": _patch_rows_impls, "cross_attention": _attention_impls}

#: ``mmfuse bench --profile quick`` (what ``mmfuse gpu-check`` runs in its few minutes): per op family
#: two real shapes, mmfuse against eager and the strongest baselines that need no compile step, bf16,
#: forward and forward+backward. No torch.compile: its max-autotune compiles alone exceed the budget.
QUICK_PROFILE = {
    # (the SigLIP-so400m tower MLP: issue 12 asks for a tower MLP timed; the Qwen mergers are merged_mlp's.
    # PaliGemma's and Florence-2's single Linear, no activation: measured 0.17-0.26x of F.linear through
    # mmfuse's GEMM (NOTES, session 14), so `patch` leaves them as PyTorch's; kept to watch the gap.)
    "mlp": (("llava-1.5-7b", "siglip-so400m-tower-mlp", "paligemma-3b-224", "florence-2-large-projection"),
            ("mmfuse", "eager", "addmm_activation")),
    "gated_mlp": (("qwen2.5-vl-7b-tower-mlp", "idefics2-8b-connector-mlp"), ("mmfuse", "eager", "mmfuse linears")),
    "merged_mlp": (("qwen2.5-vl-7b-merger", "internvl2-8b-mlp1"), ("mmfuse", "eager", "mmfuse glue")),
    "patch_embed": (("clip-l-14-336", "qwen2-vl"), ("mmfuse", "eager", "reshape+GEMM")),
    "patch_rows": (("qwen2-vl", "qwen2.5-vl-7b"), ("mmfuse", "eager", "mmfuse GEMM")),
    "cross_attention": (("idefics2-resampler", "blip2-qformer-xattn"),
                        ("mmfuse", "eager", "sdpa efficient", "sdpa enable_gqa")),
}
PROFILES = ("full", "quick")


def profile_cases(profile: str = "full") -> list[Case]:
    """The cases of a named profile: "full" (every case) or "quick" (``QUICK_PROFILE``, bf16)."""
    if profile == "full":
        return cases()
    if profile != "quick":
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    return [c for c in cases(dtypes=("bfloat16",))
            if c.shape in QUICK_PROFILE[c.op][0] and c.impl in QUICK_PROFILE[c.op][1]]


def _tensors(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _tensors(a)
        elif isinstance(a, torch.Tensor):
            yield a


def _with_grad(args):
    return [[t.detach().requires_grad_() if t is not None else None for t in a] if isinstance(a, list)
            else a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a  # (a merged case's spec)
            for a in args]


def prepare(case: Case, device: str, impls: dict | None = None):
    """(input sets, step): enough input sets to exceed L2, and a step(args) running one iteration."""
    dtype = getattr(torch, case.dtype)
    impls = impls or _IMPLS[case.op]()
    fn = impls[case.impl]
    first = case.make(device, dtype)
    per_set = sum(t.numel() * t.element_size() for t in _tensors(first))
    sets = [first] + [case.make(device, dtype) for _ in range(min(15, math.ceil(L2_BYTES / max(per_set, 1))))]
    if case.mode == "fwd":
        def step(args):
            with torch.no_grad():
                return fn(*args)
    else:
        sets = [_with_grad(a) for a in sets]
        grad_out = {}

        def step(args):
            # Gradients returned, not accumulated into .grad: no extra read-modify-write per step.
            out = fn(*args)
            g = grad_out.get(out.shape)
            if g is None:
                g = grad_out[out.shape] = torch.randn_like(out)
            torch.autograd.grad(out, list(_tensors(args)), g)
            return out
    return sets, step


def time_cuda(sets, step, warmup: int = 5, reps: int = 50) -> float:
    """Median milliseconds of ``step`` over ``reps`` runs, cycling through ``sets``."""
    for i in range(warmup):
        step(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings(timer=time_cuda, device: str = "cuda", n: int = 8192, copy_bytes: int = 2**28) -> dict:
    """Measured roofline in this run: a big bf16 GEMM (TFLOP/s) and a big copy (GB/s)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timer([[a, a]], lambda args: args[0] @ args[1])
    src = torch.empty(copy_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms_copy = timer([[src, dst]], lambda args: args[1].copy_(args[0]))
    return {"tflops": 2 * n ** 3 / ms / 1e9, "gbps": 2 * src.numel() / ms_copy / 1e6}


def min_bytes(args, mode: str) -> int:
    """The least HBM traffic of one step, for GB/s: every input read once and an output of the first
    input's rows written once (forward); forward+backward counts that three times (the forward, the
    backward reading the same operands and the upstream gradient, writing the input gradients).
    A floor, not any implementation's real traffic (``mmfuse report`` models that)."""
    inputs = sum(t.numel() * t.element_size() for t in _tensors(args))
    return inputs * (3 if mode == "fwd+bwd" else 1)


def run_suite(selected: list[Case], timer=time_cuda, device: str = "cuda", progress=print,
              roof: dict | None = None) -> list[dict]:
    """Time each case; one result row per case (an implementation that fails gets its error).
    ``roof``: the ceilings to report against (measured in this run by default)."""
    roof = roof or ceilings(timer, device)
    rows = []
    impl_cache = {}
    for i, case in enumerate(selected, 1):
        progress(f"[{i}/{len(selected)}] {case.name}")
        row = {"case": case.name, "op": case.op, "shape": case.shape, "mode": case.mode, "dtype": case.dtype,
               "impl": case.impl}
        try:
            impls = impl_cache.setdefault(case.op, _IMPLS[case.op]())
            sets, step = prepare(case, device, impls)
            ms = timer(sets, step)
            flops = case.flops * (1 + BACKWARD_FLOPS[case.op] if case.mode == "fwd+bwd" else 1)
            moved = min_bytes(sets[0], case.mode)
            row.update(ms=ms, tflops=flops / ms / 1e9, gbps=moved / ms / 1e6, min_bytes=moved,
                       roofline_fraction=max(flops / ms / 1e9 / roof["tflops"], moved / ms / 1e6 / roof["gbps"]))
        except Exception as e:  # a baseline may be unavailable on this GPU (cuDNN, flash for a head dim)
            row.update(error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)
        # each result as it comes: a run stopped by a time limit still leaves its log
        progress(f"    {row['ms']:.4f} ms" if "ms" in row else f"    failed: {row['error']}")
    for row in rows:  # speedup of mmfuse against each baseline of the same case
        ref = next((r for r in rows if r.get("ms") and r["impl"] == "mmfuse" and r["case"].rsplit("/", 1)[0] ==
                    row["case"].rsplit("/", 1)[0]), None)
        if ref and row.get("ms"):
            row["mmfuse_speedup"] = row["ms"] / ref["ms"]
    return [{"ceilings": roof}] + rows


def environment() -> dict:
    """Versions a result depends on, written beside it."""
    import triton

    import mmfuse

    return {"torch": torch.__version__, "triton": triton.__version__, "mmfuse": mmfuse.__version__,
            "cuda": torch.version.cuda}


def write_results(rows: list[dict], out_dir: str, gpu: str, date: str | None = None) -> dict[str, str]:
    """<gpu>-<date>.json / .csv / .md (and .png per op when matplotlib is installed)."""
    date = date or datetime.date.today().isoformat()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{gpu.replace(' ', '_')}-{date}")
    paths = {"json": stem + ".json", "csv": stem + ".csv", "md": stem + ".md"}
    env = environment()
    with open(paths["json"], "w") as f:
        json.dump({"gpu": gpu, "date": date, **env, "rows": rows}, f, indent=1)
    data = [r for r in rows if "case" in r]
    fields = ["case", "op", "shape", "mode", "dtype", "impl", "ms", "tflops", "gbps", "min_bytes", "roofline_fraction",
              "mmfuse_speedup",
              "error"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in data:
            w.writerow({k: r.get(k, "") for k in fields})
    lines = [f"# mmfuse benchmark, {gpu}, {date} (measured)", "",
             f"torch {env['torch']}, Triton {env['triton']}, mmfuse {env['mmfuse']}", "",
             "| case | ms | TFLOP/s | GB/s (floor bytes) | of roofline | baseline ms / mmfuse ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in data:
        if "ms" in r:
            lines.append(f"| {r['case']} | {r['ms']:.4f} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
                         f"{r['roofline_fraction']:.0%} | "
                         f"{r.get('mmfuse_speedup', float('nan')):.2f} |")
        else:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | |")
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    for op in sorted({r["op"] for r in data}):
        pts = [r for r in data if r["op"] == op and r.get("mmfuse_speedup") and r["impl"] != "mmfuse"]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.barh([r["case"].split("/", 1)[1] for r in pts], [r["mmfuse_speedup"] for r in pts])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speedup of mmfuse (baseline time / mmfuse time)")
        fig.tight_layout()
        paths[f"png:{op}"] = f"{stem}-{op}.png"
        fig.savefig(paths[f"png:{op}"])
        plt.close(fig)
    return paths
