"""pytest-benchmark runs of the `linear` suite's cases on CPU: the same inputs and providers as
`fastmm bench linear` (fastmm.bench.suites.linear). Not part of `make test`; nothing is asserted about time:

    .venv/bin/python -m pytest benchmarks/bench_linear.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import linear as suite

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("provider", ["fastmm", "torch"])
@pytest.mark.parametrize("M", suite.ROWS)
@pytest.mark.parametrize("shape", list(suite.SHAPES.values()), ids=list(suite.SHAPES))
def test_linear(benchmark, shape, M, provider):
    case = suite.linear_case(M, *shape, torch.float32, DEVICE)
    providers = {p.name: p for p in case.setup()}
    benchmark.group = case.label
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops)
    with torch.no_grad():
        benchmark(providers[provider].fn)
