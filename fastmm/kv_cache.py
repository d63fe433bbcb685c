"""A static KV cache: buffers allocated once, written in place, never reallocated while decoding.

    k, v: [layers, B, Hkv, S_max, d]      lengths: [layers, B] int32      positions: [B] int32

``lengths[layer, b]`` is the number of valid entries of one layer's cache for row b, read by decode_attention
on the device; a decode step writes its token there. ``positions[b]`` is the RoPE position of row b's next
token. Without pruning every layer holds every token and lengths[layer] == positions; a pruned prefill
(fastmm.runtime.prune) leaves later layers shorter caches while positions keep counting the whole sequence, so
the gaps of dropped tokens stay gaps. Writes go to positions given on the device, so a decode step needs no
host sync and can be captured in a CUDA graph. Rows may hold different lengths (batched prompts of different
sizes, or the conditional and unconditional rows of classifier-free guidance).

A leaf module (it imports only torch and fastmm._validate): nn's attention, the models, the runtime and the
native decode layer all take a KVCache, and none of them may import another's layer for it.
"""

from __future__ import annotations

import torch

from fastmm._validate import values_checkable


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("num_kv_heads", num_kv_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int32, device=device)
        self._rows = torch.arange(batch, device=device)  # row index of a single-token write

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def reset(self) -> None:
        """Forget every row (the buffers stay allocated)."""
        self.lengths.zero_()
        self.positions.zero_()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) views [B, Hkv, S_max, d] of one layer, for decode_attention."""
        return self.k[index], self.v[index]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Write k, v [B, Hkv, T, d] of ``layer`` at positions[b] + t for t < T (positions [B] on the device).

        Positions are checked against max_len on the host where fastmm._validate reads values there (CPU
        tensors, or CUDA under FASTMM_CHECK_VALUES=host; never while torch.compile traces or a CUDA graph is
        captured). Otherwise on CUDA the caller keeps positions + T <= max_len, as advance() does for its own
        lengths, and the indexing kernels' own device-side asserts catch a write past the buffer."""
        B, H, T, d = k.shape
        expected = (self.k.shape[1], self.k.shape[2], self.k.shape[4])
        if (B, H, d) != expected or v.shape != k.shape:
            raise ValueError(
                f"KVCache.write: k and v must be [B, Hkv, T, d] with (B, Hkv, d) = {expected}, "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if positions.shape != (B,):
            raise ValueError(f"KVCache.write: positions must be [B] = ({B},), got {tuple(positions.shape)}")
        if values_checkable(positions) and int(positions.max()) + T > self.max_len:
            raise ValueError(f"KVCache.write: positions + T reach {int(positions.max()) + T} > max_len {self.max_len}")
        if T == 1:  # a decode step: one indexed assignment per buffer, half the cost of building a scatter index
            at = (self._rows, slice(None), positions.long())
            self.k[layer][at] = k[:, :, 0].to(self.k.dtype)  # (B, Hkv, d)
            self.v[layer][at] = v[:, :, 0].to(self.v.dtype)
            return
        index = (positions.long()[:, None] + torch.arange(T, device=positions.device))  # (B, T)
        index = index[:, None, :, None].expand(B, H, T, d)
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))

    def advance(self, steps: int | torch.Tensor = 1) -> None:
        """Every layer's lengths and the positions += steps (an int, or [B] per row), in place on the device."""
        self.lengths.add_(steps)
        self.positions.add_(steps)
