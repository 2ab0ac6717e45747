"""Host (Python) time of one call of each public op, Triton kernels excluded
(``python -m mmfuse.bench.host_overhead``; ``--profile CASE`` adds a cProfile of that case).

Why: on an H100 the small ops are host-bound (bench/NOTES.md, "Host overhead per call"): BLIP-2's
cross-attention forward took 0.151 ms per call against 9.4 us of kernel. What a call spends in Python
before and around its launches is the same on any machine up to the CPU's speed, so it is measured
here without a GPU:

* The kernels run nowhere: every Triton kernel object the launchers index (``kernel[grid](...)``) is
  replaced by a recorder that notes the launch and returns. What is timed is mmfuse's own Python
  (checks, dispatch, the custom op and autograd machinery, tile and split choice, allocations) plus
  PyTorch's; Triton's launch path (``JITFunction.run`` binding and specialising the arguments, on a
  GPU) is not in it.
* ``--decisions gpu`` (default): the launchers take their GPU path (``INTERPRET`` off in the kernel
  modules), so the tile and split modelling an H100 runs is timed (on ``H100_SMS``; a CPU tensor has
  no SM count to query). ``--decisions interpreter``: the interpreter's fixed small blocks.
* Tensors are CPU tensors of the model shapes (``bench/shapes.py``, ``--images`` samples): nothing is
  computed, so only allocation sizes matter. Backward runs through ``torch.autograd.grad`` as the
  benchmark suite does.

The op dispatch needs TRITON_INTERPRET=1 before mmfuse is imported (CPU tensors go to the kernel
path): ``main`` restarts the interpreter with it set when it was not.

``--launch triton``: the launches go through Triton instead of a recorder (``triton_launch_path``), as
mmfuse launches them (``kernels/_launch.py``): the real ``JITFunction`` on a specialisation's first
launch (argument binding and specialisation, the cache key, compiling), its kept launcher after, over a
stand-in CUDA driver whose target is sm_90 and whose launcher does nothing. ``--launch triton-full``:
``JITFunction.run`` on every launch. The first call of each kernel compiles it for sm_90 (as ahead of
time, no GPU); later calls time what a GPU host spends in Triton per launch, less the driver's own
launch. Both need the interpreter *off* (``@triton.jit`` then makes real JIT functions): ``main``
restarts without it, and the ops are pointed at their GPU path for CPU tensors.

Per call: the median over ``--rounds`` rounds of the mean of ``--calls`` calls, after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch


class LaunchRecorder:
    """Stands for a jitted kernel: ``kernel[grid](*args, **meta)`` appends ``name`` and returns."""

    def __init__(self, log: list, name: str):
        self.log, self.name, self.__name__ = log, name, name

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        self.log.append(self.name)


def _name(kernel) -> str:
    """The jitted function's name under any wrapper (``triton.heuristics`` has none of its own)."""
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def _kernel_modules():
    from mmfuse.kernels import cross_attention, linear, patch_embed

    return (linear, patch_embed, cross_attention)


@contextlib.contextmanager
def kernels_recorded(log: list | None = None, decisions: str = "gpu"):
    """Within: no Triton kernel runs (each launch appends its kernel's name to ``log``); with
    ``decisions="gpu"`` the launchers choose tiles and splits as on a GPU."""
    from triton.runtime.jit import KernelInterface

    if decisions not in ("gpu", "interpreter"):
        raise ValueError(f"decisions: expected 'gpu' or 'interpreter', got {decisions!r}")
    log = [] if log is None else log
    saved = []  # (module, attribute, original value)
    try:
        for mod in _kernel_modules():
            for key, value in list(vars(mod).items()):
                if isinstance(value, KernelInterface):
                    saved.append((mod, key, value))
                    setattr(mod, key, LaunchRecorder(log, _name(value)))
                elif isinstance(value, dict) and value and all(isinstance(v, KernelInterface) for v in value.values()):
                    saved.append((mod, key, value))
                    setattr(mod, key, {k: LaunchRecorder(log, _name(v)) for k, v in value.items()})
            if decisions == "gpu" and hasattr(mod, "INTERPRET"):
                saved.append((mod, "INTERPRET", mod.INTERPRET))
                mod.INTERPRET = False
        yield log
    finally:
        for mod, key, value in reversed(saved):
            setattr(mod, key, value)


class _StandInDriver:
    """A CUDA driver for Triton's launch path without a GPU: target sm_90 (an H100), device 0, stream 0,
    binaries "loaded" without a device, a launcher that counts and returns."""

    class _Utils:
        def get_device_properties(self, device):
            from mmfuse.kernels._common import H100_SMS

            return {"max_shared_mem": 232448, "multiprocessor_count": H100_SMS, "max_num_regs": 65536,
                    "warpSize": 32}

        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 128, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):  # (Triton 3.9 unloads a freed kernel's module)
            pass

    def __init__(self, log: list):
        self.log, self.utils, self.backend = log, self._Utils(), "cuda"

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def launcher_cls(self, src, metadata):
        name = src.fn.__name__ if hasattr(src, "fn") else str(src)
        return lambda *args: self.log.append(name)


