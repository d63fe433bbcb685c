"""Continuous image input: a SigLIP-style ViT and the MLP aligner that maps its patch features into the
decoder's embedding space (Janus's understanding path). Attention is bidirectional over the patches: one
span_attention call with every query's key range the whole image. LayerNorms are fastmm's modality_layer_norm
with a single modality (the residual add before each block's MLP fused into its norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmm import ops
from fastmm.models.config import DualResolutionConfig, VisionConfig
from fastmm.nn.fusion import DualResolutionEncoder, ResolutionAdapter, ResolutionAlign
from fastmm.nn.norm import ModalityLayerNorm


class AlignerMLP(nn.Module):
    """Linear, then (GELU, Linear) * (depth - 1): Janus's vision aligner and generation aligner."""

    def __init__(self, in_features: int, width: int, depth: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.hidden_layers = nn.ModuleList(nn.Linear(width, width) for _ in range(1, depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_then_linears(self.hidden_layers, self.fc1(x))


def gelu_then_linears(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """An aligner after its first Linear: (GELU, Linear) per layer."""
    for layer in layers:
        x = layer(F.gelu(x))
    return x


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        everything = torch.zeros(B, N, dtype=torch.int32, device=x.device), torch.full(
            (B, N), N, dtype=torch.int32, device=x.device
        )  # every patch attends every patch
        out = ops.span_attention(q, k, v, *everything)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


def patch_tokens(patch_embed: nn.Conv2d, position_embed: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, C, S, S] -> patch tokens [B, N, C'] (the patch convolution, token-major) plus positions."""
    x = patch_embed(pixels.to(patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
    return x + position_embed


def _single_modality(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)


def _layer_norm(config: VisionConfig) -> ModalityLayerNorm:
    """fastmm's LayerNorm with one modality: the weight and bias are [1, hidden] (the loader adds the axis)."""
    return ModalityLayerNorm(1, config.hidden_size, eps=config.layer_norm_eps)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = int(config.hidden_size * config.mlp_ratio)
        self.norm1 = _layer_norm(config)
        self.attn = VisionAttention(config)
        self.norm2 = _layer_norm(config)
        self.fc1 = nn.Linear(config.hidden_size, width)
        self.fc2 = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, C], modality [B, N] zeros (None: made here); the residual add before norm2 fused into it."""
        if modality is None:
            modality = _single_modality(x)
        h, x = self.norm2(self.attn(self.norm1(x, modality)), modality, x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class VisionEncoder(nn.Module):
    """pixels [B, C, S, S] -> aligned patch features [B, (S / patch)^2, decoder hidden]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embed = nn.Parameter(torch.zeros(config.num_patches, config.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        self.post_norm = _layer_norm(config)
        self.aligner = AlignerMLP(config.hidden_size, config.aligner_width, config.aligner_depth)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"VisionEncoder: images must be [B, {self.config.num_channels}, {size}, {size}], got {tuple(pixels.shape)}"
            )
        x = patch_tokens(self.patch_embed, self.position_embed, pixels)
        modality = torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)
        for block in self.blocks:
            x = block(x, modality)
        return self.aligner(self.post_norm(x, modality))


class PatchStem(nn.Module):
    """pixels [B, C, S, S] -> patch tokens [B, (S / patch)^2, C] plus learned positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embed = nn.Parameter(torch.zeros(config.num_patches, config.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.patch_embed, self.position_embed, pixels)


class SingleModalityNorm(nn.Module):
    """A ModalityLayerNorm with one modality, called as norm(x)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm = _layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, _single_modality(x))


class ConvNextPath(nn.Module):
    """transformers' ConvNextModel (random weights from its config; no download) -> its last feature map
    [B, c, S / 32, S / 32]. transformers is imported here only: the dual-resolution path needs it."""

    def __init__(self, dual: DualResolutionConfig, num_channels: int):
        super().__init__()
        try:
            from transformers import ConvNextConfig, ConvNextModel
        except ImportError as error:  # pragma: no cover - transformers is a test dependency
            raise ImportError("UnifiedConfig.dual_resolution needs transformers (its ConvNext): pip install transformers") from error
        config = ConvNextConfig(num_channels=num_channels, num_stages=len(dual.conv_hidden_sizes),
                                hidden_sizes=list(dual.conv_hidden_sizes), depths=list(dual.conv_depths),
                                image_size=dual.image_size)  # fmt: skip
        self.convnext = ConvNextModel(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.convnext(pixels.to(self.convnext.embeddings.patch_embeddings.weight.dtype)).last_hidden_state


class DualResolutionVision(nn.Module):
    """LLaVA-HR's understanding path at fastmm.nn.DualResolutionEncoder: pixels [B, C, S, S] at
    dual.image_size -> aligned features [B, (vision.image_size / patch)^2, decoder hidden], the same count of
    tokens as VisionEncoder gives."""

    def __init__(self, config: VisionConfig, dual: DualResolutionConfig):
        super().__init__()
        self.config, self.dual = config, dual
        conv_channels = dual.conv_hidden_sizes[-1]
        aligner = AlignerMLP(config.hidden_size, config.aligner_width, config.aligner_depth)
        # The aligner's first Linear is the encoder's projector_in (the final align folds into it); its other
        # layers stay here, so no parameter is registered twice.
        self.aligner_layers = aligner.hidden_layers
        grid = config.image_size // config.patch_size
        self.encoder = DualResolutionEncoder(
            vit_stem=PatchStem(config),
            vit_blocks=[VisionBlock(config) for _ in range(config.num_layers)],
            conv_path=ConvNextPath(dual, config.num_channels),
            adapters=[ResolutionAdapter(config.hidden_size, conv_channels, dual.kernel_size) for _ in dual.adapter_after],
            adapter_after=dual.adapter_after,
            align=ResolutionAlign(config.hidden_size, conv_channels),
            vit_resolution=config.image_size,
            grid=(grid, grid),
            vit_norm=SingleModalityNorm(config),
            projector_in=aligner.fc1,
            fold_projector=dual.fold_projector,
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size, channels = self.dual.image_size, self.config.num_channels
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (channels, size, size):
            raise ValueError(f"DualResolutionVision: images must be [B, {channels}, {size}, {size}], got {tuple(pixels.shape)}")
        return gelu_then_linears(self.aligner_layers, self.encoder(pixels))
