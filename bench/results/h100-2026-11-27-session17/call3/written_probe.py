"""Session 17, call 3: the merged forward with its operand written once against read in the load, on the
Qwen2.5-VL merger and InternVL2-8B's mlp1 at 8 images (bf16): do_bench per call and device time, forward
and forward+backward; and the new table check's host time. Run from outside the checkout (mmfuse from
the wheel)."""
import json
import sys
import time

import torch
import triton.testing

import mmfuse
from mmfuse.bench.kernel_profile import device_ms
from mmfuse.bench.shapes import MERGED_SHAPES
from mmfuse.kernels import merged_gemm as KM
from mmfuse.ops import merged as OM

out = {}
dt = torch.bfloat16
for name in ("qwen2.5-vl-7b-merger", "internvl2-8b-mlp1"):
    s = next(m for m in MERGED_SHAPES if m.name == name)
    T = s.tokens * 8
    widths = (s.group * s.channels, *s.widths)
    ws = [(torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5).requires_grad_() for k, n in zip(widths, widths[1:])]
    bs = [torch.randn(n, device="cuda", dtype=dt).requires_grad_() for n in widths[1:]]
    x = torch.randn(T, s.channels, device="cuda", dtype=dt).requires_grad_()
    width = widths[0] if s.norm_after_merge else s.channels
    nw = torch.randn(width, device="cuda", dtype=dt).requires_grad_()
    nb = torch.randn(width, device="cuda", dtype=dt).requires_grad_() if s.norm == "layer" else None
    table = torch.randperm(T, device="cuda").view(-1, s.group).to(torch.int32) if s.table else None
    leaves = [x, *ws, *bs, nw] + ([nb] if nb is not None else [])

    def call():
        return mmfuse.merged_mlp(x, ws, bs, group=s.group, token_map=table, norm=s.norm, norm_weight=nw,
                                 norm_bias=nb, eps=1e-6, norm_after_merge=s.norm_after_merge, _table_checked=True)

    def fwd():
        with torch.no_grad():
            return call()

    g = torch.randn(T // s.group, widths[-1], device="cuda", dtype=dt)

    def step():
        return torch.autograd.grad(call(), leaves, g)

    for mode in ("in-load", "written"):
        KM.MERGED_FORWARD = mode
        ref = fwd()
        row = {"fwd_ms": triton.testing.do_bench(fwd), "fwd_device_ms": device_ms(fwd),
               "step_ms": triton.testing.do_bench(step), "step_device_ms": device_ms(step)}
        out[f"{name} {mode}"] = {k: round(v, 4) for k, v in row.items()}
        print(name, mode, out[f"{name} {mode}"], flush=True)
    KM.MERGED_FORWARD = "in-load"
    a = fwd()
    KM.MERGED_FORWARD = "written"
    b = fwd()
    out[f"{name} max |in-load - written| / max |out|"] = float((a - b).abs().max() / a.abs().max())
    KM.MERGED_FORWARD = "auto"
    if table is not None:
        def check():
            OM._check_token_values(table, T)
        for _ in range(10):
            check()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            check()
        out[f"{name} table check host us"] = round((time.perf_counter() - t0) / 200 * 1e6, 1)
        torch.cuda.synchronize()
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