@contextlib.contextmanager
def triton_launch_path(log: list | None = None, replay: bool = True):
    """Within: every launch goes through Triton over ``_StandInDriver`` and appends its kernel's name to
    ``log``; the ops take their GPU path for CPU tensors. ``replay``: as mmfuse launches
    (``kernels/_launch.py``: a kept specialisation's launcher replayed, ``JITFunction.run`` on a new
    one); False: ``JITFunction.run`` on every launch."""
    import mmfuse
    from mmfuse import _dispatch
    from mmfuse.kernels import _launch
    from mmfuse.ops import cross_attention, linear, merged, patch_embed
    from triton.runtime.driver import driver

    if mmfuse.INTERPRET:
        raise RuntimeError("triton_launch_path: expected the Triton interpreter off (TRITON_INTERPRET unset before "
                           "mmfuse is imported), got it on")
    log = [] if log is None else log
    ops = (cross_attention, linear, merged, patch_embed)
    saved = [(op, op.backend_for) for op in ops]
    previous, previous_replay = driver._active, _launch.REPLAY
    driver.set_active(_StandInDriver(log))
    _launch.REPLAY = replay
    _launch.forget()  # (launchers of another driver)
    try:
        for op in ops:
            op.backend_for = lambda *tensors: _dispatch.TRITON
        yield log
    finally:
        for op, fn in saved:
            op.backend_for = fn
        driver._active = previous
        _launch.REPLAY = previous_replay
        _launch.forget()  # (launchers of the stand-in driver)


LAUNCHES = ("recorder", "triton", "triton-full")


def launches(launch: str, decisions: str):
    """The context ``launch`` names: "recorder" (``kernels_recorded``: no Triton code runs), "triton"
    (``triton_launch_path``, as mmfuse launches) or "triton-full" (the same, Triton's path on every
    launch); the last two take the GPU's decisions."""
    if launch not in LAUNCHES:
        raise ValueError(f"launch: expected one of {LAUNCHES}, got {launch!r}")
    if launch == "recorder":
        return kernels_recorded(decisions=decisions)
    return triton_launch_path(replay=launch == "triton")


# ----------------------------------------------------------------------------------------------
# Cases: (name, make) with make() -> (call, grad_inputs); fwd times call(), fwd+bwd adds the grads
# ----------------------------------------------------------------------------------------------
def cases(images: int = 1, dtype=torch.bfloat16, tiny: bool = False) -> dict:
    """Model-shaped calls of each public op; ``tiny``: the same calls on small shapes (tests)."""
    import mmfuse
    from mmfuse.bench.shapes import by_name

    def t(*shape):
        return torch.randn(*shape, dtype=dtype)

    mlp_s = by_name("llava-1.5-7b")
    patch_s = by_name("clip-l-14-336")
    attn = {n: by_name(n) for n in ("blip2-qformer-xattn", "idefics2-resampler")}
    tokens, widths = (7, (24, 40, 16)) if tiny else (mlp_s.tokens * images, mlp_s.widths)
    img, P, D = ((28, 28), 14, 24) if tiny else (patch_s.image, patch_s.patch, patch_s.dim)

    def linear():
        x, w, b = t(tokens, widths[0]), t(widths[1], widths[0]), t(widths[1])
        return (lambda x, w, b: mmfuse.linear(x, w, b, "gelu")), [x, w, b]

    def mlp():
        x = t(tokens, widths[0])
        ws = [t(n, k) for k, n in zip(widths, widths[1:])]
        bs = [t(n) for n in widths[1:]]
        return (lambda x, *p: mmfuse.mlp(x, p[:len(ws)], p[len(ws):])), [x, *ws, *bs]

    def patch_embed():
        n = (img[0] // P) * (img[1] // P)
        px, w, b, pos = t(images, 3, *img), t(D, 3, P, P), t(D), t(n, D)
        return (lambda px, w, b, pos: mmfuse.patch_embed(px, w, b, pos)), [px, w, b, pos]

    def attention(s):
        def make():
            # tiny: grouped heads where the model groups them (Idefics2), else not (BLIP-2: the single pass)
            Lq, Lk, H, Hkv, Dh = (5, 19, 2, 1 if s.kv_heads < s.heads else 2, 16) if tiny else (
                s.queries, s.keys, s.heads, s.kv_heads, s.head_dim)
            q, k, v = t(1, H, Lq, Dh), t(images, Hkv, Lk, Dh), t(images, Hkv, Lk, Dh)
            return (lambda q, k, v: mmfuse.cross_attention(q, k, v)), [q, k, v]
        return make

    return {"linear llava-1.5-7b[0] gelu": linear, "mlp llava-1.5-7b": mlp, "patch_embed clip-l-14-336": patch_embed,
            **{f"cross_attention {n}": attention(s) for n, s in attn.items()}}


def step_for(make, mode: str):
    """A no-argument step running one call of the case (``mode`` "fwd" or "fwd+bwd")."""
    fn, inputs = make()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    if mode != "fwd+bwd":
        raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd', got {mode!r}")
    inputs = [x.requires_grad_() for x in inputs]
    grad = {}

    def step():
        out = fn(*inputs)
        g = grad.get(out.shape)
        if g is None:
            g = grad[out.shape] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, g)
    return step


