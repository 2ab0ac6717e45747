"""Ahead-of-time compilation of every kernel config for sm_80 / sm_90, without a GPU.

Each kernel module exposes ``aot_specs()``: one ``CompileSpec`` per (config, variant) it can launch,
described by a representative launch (pointer dtypes, integer values, constexprs). From that we build
the signature, the constexprs and the divisibility hints exactly as Triton's JIT would specialize that
launch (integers equal to 1 become constexprs; pointers and integers divisible by 16 get
``tt.divisibility``), compile with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, and read
registers / spills from the cubin with the ``cuobjdump`` shipped in the Triton wheel.

Used by the test suite (tests/test_aot.py) and by ``mmfuse report``. Kernels decorated under the
interpreter cannot be compiled, so when ``TRITON_INTERPRET`` is on, ``compile_all`` runs the compiles
in a subprocess without it (``python -m mmfuse._aot``) and reads back the figures as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

#: Architecture facts the checks use. Shared memory: the opt-in maximum per block.
ARCHS = {
    80: {"name": "sm_80", "max_shared": 166912, "tensor_core": "mma.sync", "max_regs": 255},
    90: {"name": "sm_90", "max_shared": 232448, "tensor_core": "wgmma", "max_regs": 255},
}


def checked_archs() -> tuple:
    """The architectures the compile check compiles: ``MMFUSE_AOT_ARCHS`` (comma-separated, e.g. "90"),
    else every one of ARCHS. The test suite sets "90" (tests/conftest.py), the GPU the project is tuned
    for, so CI compiles sm_90 on Triton 3.9 and 3.6 (each compile ~0.4 s of CI's wall time); sm_80 is
    checked by hand with "80,90"."""
    env = os.environ.get("MMFUSE_AOT_ARCHS", "").strip()
    if not env:
        return tuple(sorted(ARCHS))
    archs = tuple(sorted({int(a) for a in env.split(",")}))
    if not set(archs) <= set(ARCHS):
        raise ValueError(f"MMFUSE_AOT_ARCHS: expected a subset of {sorted(ARCHS)}, got {env!r}")
    return archs


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    kernel: str                     # kernel family and function, e.g. "linear/fused_gemm"
    variant: str                    # what this launch does, e.g. "fwd gelu+bias+aux"
    dtype: str                      # "fp16", "bf16", "fp32", "fp32-tf32"
    config: str                     # e.g. "128x128x64 w8 s4"
    fn: Any = dataclasses.field(compare=False, hash=False)
    args: tuple = ()                # ((name, value), ...): "*fp16"-style pointers or ints
    constexprs: tuple = ()          # ((name, value), ...)
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = True       # mma/wgmma expected in the PTX
    # What sm_90 should use: wgmma needs 64 tile rows per warpgroup; narrower tiles (dQ's 32 queries,
    # dK/dV's 16 keys at D = 256) legitimately compile to mma.sync there.
    sm90_instr: str = "wgmma"
    # Architectures the config runs on (the TMA kernel: sm_90 only).
    archs: tuple = (80, 90)
    # Architectures where its operands must arrive in 128-bit pieces (see the spec's reason where not).
    wide_load_archs: tuple = (80, 90)

    @property
    def label(self) -> str:
        return f"{self.kernel} [{self.variant}] {self.dtype} {self.config}"


@dataclasses.dataclass
class CompileReport:
    spec: CompileSpec
    arch: int
    registers: int
    spill_bytes: int        # STACK from cuobjdump -res-usage (local memory = spills)
    shared_bytes: int       # dynamic shared memory (metadata.shared)
    mma: bool               # mma.sync in the PTX
    wgmma: bool             # wgmma in the PTX
    cp_async_16B: bool      # 16-byte cp.async (global -> shared, 128-bit)
    tma: bool               # cp.async.bulk.tensor (TMA)
    vec128_loads: int       # number of 128-bit ld.global instructions (stores not counted)
    seconds: float
    tf32_rounds: int = 0    # `and.b32 ..., -8192`: fp32 operands rounded to TF32 before the MMA (``mma``)
    wgmma_a_registers: bool = False  # a wgmma whose A operand comes from registers, not a shared-memory descriptor
    exposed_copy_waits: int = 0  # in-loop waits for every async copy in flight (``exposed_copy_waits``)
    drained_loops: int = 0  # loops that restart a nested loop's pipeline every iteration (``drained_loops``)
    replicated_dots: int = 0  # matrix products whose warps cover more than the tile (``replicated_dots``)

    @property
    def tensor_core_instr(self) -> str:
        return "wgmma" if self.wgmma else ("mma.sync" if self.mma else "none")

    def max_ctas_per_sm(self) -> int:
        """Occupancy bound from registers and shared memory only (65536 regs, 2048 threads/SM)."""
        threads = 32 * self.spec.num_warps
        regs = max(self.registers, 1) * threads
        by_regs = 65536 // regs
        smem_sm = {80: 167936, 90: 233472}[self.arch]
        by_smem = smem_sm // max(self.shared_bytes + 1024, 1)
        return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def _in_loop_body(ttgir: str, pattern: str) -> int:
    """Lines matching ``pattern`` that a ``scf.yield`` at their own indentation follows before the
    enclosing body closes: they run once per iteration of a loop."""
    lines = ttgir.splitlines()
    found = 0
    for i, line in enumerate(lines):
        if not re.search(pattern, line):
            continue
        indent = len(line) - len(line.lstrip())
        for later in lines[i + 1:]:
            depth = len(later) - len(later.lstrip())
            if later.strip() and depth < indent:
                break
            if depth == indent and later.lstrip().startswith("scf.yield"):
                found += 1
                break
    return found


def exposed_copy_waits(ttgir: str) -> int:
    """Waits inside a loop body for *every* asynchronous copy in flight (``ttg.async_wait {num = 0}``
    at loop level): each iteration then exposes the copies' latency instead of keeping the next ones in
    flight (the cross-attention kernels at 2 stages; bench/NOTES.md, session 18). A wait counts when it
    names copy tokens (the drain after a loop names none: ``drained_loops``)."""
    return _in_loop_body(ttgir, r"async_wait %[^{]*\{num = 0 : i32\}")


def drained_loops(ttgir: str) -> int:
    """Loops whose every iteration drains the copies of a pipelined loop nested in them: a token-less
    ``ttg.async_wait {num = 0}`` (the drain after a pipelined loop) in an enclosing loop's body. Each
    iteration of the enclosing loop then restarts the inner pipeline and waits for its first copies:
    dK/dV's loop over a group's query heads around its loop over query blocks did, 4 waits a program at
    Idefics2's shape (bench/NOTES.md, session 21)."""
    return _in_loop_body(ttgir, r"async_wait\s*\{num = 0 : i32\}")


_MMA_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), (\d+)\][^}]*"
                         r"instrShape = \[(\d+), (\d+)", re.M)
