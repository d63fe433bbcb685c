"""Native ops and image generation called from 2 and 4 Python threads at once, each on its own tensors (the
native kernels release the GIL, so the calls really overlap), give exactly the results of the same calls made
one after another: no shared scratch, no state kept between calls, each call's OpenMP team its own."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import pytest
import torch

import fastmm
from fastmm.backend import native_status
from fastmm.models import UnifiedModel, presets
from fastmm.runtime import Jacobi, generate_image

pytestmark = pytest.mark.skipif(not native_status()[0], reason=native_status()[1])


def _op_calls(seed: int) -> list:
    """One call per native op family, on tensors of this seed (sizes that split across OpenMP threads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 512, generator=g)
    w = torch.randn(1024, 512, generator=g)
    modality = torch.randint(0, 2, (8,), generator=g)
    norm_weight = torch.randn(2, 512, generator=g)
    q = torch.randn(2, 8, 3, 64, generator=g).bfloat16()
    k_cache = torch.randn(2, 4, 300, 64, generator=g).bfloat16()
    v_cache = torch.randn(2, 4, 300, 64, generator=g).bfloat16()
    cache_len = torch.tensor([300, 170], dtype=torch.int32)
    logits = torch.randn(4, 16384, generator=g)
    return [
        lambda: fastmm.ops.linear(x, w),
        lambda: fastmm.ops.linear(x.bfloat16(), w.bfloat16()),
        lambda: fastmm.ops.modality_rms_norm(x, modality, norm_weight),
        lambda: fastmm.ops.decode_attention(q, k_cache, v_cache, cache_len),
        lambda: fastmm.ops.span_attention(q.float(), k_cache.float(), v_cache.float()),
        lambda: fastmm.ops.cfg_sample(logits, scales=(5.0,), temperature=1.0, seed=seed),
    ]


@pytest.mark.parametrize("threads", [2, 4])
def test_native_ops_from_several_threads_equal_serial_calls(threads):
    with fastmm.use_backend("native"):
        calls = [call for seed in range(threads) for call in _op_calls(seed)] * 3
        serial = [call() for call in calls]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            concurrent_results = list(pool.map(lambda call: call(), calls))
    for i, (a, b) in enumerate(zip(serial, concurrent_results)):
        assert torch.equal(a, b), f"call {i} ({i % 6} of its seed's calls) differs when run concurrently"


@pytest.fixture(scope="module")
def tiny_models():
    """Two tiny models, so that threads share no decode runner or KV cache."""
    config = presets.demo_config("tiny")
    config = dataclasses.replace(config, image_gen=dataclasses.replace(config.image_gen, num_image_tokens=24))
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = UnifiedModel(config).eval()
        model.refresh_generation_table()
        models.append(model)
    return models


def test_image_generation_from_two_threads_equals_serial_runs(tiny_models):
    """The fused native decode step, sequential and SJD, in two threads at once (one model each)."""
    prompt = [presets.BOS, 10, 11, 12, presets.BOI]
    runs = [(model, parallel, temperature) for model in tiny_models for parallel in (None, Jacobi(4, "copy"))
            for temperature in (0.0, 1.0)]  # fmt: skip

    def generate(run):
        model, parallel, temperature = run
        return generate_image(model, prompt, 5.0, temperature=temperature, seed=3, decode_pixels=False,
                              parallel=parallel).tokens  # fmt: skip

    serial = [generate(run) for run in runs]
    by_model = [[run for run in runs if run[0] is model] for model in tiny_models]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        per_model = list(pool.map(lambda model_runs: [generate(run) for run in model_runs], by_model))
    concurrent_results = [tokens for model_tokens in per_model for tokens in model_tokens]
    for i, (a, b) in enumerate(zip(serial, concurrent_results)):
        assert torch.equal(a, b), f"run {i} differs when two models generate at once"
