"""Long runs: generating images in a loop holds resident memory flat, and a model's KV caches and fused-step
runners go when their generation (or the model) does, so nothing accumulates per image."""

from __future__ import annotations

import dataclasses
import gc
import os
import weakref

import pytest
import torch

from fastmm.models import UnifiedModel, presets
from fastmm.runtime import Jacobi, generate_image

PROMPT = [presets.BOS, 10, 11, 12, presets.BOI]
# Resident growth allowed over 100 images after warm-up (measured: under 0.1 MiB): allocator noise. A KV cache
# and its runner kept per image add only about 5 KB each at this size, so the runner count below catches that
# leak and this bound catches leaks of the size of an image's logits or more.
GROWTH_BYTES = 8 * 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny_model(tokens: int = 16):
    config = presets.demo_config("tiny")
    config = dataclasses.replace(config, image_gen=dataclasses.replace(config.image_gen, num_image_tokens=tokens))
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    model.refresh_generation_table()
    return model


def _generate(model, i: int):
    parallel = Jacobi(4, "copy") if i % 2 else None  # sequential and SJD in turns
    return generate_image(model, PROMPT, 5.0, temperature=1.0, seed=i, decode_pixels=False, parallel=parallel)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_a_hundred_images_keep_resident_memory_flat():
    model = _tiny_model()
    for i in range(10):  # warm-up: allocator pools, lazy tables
        _generate(model, i)
    gc.collect()
    before = _resident_bytes()
    for i in range(100):
        _generate(model, i)
    gc.collect()
    growth = _resident_bytes() - before
    assert growth < GROWTH_BYTES, f"resident memory grew by {growth / 2**20:.1f} MiB over 100 images"
    assert len(model.decoder.decode_runners) == 0, "fused-step runners outlived their KV caches"


def test_caches_and_runners_are_released_with_the_model():
    model = _tiny_model()
    _generate(model, 0)
    runners = model.decoder.decode_runners
    model_ref, runners_ref = weakref.ref(model), weakref.ref(runners)
    del model, runners
    gc.collect()
    assert model_ref() is None and runners_ref() is None
