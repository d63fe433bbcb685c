"""Suite `routed_linear`: routed (per-modality) linear projections (mPLUG-Owl2's K / V), forward.

Rows follow mPLUG-Owl2's prefill layout (the same as the `norm` suite's): text runs of random length
(8..128 tokens) with a 65-token image span after each, so both modalities interleave at real span lengths
(about 45% image rows). Every case times fastmm and its baselines on the same tensors; routed_linear does
2*T*N*K FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.bench.suites.norm import DTYPES, MODALITIES, MultiwayNetwork, modality_layout


def routed_linear_case(tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> Case:
    """routed_linear at x [tokens, K=dim], weight [2, N=dim, K=dim], no bias (mPLUG-Owl2's K / V projections).
    N = K because the recipe, like mPLUG-Owl2, writes into empty_like(x)."""
    size = torch.finfo(dtype).bits // 8
    # read x and both weights once, write y, read the ids
    traffic = 2 * tokens * dim * size + MODALITIES * dim * dim * size + tokens * 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(tokens * 7919 + dim)
        x = torch.randn(tokens, dim, generator=generator).to(device, dtype)
        modality = modality_layout(tokens).to(device)
        weight = (torch.randn(MODALITIES, dim, dim, generator=generator) / dim**0.5).to(device, dtype)
        linears = []
        for m in range(MODALITIES):
            linear = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype).requires_grad_(False)
            linear.weight.copy_(weight[m])
            linears.append(linear)
        recipe = MultiwayNetwork(linears)
        w0 = weight[0]
        backend = choose_backend("routed_linear", device)
        return [
            Provider("fastmm", lambda: fastmm.ops.routed_linear(x, modality, weight), backend=backend),
            Provider("mplug_owl2", lambda: recipe(x, modality), graph_safe=False, note="nonzero per modality"),
            Provider("torch", lambda: F.linear(x, w0), same_result=False, note="one dense GEMM, same FLOPs"),
        ]

    return Case(
        op="routed_linear",
        shape={"T": tokens, "K": dim, "N": dim},
        dtype=dtype,
        bytes=traffic,
        flops=2 * tokens * dim * dim,
        bound="compute",
        setup=setup,
        decode_size=tokens <= 128,
    )


PROVIDERS = {
    "fastmm": "fastmm.ops with the device's default backend (native on CPU, triton on CUDA); the backend that "
    "actually ran is shown next to it",
    "mplug_owl2": "the recipe fastmm replaces: mPLUG-Owl2's MultiwayNetwork (nonzero per modality, gather, one "
    "nn.Linear per modality, scatter into an empty_like output)",
    "torch": "F.linear with one weight over all rows. It ignores modality, so its result differs; it is the floor "
    "of what torch offers (one dense GEMM, the same FLOPs), the time to beat without routing",
}


@register_suite(
    "routed_linear",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("routed_linear", {"T": 8192, "K": 4096}, "speedup:torch", 0.9, "native"),
        Target("routed_linear", {"T": 8192, "K": 4096}, "speedup:mplug_owl2", 1.5, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """The full grid (T x K = N in {128, 2048} x {1024, 4096}, and 8192 x 4096), or one tiny shape for a
    smoke test (--quick)."""
    shapes = [(100, 128)] if quick else [(128, 1024), (128, 4096), (2048, 1024), (2048, 4096), (8192, 4096)]
    return [routed_linear_case(tokens, dim, dtype, device) for tokens, dim in shapes for dtype in DTYPES]
