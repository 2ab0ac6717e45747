"""How the GEMM launchers pick a tile: from the wave model by default, by timing only on request.

Token counts change at almost every step of dynamic-resolution training and serving (native-resolution
Qwen-VL, any-res LLaVA-NeXT, InternVL tiles, video). An autotuner keyed on the exact token count M
times every surviving config again for each new M, in every GEMM of the step, forever. So:

* **Default: no timing at all.** The launcher keeps the tiles whose wave efficiency on this GPU's SMs
  reaches ``MIN_WAVE_EFFICIENCY`` (``candidate_tiles`` of each kernel family) and takes the largest
  of them (the highest arithmetic intensity per tile; ties go to the earlier entry of the tile table).
  It is a pure function of (M, N, SMs): deterministic, free, and it is the tile the byte and time
  figures of ``mmfuse report`` assume.
* **``MMFUSE_AUTOTUNE=1``: time the candidates once per octave of the token count.** The cache key
  is (kernel, every GEMM dim rounded up to a power of two by ``m_bucket``, flags, dtype, device,
  operand layouts), so a run with token counts spread over [1, 2^k] tunes each GEMM at most k + 1
  times, whatever the number of distinct counts. The token count is M in the forward and dX GEMMs
  and the reduction length in dW: bucketing every dim covers both (weight dims are fixed anyway).
  The tile timed at the first count of an octave serves the whole octave.

``bench/NOTES.md`` ("Tile choice with dynamic token counts") states the policy and its figures.
"""

from __future__ import annotations

import os

from mmfuse.kernels._common import next_pow2

#: Opt-in timing (read at import, like TRITON_INTERPRET; tests flip the module attribute).
AUTOTUNE = os.environ.get("MMFUSE_AUTOTUNE", "0") not in ("", "0")


def m_bucket(M: int) -> int:
    """The octave of token counts one tuning result serves: the next power of two of M."""
    return next_pow2(max(int(M), 1))


def largest_tile(candidates):
    """The model's choice among kept tiles: the largest (BLOCK_M x BLOCK_N), first on ties."""
    best = candidates[0]
    for t in candidates[1:]:
        if t[0] * t[1] > best[0] * best[1]:
            best = t
    return best


def _bench(run) -> float:
    """Milliseconds of ``run()`` on the GPU (the one step tests replace with a counter)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=5, rep=20)


class TileChooser:
    """Per-kernel tile choice with an M-bucketed timing cache (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self.cache: dict[tuple, tuple] = {}

    def choose(self, dims: tuple, key: tuple, candidates, launch):
        """``dims``: the GEMM's sizes (bucketed here); ``key``: everything else that changes the best
        tile (flags, dtype, device, layouts); ``candidates``: the kept tiles at these sizes;
        ``launch(tile)``: runs the kernel with ``tile`` (timed only with AUTOTUNE)."""
        if not AUTOTUNE or len(candidates) == 1:
            return largest_tile(candidates)
        cache_key = (tuple(m_bucket(d) for d in dims), *key)
        tile = self.cache.get(cache_key)
        if tile is None:
            times = [_bench(lambda t=t: launch(t)) for t in candidates]
            tile = candidates[min(range(len(times)), key=times.__getitem__)]
            self.cache[cache_key] = tile
        return tile


__all__ = ["AUTOTUNE", "m_bucket", "largest_tile", "TileChooser"]
