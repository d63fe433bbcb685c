"""Suite `vq`: nearest-code quantization (vq_quantize, metric l2) at the tokenizers' real sizes.

Shapes (N vectors, K codes, D dims): Chameleon (1024, 8192, 256); a batch of 16 Janus images
(16 x 576 = 9216, 16384, 8); one Emu3 image (4096, 32768, 4). z and the codebook are N(0, 1). Every
provider returns the [N] int64 indices (the note says when a baseline disagrees with fastmm on some rows:
near-ties, or bf16 distances). FLOPs are the 2 N K D of the dot products; `peak alloc MiB` is what one call
holds allocated at once through torch, outputs included (FAISS allocates its own buffers, not counted).
"""

from __future__ import annotations

import torch

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite

DTYPES = (torch.float32, torch.bfloat16)
SHAPES = {"chameleon": (1024, 8192, 256), "janus": (9216, 16384, 8), "emu3": (4096, 32768, 4)}
QUICK_SHAPES = {"small": (300, 1000, 8), "wide": (100, 500, 64)}


def transformers_recipe(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """transformers' Chameleon / Janus / Emu3 quantizers: the full N x K matrix |z|^2 + |e|^2 - 2 z.e, argmin."""
    distances = (
        torch.sum(z**2, dim=1, keepdim=True)
        + torch.sum(codebook**2, dim=1)
        - 2 * torch.einsum("bd,dn->bn", z, codebook.transpose(0, 1))
    )
    return torch.argmin(distances, dim=1)


def _faiss_provider(z: torch.Tensor, codebook: torch.Tensor) -> Provider | None:
    """FAISS IndexFlatL2 (exact search, BLAS for large batches), fp32 CPU only; None when not importable."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())
    queries = z.numpy()
    return Provider(
        "faiss",
        lambda: torch.from_numpy(index.search(queries, 1)[1][:, 0]),
        graph_safe=False,
        note="own buffers not counted",
    )


def _vector_quantize_provider(z: torch.Tensor, codebook: torch.Tensor) -> Provider | None:
    """vector-quantize-pytorch's VectorQuantize (eval mode) loaded with the same codes; None when absent."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    K, D = codebook.shape
    module = VectorQuantize(dim=D, codebook_size=K).eval().to(z.device)
    with torch.no_grad():
        module._codebook.embed.copy_(codebook.float()[None])
    batch = z[None]  # (1, N, D)
    return Provider("vector_quantize", lambda: module(batch)[1][0], graph_safe=False, note="eval mode")


def vq_case(N: int, K: int, D: int, dtype: torch.dtype, device: torch.device) -> Case:
    """vq_quantize of z [N, D] against a codebook [K, D], both N(0, 1), every provider on the same tensors."""
    size = torch.finfo(dtype).bits // 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(N * 31 + K)
        z = torch.randn(N, D, generator=generator).to(device, dtype)
        codebook = torch.randn(K, D, generator=generator).to(device, dtype)
        codebook_sq = codebook.float().pow(2).sum(dim=1)  # cached by VQCodebook, as FAISS keeps its norms
        backend = choose_backend("vq_quantize", device)

        def run_fastmm() -> torch.Tensor:
            return fastmm.ops.vq_quantize(z, codebook, codebook_sq=codebook_sq, return_quantized=False)[0]

        providers = [
            Provider("fastmm", run_fastmm, backend=backend),
            Provider("transformers", lambda: transformers_recipe(z, codebook), note="N x K matrix"),
            Provider("cdist", lambda: torch.cdist(z, codebook).argmin(dim=1), note="torch.cdist + argmin"),
        ]
        if device.type == "cpu" and dtype == torch.float32:
            providers.append(_faiss_provider(z, codebook))
        providers.append(_vector_quantize_provider(z, codebook))
        return [provider for provider in providers if provider is not None]

    return Case(
        op="vq_quantize",
        shape={"N": N, "K": K, "D": D},
        dtype=dtype,
        bytes=(N * D + K * D) * size + N * 8,
        flops=2 * N * K * D,
        bound="compute",
        setup=setup,
        measure_memory=True,
    )


PROVIDERS = {
    "fastmm": "fastmm.ops.vq_quantize, indices only, |e|^2 precomputed (as fastmm.nn.VQCodebook caches it); "
    "the backend that ran is shown next to it",
    "transformers": "the recipe of transformers' Chameleon / Janus / Emu3 quantizers: the N x K expanded-formula "
    "distance matrix in the input dtype, then argmin",
    "cdist": "torch.cdist(z, codebook).argmin(dim=1)",
    "faiss": "FAISS IndexFlatL2.search(z, 1) on the same codes (fp32, CPU only), threads set to torch's",
    "vector_quantize": "vector-quantize-pytorch's VectorQuantize in eval mode with the same codes (fp32 codebook)",
}

_JANUS = {"N": 9216, "K": 16384, "D": 8}
_CHAMELEON = {"N": 1024, "K": 8192, "D": 256}


@register_suite(
    "vq",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("vq_quantize", _JANUS, "speedup:faiss", 10, "native"),
        Target("vq_quantize", _JANUS, "speedup:transformers", 20, "native"),
        Target("vq_quantize", _CHAMELEON, "speedup:faiss", 1.2, "native"),
        Target("vq_quantize", _JANUS, "memory_pct:transformers", 5, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """The three tokenizer shapes in fp32 and bf16, or two tiny ones (--quick)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    return [vq_case(*shape, dtype, device) for shape in shapes.values() for dtype in DTYPES]
