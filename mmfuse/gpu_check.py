"""``mmfuse gpu-check`` (``bench/gpu-check``): what a few minutes on one GPU can tell, in one command.

Designed for the GPU machine a developer most likely gets for a few minutes: one H100 (or an H200),
torch 2.11 + Triton 3.6 already installed, no network (mmfuse arrives as a wheel), about 15 minutes of
GPU time in all with the machine's start, at most 10 minutes for one command. So the steps together
get a budget of 8 minutes (``--budget``), run in this order, and each writes its results as it goes,
so a step that runs out of time still leaves the earlier ones:

1. ``verify``  ``mmfuse verify --device cuda``: the compiled kernels against their references, in
               ``VERIFY_SHARDS`` processes side by side (``--shard``; each compiles its share);
2. ``tests``   the value tests of the suite on CUDA tensors (``MMFUSE_TEST_DEVICE=cuda``: the same test
               code, the interpreter off, tensors created on the GPU by default; tests that need the
               interpreter skip themselves);
3. ``bench``   ``mmfuse bench --profile quick``: every op family at two real shapes, mmfuse against
               eager and the cheap strong baselines, bf16, forward and forward+backward.
4. ``profile`` ``python -m mmfuse.bench.kernel_profile``: where each quick case's time goes (device
               time per kernel, host gaps), every compiled kernel's registers/spills/shared memory,
               and the GEMM tile sweep of one LLaVA-1.5 layer against torch.mm.

Each step runs in a subprocess with its share of the remaining time as a timeout (a hung kernel cannot
eat the budget), from a directory outside the repository (so ``import mmfuse`` finds the installed
package, not the source folder, which lacks ``mmfuse.kernels``). Results:
``<out-dir>/gpu-check-<gpu>-<date>/`` holds each step's log and ``summary.json`` (device, torch,
Triton, exit code and seconds per step); the benchmark writes its usual files into ``<out-dir>``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

#: The source checkout whose tests step 2 runs. ``bench/gpu-check`` exports ``MMFUSE_REPO``: when mmfuse
#: arrives as a wheel, this file lives in site-packages, whose parent holds no tests (the first GPU run,
#: 2026-11-26, failed step 2 for that reason).
REPO = os.environ.get("MMFUSE_REPO") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("verify", "tests", "bench", "profile")
#: Share of the budget each step may use at most (of what is left when it starts). Measured on an H100
#: with an empty Triton cache (2026-11-26, session 6): verify > 125 s (217 comparisons, each config's
#: compile; 36 s once cached), tests 98 s, bench 71 s, profile 56 s: 0.25 of 480 s stopped verify.
SHARES = {"verify": 0.4, "tests": 0.55, "bench": 0.6, "profile": 1.0}
#: Processes ``verify`` runs side by side, each a contiguous run of the checks (``mmfuse verify --shard
#: i/n``). With an empty Triton cache the step is compiles, one CPU core at a time: on the fourth H100
#: run (2026-11-27, 253 comparisons) one process stopped at 217 after its 180 s; the same run warm took
#: 45 s. One process where there are few cores (the compiles would only contend).
VERIFY_SHARDS = max(1, min(4, len(os.sched_getaffinity(0)) // 4))
#: The value-test files run on CUDA.
VALUE_TEST_FILES = ("tests/test_linear.py", "tests/test_tma_gemm.py", "tests/test_gated_mlp.py",
                    "tests/test_merged_mlp.py", "tests/test_patch_embed.py", "tests/test_cross_attention.py",
                    "tests/test_cuda_graphs.py")


def step_command(step: str, out_dir: str, repo: str | None = None) -> tuple[list[str], dict]:
    """(argv, extra environment) of one step; ``repo``: the checkout whose tests run (``REPO``)."""
    py = sys.executable
    repo = repo or REPO
    if step == "verify":
        return [py, "-m", "mmfuse.cli", "verify", "--device", "cuda"], {}
    if step.startswith("verify "):  # "verify i/n": one shard
        return [py, "-m", "mmfuse.cli", "verify", "--device", "cuda", "--shard", step.split()[1]], {}
    if step == "tests":
        files = [os.path.join(repo, f) for f in VALUE_TEST_FILES if os.path.exists(os.path.join(repo, f))]
        if not files or not os.path.exists(os.path.join(repo, "pyproject.toml")):
            raise FileNotFoundError(f"tests: expected {VALUE_TEST_FILES} and pyproject.toml under the source "
                                    f"checkout {repo!r} (set MMFUSE_REPO to it)")
        # Compiling each test's kernels dominates (2.2 s a test on the first H100 run, which ran out of
        # time at 95 of 165): spread the tests over workers when pytest-xdist is there.
        import importlib.util

        workers = min(8, (os.cpu_count() or 2) // 2)
        par = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
        return ([py, "-m", "pytest", "-q", "-rfE", "--tb=short", *par, "-c", os.path.join(repo, "pyproject.toml"),
                 "--rootdir", repo, "-p", "no:cacheprovider", *files], {"MMFUSE_TEST_DEVICE": "cuda"})
    if step == "bench":
        return [py, "-m", "mmfuse.cli", "bench", "--profile", "quick", "--out-dir", out_dir], {}
    if step == "profile":
        return [py, "-m", "mmfuse.bench.kernel_profile", "--out-dir", out_dir], {}
    raise ValueError(f"steps: expected names from {STEPS}, got {step!r}")


def environment() -> dict:
    import torch
    import triton

    import mmfuse

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "no CUDA device", "torch": torch.__version__,
            "triton": triton.__version__, "mmfuse": mmfuse.__version__, "python": sys.version.split()[0]}


def _run_step(step: str, out_dir: str, log: str, timeout: float, run, shards: int):
    """Run one step into ``log``; its exit code, or "timeout". ``verify`` with ``shards`` > 1: that many
    processes side by side (threads wait on them), each into its own part of the log, joined after."""
    parts = [f"verify {i}/{shards}" for i in range(shards)] if step == "verify" and shards > 1 else [step]

    def one(part, path):
        argv, extra = step_command(part, out_dir)
        with open(path, "w") as f, tempfile.TemporaryDirectory() as cwd:
            try:
                return run(argv, cwd=cwd, env={**os.environ, **extra}, stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                f.write(f"\nmmfuse gpu-check: stopped after {timeout:.0f} s\n")
                return "timeout"

    if len(parts) == 1:
        return one(step, log)
    from concurrent.futures import ThreadPoolExecutor

    paths = [f"{log}.{i}" for i in range(len(parts))]
    with ThreadPoolExecutor(len(parts)) as pool:
        rcs = list(pool.map(one, parts, paths))
    with open(log, "w") as f:
        for part, path in zip(parts, paths):
            with open(path) as p:
                f.write(f"## mmfuse {part}\n{p.read()}\n")
            os.remove(path)
    return next((rc for rc in rcs if rc == "timeout"), None) or next((rc for rc in rcs if rc != 0), 0)


def pack(out_dir: str, archive: str) -> None:
    """Every file under ``out_dir`` into the gzipped tar ``archive`` (named from ``out_dir``'s own folder
    down; the archive itself left out if it lies inside), written to a temporary name and renamed, so a
    reader never finds half an archive."""
    out_dir, archive = os.path.abspath(out_dir), os.path.abspath(archive)
    tmp = archive + ".part"
    with tarfile.open(tmp, "w:gz") as tar:
        for root, dirs, files in os.walk(out_dir):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if path not in (archive, tmp):
                    tar.add(path, arcname=os.path.relpath(path, os.path.dirname(out_dir)))
    os.replace(tmp, archive)


def main(out_dir: str, budget_s: float = 480.0, steps=None, run=subprocess.run, env_info=None,
         clock=time.monotonic, print=print, verify_shards: int | None = None, archive: str | None = None) -> int:
    """Run the steps in order within ``budget_s``; 0 when every step passed. ``run``/``env_info``/
    ``clock`` are parameters so the logic is tested on CPU without a GPU. ``archive``: after every step,
    pack ``out_dir`` into this gzipped tar (``pack``): one file for a tool that brings back only a few
    (session 20's first H100 call lost every result that way)."""
    steps = list(steps or STEPS)
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"steps: expected names from {STEPS}, got {s!r}")
    info = env_info() if env_info else environment()
    out_dir = os.path.abspath(out_dir)
    date = datetime.date.today().isoformat()
    folder = os.path.join(out_dir, f"gpu-check-{info['device'].replace(' ', '_')}-{date}")
    os.makedirs(folder, exist_ok=True)
    summary = {**info, "date": date, "budget_s": budget_s, "steps": []}
    print(f"mmfuse gpu-check: {info['device']}, torch {info['torch']}, Triton {info['triton']}; "
          f"budget {budget_s:.0f} s; results in {folder}")
    start = clock()
    failed = 0
    shards = VERIFY_SHARDS if verify_shards is None else verify_shards
    for step in steps:
        left = budget_s - (clock() - start)
        if left < 10:
            summary["steps"].append({"step": step, "rc": None, "seconds": 0.0, "skipped": "budget spent"})
            print(f"mmfuse gpu-check: {step}: not run, the budget is spent")
            failed += 1
            continue
        timeout = left * SHARES[step]
        log = os.path.join(folder, f"{step}.txt")
        try:
            argv, extra = step_command(step, out_dir)
        except FileNotFoundError as e:  # the step cannot run here: say why, go on with the others
            with open(log, "w") as f:
                f.write(f"mmfuse gpu-check: {e}\n")
            summary["steps"].append({"step": step, "rc": "not runnable", "seconds": 0.0, "log": os.path.basename(log)})
            print(f"mmfuse gpu-check: {step}: not runnable: {e}")
            failed += 1
            continue
        side = f" in {shards} shards side by side (--shard i/{shards})" if step == "verify" and shards > 1 else ""
        print(f"mmfuse gpu-check: {step} (at most {timeout:.0f} s): {' '.join(argv)}{side}")
        t0 = clock()
        rc = _run_step(step, out_dir, log, timeout, run, shards)
        seconds = clock() - t0
        failed += rc != 0
        summary["steps"].append({"step": step, "rc": rc, "seconds": round(seconds, 1), "log": os.path.basename(log)})
        # Written after every step: a later step that runs out of time leaves the earlier results.
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if archive:
            pack(out_dir, archive)
        print(f"mmfuse gpu-check: {step}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s -> {log}")
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if archive:
        pack(out_dir, archive)
        print(f"mmfuse gpu-check: everything under {out_dir} packed into {archive}")
    print(f"mmfuse gpu-check: {len(steps) - failed} of {len(steps)} steps passed")
    return 1 if failed else 0
