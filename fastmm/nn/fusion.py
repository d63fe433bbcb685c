"""LLaVA-HR's mixture-of-resolution adapter over fastmm.ops' fusion family.

``ResolutionAdapter`` and ``ResolutionAlign`` hold the parameters of LLaVA-HR's ``S2FStitchAlignModuleV2`` and
``MultiPathAlignModule`` under the same names and shapes, so their state dicts load unchanged:

    adapters = [from_llava_hr(m) for m in tower.align_stages_latent]   # S2FStitchAlignModuleV2 x 3
    align = from_llava_hr(tower.align_stages[0])                        # MultiPathAlignModule

``DualResolutionEncoder`` wires them around a ViT and a conv network the way LLaVA-HR's
``MultiPathCLIPVisionTower`` does, with the slow branches of every adapter computed once, before the first ViT
block (they depend only on the conv map), and the final align folded into the projector's first Linear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fastmm import ops
from fastmm.ops.fusion import conv_map_tokens, folded_align, square_grid

Tensor = torch.Tensor


class ResolutionAdapter(nn.Module):
    """One adapter: y' = F + tanh(g) S (fastmm.ops.resolution_fusion) with S the slow branch of the conv map.

    Parameters carry LLaVA-HR's names: slow_conv, slow_proj (1x1 convs c -> c -> d), fast_conv (depthwise k x k on
    the ViT grid), fast_proj (1x1 conv d -> d), gate (Linear 2d -> d/2, GELU, Linear d/2 -> 1). The conv modules
    only hold parameters; forward runs the fused ops.
    """

    def __init__(self, fast_dim: int, slow_dim: int, kernel_size: int = 7, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1, **factory)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1, **factory)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, kernel_size, padding=kernel_size // 2, groups=fast_dim, **factory)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1, **factory)
        self.gate = nn.Sequential(
            nn.Linear(2 * fast_dim, fast_dim // 2, **factory), nn.GELU(), nn.Linear(fast_dim // 2, 1, **factory)
        )

    def slow_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(slow_conv_w [c, c], slow_conv_b [c], slow_proj_w [d, c], slow_proj_b [d]): views of the parameters."""
        return (self.slow_conv.weight[:, :, 0, 0], self.slow_conv.bias, self.slow_proj.weight[:, :, 0, 0],
                self.slow_proj.bias)  # fmt: skip

    def slow_branch(self, x: Tensor, grid) -> Tensor:
        """S [B, gh * gw, d] of the conv map x [B, c, hs, ws] on the ViT grid."""
        return stacked_slow_branch([self], x, grid)[0]

    def forward(self, y: Tensor, x: Tensor | None = None, *, slow: Tensor | None = None, grid=None) -> Tensor:
        """y [B, n, d] token-major; either the conv map x [B, c, hs, ws] or its slow branch ``slow`` [B, n, d]
        computed beforehand (DualResolutionEncoder does, for every adapter at once). grid: the ViT grid, None
        for the square grid of n."""
        if (x is None) == (slow is None):
            raise ValueError("ResolutionAdapter: pass exactly one of x (the conv map) and slow (its slow branch)")
        if slow is None:
            slow = self.slow_branch(x, grid if grid is not None else square_grid(y.shape[1], "ResolutionAdapter"))
        linear1, linear2 = self.gate[0], self.gate[2]
        return ops.resolution_fusion(
            y, slow, self.fast_conv.weight, self.fast_conv.bias, self.fast_proj.weight, self.fast_proj.bias,
            linear1.weight, linear1.bias, linear2.weight, linear2.bias, grid,
        )  # fmt: skip


def stacked_slow_branch(adapters: Sequence[ResolutionAdapter], x: Tensor, grid) -> Tensor:
    """The slow branches of several adapters over one conv map, [A, B, n, d]: one op, whose kernels run every
    adapter's slow_conv as one GEMM. Stacking several adapters copies their weights (about 3 c^2 values for
    three), little next to the GEMMs they feed; one adapter's are views."""
    weights = zip(*(adapter.slow_weights() for adapter in adapters))
    stacked = [parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts) for parts in weights]
    return ops.resolution_slow_branch(x, *stacked, grid)


