"""pytest-benchmark entry to the suite (``pytest bench/``): one benchmark per case of bench/suite.py."""

import pytest
import torch

from mmfuse.bench.suite import cases, prepare

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

    benchmark.pedantic(run, warmup_rounds=5, rounds=50)
