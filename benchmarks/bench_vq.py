"""pytest-benchmark runs of the `vq` suite's cases on CPU: the same inputs and providers as `fastmm bench vq`
(fastmm.bench.suites.vq). Not part of `make test`; nothing is asserted about time:

    .venv/bin/python -m pytest benchmarks/bench_vq.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import vq as suite

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("provider", ["fastmm", "transformers", "cdist", "faiss", "vector_quantize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(suite.SHAPES.values()), ids=list(suite.SHAPES))
def test_vq_quantize(benchmark, shape, dtype, provider):
    case = suite.vq_case(*shape, dtype, DEVICE)
    providers = {p.name: p for p in case.setup()}
    if provider not in providers:
        pytest.skip(f"{provider} does not run {case.label} here (FAISS: fp32 CPU only; or not installed)")
    benchmark.group = case.label
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops)
    with torch.no_grad():
        benchmark(providers[provider].fn)
