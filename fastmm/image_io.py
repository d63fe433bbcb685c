"""Write decoded images as PNG with the standard library alone (zlib), so the CLI needs no imaging package."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[3, H, W] decoder output in about [-1, 1] -> [H, W, 3] uint8 (values outside are clipped)."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"to_uint8: pixels must be [3, H, W], got shape {tuple(pixels.shape)}")
    scaled = ((pixels.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save_png(pixels: torch.Tensor, path: str | Path) -> Path:
    """Save a [3, H, W] image in about [-1, 1] as an 8-bit RGB PNG."""
    rgb = to_uint8(pixels)
    height, width, _ = rgb.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rgb.view(height, width * 3)], dim=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolor, no interlace
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.numpy().tobytes()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png + _chunk(b"IEND", b""))
    return path
