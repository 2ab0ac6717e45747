"""Session 20's second H100 call: the attention forward at its new default (4 warps up to D = 128) against
SDPA with enable_gqa, forward and forward+backward, device time and host time per call; and the tile
sweep at more batches. Run from outside the repository with the wheel on PYTHONPATH: probe.py OUT.json"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from mmfuse import cross_attention
from mmfuse.bench.kernel_profile import attention_pipeline_sweep, device_ms
from mmfuse.bench.shapes import ATTENTION_SHAPES
from mmfuse.kernels import cross_attention as KA

out = {"device": torch.cuda.get_device_name()}


def host_ms(fn, calls=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


rows = []
for s in ATTENTION_SHAPES:
    for batch in (1, 8, 64):
        q = torch.randn(1, s.heads, s.queries, s.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, s.kv_heads, s.keys, s.head_dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        do = torch.randn(batch, s.heads, s.queries, s.head_dim, device="cuda", dtype=torch.bfloat16)
        gqa = s.heads != s.kv_heads
        blk = KA.blocks_for(s.queries, s.head_dim)

        def ours():
            return cross_attention(q, k, v)

        def ours_fb():
            cross_attention(q, k, v).backward(do)

        def sdpa():
            return F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v, enable_gqa=gqa)

        def sdpa_fb():
            sdpa().backward(do)

        row = {"shape": s.name, "batch": batch, "warps": blk["num_warps"], "block_m": blk["BLOCK_M"]}
        for name, fn in (("mmfuse fwd", ours), ("sdpa fwd", sdpa), ("mmfuse fwd+bwd", ours_fb),
                         ("sdpa fwd+bwd", sdpa_fb)):
            try:
                with torch.no_grad() if "bwd" not in name else torch.enable_grad():
                    row[name + " device ms"] = device_ms(fn)
                    row[name + " host ms"] = host_ms(fn)
            except Exception as e:  # a finding, not a stop
                row[name + " error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(row, flush=True)
out["default_vs_sdpa"] = rows
cases = (("idefics2-resampler", 64, ((3, 8, 64), (3, 4, 64), (3, 8, 128)), ()),
         ("idefics2-resampler", 2, ((3, 8, 64), (3, 4, 64), (3, 8, 128)), ()),
         ("idefics2-resampler", 1, ((3, 4, 64),), ()))
try:
    out["pipeline"] = attention_pipeline_sweep(cases=cases)
except Exception as e:
    out["pipeline"] = f"{type(e).__name__}: {e}"
print(out["pipeline"], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