def time_per_call(step, calls: int = 200, rounds: int = 5, warmup: int = 20) -> float:
    """Microseconds per call: the median over ``rounds`` of the mean of ``calls`` calls."""
    for _ in range(warmup):
        step()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(per)[len(per) // 2]


def measure(images: int = 1, decisions: str = "gpu", calls: int = 200, rounds: int = 5, warmup: int = 20,
            tiny: bool = False, modes=("fwd", "fwd+bwd"), only: str | None = None,
            launch: str = "recorder") -> list[dict]:
    """One row per (case, mode): microseconds per call and the kernels one call launched. ``launch``: as
    ``launches`` takes it."""
    rows = []
    with launches(launch, decisions) as log:
        for name, make in cases(images, tiny=tiny).items():
            if only and only not in name:
                continue
            for mode in modes:
                step = step_for(make, mode)
                log.clear()
                step()
                launched = list(log)
                us = time_per_call(step, calls, rounds, warmup)
                rows.append({"case": name, "mode": mode, "us_per_call": us, "launches": launched})
    return rows


def profile(case: str, mode: str = "fwd", images: int = 1, decisions: str = "gpu", calls: int = 500,
            top: int = 25, sort: str = "tottime", launch: str = "recorder", tiny: bool = False) -> str:
    """cProfile of ``calls`` calls of the first case whose name contains ``case``: the top functions.
    ``launch`` as in ``measure`` (with "triton" or "triton-full" the profile holds Triton's launch path;
    without it, the interpreter off, the ops would have run their PyTorch reference)."""
    import cProfile
    import io
    import pstats

    with launches(launch, decisions):
        name, make = next((n, m) for n, m in cases(images, tiny=tiny).items() if case in n)
        step = step_for(make, mode)
        for _ in range(20):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
    out = io.StringIO()
    out.write(f"{name} {mode}: {calls} calls\n")
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(top)
    return out.getvalue()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1, help="samples per call (default 1)")
    p.add_argument("--decisions", choices=("gpu", "interpreter"), default="gpu")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=None, help="cases whose name contains this")
    p.add_argument("--profile", metavar="CASE", default=None, help="cProfile the first case matching CASE")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd", help="mode of --profile")
    p.add_argument("--sort", default="tottime", help="cProfile sort key of --profile (tottime, cumtime)")
    p.add_argument("--launch", choices=LAUNCHES, default="recorder",
                   help="recorder: no Triton code runs; triton: Triton's launch path over a stand-in driver, as "
                        "mmfuse launches; triton-full: the same without replaying a kept specialisation")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--tiny", action="store_true", help="the cases at small shapes (tests)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import mmfuse

    want = args.launch == "recorder"  # the interpreter on for the recorder, off for Triton's launch path
    if mmfuse.INTERPRET != want:  # (``python -m`` imported mmfuse, the parent package, before this file)
        if (os.environ.get("TRITON_INTERPRET") == "1") == want:
            raise SystemExit("mmfuse was imported before TRITON_INTERPRET took effect")
        env = dict(os.environ, TRITON_INTERPRET="1") if want else \
            {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "mmfuse.bench.host_overhead", *argv], env)
    if args.profile:
        print(profile(args.profile, args.mode, args.images, args.decisions, sort=args.sort, launch=args.launch,
                      tiny=args.tiny, calls=args.calls))
        return
    import triton

    what = {"recorder": "launches recorded", "triton": "Triton's launch path, a stand-in sm_90 driver",
            "triton-full": "Triton's launch path on every launch (no replay), a stand-in sm_90 driver"}[args.launch]
    print(f"host time per call, kernels not run ({what}; decisions: "
          f"{args.decisions if args.launch == 'recorder' else 'gpu'}, images: {args.images}, "
          f"torch {torch.__version__}, "
          f"Triton {triton.__version__}, {args.rounds} rounds x {args.calls} calls, median)")
    print(f"{'case':40s} {'mode':8s} {'us/call':>9s}  launches")
    for r in measure(args.images, args.decisions, args.calls, args.rounds, only=args.only, tiny=args.tiny,
                     modes=tuple(args.modes.split(",")), launch=args.launch):
        print(f"{r['case']:40s} {r['mode']:8s} {r['us_per_call']:9.1f}  {len(r['launches'])}: "
              f"{' '.join(r['launches'])}")


if __name__ == "__main__":
    main()
