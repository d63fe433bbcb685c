"""Attention masks for transformers' "fastmm" attention: one layout per forward, read by every layer.

transformers builds a model's mask once per forward through the function registered for the attention
implementation in ``AttentionMaskInterface`` (for sdpa a dense [B, 1, Lq, S] boolean tensor) and passes the
result to every layer. fastmm registers ``mask_layout`` there: it returns a ``MaskLayout``, the mask in the form
fastmm's kernels read, so no layer analyses a mask again:

- per query a key range [kv_start, kv_end): the kernels never visit keys outside it;
- ``key_keep`` [B, S], key padding (a False key is dropped for every query of its row);
- ``mask`` [B, Lq, S], the exact boolean mask, only where ranges and padding cannot describe it.

Causal and bidirectional masks with padding, what decoders and vision towers build, become ranges plus
``key_keep`` computed from the mask's sizes and the 2D padding mask alone. Any other pattern (sliding windows,
packed sequences, image blocks, custom ``or`` / ``and`` overlays) is evaluated densely once, exactly as
transformers' own sdpa mask builder does, and its bounding ranges are derived on the device. Nothing here reads
a tensor's values on the host, so the whole forward traces under ``torch.compile(fullgraph=True)``.

A 4D tensor mask that reaches the attention function directly (a custom mask passed by the user, or one built by
another mask function) is turned into a layout by ``layout_from_tensor``; in eager mode the last conversion is
kept, so a mask shared by every layer of a forward is analysed once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fastmm.ops.attention import MASK_FLOOR, floor_mask

@dataclass(frozen=True)
class MaskLayout:
    """A transformers attention mask in the form fastmm's attention kernels read. See the module docstring.

    kv_start, kv_end: [B, Lq] int32 key range of each query, indices of the S keys.
    key_keep: [B, S] bool key padding, or None.
    mask: [B, Lq, S], bool (True = attend) or float32 (added to the logits), or None: exact, where the ranges
        and key_keep alone do not describe the mask.
    suffix_causal: the ranges are known (from sizes alone) to be plain causal for the last Lq of S keys,
        query i attending keys j < S - Lq + i + 1: what decode_attention computes.
    """

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    key_keep: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    suffix_causal: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, 1, Lq, S), the shape of the dense mask this layout stands for (code that reads a mask's shape)."""
        batch, queries = self.kv_start.shape
        keys = self.key_keep.shape[1] if self.key_keep is not None else None
        if keys is None and self.mask is not None:
            keys = self.mask.shape[2]
        return (batch, 1, queries, keys if keys is not None else -1)

    @property
    def ndim(self) -> int:
        """4, like the dense mask: transformers' mask preparation then hands a layout it made earlier (generate
        builds the mask ahead of the forward for compileable caches) back to mask_layout, which returns it."""
        return 4

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def to(self, *args, **kwargs) -> MaskLayout:
        """Tensor.to's arguments, for code that moves the prepared mask (transformers' Janus image loop calls
        ``attention_mask.to(device)``). The device moves every tensor. A floating dtype rounds the float mask
        through it, as casting the dense mask would, but the mask stays float32 (the kernels' contract); the ranges
        and boolean parts have no floating values to cast."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if memory_format not in (None, torch.preserve_format):
            raise ValueError(f"MaskLayout.to: memory_format has no meaning for a mask layout, got {memory_format}")

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point() and dtype.is_floating_point:
                t = t.to(dtype).float()
            return t.to(device, non_blocking=non_blocking) if device is not None else t

        return MaskLayout(
            moved(self.kv_start), moved(self.kv_end), moved(self.key_keep), moved(self.mask), self.suffix_causal
        )


def bounding_ranges(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Lq] int32 (first, last + 1) allowed key of each query of a [B, Lq, S] bool mask; (0, 0) when none."""
    num_keys = allowed.shape[-1]
    any_key = allowed.any(dim=-1)
    first = allowed.int().argmax(dim=-1)
    last = num_keys - allowed.flip(-1).int().argmax(dim=-1)
    kv_start = torch.where(any_key, first, torch.zeros_like(first))
    kv_end = torch.where(any_key, last, torch.zeros_like(last))
    return kv_start.int(), kv_end.int()


