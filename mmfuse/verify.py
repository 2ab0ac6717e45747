"""``mmfuse verify``: every kernel against its reference on this machine, as a table.

Each op module exposes ``verify_checks()``: a list of ``Check``s, each running one op at one shape
and dtype and returning its ``Comparison``s (outputs and gradients) under the error rule of
``mmfuse.testing``. Exit status is non-zero when any comparison fails or raises.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from mmfuse.testing import Comparison, poisoned_outputs


@dataclasses.dataclass
class Check:
    op: str
    dtype: torch.dtype
    shape: str
    run: Callable[[torch.device], list[Comparison]]


def all_checks() -> list[Check]:
    from mmfuse.ops import cross_attention, linear, merged, patch_embed

    checks = []
    for module in (linear, merged, patch_embed, cross_attention):
        checks.extend(module.verify_checks())
    return checks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def main(device: str | None = None, ops: list[str] | None = None, out=sys.stdout,
         shard: tuple[int, int] | None = None) -> int:
    """Run the checks (those whose op name starts with one of ``ops``, if given); 0 if all pass.
    ``shard`` (i, n): only the i-th of n contiguous runs of the checks, so that n processes share the
    compiles (what a cold Triton cache spends most of the time on; ``mmfuse gpu-check`` runs the shards
    side by side). Contiguous, not every n-th: the checks come op by op, so a shard compiles its own ops'
    kernels, where every n-th check would have every shard compile nearly every kernel."""
    import mmfuse

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = mmfuse.backend_for(torch.empty(0, device=dev))
    print(f"mmfuse verify: device {dev}, backend {backend!r}", file=out)
    if backend == mmfuse.REFERENCE:
        print("warning: the Triton interpreter is off on CPU, so this compares the reference with itself; "
              "run `mmfuse verify` (it turns the interpreter on) rather than importing mmfuse first",
              file=out)
    header = f"{'op':<34} {'dtype':<9} {'shape':<26} {'check':<10} {'max error':>10} {'allowed':>10}  pass"
    print(header, file=out)
    print("-" * len(header), file=out)
    failures = 0
    total = 0
    t0 = time.perf_counter()
    checks = [c for c in all_checks() if not ops or c.op.split()[0] in ops]
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard: expected I/N with 0 <= I < N, got {i}/{n}")
        size, extra = divmod(len(checks), n)
        start = i * size + min(i, extra)
        checks = checks[start:start + size + (i < extra)]
    if not checks:
        print(f"no checks match --op {' '.join(ops or [])}", file=out)
        return 2
    for check in checks:
        torch.manual_seed(0)
        try:
            with poisoned_outputs():
                comparisons = check.run(dev)
        except Exception as e:  # a crash is a failure, reported in the table
            failures += 1
            total += 1
            print(f"{check.op:<34} {_dtype_name(check.dtype):<9} {check.shape:<26} {'-':<10} "
                  f"{'-':>10} {'-':>10}  FAIL ({type(e).__name__}: {e})", file=out)
            continue
        for c in comparisons:
            total += 1
            failures += not c.ok
            print(f"{check.op:<34} {_dtype_name(check.dtype):<9} {check.shape:<26} {c.what:<10} "
                  f"{c.error:>10.3g} {c.allowed:>10.3g}  {'ok' if c.ok else 'FAIL'}", file=out)
    print(f"\n{total - failures} passed, {failures} failed ({time.perf_counter() - t0:.1f} s)", file=out)
    return 1 if failures else 0
