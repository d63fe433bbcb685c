"""Suite `norm`: modality-adaptive RMSNorm / LayerNorm (mPLUG-Owl2), forward.

Rows follow mPLUG-Owl2's prefill layout: text runs of random length (8..128 tokens) with a 65-token image
span after each, so both modalities interleave at real span lengths (about 45% image rows). Every case
times fastmm and its baselines on the same tensors; norms move x in, y out and the [2, D] parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.reference import norm as reference

IMAGE_SPAN = 65  # visual tokens per image after mPLUG-Owl2's visual abstractor
TEXT_RUN = (8, 128)  # random text run length between images, inclusive
MODALITIES = 2  # 0 = text, 1 = image
EPS = {"modality_rms_norm": 1e-6, "modality_layer_norm": 1e-5}
DTYPES = (torch.float32, torch.bfloat16)


def modality_layout(tokens: int, seed: int = 0) -> torch.Tensor:
    """[tokens] int64 ids: a text run (0) of random length, then a 65-token image span (1), repeated."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(tokens, dtype=torch.int64)
    pos = 0
    while pos < tokens:
        run = int(torch.randint(TEXT_RUN[0], TEXT_RUN[1] + 1, (1,), generator=generator))
        ids[pos : pos + run] = 0
        ids[pos + run : pos + run + IMAGE_SPAN] = 1
        pos += run + IMAGE_SPAN
    return ids


class MultiwayNetwork(nn.Module):
    """mPLUG-Owl2's modality router (modeling_llama2.py), same structure: one module per modality, each
    modality's rows found with nonzero (a host sync on GPU), gathered, run and scattered back. Like the
    original it writes into empty_like(hidden_states), so its modules must keep the last dimension."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.multiway = nn.ModuleList(modules)

    def forward(self, hidden_states: torch.Tensor, multiway_indices: torch.Tensor) -> torch.Tensor:
        if len(self.multiway) == 1:
            return self.multiway[0](hidden_states)
        output_hidden_states = torch.empty_like(hidden_states)
        for idx, subway in enumerate(self.multiway):
            local_indices = multiway_indices.eq(idx).nonzero(as_tuple=True)
            hidden = hidden_states[local_indices].unsqueeze(1).contiguous()
            if hidden.numel():
                output = subway(hidden).squeeze(1)
                output_hidden_states[local_indices] = output
        return output_hidden_states.contiguous()


def _norm_module(op: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The torch module mPLUG-Owl2 would hold for one modality, loaded with that modality's parameters."""
    dim = weight.shape[0]
    if op == "modality_rms_norm":
        module = nn.RMSNorm(dim, eps=EPS[op], device=weight.device, dtype=weight.dtype)
    else:
        module = nn.LayerNorm(dim, eps=EPS[op], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module.requires_grad_(False)


def norm_case(op: str, tokens: int, dim: int, dtype: torch.dtype, device: torch.device, compile: bool = True) -> Case:
    """modality_rms_norm or modality_layer_norm at x [tokens, dim], weight (and bias for LayerNorm) [2, dim]."""
    has_bias = op == "modality_layer_norm"
    size = torch.finfo(dtype).bits // 8
    params = 2 if has_bias else 1
    # read x, write y, read the [M, D] parameters and the int64 ids
    traffic = 2 * tokens * dim * size + params * MODALITIES * dim * size + tokens * 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(tokens * 7919 + dim)
        x = torch.randn(tokens, dim, generator=generator).to(device, dtype)
        modality = modality_layout(tokens).to(device)
        weight = (1 + 0.1 * torch.randn(MODALITIES, dim, generator=generator)).to(device, dtype)
        bias = (0.1 * torch.randn(MODALITIES, dim, generator=generator)).to(device, dtype) if has_bias else None
        eps = EPS[op]
        fastmm_op = getattr(fastmm.ops, op)
        reference_op = getattr(reference, op)
        extra = {"bias": bias} if has_bias else {}
        modules = [_norm_module(op, weight[m], None if bias is None else bias[m]) for m in range(MODALITIES)]
        recipe = MultiwayNetwork(modules)
        w0, b0 = weight[0], None if bias is None else bias[0]
        kept = torch.empty_like(x)
        if has_bias:
            floor = lambda: F.layer_norm(x, (dim,), w0, b0, eps)  # noqa: E731
        else:
            floor = lambda: F.rms_norm(x, (dim,), w0, eps)  # noqa: E731
        backend = choose_backend(op, device)
        providers = [
            Provider("fastmm", lambda: fastmm_op(x, modality, weight, eps=eps, **extra), backend=backend),
            Provider("mplug_owl2", lambda: recipe(x, modality), graph_safe=False, note="nonzero per modality"),
            Provider("torch", floor, same_result=False, note="one weight for all rows"),
            Provider("copy", lambda: kept.copy_(x), same_result=False, note="the same bytes, no math"),
        ]
        if compile:
            # A fresh dynamo state per case: dynamo allows only a few recompiles per function before it falls
            # back to eager without saying so in the figures, and every case is a new shape.
            torch._dynamo.reset()
            compiled = torch.compile(reference_op, dynamic=False)
            providers.append(Provider("torch_compile", lambda: compiled(x, modality, weight, eps=eps, **extra)))
        return providers

    return Case(
        op=op,
        shape={"T": tokens, "D": dim},
        dtype=dtype,
        bytes=traffic,
        flops=0,
        bound="memory",
        setup=setup,
        decode_size=tokens <= 128,
    )


PROVIDERS = {
    "fastmm": "fastmm.ops with the device's default backend (native on CPU, triton on CUDA); the backend that "
    "actually ran is shown next to it",
    "mplug_owl2": "the recipe fastmm replaces: mPLUG-Owl2's MultiwayNetwork (nonzero per modality, gather, one "
    "nn.RMSNorm / nn.LayerNorm per modality, scatter into an empty_like output)",
    "torch": "one torch op with one weight over all rows (F.rms_norm / F.layer_norm). It ignores modality, so its "
    "result differs; it is the floor of what torch offers, the time to beat without routing",
    "copy": "x copied into a kept [T, D] buffer (copy_), the same bytes as the norm with no math: the roofline "
    "of this very shape, timed in the same rounds (a ratio `vs copy` of 1 means copy speed)",
    "torch_compile": "torch.compile(dynamic=False) of fastmm.reference.norm, compiled per case (about 1 s each "
    "after a one-time ~15 s inductor start on 2 cores); compile time is not in the figure",
}


@register_suite(
    "norm",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("modality_rms_norm", {"T": 8192, "D": 4096}, "pct_of_peak", 60, "native"),
        Target("modality_rms_norm", {"T": 8192, "D": 4096}, "speedup:torch", 5, "native"),
        Target("modality_rms_norm", {"T": 8192, "D": 4096}, "speedup:mplug_owl2", 10, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """The full grid (D in {1024, 4096}, T in {128, 2048, 8192}), or tiny shapes without torch.compile for a
    smoke test (--quick: seconds, where inductor alone would take 15 s to start)."""
    shapes = [(100, 256), (300, 256)] if quick else [(t, d) for d in (1024, 4096) for t in (128, 2048, 8192)]
    return [
        norm_case(op, tokens, dim, dtype, device, compile=not quick)
        for op in ("modality_rms_norm", "modality_layer_norm")
        for tokens, dim in shapes
        for dtype in DTYPES
    ]
