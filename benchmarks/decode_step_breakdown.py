"""Where one CPU image-decode step of the e2e model (8 x 512, fastmm.models.presets "small") spends its time,
against the floor of reading its weights once. Not a suite: the parts are timed alone, in interleaved rounds,
so a part whose weights fit in the L3 cache (the head) reads faster than inside the real step.

    .venv/bin/python benchmarks/decode_step_breakdown.py [float32|bfloat16]

Rows: the whole step (decoder, head, sampling, next embedding); the native decoder layers alone; the decoder
forward (layers, final norm, Python around them); the generation head; sampling and the next embedding; and
`weights.sum()` over every tensor a step streams, the read floor.
"""

from __future__ import annotations

import sys
import tempfile

import torch

from fastmm.bench.suites.e2e import CFG_SCALE, PROMPT, decode_weight_bytes
from fastmm.bench.timer import cpu_time_interleaved
from fastmm.models import UnifiedModel, presets
from fastmm.runtime.generate import start_image_generation


def main(dtype: torch.dtype) -> None:
    torch.set_grad_enabled(False)
    model = UnifiedModel.from_pretrained(presets.save_random_janus(tempfile.mkdtemp(), "small"), dtype=dtype)
    step = start_image_generation(model, PROMPT, CFG_SCALE, temperature=0.0, seed=0)
    step()  # builds the native runner of this cache
    runner = model.decoder._fused_decode_runner(step.embeds, step.cache, prefill=False)
    hidden = torch.randn(step.embeds.shape[0], model.config.hidden_size, dtype=dtype)
    logits = model.image_logits(hidden)
    start_length, start_position, start_step = step.cache.lengths.clone(), step.cache.positions.clone(), step.step.clone()

    def rewind() -> None:  # every timed call decodes at the same position, far from the cache's end
        step.cache.lengths.copy_(start_length)
        step.cache.positions.copy_(start_position)
        step.step.copy_(start_step)

    streamed = [p for name, p in model.named_parameters() if name.startswith(("decoder.layers", "decoder.norm", "gen_head"))]
    parts = {
        "whole step": lambda: (rewind(), step()),
        "native decoder layers": lambda: runner.run(step.embeds, step.modality),
        "decoder forward": lambda: (rewind(), model.decoder(step.embeds, step.modality, step.cache, prefill=False)),
        "generation head": lambda: model.image_logits(hidden),
        "sampling + next embedding": lambda: (rewind(), step.sample(logits)),
        "read floor: sum of every streamed weight": lambda: [p.sum() for p in streamed],
    }
    for part in parts.values():  # warm-up, as cpu_time_interleaved expects
        part()
    timings = cpu_time_interleaved(parts, min_time_s=3.0, rounds=15)
    megabytes = decode_weight_bytes(model.config, dtype) / 1e6
    print(f"{dtype}, {torch.get_num_threads()} threads, {megabytes:.1f} MB of weights per step; medians:")
    for name, timing in timings.items():
        print(f"  {name:42s} {timing.median_ms:7.3f} ms")
    step_ms, floor_ms = timings["whole step"].median_ms, timings["read floor: sum of every streamed weight"].median_ms
    print(f"whole step {megabytes / step_ms:.1f} GB/s of weights, read floor {megabytes / floor_ms:.1f} GB/s "
          f"(the step takes {step_ms / floor_ms:.2f}x the floor)")  # fmt: skip


if __name__ == "__main__":
    main(getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32)
