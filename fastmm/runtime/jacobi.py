"""Speculative Jacobi decoding (SJD, Teng et al., ICLR 2025) of image tokens: several tokens per decoder pass,
lossless.

Each iteration feeds every image's window of W tokens through the decoder in one pass on the static KV cache:
the last accepted token and the first W - 1 drafts, at their positions. The pass's logits verify the W drafts
(fastmm.ops.jacobi_verify: accept a draft with probability min(1, p / q), at the first rejection draw from the
residual, redraft the rest from their new p), so each image advances by its own count (1 to W tokens) and
its cache rows by the same: K / V written for rejected drafts lie past the row's length and the next pass
overwrites them in place. New window slots start as a random code ("random") or a copy of the token to their
left ("copy"). At temperature 0 the result is exactly sequential greedy decoding; otherwise every token is an
exact sample of the sequential conditional, with the same random numbers a position would use sequentially.
"""

from __future__ import annotations

import dataclasses

import torch

from fastmm import ops
from fastmm.ops.sampling import jacobi_initial_drafts

INITS = ("random", "copy")


@dataclasses.dataclass(frozen=True)
class Jacobi:
    """generate_image(..., parallel=Jacobi(window=W)): W draft tokens verified per decoder pass per image.
    window="auto" takes the device's roofline crossover (fastmm.runtime.window); GeneratedImages.window reports
    the window used."""

    window: int | str = "auto"
    init: str = "random"

    def __post_init__(self):
        auto = self.window == "auto"
        if not auto and (not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1):
            raise ValueError(f"Jacobi: window must be an int >= 1 or 'auto', got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"Jacobi: init must be one of {INITS}, got {self.init!r}")


@torch.no_grad()
def jacobi_decode(step, parallel: Jacobi) -> int:
    """Fill step.tokens (an ImageDecodeStep after its first token, its cache with ``window`` spare positions past
    the image) by SJD; parallel.window is an int here (generate_image resolves "auto"). Returns the number of
    decoder passes."""
    model, cache, tokens = step.model, step.cache, step.tokens
    N, T = tokens.shape
    W, G = parallel.window, step.groups
    if W > T - 1:
        raise ValueError(f"generate_image: the Jacobi window ({W}) is larger than the tokens left after the first "
                         f"({T - 1})")  # fmt: skip
    sampling = step.sampling
    seed = sampling["seed"]
    device = tokens.device
    slots = torch.arange(W, device=device)
    modality = step.modality.expand(-1, W)
    accepted = torch.ones(N, dtype=torch.int64, device=device)  # tokens decided per image; cache rows hold one less
    vocab = model.config.image_gen.codebook_size  # image_logits' width
    drafts, probs = jacobi_initial_drafts(parallel.init, seed, accepted[:, None] + slots, tokens[:, :1].expand(N, W),
                                          vocab)  # fmt: skip
    passes = 0
    while int(accepted.min()) < T:
        last = tokens.gather(1, (accepted - 1)[:, None])  # [N, 1]: decided, not yet in the cache
        inputs = torch.cat([last, drafts[:, :-1]], dim=1)  # [N, W]
        embeds = model.image_embeds(inputs.reshape(-1)).view(N, W, -1).repeat(G, 1, 1)  # [G*N, W, hidden]
        logits = model.image_logits(model.decoder(embeds, modality, cache, prefill=False))  # [G*N, W, V]
        count, new, new_probs = ops.jacobi_verify(logits, drafts, probs, accepted, T, **sampling)
        cache.advance(count.repeat(G) - W)  # the pass advanced every row by W; keep what was accepted
        rows, taken = (slots[None, :] < count[:, None]).nonzero(as_tuple=True)
        tokens[rows, accepted[rows] + taken] = new[rows, taken]
        accepted += count
        passes += 1
        # The next window starts at the new frontier: the old window's redrafts shift left by count, and the
        # count slots freed at the end get initial drafts (a "copy" draft copies the last token before it).
        source = slots[None, :] + count[:, None]
        from_old = source < W
        source = source.clamp(max=W - 1)
        left = torch.where(count < W, new[:, -1], tokens.gather(1, (accepted - 1).clamp(max=T - 1)[:, None])[:, 0])
        fresh, fresh_probs = jacobi_initial_drafts(parallel.init, seed, accepted[:, None] + slots,
                                                   left[:, None].expand(N, W), vocab)  # fmt: skip
        drafts = torch.where(from_old, new.gather(1, source), fresh)
        probs = torch.where(from_old[..., None], new_probs.gather(1, source[..., None].expand(-1, -1, vocab)),
                            fresh_probs)  # fmt: skip
    return passes
