"""Every kernel config compiled ahead of time, as the JIT would specialize it: it compiles, does not
spill, fits shared memory, and uses tensor cores where it should. For the architectures of
``MMFUSE_AOT_ARCHS``: sm_90 in the suite (tests/conftest.py), sm_80 too with MMFUSE_AOT_ARCHS=80,90."""

import pytest

from mmfuse._aot import ARCHS, all_specs, checked_archs, compile_all

SPECS = all_specs()
JOBS = [(s, a) for s in SPECS for a in checked_archs() if a in s.archs]


@pytest.mark.aot
@pytest.mark.xdist_group("aot")  # one worker compiles (itself 2 processes); _aot also locks across workers
@pytest.mark.parametrize("spec,arch", JOBS, ids=[f"{s.label}-{a}" for s, a in JOBS])
def test_compiles_without_spills(spec, arch):
    r = compile_all()[(spec.label, arch)]
    facts = ARCHS[arch]
    assert r.spill_bytes == 0, f"{spec.label} on {facts['name']}: {r.spill_bytes} bytes of spills ({r.registers} regs)"
    assert r.registers <= facts["max_regs"]
    assert r.shared_bytes <= facts["max_shared"], f"{spec.label}: {r.shared_bytes} B shared > {facts['max_shared']}"
    if spec.tensor_cores:
        expected = spec.sm90_instr if arch == 90 else "mma.sync"
        assert r.tensor_core_instr == expected, f"{spec.label} on {facts['name']}: {r.tensor_core_instr}"
        # Operands arrive in 128-bit pieces (16-byte cp.async, TMA or v4 loads; stores do not count),
        # not scalar loads: what the divisibility hints buy.
        if arch in spec.wide_load_archs:
            assert r.cp_async_16B or r.tma or r.vec128_loads > 0, f"{spec.label}: no 128-bit global loads"
    else:
        assert r.tensor_core_instr == "none"
    # From 3 stages a pipelined loop keeps the next copies in flight while it waits: no in-loop wait for
    # every copy (at 2, Triton's pipeliner waits for all of them at the top of each iteration, and the
    # attention kernels ran at ~15% of an SM's tensor-core rate on an H100; bench/NOTES.md, session 18).
    if spec.num_stages >= 3:
        assert r.exposed_copy_waits == 0, f"{spec.label} on {facts['name']}: {r.exposed_copy_waits} in-loop " \
                                          "waits for every async copy"
    # dK/dV walks its group's query heads and query blocks as one loop: nested, the pipeline restarted at
    # every head (bench/NOTES.md, session 21). (dQ restarts per sample of its batch loop, after ~all the
    # keys: kept.)
    if spec.kernel.endswith("attn_bwd_dkdv_kernel"):
        assert r.drained_loops == 0, f"{spec.label} on {facts['name']}: {r.drained_loops} loops drain every copy"
    # fp32 under TF32: the GEMM families round their operands to nearest first (Triton's TF32 MMA would
    # truncate them: twice the error of PyTorch's TF32 GEMMs; kernels/_common.py, ``mma``); nothing else
    # rounds. Cross-attention
    # keeps the truncation: rounding spilled 7 of its backward configs (bench/NOTES.md, session 14).
    rounds = spec.dtype == "fp32-tf32" and not spec.kernel.startswith("cross_attention")
    assert (r.tf32_rounds > 0) == rounds, f"{spec.label}: {r.tf32_rounds} TF32 roundings in the PTX"
    # The merged projector's forward on Hopper: normalising A in the load hands wgmma its A operand from
    # registers (a shared -> registers -> shared round trip per K step; 2.2 ms against an unmapped GEMM's
    # 0.84-0.90 ms on an H100, bench/NOTES.md); the folded RMSNorm forward reads A raw, and wgmma takes both
    # operands from shared memory as in every unmapped GEMM (16-bit: TF32 rounds A in registers anyway).
    cx = dict(spec.constexprs)
    if arch == 90 and spec.kernel.endswith("mapped_gemm_kernel") and cx["MAPPED"] == 0 and spec.dtype == "bf16":
        assert r.wgmma_a_registers == bool(cx["NORM"]), f"{spec.label}: wgmma A from registers {r.wgmma_a_registers}"
    # The Hopper core (the linear TMA kernel, the patch GEMMs' TMA form): its operands come by TMA, and
    # it runs persistent programs.
    if spec.kernel.endswith("tma_gemm_kernel") or dict(spec.constexprs).get("TMA") is True:
        assert r.tma, f"{spec.label}: no cp.async.bulk.tensor in the PTX"
        assert dict(spec.constexprs)["NUM_PROGRAMS"] > 0 and spec.archs == (90,), spec.label


