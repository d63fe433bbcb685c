"""The VQ tokenizer (a VQGAN, as in Janus / LlamaGen): pixels -> codes -> image tokens, and image tokens ->
pixels. The quantizer is fastmm's VQCodebook (vq_quantize, no N x K distance matrix); the conv stacks are
plain PyTorch. Submodule names follow transformers' JanusVQVAE so the checkpoint maps by prefix alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmm.models.config import VQConfig
from fastmm.nn.vq import VQCodebook


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original VQGAN


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        level.add_module("downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


def _run_level(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One resolution level: its resnet blocks (each followed by its attention block where the level has them),
    then the level's 2x resampling if any."""
    for j, block in enumerate(level.block):
        x = block(x)
        if len(level.attn):
            x = level.attn[j](x)
    for name in ("downsample", "upsample"):
        if hasattr(level, name):
            x = getattr(level, name)(x)
    return x


class VQEncoder(nn.Module):
    """pixels [B, 3, S, S] -> latents [B, latent_channels, S / 2^(levels-1), ...]; attention at the last level."""

    def __init__(self, config: VQConfig):
        super().__init__()
        mult, base, levels = (1, *config.channel_multiplier), config.base_channels, len(config.channel_multiplier)
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(levels):
            width_in, width = base * mult[i], base * mult[i + 1]
            blocks = [ResnetBlock(width_in if j == 0 else width, width) for j in range(config.num_res_blocks)]
            attns = [AttnBlock(width) for _ in blocks] if i == levels - 1 else []
            self.down.append(_level(blocks, attns, Downsample(width) if i < levels - 1 else None))
        self.mid = MidBlock(width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = _run_level(level, x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class VQDecoder(nn.Module):
    """latents [B, latent_channels, g, g] -> pixels [B, 3, g * 2^(levels-1), ...]; attention at the first level."""

    def __init__(self, config: VQConfig):
        super().__init__()
        levels, base = len(config.channel_multiplier), config.base_channels
        width = base * config.channel_multiplier[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, width, 3, padding=1)
        self.mid = MidBlock(width)
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):  # lowest resolution first
            width_out = base * config.channel_multiplier[i]
            blocks = [ResnetBlock(width if j == 0 else width_out, width_out) for j in range(config.num_res_blocks + 1)]
            attns = [AttnBlock(width_out) for _ in blocks] if i == levels - 1 else []
            width = width_out
            self.up.append(_level(blocks, attns, Upsample(width) if i > 0 else None))
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(x))
        for level in self.up:
            x = _run_level(level, x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQTokenizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = VQEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        self.quantize = VQCodebook(config.codebook_size, config.code_dim, metric="l2")
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.latent_channels, 1)
        self.decoder = VQDecoder(config)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [-1, 1] -> image tokens [B, g * g] (nearest code, l2)."""
        indices, _ = self.quantize.quantize(self.quant_conv(self.encoder(pixels)), return_quantized=False)
        return indices.flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """image tokens [B, g * g] -> pixels [B, 3, S, S] (about [-1, 1]). The codes are l2-normalized before
        the decoder, as in Janus (its generation path was trained against normalized codes)."""
        grid = self.config.grid
        if tokens.dim() != 2 or tokens.shape[1] != grid * grid:
            raise ValueError(f"VQTokenizer.decode: tokens must be [B, {grid * grid}] ({grid} x {grid}), got {tuple(tokens.shape)}")
        codes = F.normalize(self.quantize.embed(tokens), dim=-1)  # (B, g*g, D)
        codes = codes.view(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)  # (B, D, g, g)
        return self.decoder(self.post_quant_conv(codes))
