"""Kernel launches (``kernels/_launch.py``): a kept specialisation's launcher is replayed only where
Triton's own path would launch the same compiled kernel with the same values; the call contract
(runtime arguments by position, constexprs by keyword) is enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from mmfuse.kernels import _launch


def _specimens():
    """Arguments of every kind a launcher passes, around each boundary Triton specialises on."""
    base = torch.empty(64, dtype=torch.float32)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -15, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16,
            -(2 ** 31), -(2 ** 31) - 1, -(2 ** 31) - 16, 2 ** 32, 2 ** 40 + 1, 2 ** 63 - 16, 2 ** 63, 2 ** 63 + 16,
            2 ** 64 - 16, 2 ** 64 - 1, -(2 ** 63), -(2 ** 63) + 16]
    tensors = [base[i:] for i in range(5)] + [base.to(dt)[i:] for dt in (torch.float16, torch.bfloat16)
                                              for i in (0, 1, 8)]
    tensors += [torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.int64)[1:], torch.empty(3, 5).t()]
    return ints + tensors + [0.0, 1.0, -2.5, 1e30, True, False, None]


def test_argument_classes_never_coarser_than_tritons_specialisation():
    # Two arguments that share a class must get the same specialisation from Triton (its own native
    # specialiser, as JITFunction.run calls it), or a replay would launch a kernel compiled for the other.
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    seen = {}
    for a in _specimens():
        cls = _launch._argument_classes((a,))[0]
        spec = native_specialize_impl(CUDABackend, a, False, True, True)
        assert seen.setdefault(cls, spec) == spec, (a, cls, spec, seen[cls])
    # ... and the classes are not trivially fine: ints fall into Triton's few classes
    assert len({_launch._argument_classes((i,))[0] for i in range(1, 1000)}) == 3
    # Past u64 and i64 Triton raises (and 3.6's launcher would wrap the value): Triton's path takes them
    for a in (2 ** 64, 2 ** 64 + 16, -(2 ** 63) - 1, -(2 ** 63) - 16):
        with pytest.raises(OverflowError):
            native_specialize_impl(CUDABackend, a, False, True, True)
        with pytest.raises(_launch._Unkeyed):
            _launch._argument_classes((a,))


@pytest.mark.parametrize("arg", [object(), "tf32", torch.float16, [1, 2]])
def test_an_argument_of_another_kind_takes_tritons_path(arg):
    with pytest.raises(_launch._Unkeyed):
        _launch._argument_classes((1, arg))


def _toy(x_ptr, n, scale, flag, BLOCK: tl.constexpr, DOUBLE: tl.constexpr = False):
    pass


def test_call_contract_names_the_argument():
    _launch.check_call(_toy, 4, ("BLOCK", "num_warps"))
    _launch.check_call(_toy, 4, ("BLOCK", "DOUBLE", "num_warps", "num_stages"))
    with pytest.raises(TypeError, match="_toy: constexpr 'BLOCK' must be passed by keyword"):
        _launch.check_call(_toy, 5, ())
    with pytest.raises(TypeError, match="_toy: runtime argument 'flag' must be passed by position"):
        _launch.check_call(_toy, 3, ("flag", "BLOCK"))
    with pytest.raises(TypeError, match="_toy: expected at most 6 positional arguments, got 7"):
        _launch.check_call(_toy, 7, ())
    assert _launch._tail(_toy, 4, {"BLOCK": 64, "num_warps": 4}) == (64, False)


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@pytest.mark.skipif(not _launch.INTERPRET, reason="the interpreter checks every launch's contract")
def test_interpreted_launches_check_the_contract():
    # Under the interpreter every launch is checked, so the suite checks every call site of the library.
    src, dst = torch.arange(10.0), torch.full((10,), float("nan"))
    _launch.launch_kernel(_copy_kernel, (2,), src, dst, 10, BLOCK=8)
    assert torch.equal(src, dst)
    with pytest.raises(TypeError, match="_copy_kernel: runtime argument 'n' must be passed by position"):
        _launch.launch_kernel(_copy_kernel, (2,), src, dst, n=10, BLOCK=8)
    with pytest.raises(TypeError, match="_copy_kernel: constexpr 'BLOCK' must be passed by keyword"):
        _launch.launch_kernel(_copy_kernel, (2,), src, dst, 10, 8)


def test_replayed_launches_are_tritons_own():
    # With the interpreter off, over the stand-in sm_90 driver: every launch of a spread of calls (each op,
    # forward and backward, and arguments that change a specialisation: an address off 16 bytes, a stride
    # of 1, another dtype, no bias, a padding mask, a second key source, the split forward's merge launch)
    # made as mmfuse makes it and again
    # by Triton's own path; the launchers must be handed the same compiled kernel and the same values.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = os.path.join(os.path.dirname(__file__), "_launch_worker.py")
    out = subprocess.run([sys.executable, worker], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["differences"] == [], report["differences"][:1]
    per_sweep = report["launches"] // 2
    # the first sweep replays only repeats of a key it has seen; the second replays every launch
    assert 0 < report["replayed_sweep_0"] < per_sweep and report["replayed_sweep_1"] == per_sweep, report
    assert {"fused_gemm_kernel", "act_grad_kernel", "patch_embed_fwd_kernel", "patch_embed_dx_kernel",
            "patch_embed_dw_kernel", "batch_sum_kernel", "attn_fwd_kernel", "attn_combine_kernel",
            "attn_delta_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "norm_stats_kernel",
            "mapped_gemm_kernel", "norm_bwd_kernel"} <= set(report["kernels"]), report
    # with a launch hook installed (a profiler), every launch takes Triton's path
    assert report["hooked_jit_runs"] == report["hooked_launches"] > 0, report


def test_replay_setting_is_checked_at_import():
    env = {**os.environ, "MMFUSE_LAUNCH_REPLAY": "yes"}
    proc = subprocess.run([sys.executable, "-c", "import mmfuse"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MMFUSE_LAUNCH_REPLAY: expected '0' or '1', got 'yes'" in proc.stderr
    env["MMFUSE_LAUNCH_REPLAY"] = "0"
    proc = subprocess.run([sys.executable, "-c", "from mmfuse.kernels import _launch; print(_launch.REPLAY)"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
