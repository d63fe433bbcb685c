"""pytest-benchmark runs of the `e2e` suite's cases on CPU: the same random-weight Janus checkpoint, cases and
providers as `fastmm bench e2e` (fastmm.bench.suites.e2e). Not part of `make test`; nothing is asserted about
time. A whole image takes seconds, so each provider runs three rounds of one call:

    .venv/bin/python -m pytest benchmarks/bench_e2e.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import e2e as suite

DEVICE = torch.device("cpu")
CASES = {case.op: case for case in suite.e2e_cases("small", torch.float32, DEVICE, 576, with_pixels=True)}


@pytest.mark.parametrize("provider", ["fastmm", "transformers"])
@pytest.mark.parametrize("op", list(CASES))
def test_e2e(benchmark, op, provider):
    case = CASES[op]
    providers = {p.name: p for p in case.setup()}
    if provider not in providers:
        pytest.skip(f"{provider} does not run here (transformers not installed)")
    benchmark.group = case.label
    benchmark.extra_info.update(items=case.items, weight_bytes=case.bytes)
    with torch.no_grad():
        benchmark.pedantic(providers[provider].fn, rounds=3, iterations=1, warmup_rounds=1)
