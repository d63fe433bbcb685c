"""pytest-benchmark runs of the `routed_linear` suite's cases on CPU: the same inputs and providers as `fastmm
bench routed_linear` (fastmm.bench.suites.routed_linear), at the target size K = N = 4096. Not part of
`make test`; nothing is asserted about time. Each case is one benchmark group, so the providers of a case sit
in one table:

    .venv/bin/python -m pytest benchmarks/bench_routed_linear.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import routed_linear as suite

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("provider", ["fastmm", "mplug_owl2", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [128, 2048], ids=lambda t: f"T{t}")
def test_routed_linear(benchmark, tokens, dtype, provider):
    case = suite.routed_linear_case(tokens, 4096, dtype, DEVICE)
    fn = {p.name: p for p in case.setup()}[provider].fn
    benchmark.group = case.label
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops)
    with torch.no_grad():
        fn()
        benchmark(fn)
