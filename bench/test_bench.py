"""pytest-benchmark entry to the suite (``pytest bench/``): one benchmark per case of bench/suite.py."""

import pytest
import torch

from mmfuse.bench.suite import BACKWARD_FLOPS, cases, min_bytes, prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the benchmarks time CUDA kernels and this machine has no CUDA device; "
                                       "`mmfuse report` gives the exact no-GPU figures instead")


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_bench(benchmark, case):
    sets, step = prepare(case, "cuda")
    counter = iter(range(10**9))

    def run():
        step(sets[next(counter) % len(sets)])
        torch.cuda.synchronize()

    flops = case.flops * (1 + BACKWARD_FLOPS[case.op] if case.mode == "fwd+bwd" else 1)
    # What `mmfuse bench` derives TFLOP/s and GB/s from, kept beside pytest-benchmark's timings.
    benchmark.extra_info.update(flops=flops, min_bytes=min_bytes(sets[0], case.mode))
    benchmark.pedantic(run, warmup_rounds=5, rounds=50)
