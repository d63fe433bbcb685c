"""Suite `linear`: decode-sized GEMMs y = x W^T, x [M, K] with M = 1 to 8 rows (2: classifier-free guidance).

The weights are the projections of a Llama-style decoder layer at hidden 512 (the e2e model: fused q/k/v,
o, fused gate/up, down) and at hidden 2048 (Janus-Pro-1B's decoder), plus the image-generation head over the
16384-code codebook. At these M one call is one pass over W, so `bytes` counts the weight (and x and y) and
the row is held to memory bandwidth. A weight that fits in the last-level cache (the hidden-512 ones) is read
from it when timed back to back, so those rows can pass 100% of the DRAM copy bandwidth; inside a decode
step, where the whole model streams through, they cannot. Baseline: `torch`, torch.nn.functional.linear on
the same tensors (MKL on CPU, cuBLAS on GPU; oneDNN for bf16 on CPU). On the native backend the bf16 rows also
time `native_skinny`, the skinny kernel called past the routing of fastmm.ops.linear, which hands bf16 calls of
more than SKINNY_MAX_ROWS_BF16 rows to F.linear: those rows show where that limit comes from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite

ROWS = (1, 2, 8)
BF16_ROWS = (2, 4, 8)
# (N, K): hidden 512 (8 heads / 4 KV heads of 64, SwiGLU 1376), hidden 2048 (16 heads of 128, SwiGLU 5632)
SHAPES = {
    "qkv 512": (1024, 512),
    "o 512": (512, 512),
    "gate_up 512": (2752, 512),
    "down 512": (512, 1376),
    "image head 512": (16384, 512),
    "qkv 2048": (6144, 2048),
    "gate_up 2048": (11264, 2048),
    "down 2048": (2048, 5632),
    "image head 2048": (16384, 2048),
}
QUICK_SHAPES = {"small": (96, 40)}


def linear_case(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Case:
    size = torch.finfo(dtype).bits // 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(N * 7 + K + M)
        x = torch.randn(M, K, generator=generator).to(device, dtype)
        weight = (torch.randn(N, K, generator=generator) * K**-0.5).to(device, dtype)
        backend = choose_backend("linear", device)
        found = [
            Provider("fastmm", lambda: fastmm.ops.linear(x, weight), backend=backend),
            Provider("torch", lambda: F.linear(x, weight)),
        ]
        if backend == "native" and dtype == torch.bfloat16:  # the kernel whatever M: what the bf16 limit weighs
            from fastmm.native.linear import skinny_linear

            found.append(Provider("native_skinny", lambda: skinny_linear(x, weight, None), note="skinny kernel at any M"))
        return found

    return Case(
        op="linear",
        shape={"M": M, "N": N, "K": K},
        dtype=dtype,
        bytes=(N * K + M * K + M * N) * size,
        flops=2 * M * N * K,
        bound="memory",
        setup=setup,
        decode_size=True,
    )


@register_suite(
    "linear",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers={
        "fastmm": "fastmm.ops.linear (the backend that ran is shown next to it)",
        "torch": "torch.nn.functional.linear on the same x and W",
        "native_skinny": "bf16 on the native backend: fastmm.native.linear.skinny_linear called directly, the kernel "
        "fastmm.ops.linear hands to F.linear above SKINNY_MAX_ROWS_BF16 rows (the rows that set that limit)",
    },
    targets=(Target("linear", {"M": 2, "N": 16384, "K": 512}, "speedup:torch", 2, "native"),),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """Every shape at M = 1, 2, 8 in fp32, at M = 2, 4, 8 in bf16 (around the native bf16 limit of 4 rows), or
    one tiny shape (--quick)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    found = [linear_case(M, N, K, torch.float32, device) for N, K in shapes.values() for M in ROWS]
    found += [linear_case(M, N, K, torch.bfloat16, device) for N, K in shapes.values() for M in BF16_ROWS]
    return found
