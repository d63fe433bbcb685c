"""pytest-benchmark runs of the `attention` suite's cases on CPU: the same inputs and providers as
`fastmm bench attention` (fastmm.bench.suites.attention). Not part of `make test`; nothing is asserted:

    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import attention as suite

DEVICE = torch.device("cpu")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _run(benchmark, case, provider: str) -> None:
    providers = {p.name: p for p in case.setup()}
    benchmark.group = case.label
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops)
    with torch.no_grad():
        providers[provider].fn()  # outside the timing: FlexAttention compiles on its first call
        benchmark(providers[provider].fn)


@pytest.mark.parametrize("provider", ["fastmm", "sdpa_dense_mask", "sdpa_causal", "flex_attention"])
@DTYPES
@pytest.mark.parametrize("spans", [1, 2])
@pytest.mark.parametrize("length", [512, 2048])
def test_span_attention(benchmark, length, spans, dtype, provider):
    _run(benchmark, suite.span_case(length, spans, dtype, DEVICE, flex=provider == "flex_attention"), provider)


@pytest.mark.parametrize("provider", ["fastmm", "sdpa"])
@DTYPES
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("cache", [1024, 4096])
def test_decode_attention(benchmark, cache, batch, dtype, provider):
    _run(benchmark, suite.decode_case(batch, cache, dtype, DEVICE), provider)
