"""pytest-benchmark runs of the `norm` suite's cases on CPU: the same inputs and providers as `fastmm bench
norm` (fastmm.bench.suites.norm), at the target hidden size D = 4096. Not part of `make test`; nothing is
asserted about time. Each case is one benchmark group, so the providers of a case sit in one table:

    .venv/bin/python -m pytest benchmarks/bench_norm.py --benchmark-only
"""

import pytest
import torch

from fastmm.bench.suites import norm as suite

DEVICE = torch.device("cpu")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _run(benchmark, case, provider: str) -> None:
    fn = {p.name: p for p in case.setup()}[provider].fn
    benchmark.group = case.label
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops)
    with torch.no_grad():
        fn()  # outside the timing: torch.compile compiles on its first call
        benchmark(fn)


@pytest.mark.parametrize("provider", ["fastmm", "mplug_owl2", "torch", "copy", "torch_compile"])
@DTYPES
@pytest.mark.parametrize("tokens", [128, 2048, 8192], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("op", ["modality_rms_norm", "modality_layer_norm"], ids=["rms", "layer"])
def test_norm(benchmark, op, tokens, dtype, provider):
    case = suite.norm_case(op, tokens, 4096, dtype, DEVICE, compile=provider == "torch_compile")
    _run(benchmark, case, provider)
