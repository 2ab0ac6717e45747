"""Run by tests/test_launch.py as a script, with the Triton interpreter off: every launch as mmfuse makes
it (a kept specialisation's launcher replayed) against the same launch by Triton's own path, over
bench/host_overhead.py's stand-in sm_90 driver (kernels compiled ahead of time, launchers that record).

Prints one JSON object: how many launches were made and how many of them replayed (in all, and in each of
two sweeps over the calls), the kernels launched, every launch whose two runs differed, and, with a launch
hook installed, how many launches were made and how many went through ``JITFunction.run``."""

import json
import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import mmfuse  # noqa: E402
from mmfuse.bench import host_overhead as H  # noqa: E402


class RecordingDriver(H._StandInDriver):
    """Launchers that record what they are handed: which compiled kernel (its hash), the grid, the stream,
    the packed metadata and every argument (a tensor as its address, shape and strides)."""

    def launcher_cls(self, src, metadata):
        name = src.fn.__name__

        def launch(g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
            self.log.append([name, metadata.hash, [g0, g1, g2], stream, repr(packed),
                             [[a.data_ptr(), list(a.shape), list(a.stride())] if isinstance(a, torch.Tensor)
                              else repr(a) for a in args]])
        return launch


def calls():
    """Each op on small shapes, then again on arguments that change a specialisation: an address off 16
    bytes, a stride of 1, another dtype, no bias, a padding mask, a second key source."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w, b = t(7, 24), t(40, 24), t(40)
    x_off = t(7 * 24 + 1)[1:].view(7, 24)  # 2 bytes past a 16-byte boundary
    w_t = t(24, 40).t()  # stride (1, 40)
    xb, wb = t(7, 24, dtype=torch.bfloat16), t(40, 24, dtype=torch.bfloat16)
    ws, bs = [t(40, 24), t(16, 40)], [t(40), t(16)]
    px, pw, pb, pos = t(1, 3, 28, 28), t(24, 3, 14, 14), t(24), t(4, 24)
    q, k, v = t(1, 2, 5, 16), t(2, 1, 19, 16), t(2, 1, 19, 16)
    k2, v2 = t(2, 1, 6, 16), t(2, 1, 6, 16)
    lens = torch.tensor([19, 7], dtype=torch.int32)
    xm, w1m, w2m, gm = t(6, 12), t(16, 24), t(8, 16), t(12) + 1
    kl, vl = t(2, 1, 150, 16), t(2, 1, 150, 16)  # keys enough for two splits of the GPU's key blocks
    from mmfuse.kernels.cross_attention import attention_fwd

    def backward(fn, *inputs):
        inputs = [i.detach().requires_grad_() for i in inputs]
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return [
        lambda: mmfuse.linear(x, w, b, "gelu"),
        lambda: mmfuse.linear(x, w, b, "gelu"),
        lambda: mmfuse.linear(x_off, w, b, "gelu"),
        lambda: mmfuse.linear(x, w_t, None),
        lambda: mmfuse.linear(xb, wb, None),
        lambda: mmfuse.linear(x, w, b, "gelu"),
        lambda: mmfuse.mlp(x, ws, bs),
        lambda: mmfuse.patch_embed(px, pw, pb, pos),
        lambda: mmfuse.patch_embed(px, pw, None, None),
        lambda: mmfuse.cross_attention(q, k, v),
        lambda: mmfuse.cross_attention(q, k, v, kv_lens=lens),
        lambda: mmfuse.cross_attention(q, k, v),
        lambda: attention_fwd(q, k, v, None, None, 0.25, k2=k2, v2=v2),
        lambda: backward(lambda x, w, b: mmfuse.linear(x, w, b, "gelu"), x, w, b),
        lambda: backward(mmfuse.cross_attention, q, k, v),
        lambda: backward(mmfuse.patch_embed, px, pw, pb, pos),
        lambda: attention_fwd(q, kl, vl, None, None, 0.25, splits=2, combine="launch"),  # + the merge launch
        lambda: backward(lambda x, w1, w2, g: mmfuse.merged_mlp(x, [w1, w2], None, "gelu", group=2, norm="rms",
                                                                norm_weight=g), xm, w1m, w2m, gm),
    ]


def main():
    """Each launch twice, with the same arguments: as mmfuse makes it, then by Triton's own path. The two
    must hand the launcher the same compiled kernel and the same values."""
    from mmfuse.kernels import _launch, cross_attention, linear, merged_gemm, patch_embed

    H._StandInDriver = RecordingDriver  # (triton_launch_path makes its driver from this name)
    runs, report = [], {"launches": 0, "replayed": 0, "differences": []}
    original_run, launch_kernel = JITFunction.run, _launch.launch_kernel

    def counted(self, *args, **kwargs):
        runs.append(self.__name__)
        return original_run(self, *args, **kwargs)

    def twice(kernel, grid, *args, **meta):
        start, jit_runs = len(log), len(runs)
        launch_kernel(kernel, grid, *args, **meta)
        replayed = len(runs) == jit_runs
        mine = log[start:]
        kernel[grid](*args, **meta)
        theirs = log[start + len(mine):]
        report["launches"] += 1
        report["replayed"] += replayed
        if mine != theirs:
            report["differences"].append([mine, theirs])

    modules = (cross_attention, linear, merged_gemm, patch_embed)
    JITFunction.run = counted
    for m in modules:
        m.launch_kernel = twice
    try:
        with H.triton_launch_path() as log:
            for sweep in range(2):  # (the second sweep replays every launch)
                for call in calls():
                    call()
                report[f"replayed_sweep_{sweep}"] = report["replayed"] - report.get("replayed_sweep_0", 0)
        report["kernels"] = sorted(set(runs))
        # A launch hook installed (as a profiler installs one): every launch takes Triton's path.
        launches = []

        def counted_launch(*args, **meta):
            launches.append(args[0])
            return launch_kernel(*args, **meta)

        for m in modules:
            m.launch_kernel = counted_launch
        knobs.runtime.launch_enter_hook.add(_hook)
        runs.clear()
        with H.triton_launch_path():
            for call in calls() * 2:
                call()
        report["hooked_launches"], report["hooked_jit_runs"] = len(launches), len(runs)
    finally:
        JITFunction.run = original_run
        knobs.runtime.launch_enter_hook.remove(_hook)
        for m in modules:
            m.launch_kernel = launch_kernel
    print(json.dumps(report))


def _hook(metadata):
    pass


if __name__ == "__main__":
    main()
