"""Suite `sampling`: one guided sampling step of image generation, cfg_sample over [2 B, V] logits.

Janus-style classifier-free guidance: B conditional rows over B unconditional ones, V = 16384 image codes (the
Janus / LlamaGen codebook), scale 5, temperature 1, top-p 0.9; B = 1 (one image) and 16 (a batch). The op reads
the logits once and writes B ids, so `bytes` counts the logits and the row is held to memory bandwidth.
Baseline: `torch`, the step as generation loops write it in eager PyTorch (transformers' guidance processor
arithmetic, a sort for top-p, torch.multinomial) on the same logits. Both sample, with different random streams,
so their ids are not compared.

Also `jacobi_verify`, the verification of one window of speculative Jacobi decoding (W = 8, one image, 16384
codes), against the rule's reference formulation in eager PyTorch (the same random numbers: the new tokens
are compared).
"""

from __future__ import annotations

import torch

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, register_suite

VOCAB = 16384
BATCHES = (1, 16)
SCALE, TOP_P = 5.0, 0.9


def eager_step(logits: torch.Tensor, scale: float, top_p: float) -> torch.Tensor:
    """The guided top-p sampling step as eager PyTorch (guidance, temperature 1, top-p, multinomial)."""
    conditional, unconditional = logits.float().chunk(2)
    scores = unconditional + scale * (conditional - unconditional)
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # keep the fewest ids whose mass reaches top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(sorted_scores.softmax(dim=-1), 1)
    return order.gather(-1, choice).squeeze(-1)


def sampling_case(batch: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Case:
    size = torch.finfo(dtype).bits // 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(batch + vocab)
        logits = (torch.randn(2 * batch, vocab, generator=generator) * 3).to(device, dtype)
        offset = torch.zeros(1, dtype=torch.int64, device=device)
        out = torch.empty(batch, dtype=torch.int64, device=device)
        return [
            Provider("fastmm", lambda: fastmm.ops.cfg_sample(logits, scales=(SCALE,), top_p=TOP_P, seed=1,
                                                             offset=offset, out=out),
                     backend=choose_backend("cfg_sample", device)),  # fmt: skip
            Provider("torch", lambda: eager_step(logits, SCALE, TOP_P), same_result=False, graph_safe=False,
                     note="eager guidance + sort-based top-p + multinomial"),  # fmt: skip
        ]

    return Case(
        op="cfg_sample",
        shape={"B": batch, "V": vocab},
        dtype=dtype,
        bytes=2 * batch * vocab * size + batch * 8,
        flops=0,
        bound="memory",
        setup=setup,
        decode_size=True,
    )


WINDOW = 8  # the SJD window of the e2e suite's fastmm_sjd


def verify_case(images: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Case:
    """jacobi_verify over one SJD window: [2 N, W, V] guided logits at temperature 1, drafts half taken from the
    logits' own argmax (long accepted runs) and half random, their q one-hot ("copy" drafts)."""
    size = torch.finfo(dtype).bits // 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(images + vocab)
        logits = (torch.randn(2 * images, WINDOW, vocab, generator=generator) * 3).to(device, dtype)
        random_drafts = torch.randint(0, vocab, (images, WINDOW), generator=generator).to(device)
        drafts = torch.where(torch.arange(WINDOW, device=device) < WINDOW // 2, logits[:images].argmax(-1),
                             random_drafts)  # fmt: skip
        probs = torch.nn.functional.one_hot(drafts, vocab).float()
        start = torch.ones(images, dtype=torch.int64, device=device)
        def new_tokens():
            return fastmm.ops.jacobi_verify(logits, drafts, probs, start, 10**6, scales=(SCALE,), temperature=1.0,
                                            seed=1)[1]  # fmt: skip

        def eager():
            with fastmm.use_backend("reference"):
                return new_tokens()

        return [
            Provider("fastmm", new_tokens, backend=choose_backend("jacobi_verify", device)),
            Provider("torch", eager, graph_safe=False, note="fastmm.reference's eager PyTorch of the same rule"),
        ]

    return Case(
        op="jacobi_verify",
        shape={"N": images, "W": WINDOW, "V": vocab},
        dtype=dtype,
        bytes=2 * images * WINDOW * vocab * size + 2 * images * WINDOW * vocab * 4,  # logits, q in and p out
        flops=0,
        bound="memory",
        setup=setup,
        decode_size=True,
    )


@register_suite(
    "sampling",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers={
        "fastmm": "fastmm.ops.cfg_sample / fastmm.ops.jacobi_verify (the backend that ran is shown next to it)",
        "torch": "the same step in eager PyTorch: for cfg_sample guidance, sort-based top-p, torch.multinomial; "
        "for jacobi_verify fastmm.reference's formulation of the rule",
    },
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [sampling_case(1, 512, torch.float32, device), verify_case(1, 512, torch.float32, device)]
    found = [sampling_case(batch, VOCAB, dtype, device) for dtype in (torch.float32, torch.bfloat16)
             for batch in BATCHES]  # fmt: skip
    return found + [verify_case(1, VOCAB, dtype, device) for dtype in (torch.float32, torch.bfloat16)]
