"""Visual-token pruning policies for the unified model's prefill: VTW, FastV and PyramidDrop.

A policy decides, before a decoder layer, which image tokens go on; the decoder (fastmm.models.decoder,
``Decoder.prefill``) moves the survivors together with their RoPE positions, modality ids and key ranges, and
each layer's KV cache keeps only the tokens that reached it. Decoding afterwards attends those shorter caches.

    VTW(layer=K)                      every image token withdrawn before layer K (VTW, Lin et al. 2024)
    FastV(layer=K, ratio=R)           before layer K keep the top (1 - R) image tokens by the attention the rater
                                      rows paid them in layer K - 1, averaged over heads (FastV, Chen et al. 2024)
    PyramidDrop(layers=(8, 16, 24))   FastV's ranking at several layers, each keeping (1 - ratio) of what is left

Scores come from ops.attention_importance over the layer's own queries, keys and softmax log-sum-exp: no eager
attention, no [L, L] tensor. Rows of a batch may hold different numbers of images in different places; a row
keeps n - floor(n * ratio) of its n image tokens (ties: the earlier token).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastmm import ops

RATERS = ("last", "text")


def _check_layer(policy: str, name: str, layer: object, lowest: int, num_layers: int | None = None) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < lowest:
        raise ValueError(f"{policy}: {name} must be an int >= {lowest}, got {layer!r}")
    if num_layers is not None and layer >= num_layers:
        raise ValueError(f"{policy}: {name} = {layer} is out of range for a decoder of {num_layers} layers "
                         f"(expected {lowest} <= {name} < {num_layers})")  # fmt: skip


def _check_ratio(policy: str, ratio: object) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"{policy}: ratio must be a number in [0, 1) (the share of image tokens dropped), got {ratio!r}")


def _check_rater(policy: str, rater: object) -> None:
    if rater not in RATERS:
        raise ValueError(f"{policy}: rater must be one of {RATERS}, got {rater!r}")


def _padded_indices(mask: torch.Tensor) -> torch.Tensor:
    """The indices where mask [B, L] is True, per row in order, padded with -1: [B, max count]."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return torch.where(torch.arange(width, device=mask.device) < counts[:, None], order, -1)


def image_spans(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's runs of image tokens as spans (start, end), [B, P] each, padded with empty spans (0, 0)."""
    before = torch.nn.functional.pad(image[:, :-1], (1, 0))
    after = torch.nn.functional.pad(image[:, 1:], (0, 1))
    starts = _padded_indices(image & ~before)
    ends = _padded_indices(image & ~after)
    padding = starts < 0
    return starts.masked_fill(padding, 0), (ends + 1).masked_fill(padding, 0)


def rank_images(tokens, stats, ratio: float, rater: str) -> torch.Tensor:
    """FastV's choice: [B, L] bool, True for the n - floor(n * ratio) image tokens of each row that received the
    most attention from the rater rows (the row's last token, or all its text tokens) in the layer of ``stats``.
    tokens: fastmm.models.decoder.PrefillTokens; stats: fastmm.nn.attention.AttentionStats of that layer."""
    image = tokens.image
    B, L = image.shape
    present = torch.arange(L, device=image.device)[None, :] < tokens.count[:, None]
    rows = (tokens.count - 1)[:, None] if rater == "last" else _padded_indices(present & ~image)
    starts, ends = image_spans(image)
    scores = ops.attention_importance(stats.q, stats.k, tokens.kv_start, tokens.kv_end, rows, starts, ends,
                                      lse=stats.lse)  # fmt: skip
    columns = ops.span_keys(starts, ends)
    images = image.sum(dim=1)
    kept = images - torch.floor(images.double() * ratio).long()
    chosen = ops.top_k_mask(scores, kept, columns >= 0)
    # Padding columns (-1) land in an extra column L, dropped after the scatter.
    keep = torch.zeros(B, L + 1, dtype=torch.bool, device=image.device)
    keep.scatter_(1, torch.where(columns >= 0, columns, L), chosen)
    return keep[:, :L]


@dataclasses.dataclass(frozen=True)
class VTW:
    """Visual Tokens Withdrawal: every image token leaves before layer ``layer`` (0 <= layer < num_layers)."""

    layer: int

    def __post_init__(self):
        _check_layer("VTW", "layer", self.layer, 0)

    def check(self, num_layers: int) -> None:
        _check_layer("VTW", "layer", self.layer, 0, num_layers)

    def needs_stats(self, layer_index: int) -> bool:
        return False

    def keep_images(self, layer_index: int, tokens, stats) -> torch.Tensor | None:
        return torch.zeros_like(tokens.image) if layer_index == self.layer else None

    def survivors(self, layer_index: int, images: int) -> int:
        """How many of ``images`` image tokens go on into layer layer_index."""
        return 0 if layer_index == self.layer else images


@dataclasses.dataclass(frozen=True)
class FastV:
    """FastV: before layer ``layer`` (>= 1), keep the top (1 - ratio) image tokens by the attention that the
    ``rater`` rows ("last": each row's last token, FastV's default; "text": every text token) paid them in
    layer - 1, averaged over heads and rows."""

    layer: int = 2
    ratio: float = 0.5
    rater: str = "last"

    def __post_init__(self):
        _check_layer("FastV", "layer", self.layer, 1)
        _check_ratio("FastV", self.ratio)
        _check_rater("FastV", self.rater)

    def check(self, num_layers: int) -> None:
        _check_layer("FastV", "layer", self.layer, 1, num_layers)

    def needs_stats(self, layer_index: int) -> bool:
        return layer_index == self.layer - 1

    def keep_images(self, layer_index: int, tokens, stats) -> torch.Tensor | None:
        if layer_index != self.layer:
            return None
        return rank_images(tokens, stats, self.ratio, self.rater)

    def survivors(self, layer_index: int, images: int) -> int:
        return images - math.floor(images * self.ratio) if layer_index == self.layer else images


@dataclasses.dataclass(frozen=True)
class PyramidDrop:
    """PyramidDrop-style stages: before each of ``layers`` (increasing, each >= 1) FastV's ranking keeps
    (1 - ratio) of the image tokens left, rated by each row's last token (PyramidDrop's choice) or its text."""

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5
    rater: str = "last"

    def __post_init__(self):
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
        if not layers:
            raise ValueError(f"PyramidDrop: layers must be a non-empty sequence of ints, got {self.layers!r}")
        for layer in layers:
            _check_layer("PyramidDrop", "every layer", layer, 1)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"PyramidDrop: layers must increase, got {layers}")
        object.__setattr__(self, "layers", layers)
        _check_ratio("PyramidDrop", self.ratio)
        _check_rater("PyramidDrop", self.rater)

    def check(self, num_layers: int) -> None:
        _check_layer("PyramidDrop", "the last layer", self.layers[-1], 1, num_layers)

    def needs_stats(self, layer_index: int) -> bool:
        return layer_index + 1 in self.layers

    def keep_images(self, layer_index: int, tokens, stats) -> torch.Tensor | None:
        if layer_index not in self.layers:
            return None
        return rank_images(tokens, stats, self.ratio, self.rater)

    def survivors(self, layer_index: int, images: int) -> int:
        return images - math.floor(images * self.ratio) if layer_index in self.layers else images