def plain_ranges(
    batch: int, num_queries: int, num_keys: int, first_query: int | torch.Tensor, causal: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Lq] int32 ranges of causal (query i sees keys j <= first_query + i) or bidirectional (all S keys)
    attention; first_query is the key index of query 0 (a host int or a 0-d / [1] device tensor)."""
    if causal:
        position = torch.arange(num_queries, device=device) + first_query
        kv_end = (position + 1).clamp(0, num_keys).int()
    else:
        kv_end = torch.full((num_queries,), num_keys, dtype=torch.int32, device=device)
    kv_end = kv_end.reshape(1, num_queries).expand(batch, num_queries).contiguous()
    return torch.zeros_like(kv_end), kv_end


def _padding_of_keys(attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """[B, S] bool key padding for the S = kv_length keys starting at kv_offset (transformers' 2D mask covers
    the positions seen so far; slots past it, e.g. of a static cache, are padded as not attendable, the way
    transformers' prepare_padding_mask pads them)."""
    if attention_mask is None:
        return None
    padding = attention_mask
    missing = kv_length + kv_offset - padding.shape[-1]
    if missing > 0:
        padding = torch.nn.functional.pad(padding, (0, missing))
    return padding[:, kv_offset : kv_offset + kv_length].contiguous()


def mask_layout(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> MaskLayout:
    """The mask function fastmm registers in transformers' AttentionMaskInterface (sdpa_mask's arguments).

    Returns a MaskLayout for the Lq = q_length queries at positions q_offset + i against the S = kv_length keys
    at positions kv_offset + j, allowed where ``mask_function(b, h, q, kv)`` and the 2D padding mask agree. It
    never returns None: a layout is cheap and tells the kernels more than "causal" would.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    if isinstance(attention_mask, MaskLayout):  # already built for this step (see MaskLayout.ndim)
        return attention_mask
    mask_function = causal_mask_function if mask_function is None else mask_function
    attention_mask = None if attention_mask is None else attention_mask.bool()  # 0 / 1 integers select, not mask
    key_keep = _padding_of_keys(attention_mask, kv_length, kv_offset)
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        causal = mask_function is causal_mask_function
        first_query = q_offset - kv_offset
        kv_start, kv_end = plain_ranges(batch_size, q_length, kv_length, first_query, causal, device)
        # decode_attention's rule needs the last query to see the last key: known from host ints only
        suffix = causal and isinstance(q_offset, int) and q_offset - kv_offset + q_length == kv_length
        return MaskLayout(kv_start, kv_end, key_keep=key_keep, suffix_causal=suffix)
    # any other pattern: transformers' own dense evaluation (padding included), then its bounding ranges
    kwargs = {k: v for k, v in kwargs.items() if k in ("use_vmap", "local_size")}
    dense = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False, device=device, **kwargs,
    )  # fmt: skip
    dense = dense[:, 0].expand(batch_size, q_length, kv_length).contiguous()
    kv_start, kv_end = bounding_ranges(dense)
    return MaskLayout(kv_start, kv_end, mask=dense)


def layout_from_tensor(mask: torch.Tensor, batch: int, num_queries: int, num_keys: int) -> MaskLayout:
    """A MaskLayout for a [B or 1, 1, Lq or 1, S] bool or additive float mask (SDPA's attn_mask semantics).
    Float masks are clamped at MASK_FLOOR (see there); a query whose keys all sit at the floor keeps the whole
    range, as SDPA then averages over every key."""
    expected = (batch, 1, num_queries, num_keys)
    if mask.dim() != 4 or any(m not in (1, e) for m, e in zip(mask.shape, expected)) or mask.shape[1] != 1:
        raise ValueError(
            f"attention_forward: attention_mask must broadcast to [B, 1, Lq, S] = {list(expected)}, "
            f"got {tuple(mask.shape)}"
        )
    cached = _last_conversion.get(mask, expected)
    if cached is not None:
        return cached
    dense = mask[:, 0].expand(batch, num_queries, num_keys)
    if dense.dtype == torch.bool:
        layout = MaskLayout(*bounding_ranges(dense), mask=dense.contiguous())
    elif dense.dtype.is_floating_point:
        bias = floor_mask(dense).contiguous()
        live = bias > MASK_FLOOR
        kv_start, kv_end = bounding_ranges(live)
        no_live_key = ~live.any(dim=-1)
        kv_end = torch.where(no_live_key, torch.full_like(kv_end, num_keys), kv_end)
        layout = MaskLayout(kv_start, kv_end, mask=bias)
    else:
        raise TypeError(f"attention_forward: attention_mask must be bool or floating point, got {mask.dtype}")
    _last_conversion.put(mask, expected, layout)
    return layout


class _LastConversion:
    """The last tensor mask converted in eager mode and its layout: every layer of a forward receives the same
    mask object, so it is analysed once. Keyed on the object (weakly), its version counter and the sizes; one
    tuple, replaced whole, so concurrent callers never pair one mask with another's layout."""

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref to the mask, its version, sizes, layout)

    @staticmethod
    def _enabled(mask: torch.Tensor) -> bool:
        return not torch.compiler.is_compiling() and not mask.requires_grad

    def get(self, mask: torch.Tensor, sizes: tuple) -> MaskLayout | None:
        entry = self._entry
        if entry is None or not self._enabled(mask):
            return None
        ref, version, cached_sizes, layout = entry
        return layout if ref() is mask and version == mask._version and cached_sizes == sizes else None

    def put(self, mask: torch.Tensor, sizes: tuple, layout: MaskLayout) -> None:
        if self._enabled(mask):
            self._entry = (weakref.ref(mask), mask._version, sizes, layout)


_last_conversion = _LastConversion()