_DOT = re.compile(r"(?:warp_group_dot|tt\.dot) [^\n]*-> tensor<(\d+)x(\d+)x\w+, (#mma\d*)>")


def replicated_dots(ttgir: str) -> int:
    """Tensor-core products whose warps cover more rows or columns than the product's tile: warps along M
    x the instruction's rows (16 per warp) or warps along N x its columns, beyond M or N. The surplus warps
    hold copies of the tile and issue the same MMAs: the 64-row attention forward at 8 warps gives its
    Q.K^T 8 warps along M, 128 rows for 64, so both warpgroups compute it (bench/NOTES.md, session 18)."""
    layouts = {m.group(1): tuple(int(x) for x in m.group(2, 3, 4, 5)) for m in _MMA_LAYOUT.finditer(ttgir)}
    found = 0
    for m in _DOT.finditer(ttgir):
        rows, cols, layout = int(m.group(1)), int(m.group(2)), m.group(3)
        if layout not in layouts:  # a layout this parser does not read: not counted (tests/test_aot.py
            continue               # checks the figure on a real compile, so a format change shows there)
        warps_m, warps_n, instr_m, instr_n = layouts[layout]
        found += rows < warps_m * instr_m or cols < warps_n * instr_n
    return found


def _signature(spec: CompileSpec):
    names = spec.fn.arg_names
    given = dict(spec.args)
    constexprs = dict(spec.constexprs)
    sig, attrs, cx = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            cx[(i,)] = constexprs[name]
            continue
        if name not in given:
            raise KeyError(f"{spec.label}: no value for argument {name!r}")
        value = given[name]
        if isinstance(value, str) and value.startswith("tensordesc"):  # a host TMA descriptor
            sig[name] = value
        elif isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned (and more)
            sig[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:  # the JIT specializes integers equal to 1
            sig[name] = "constexpr"
            cx[(i,)] = 1
        else:
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)")