class ResolutionAlign(nn.Module):
    """LLaVA-HR's final align: fast_proj(y) + slow_proj(x resized to the ViT grid, token-major)."""

    def __init__(self, fast_dim: int, slow_dim: int, device=None, dtype=None):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim, device=device, dtype=dtype)
        self.slow_proj = nn.Linear(slow_dim, fast_dim, device=device, dtype=dtype)

    def forward(self, y: Tensor, x: Tensor, grid=None) -> Tensor:
        tokens = conv_map_tokens(x, grid if grid is not None else square_grid(y.shape[1], "ResolutionAlign"))
        return self.fast_proj(y) + self.slow_proj(tokens)

    def folded_into(self, linear: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
        """linear(align(y, x)) as y W_y^T + x_tok W_x^T + b (linear after linear): returns (W_y [D, d],
        W_x [D, c], b [D]) computed in fp64 and cast to linear's dtype."""
        outer = linear.weight.double()
        fast_w, slow_w = self.fast_proj.weight.double(), self.slow_proj.weight.double()
        bias = outer @ (self.fast_proj.bias.double() + self.slow_proj.bias.double())
        if linear.bias is not None:
            bias = bias + linear.bias.double()
        dtype = linear.weight.dtype
        return (outer @ fast_w).to(dtype), (outer @ slow_w).to(dtype), bias.to(dtype)


def from_llava_hr(source: nn.Module | Mapping[str, Tensor]) -> ResolutionAdapter | ResolutionAlign:
    """A ResolutionAdapter from an S2FStitchAlignModuleV2 (module or state dict), or a ResolutionAlign from a
    MultiPathAlignModule; sizes are read from the weights, which load under their own names."""
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    if "fast_conv.weight" in state:
        required = ("slow_conv.weight", "slow_proj.weight", "fast_conv.weight", "gate.0.weight")
        _require(state, required, "an S2FStitchAlignModuleV2")
        fast_dim, slow_dim = state["slow_proj.weight"].shape[:2]
        kernel_size = state["fast_conv.weight"].shape[-1]
        weight = state["fast_conv.weight"]
        module: nn.Module = ResolutionAdapter(fast_dim, slow_dim, kernel_size, device=weight.device, dtype=weight.dtype)
    else:
        _require(state, ("fast_proj.weight", "slow_proj.weight"), "a MultiPathAlignModule")
        weight = state["slow_proj.weight"]
        fast_dim, slow_dim = weight.shape
        module = ResolutionAlign(fast_dim, slow_dim, device=weight.device, dtype=weight.dtype)
    module.load_state_dict(state)
    return module


def _require(state: Mapping[str, Tensor], keys: Sequence[str], what: str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise KeyError(f"from_llava_hr: the state dict of {what} lacks {missing}; it has {sorted(state)}")


class DualResolutionEncoder(nn.Module):
    """LLaVA-HR's dual-resolution vision path: a ViT over the low-resolution image and a conv network over the
    high-resolution one, fused by adapters after chosen ViT blocks and by a final align.

    Args:
        vit_stem: pixels at the ViT's resolution -> tokens [B, n, d] (patch embedding and positions).
        vit_blocks: the ViT blocks, each called as block(y) -> y.
        conv_path: high-resolution pixels -> the conv map [B, c, hs, ws] (e.g. a ConvNeXt's last stage).
        adapters: one ResolutionAdapter per entry of adapter_after.
        adapter_after: adapter i runs after block adapter_after[i] (0-based; LLaVA-HR: 5, 11, 17 of 24).
        align: the final ResolutionAlign.
        vit_resolution: the side, in pixels, the ViT reads (the input is resized to it, bilinear
            align_corners=True, as LLaVA-HR does).
        grid: the ViT's token grid (gh, gw).
        vit_norm: applied to y after the last block, before the align (None: none, as LLaVA-HR).
        projector_in: the projector's first Linear, run on the align's output; with fold_projector=True the
            align and it are one product: y W_y^T + x_tok W_x^T + b (two accumulating GEMMs, no intermediate),
            the fold cached until a parameter changes. While autograd records, the unfolded modules run.
    """

    def __init__(
        self,
        vit_stem: nn.Module,
        vit_blocks: Sequence[nn.Module],
        conv_path: nn.Module,
        adapters: Sequence[ResolutionAdapter],
        adapter_after: Sequence[int],
        align: ResolutionAlign,
        vit_resolution: int,
        grid: tuple[int, int],
        vit_norm: Callable[[Tensor], Tensor] | None = None,
        projector_in: nn.Linear | None = None,
        fold_projector: bool = False,
    ):
        super().__init__()
        if len(adapters) != len(adapter_after):
            raise ValueError(
                f"DualResolutionEncoder: {len(adapters)} adapters but {len(adapter_after)} adapter_after entries"
            )
        if any(not 0 <= i < len(vit_blocks) for i in adapter_after) or len(set(adapter_after)) != len(adapter_after):
            raise ValueError(
                f"DualResolutionEncoder: adapter_after must be distinct block indices in [0, {len(vit_blocks)}), "
                f"got {list(adapter_after)}"
            )
        if fold_projector and projector_in is None:
            raise ValueError("DualResolutionEncoder: fold_projector=True needs projector_in (the Linear to fold into)")
        self.vit_stem, self.conv_path, self.align = vit_stem, conv_path, align
        self.vit_blocks = nn.ModuleList(vit_blocks)
        self.adapters = nn.ModuleList(adapters)
        self.adapter_after = tuple(adapter_after)
        self.vit_resolution, self.grid = vit_resolution, tuple(grid)
        self.vit_norm, self.projector_in, self.fold_projector = vit_norm, projector_in, fold_projector
        self._fold_cache: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, C, S, S] at the conv path's resolution -> [B, n, d] (the align's output), or [B, n, D]
        through projector_in."""
        size = (self.vit_resolution, self.vit_resolution)
        low = nn.functional.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=True)
        y = self.vit_stem(low.to(pixels.dtype))
        x = self.conv_path(pixels)
        slow = stacked_slow_branch(list(self.adapters), x, self.grid) if len(self.adapters) else None
        stage = {block: i for i, block in enumerate(self.adapter_after)}
        for index, block in enumerate(self.vit_blocks):
            y = block(y)
            if index in stage:
                a = stage[index]
                y = self.adapters[a](y, slow=slow[a], grid=self.grid)
        if self.vit_norm is not None:
            y = self.vit_norm(y)
        if self.projector_in is None:
            return self.align(y, x, self.grid)
        if not self.fold_projector or self._records_grad():
            return self.projector_in(self.align(y, x, self.grid))
        return folded_align(y, x, *self._folded(), self.grid)

    def _records_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _folded(self) -> tuple[Tensor, Tensor, Tensor]:
        """The align folded into projector_in, recomputed when one of their parameters changed (in-place updates
        bump a tensor's version; a replaced parameter has another identity)."""
        parameters = [*self.align.parameters(), *self.projector_in.parameters()]
        key = tuple((id(p), p._version) for p in parameters)
        if self._fold_cache is None or self._fold_cache[0] != key:
            with torch.no_grad():
                self._fold_cache = (key, self.align.folded_into(self.projector_in))
        return self._fold_cache[1]
