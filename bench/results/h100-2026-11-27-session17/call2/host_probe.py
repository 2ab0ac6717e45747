"""Session 17's one-off probe (not committed): host time per call of the InternVL merged forward with and
without the token table's device-side validation, and of the LLaVA MLP forward."""
import time
import json
import sys

import torch
import triton.testing

import mmfuse
from mmfuse.bench.kernel_profile import device_ms
from mmfuse.bench.shapes import MERGED_SHAPES, by_name
from mmfuse.ops import merged as OM

out = {}


def host_us(fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def record(name, fn):
    h, w = host_us(fn)
    out[name] = {"host_us_per_call": round(h, 1), "wall_us_per_call": round(w, 1),
                 "do_bench_ms": round(triton.testing.do_bench(fn), 4), "device_ms": round(device_ms(fn), 4)}
    print(name, out[name], flush=True)


dt = torch.bfloat16
for name in ("internvl2-8b-mlp1", "qwen2.5-vl-7b-merger"):
    s = next(m for m in MERGED_SHAPES if m.name == name)
    T = s.tokens * 8
    widths = (s.group * s.channels, *s.widths)
    ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for k, n in zip(widths, widths[1:])]
    bs = [torch.randn(n, device="cuda", dtype=dt) for n in widths[1:]]
    x = torch.randn(T, s.channels, device="cuda", dtype=dt)
    width = widths[0] if s.norm_after_merge else s.channels
    nw = torch.randn(width, device="cuda", dtype=dt)
    nb = torch.randn(width, device="cuda", dtype=dt) if s.norm == "layer" else None
    table = torch.randperm(T, device="cuda").view(-1, s.group).to(torch.int32) if s.table else None

    def fwd():
        with torch.no_grad():
            return mmfuse.merged_mlp(x, ws, bs, group=s.group, token_map=table, norm=s.norm, norm_weight=nw,
                                     norm_bias=nb, eps=1e-6, norm_after_merge=s.norm_after_merge)
    record(f"{name} fwd", fwd)
    if table is not None:
        real = OM._check_token_values
        OM._check_token_values = lambda *a: None
        record(f"{name} fwd, table not validated", fwd)
        OM._check_token_values = real
        # the validation alone
        record(f"{name} table validation alone", lambda: real(table, T))

m = by_name("llava-1.5-7b")
x = torch.randn(m.tokens * 8, m.widths[0], device="cuda", dtype=dt)
ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for k, n in zip(m.widths, m.widths[1:])]
bs = [torch.randn(n, device="cuda", dtype=dt) for n in m.widths[1:]]


def mlp():
    with torch.no_grad():
        return mmfuse.mlp(x, ws, bs)


def eager():
    with torch.no_grad():
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, ws[0], bs[0])), ws[1], bs[1])


record("llava mlp fwd", mlp)
record("llava mlp fwd eager", eager)
json.dump(out, open(sys.argv[1], "w"), indent=1)