@functools.lru_cache(maxsize=None)
def compile_spec(spec: CompileSpec, arch: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmfuse.kernels._common import LAUNCH_OPTIONS

    sig, cx, attrs = _signature(spec)
    t0 = time.perf_counter()
    kernel = triton.compile(
        ASTSource(fn=spec.fn, signature=sig, constexprs=cx, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, **LAUNCH_OPTIONS},  # as launched
    )
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"{spec.label}: could not read register usage from cuobjdump:\n{out}")
    ptx = kernel.asm["ptx"]
    return CompileReport(
        spec=spec, arch=arch, registers=int(m.group(1)), spill_bytes=int(m.group(2)),
        shared_bytes=int(kernel.metadata.shared),
        mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
        cp_async_16B=bool(re.search(r"cp\.async\.c[ga]\.shared\.global[^\n]*, (?:16|0x10)(?:, |;)", ptx)),
        tma="cp.async.bulk.tensor" in ptx,
        vec128_loads=len(re.findall(r"ld\.global(?:\.[a-z0-9:]+)*\.v4\.(?:b32|f32|u32|s32)", ptx))
        + len(re.findall(r"ld\.global(?:\.[a-z0-9:]+)*\.v2\.(?:b64|f64|u64)", ptx)),
        seconds=seconds,
        tf32_rounds=len(re.findall(r"and\.b32\s[^;]*, -8192;", ptx)),
        # wgmma D, A, B: the accumulator's register list, then A as a register list or a descriptor
        wgmma_a_registers=bool(re.search(r"wgmma\.mma_async[^;{]*\{[^}]*\},\s*\{", ptx)),
        exposed_copy_waits=exposed_copy_waits(kernel.asm["ttgir"]),
        drained_loops=drained_loops(kernel.asm["ttgir"]),
        replicated_dots=replicated_dots(kernel.asm["ttgir"]),
    )


def all_specs() -> list[CompileSpec]:
    """Every config of every kernel, as the kernel modules list them."""
    from mmfuse.kernels import cross_attention, linear, merged_gemm, patch_embed

    specs = []
    for module in (linear, merged_gemm, patch_embed, cross_attention):
        specs.extend(module.aot_specs())
    return specs


# ----------------------------------------------------------------------------------------------
# Batch compilation (in a subprocess when this process runs the interpreter)
# ----------------------------------------------------------------------------------------------
_FIELDS = ("registers", "spill_bytes", "shared_bytes", "mma", "wgmma", "cp_async_16B", "tma",
           "vec128_loads", "seconds", "tf32_rounds", "wgmma_a_registers", "exposed_copy_waits",
           "drained_loops", "replicated_dots")


def _compile_index(job):
    i, arch = job
    r = compile_spec(all_specs()[i], arch)
    return i, arch, {f: getattr(r, f) for f in _FIELDS}


def _compile_jobs(jobs: int, progress=None):
    specs = all_specs()
    todo = [(i, arch) for i in range(len(specs)) for arch in checked_archs() if arch in specs[i].archs]
    done = []
    t0 = time.perf_counter()

    def collect(results):
        for row in results:
            done.append(row)
            if progress and (len(done) % 16 == 0 or len(done) == len(todo)):
                progress(f"compiled {len(done)}/{len(todo)} kernel configs for sm_80/sm_90 "
                         f"({time.perf_counter() - t0:.0f} s)")
        return done

    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            return collect(pool.imap(_compile_index, todo, chunksize=1))
    return collect(_compile_index(job) for job in todo)


@contextlib.contextmanager
def _one_compiler_at_a_time():
    """Serialise batch compiles across processes on this machine. Two test workers (or a test run and
    ``mmfuse report``) would otherwise compile the same configs side by side on the same cores; the
    second one to get the lock finds Triton's on-disk cache warm and takes seconds. (pytest-xdist's
    ``--dist loadgroup`` would keep the compile tests on one worker, but xdist 3.8 cannot rename node
    ids under pytest 9.2, so groups are silently ignored there.)"""
    import fcntl

    path = os.path.join(tempfile.gettempdir(), f"mmfuse-aot-{os.getuid()}.lock")
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_COMPILED: dict[int, dict] = {}


def compile_all(jobs: int = 2, progress=None) -> dict[tuple[str, int], CompileReport]:
    """Every spec of ``all_specs()`` for every arch: {(label, arch): CompileReport}, computed once per
    process. ``progress``: called with a line of text now and then while compiling in this process."""
    from mmfuse._dispatch import INTERPRET

    if jobs in _COMPILED:
        return _COMPILED[jobs]
    specs = all_specs()
    with _one_compiler_at_a_time():
        if INTERPRET:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-m", "mmfuse._aot", "--jobs", str(jobs)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
            rows = json.loads(proc.stdout)
        else:
            rows = _compile_jobs(jobs, progress)
    _COMPILED[jobs] = {(specs[i].label, arch): CompileReport(spec=specs[i], arch=arch, **fields)
                       for i, arch, fields in rows}
    return _COMPILED[jobs]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile every kernel config for sm_80/sm_90; print JSON.")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    json.dump(_compile_jobs(args.jobs), sys.stdout)
