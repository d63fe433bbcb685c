"""Suite `fusion`: LLaVA-HR's mixture-of-resolution adapter, forward, at LLaVA-HR's sizes.

One adapter (the slow branch of the conv map, then the fusion into the ViT stream) and the three-adapter stage
(fastmm: every slow branch in one op before the first block, then three fusions; the module: three full calls).
The ViT stream is B=1, n=1024 tokens on a 32x32 grid, d=1024; the conv map is 1536 channels (LLaVA-HR-7B,
ConvNeXt-L) or 3072 (LLaVA-HR-X, ConvNeXt-XXL) on the same 32x32 grid. FLOPs count the GEMMs and the depthwise
convolution; GFLOP/s are held to the same run's GEMM throughput in the case's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.native.fusion import gemm_dtype
from fastmm.nn.fusion import stacked_slow_branch

DTYPES = (torch.float32, torch.bfloat16)
KERNEL_SIZE = 7


class LlavaHrStyleAdapter(nn.Module):
    """The adapter as LLaVA-HR runs it (S2FStitchAlignModuleV2.forward): NCHW 1x1 convolutions for the slow
    branch, a transpose of the ViT stream to a feature map and back around the depthwise convolution and its
    1x1 projection, GELU as separate passes, and the gate over the token means of the concatenation. Used as the
    benchmark baseline and, in the tests, as the independent formulation the reference is checked against.
    Parameter names and shapes are LLaVA-HR's."""

    def __init__(self, fast_dim: int, slow_dim: int, kernel_size: int = KERNEL_SIZE):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, kernel_size, padding=kernel_size // 2, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * fast_dim, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1))

    @staticmethod
    def resize(tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """Token-major [B, l, C] on a square grid -> [B, grid^2, C]: bilinear (align_corners, in fp32) up,
        average pooling down, as LLaVA-HR's src2dst_align."""
        B, length, C = tokens.shape
        side = int(round(length**0.5))
        if side == grid:
            return tokens
        image = tokens.transpose(1, 2).reshape(B, C, side, side)
        if side < grid:
            image = F.interpolate(image.float(), size=(grid, grid), mode="bilinear", align_corners=True).to(tokens.dtype)
        else:
            image = F.avg_pool2d(image, side // grid, side // grid)
        return image.reshape(B, C, grid * grid).transpose(1, 2)

    def forward(self, fast: torch.Tensor, slow_map: torch.Tensor) -> torch.Tensor:
        """fast [B, n, d] ViT tokens on a square grid; slow_map [B, c, hs, ws] -> [B, n, d]."""
        B, n, d = fast.shape
        grid = int(round(n**0.5))
        slow = self.slow_proj(F.gelu(self.slow_conv(slow_map)))
        slow = self.resize(slow.reshape(B, d, -1).transpose(1, 2), grid)
        image = fast.transpose(1, 2).reshape(B, d, grid, grid)
        image = image + self.fast_proj(F.gelu(self.fast_conv(image)))
        fused = image.reshape(B, d, n).transpose(1, 2)
        gate = self.gate(torch.cat([fused, slow], -1).mean(1)).unsqueeze(1)
        return fused + slow * gate.tanh()


class LlavaHrStyleAlign(nn.Module):
    """LLaVA-HR's final align (MultiPathAlignModule): fast_proj(y) + slow_proj(resized conv map tokens)."""

    def __init__(self, fast_dim: int, slow_dim: int):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast: torch.Tensor, slow_map: torch.Tensor) -> torch.Tensor:
        B, c = slow_map.shape[:2]
        tokens = slow_map.reshape(B, c, -1).transpose(1, 2)
        return self.fast_proj(fast) + self.slow_proj(LlavaHrStyleAdapter.resize(tokens, int(round(fast.shape[1] ** 0.5))))


def adapter_flops(tokens: int, fast_dim: int, conv_tokens: int, slow_dim: int) -> int:
    """GEMMs (slow_conv, slow_proj, fast_proj) and the depthwise convolution of one adapter."""
    slow = 2 * conv_tokens * slow_dim * (slow_dim + fast_dim)
    fast = 2 * tokens * fast_dim * (fast_dim + KERNEL_SIZE * KERNEL_SIZE)
    return slow + fast


def fusion_case(stage: int, grid: int, fast_dim: int, slow_dim: int, dtype: torch.dtype, device: torch.device) -> Case:
    """``stage`` adapters in a row (1: one adapter; 3: LLaVA-HR's stage, slow branches hoisted by fastmm)."""
    tokens = grid * grid
    size = torch.finfo(dtype).bits // 8
    weights = stage * (slow_dim * slow_dim + fast_dim * slow_dim + fast_dim * fast_dim + 2 * fast_dim * fast_dim // 2)

    def setup() -> list[Provider]:
        torch.manual_seed(grid * 131 + slow_dim)
        modules = [LlavaHrStyleAdapter(fast_dim, slow_dim).to(device, dtype).eval().requires_grad_(False)
                   for _ in range(stage)]  # fmt: skip
        for module in modules:  # LLaVA-HR zero-initialises its projections; random ones exercise the gate
            for p in module.parameters():
                p.data.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02)
        adapters = [fastmm.nn.from_llava_hr(module) for module in modules]
        y = torch.randn(1, tokens, fast_dim, device=device, dtype=dtype)
        x = torch.randn(1, slow_dim, grid, grid, device=device, dtype=dtype)
        compiled = [torch.compile(module) for module in modules]

        def fastmm_stage():
            slow = stacked_slow_branch(adapters, x, grid)
            out = y
            for a, adapter in enumerate(adapters):
                out = adapter(out, slow=slow[a], grid=grid)
            return out

        def module_stage(stack):
            def run():
                out = y
                for module in stack:
                    out = module(out, x)
                return out

            return run

        backend = choose_backend("resolution_fusion", device)
        return [
            Provider("fastmm", fastmm_stage, backend=backend),
            Provider("llava_hr", module_stage(modules)),
            Provider("llava_hr_compiled", module_stage(compiled), note="torch.compile, default mode"),
        ]

    return Case(
        op="resolution_adapter" if stage == 1 else "resolution_stage",
        shape={"A": stage, "n": tokens, "d": fast_dim, "c": slow_dim},
        dtype=dtype,
        bytes=(3 * tokens * fast_dim + slow_dim * tokens) * size + weights * size,
        flops=stage * adapter_flops(tokens, fast_dim, tokens, slow_dim),
        bound="compute",
        setup=setup,
    )


PROVIDERS = {
    "fastmm": "fastmm.nn.ResolutionAdapter over fastmm.ops.resolution_slow_branch (every adapter's slow branch in "
    "one op) and resolution_fusion, with the device's default backend",
    "llava_hr": "the adapter as LLaVA-HR writes it (S2FStitchAlignModuleV2): NCHW 1x1 convolutions, transposes "
    "around the depthwise convolution, separate GELU passes; one full call per adapter",
    "llava_hr_compiled": "the same module under torch.compile (default mode; compile time excluded)",
}

_SEVEN_B = {"n": 1024, "d": 1024, "c": 1536}


@register_suite(
    "fusion",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("resolution_adapter", _SEVEN_B, "speedup:llava_hr", 1.4, "native", dtype="float32"),
        Target("resolution_adapter", _SEVEN_B, "speedup:llava_hr", 2.0, "native", dtype="bfloat16"),
        Target("resolution_stage", _SEVEN_B, "speedup:llava_hr", 1.6, "native"),
        Target("resolution_adapter", {}, "pct_of_peak", 85, "native", dtype="float32"),
        Target("resolution_stage", {}, "pct_of_peak", 85, "native", dtype="float32"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """One adapter and the three-adapter stage at LLaVA-HR-7B (c = 1536) and LLaVA-HR-X (c = 3072) sizes, fp32
    and bf16; or one small shape (--quick)."""
    if quick:
        return [fusion_case(stage, 6, 32, 48, torch.float32, device) for stage in (1, 3)]
    grid = [(stage, slow_dim, dtype) for slow_dim in (1536, 3072) for stage in (1, 3) for dtype in DTYPES]
    if device.type == "cpu" and gemm_dtype(torch.bfloat16) != torch.bfloat16:
        # Without bf16 matrix instructions torch's bf16 convolutions take a slow path, seconds per module call
        # (the README's fusion table): one bf16 case shows it; more would only add tens of minutes.
        grid = [case for case in grid if case[2] != torch.bfloat16 or case[:2] == (1, 1536)]
    return [fusion_case(stage, 32, 1024, slow_dim, dtype, device) for stage, slow_dim, dtype in grid]