@pytest.mark.aot
@pytest.mark.xdist_group("aot")
def test_the_exposed_wait_check_sees_two_stage_loops():
    """The checks above can fail: the 2-stage loops that remain (IEEE fp32 and fp64 attention, TF32's
    dK/dV) wait for every copy in their loops, and it sees them; dQ's loop over the batch drains its key
    loop's copies per sample, and the drain check sees that."""
    from mmfuse._aot import drained_loops, exposed_copy_waits

    two = [r for (label, arch), r in compile_all().items() if r.spec.num_stages == 2
           and r.spec.kernel.startswith("cross_attention/attn_")]
    assert two and all(r.exposed_copy_waits >= 1 for r in two), [r.spec.label for r in two if not r.exposed_copy_waits]
    loop = """  scf.for %i = %a to %b step %c {
    %t = ttg.async_wait %k, %v {num = 0 : i32}
    %d = ttg.async_wait %k {num = 2 : i32}
    scf.yield %x
  }
  %e = ttg.async_wait {num = 0 : i32}
"""
    assert exposed_copy_waits(loop) == 1
    # ... and the drain check sees dQ's batch loop, which restarts its key loop's pipeline per sample
    dq = [r for (label, arch), r in compile_all().items() if r.spec.kernel.endswith("attn_bwd_dq_kernel")
          and r.spec.num_stages >= 2]  # (one stage: no pipeline to drain)
    assert dq and all(r.drained_loops == 1 for r in dq), [r.spec.label for r in dq if r.drained_loops != 1]
    nest = """  scf.for %g = %a to %b step %c {
    %r = scf.for %i = %a to %n step %c {
      %w = ttg.async_wait %k {num = 2 : i32}
      scf.yield %x
    }
    %e = ttg.async_wait {num = 0 : i32}
    scf.yield %y
  }
"""
    assert drained_loops(nest) == 1 and drained_loops(loop) == 0  # (a drain after the outermost loop: none)


def test_replicated_dots_counts_products_whose_warps_cover_more_than_the_tile():
    """The figure the report prints: warps along M x 16 rows (or along N x the instruction's columns)
    beyond the product's tile. The layouts are those Triton 3.6 / 3.9 gave the attention forward on sm_90."""
    from mmfuse._aot import replicated_dots

    ttgir = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
  %qk = ttng.warp_group_dot %q, %kt, %c {isAsync = true} : !ttg.memdesc<64x128xbf16> * !ttg.memdesc<128x64xbf16> -> tensor<64x64xf32, #mma>
  %pv = ttng.warp_group_dot %p, %v, %a {isAsync = true} : tensor<64x64xbf16> * !ttg.memdesc<64x128xbf16> -> tensor<64x128xf32, #mma1>
  %wide = ttng.warp_group_dot %q2, %k2, %c2 : !ttg.memdesc<128x128xbf16> * !ttg.memdesc<128x64xbf16> -> tensor<128x64xf32, #mma>
  %dq = tt.dot %ds, %k, %z : tensor<32x64xf16> * tensor<64x32xf16> -> tensor<32x32xf32, #mma2>
"""
    # Q.K^T: 8 warps x 16 rows = 128 > 64 (counted); P.V at [4, 2]: 64 rows x 128 columns, exact; the
    # 128-row tile fits its 8 warps; mma.sync's 8 warps along N x 8 columns = 64 > 32 (counted).
    assert replicated_dots(ttgir) == 2


_REAL_COMPILES = """
import dataclasses, json
from mmfuse._aot import compile_spec
from mmfuse.kernels import cross_attention as KA

specs = KA.aot_specs()
fwd = next(s for s in specs if s.kernel.endswith("attn_fwd_kernel") and s.dtype == "bf16"
           and s.variant == "split-KV partial, lens+mask")
two = next(s for s in specs if s.kernel.endswith("attn_fwd_kernel") and s.num_stages == 2)
eight = dataclasses.replace(fwd, variant=fwd.variant + ", 8 warps", num_warps=8)
packed = dataclasses.replace(eight, variant=fwd.variant + ", packed heads",
                             constexprs=tuple(dict(fwd.constexprs, BLOCK_M=128, PACK_GQA=True).items()))
one = dataclasses.replace(packed, variant=packed.variant + ", one query", args=tuple(dict(fwd.args, Lq=1).items()))
out = {}
for name, spec in (("fwd", fwd), ("eight", eight), ("two", two), ("packed", packed), ("one", one)):
    r = compile_spec(spec, 90)
    out[name] = [r.spill_bytes, r.exposed_copy_waits, r.replicated_dots]
out["fwd warps"] = fwd.num_warps
print(json.dumps(out))
"""


@pytest.mark.aot
@pytest.mark.xdist_group("aot")
def test_the_attention_figures_on_real_compiles():
    """The two TTGIR figures read from this Triton's real output (a format change would otherwise read as
    0), and the opt-in packed forward (PACK_GQA) as the kernel profile's sweep launches it on an H100:
    * the 64-row, 8-warp forward tile duplicates a product (its Q.K^T layout covers 128 rows), the 4-warp
      one the launcher takes since session 20 (Idefics2's D = 96, bf16) does not, and a 2-stage attention
      loop waits for every copy;
    * the packed 128-row tile of two Idefics2 heads compiles for sm_90 without spills, exposed waits or
      duplicated products, and the packed form compiles with a single query per head (Lq = 1, which the
      JIT turns into a constant).
    Compiled in a subprocess without the interpreter (as ``compile_all`` does)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _REAL_COMPILES], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["eight"][2] >= 1 and got["two"][1] >= 1, got
    assert got["fwd"][0] == got["fwd"][2] == 0 and got["fwd warps"] == 4, got
    assert got["packed"] == [0, 0, 0] and got["one"][0] == 0, got
