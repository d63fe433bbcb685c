"""The two native kernels a multi-row decode pass (SJD windows) spends its time in, at the e2e model's sizes,
against their baselines. Not a suite: a quick look at how they scale with the rows of a pass.

    .venv/bin/python benchmarks/decode_kernels.py

Rows: `fastmm.native.linear.skinny_linear` against F.linear on the small model's q/k/v, o, gate/up, down and
image-head weights, M = 1, 2, 8, 16 rows, fp32 and bf16; decode attention (B = 2 CFG rows, 8 query / 4 KV heads,
d = 64, 600 cached keys) for 1 and 8 queries per row, against SDPA over the same cache with the causal mask of
the window. Medians of interleaved rounds (fastmm.bench.timer.cpu_time_interleaved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmm.bench.timer import cpu_time_interleaved
from fastmm.native.attention import decode_attention_fwd
from fastmm.native.linear import skinny_linear

LINEAR_SHAPES = {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2752, 512), "down": (512, 1376),
                 "image head": (16384, 512)}  # fmt: skip
ROWS = (1, 2, 8, 16)
CACHE, FILLED, BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 640, 600, 2, 8, 4, 64


def _median_us(timings: dict) -> dict[str, float]:
    return {name: 1e3 * timing.median_ms for name, timing in timings.items()}


def linear_rows() -> None:
    print("skinny_linear vs F.linear: us (ratio = F.linear / skinny)")
    for dtype in (torch.float32, torch.bfloat16):
        for name, (n, k) in LINEAR_SHAPES.items():
            weight = torch.randn(n, k).to(dtype)
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, k).to(dtype)
                fns = {"skinny": lambda: skinny_linear(x, weight, None), "F.linear": lambda: F.linear(x, weight)}
                for fn in fns.values():
                    fn()
                us = _median_us(cpu_time_interleaved(fns))
                ratio = us["F.linear"] / us["skinny"]
                cells.append(f"M={rows}: {us['skinny']:7.1f} vs {us['F.linear']:7.1f} ({ratio:.2f}x)")
            print(f"  {str(dtype)[6:]:8} {name:10} [{n}, {k}]  " + "  ".join(cells))


def attention_rows() -> None:
    print(f"decode attention, B={BATCH}, {Q_HEADS}/{KV_HEADS} heads, d={HEAD_DIM}, {FILLED} keys: us")
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(BATCH, KV_HEADS, CACHE, HEAD_DIM).to(dtype)
        v = torch.randn(BATCH, KV_HEADS, CACHE, HEAD_DIM).to(dtype)
        lengths = torch.full((BATCH,), FILLED, dtype=torch.int32)
        for queries in (1, 8):
            q = torch.randn(BATCH, Q_HEADS, queries, HEAD_DIM).to(dtype)
            # The window's causal mask over the filled cache: query i sees keys < FILLED - queries + i + 1.
            keys = torch.arange(FILLED)
            mask = keys[None, :] < (FILLED - queries + 1 + torch.arange(queries))[:, None]
            group = Q_HEADS // KV_HEADS
            k_full = k[:, :, :FILLED].repeat_interleave(group, dim=1)
            v_full = v[:, :, :FILLED].repeat_interleave(group, dim=1)
            fns = {
                "fastmm": lambda: decode_attention_fwd(q, k, v, lengths, HEAD_DIM**-0.5),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask),
            }
            for fn in fns.values():
                fn()
            us = _median_us(cpu_time_interleaved(fns))
            print(f"  {str(dtype)[6:]:8} {queries} queries per row: fastmm {us['fastmm']:7.1f}, "
                  f"SDPA {us['sdpa']:7.1f} ({us['sdpa'] / us['fastmm']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    print(f"torch threads: {torch.get_num_threads()}")
    linear_rows()
    attention_rows()
