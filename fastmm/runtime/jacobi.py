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
from fastmm.runtime.cuda_graph import capture_step

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


# Passes between two host reads of "is every image done?": on CUDA each read drains the queue, so several
# replayed passes go between reads (a pass after the last image is done changes nothing); on the CPU a read is
# free.
CHECK_EVERY = {"cuda": 4}


class JacobiLoop:
    """One SJD iteration as a function of static buffers (graph-safe: no host sync, no data-dependent shape).

    Buffers: ``tokens`` [N, T + W] (decided tokens in columns < accepted; the W columns past T take the writes of
    images already done), ``accepted`` [N], ``drafts`` [N, W], ``probs`` [N, W, V] (each draft's q), ``passes``
    (the passes run while an image was unfinished) and the KV cache's lengths and positions.
    """

    def __init__(self, step, parallel: Jacobi):
        self.model, self.cache = step.model, step.cache
        N, T = step.tokens.shape
        W = parallel.window
        if W > T - 1:
            raise ValueError(f"generate_image: the Jacobi window ({W}) is larger than the tokens left after the first "
                             f"({T - 1})")  # fmt: skip
        self.N, self.T, self.W, self.G = N, T, W, step.groups
        self.init, self.sampling = parallel.init, step.sampling
        device = step.tokens.device
        self.slots = torch.arange(W, device=device)
        self.modality = step.modality.expand(-1, W)
        self.vocab = self.model.config.image_gen.codebook_size  # image_logits' width
        self.tokens = torch.zeros(N, T + W, dtype=torch.int64, device=device)
        self.tokens[:, :1] = step.tokens[:, :1]
        self.accepted = torch.ones(N, dtype=torch.int64, device=device)  # the cache holds one token less
        drafts, probs = jacobi_initial_drafts(self.init, self.sampling["seed"], self.window_positions(),
                                              step.tokens[:, :1].expand(N, W), self.vocab)  # fmt: skip
        self.drafts, self.probs = drafts.contiguous(), probs.contiguous()  # "copy" returns its expanded input
        self.passes = torch.zeros((), dtype=torch.int64, device=device)

    def window_positions(self) -> torch.Tensor:
        return self.accepted[:, None] + self.slots  # [N, W]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """What an iteration advances (restored after a CUDA-graph warm-up)."""
        return (self.tokens, self.accepted, self.drafts, self.probs, self.passes, self.cache.lengths,
                self.cache.positions)  # fmt: skip

    def all_done(self) -> bool:
        return int(self.accepted.min()) >= self.T

    def __call__(self) -> None:
        N, T, W, G, slots, model = self.N, self.T, self.W, self.G, self.slots, self.model
        self.passes += (self.accepted.min() < T).long()
        last = self.tokens.gather(1, (self.accepted - 1)[:, None])  # [N, 1]: decided, not yet in the cache
        inputs = torch.cat([last, self.drafts[:, :-1]], dim=1)  # [N, W]
        embeds = model.image_embeds(inputs.reshape(-1)).view(N, W, -1).repeat(G, 1, 1)  # [G*N, W, hidden]
        logits = model.image_logits(model.decoder(embeds, self.modality, self.cache, prefill=False))  # [G*N, W, V]
        count, new, new_probs = ops.jacobi_verify(logits, self.drafts, self.probs, self.accepted, T, **self.sampling)
        self.cache.advance(count.repeat(G) - W)  # the pass advanced every row by W; keep what was accepted
        positions = self.window_positions()  # < T + W - 1: inside the buffer
        kept = slots[None, :] < count[:, None]
        self.tokens.scatter_(1, positions, torch.where(kept, new, self.tokens.gather(1, positions)))
        self.accepted += count
        # The next window starts at the new frontier: the old window's redrafts shift left by count, and the
        # count slots freed at the end get initial drafts (a "copy" draft copies the last token before it).
        source = slots[None, :] + count[:, None]
        from_old = source < W
        source = source.clamp(max=W - 1)
        left = torch.where(count < W, new[:, -1], self.tokens.gather(1, (self.accepted - 1)[:, None])[:, 0])
        fresh, fresh_probs = jacobi_initial_drafts(self.init, self.sampling["seed"], self.window_positions(),
                                                   left[:, None].expand(N, W), self.vocab)  # fmt: skip
        torch.where(from_old, new.gather(1, source), fresh, out=self.drafts)
        gathered = new_probs.gather(1, source[..., None].expand(-1, -1, self.vocab))
        torch.where(from_old[..., None], gathered, fresh_probs, out=self.probs)  # written in place: no [N, W, V] copy


@torch.no_grad()
def jacobi_decode(step, parallel: Jacobi, use_cuda_graph: bool = True, progress=None) -> tuple[int, bool]:
    """Fill step.tokens (an ImageDecodeStep after its first token, its cache with ``window`` spare positions past
    the image) by SJD; parallel.window is an int here (generate_image resolves "auto"). On CUDA with
    ``use_cuda_graph`` the iteration is captured once and replayed. progress(tokens done, total) is called at
    each host check with the least advanced image's count. Returns (decoder passes, whether a graph ran)."""
    loop = JacobiLoop(step, parallel)
    device = step.tokens.device
    graph = None
    if use_cuda_graph and device.type == "cuda":
        graph = capture_step(loop, buffers=loop.buffers())
    run = graph.replay if graph is not None else loop
    check_every = CHECK_EVERY.get(device.type, 1)
    while not loop.all_done():
        for _ in range(check_every):
            run()
        if progress is not None:
            progress(min(int(loop.accepted.min()), loop.T), loop.T)
    step.tokens.copy_(loop.tokens[:, : loop.T])
    return int(loop.passes), graph is not None
