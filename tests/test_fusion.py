"""Op family `fusion` (LLaVA-HR's mixture-of-resolution adapter): the reference against a module written the way
LLaVA-HR writes it (NCHW convolutions), every backend against the reference over dtypes, grids, the three resize
cases, batches and channels-last input, forward and backward; the nn modules loading LLaVA-HR state dicts; the
dual-resolution encoder and unified model against the unfused composition; bad input; the op contract."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm
from fastmm.bench.suites.fusion import LlavaHrStyleAdapter, LlavaHrStyleAlign
from fastmm.nn.fusion import ResolutionAdapter, ResolutionAlign, from_llava_hr, stacked_slow_branch
from fastmm.reference import fusion as ref

ops = fastmm.ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random parameters at unit scale (LLaVA-HR zero-initialises its projections, which would hide them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * (1.0 if p.dim() > 1 else 0.3))
    return module


def _adapter_args(B, grid, d, c, conv_grid, adapters, dtype, seed=0, k=7, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    gh, gw = grid
    x = torch.randn(B, c, *conv_grid, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randn(B, gh * gw, d, generator=gen).to(dtype)
    slow = (
        torch.randn(adapters, c, c, generator=gen) / c**0.5,
        torch.randn(adapters, c, generator=gen) * 0.3,
        torch.randn(adapters, d, c, generator=gen) / c**0.5,
        torch.randn(adapters, d, generator=gen) * 0.3,
    )
    dg = max(d // 2, 1)
    fusion = (
        torch.randn(d, k, k, generator=gen) / k,
        torch.randn(d, generator=gen) * 0.3,
        torch.randn(d, d, generator=gen) / d**0.5,
        torch.randn(d, generator=gen) * 0.3,
        torch.randn(dg, 2 * d, generator=gen) / (2 * d) ** 0.5,
        torch.randn(dg, generator=gen) * 0.3,
        torch.randn(1, dg, generator=gen) / dg**0.5,
        torch.randn(1, generator=gen) * 0.3,
    )
    return x, y, tuple(t.to(dtype) for t in slow), tuple(t.to(dtype) for t in fusion)


# ------------------------------------------------------------------- the reference against LLaVA-HR's NCHW module


@pytest.mark.parametrize("conv_grid", [4, 8, 16], ids=["upsample", "identity", "pool"])
def test_reference_equals_llava_hr_module(conv_grid):
    """The token-major reference (slow branch, then fusion) gives the output of the NCHW module written as
    LLaVA-HR's S2FStitchAlignModuleV2, in fp64, for the three resize cases."""
    d, c, B = 12, 10, 2
    module = _randomize(LlavaHrStyleAdapter(d, c), 1).double()
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(B, 64, d, generator=gen, dtype=torch.float64)
    x = torch.randn(B, c, conv_grid, conv_grid, generator=gen, dtype=torch.float64)
    expected = module(y, x)

    slow = ref.slow_branch(x, module.slow_conv.weight[:, :, 0, 0], module.slow_conv.bias,
                           module.slow_proj.weight[:, :, 0, 0], module.slow_proj.bias, (8, 8))  # fmt: skip
    got = ref.resolution_fusion(
        y, slow, module.fast_conv.weight[:, 0], module.fast_conv.bias, module.fast_proj.weight[:, :, 0, 0],
        module.fast_proj.bias, module.gate[0].weight, module.gate[0].bias, module.gate[2].weight, module.gate[2].bias,
        (8, 8),
    )  # fmt: skip
    # 1e-6: LLaVA-HR upsamples in fp32 (slow.float()) even when the rest runs in fp64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reference_align_equals_llava_hr_module():
    """ResolutionAlign (loaded from a MultiPathAlignModule-style state dict) against the module, fp32."""
    module = _randomize(LlavaHrStyleAlign(12, 10), 3)
    align = from_llava_hr(module.state_dict())
    y = torch.randn(2, 64, 12)
    for side in (4, 8, 16):
        x = torch.randn(2, 10, side, side)
        with torch.no_grad():
            torch.testing.assert_close(align(y, x), module(y, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ every backend against the reference

# (B, ViT grid, d, c, conv grid, adapters, k)
SLOW_CASES = [
    (1, (1, 1), 3, 5, (1, 1), 1, 1),
    (2, (3, 5), 8, 6, (3, 5), 3, 3),  # identity, non-square
    (1, (6, 6), 16, 12, (3, 3), 2, 7),  # bilinear upsampling
    (3, (4, 4), 8, 20, (12, 12), 1, 7),  # average pooling by 3
    (2, (7, 7), 40, 24, (7, 7), 3, 7),
]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("B,grid,d,c,conv_grid,adapters,k", SLOW_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_slow_branch(backend, device, B, grid, d, c, conv_grid, adapters, k, dtype, channels_last):
    x, _, slow, _ = _adapter_args(B, grid, d, c, conv_grid, adapters, dtype, channels_last=channels_last)
    x, slow = x.to(device), tuple(t.to(device) for t in slow)
    with fastmm.use_backend(backend):
        got = ops.resolution_slow_branch(x, *slow, grid)
    baseline = ref.resolution_slow_branch(x, *slow, grid)
    truth = ref.resolution_slow_branch(x.double(), *(t.double() for t in slow), grid)
    assert got.dtype == dtype and got.shape == (adapters, B, grid[0] * grid[1], d)
    assert_error_ratio("resolution_slow_branch", got, baseline, truth)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("B,grid,d,c,conv_grid,adapters,k", SLOW_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion(backend, device, B, grid, d, c, conv_grid, adapters, k, dtype):
    _, y, _, weights = _adapter_args(B, grid, d, c, conv_grid, 1, dtype, k=k)
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(y.shape, generator=gen).to(dtype)
    y, s, weights = y.to(device), s.to(device), tuple(t.to(device) for t in weights)
    with fastmm.use_backend(backend):
        got = ops.resolution_fusion(y, s, *weights, grid)
    baseline = ref.resolution_fusion(y, s, *weights, grid)
    truth = ref.resolution_fusion(y.double(), s.double(), *(t.double() for t in weights), grid)
    assert got.dtype == dtype
    assert_error_ratio("resolution_fusion", got, baseline, truth)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("conv_side", [2, 4, 8], ids=["upsample", "identity", "pool"])
def test_backward_through_the_adapter(backend, device, conv_side):
    """Gradients of the ops (slow branch and fusion chained, fp32) with respect to every input and parameter
    equal those of the LLaVA-HR-style module, computed by autograd in fp64."""
    d, c = 8, 6
    module = _randomize(LlavaHrStyleAdapter(d, c, kernel_size=3), 4).double()
    adapter = from_llava_hr(module).float().to(device)
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(2, 16, d, generator=gen, dtype=torch.float64)
    x = torch.randn(2, c, conv_side, conv_side, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 16, d, generator=gen, dtype=torch.float64)

    def grads(model, y, x):
        y, x = y.clone().requires_grad_(), x.clone().requires_grad_()
        out = model(y, x)
        params = list(model.parameters())
        return (out, *torch.autograd.grad((out * grad.to(out.device)).sum(), [y, x, *params]))

    with fastmm.use_backend(backend):
        got = grads(adapter, y.float().to(device), x.float().to(device))
    expected = grads(module, y, x)
    assert len(got) == len(expected) == 3 + len(list(module.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double().reshape(e.shape), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_16_bit_gemm_route(monkeypatch, dtype):
    """On CPUs with bf16 / fp16 matrix instructions the native launchers run their GEMMs in the 16-bit dtype (h
    stored in it, the blend written into the GEMM's output): forced here, against the reference."""
    native = pytest.importorskip("fastmm.native.fusion")
    monkeypatch.setattr(native, "gemm_dtype", lambda d: d)
    x, y, slow, weights = _adapter_args(2, (5, 5), 16, 12, (10, 10), 2, dtype)
    s = torch.randn(y.shape).to(dtype)
    with fastmm.use_backend("native"):
        got_slow = ops.resolution_slow_branch(x, *slow, 5)
        got = ops.resolution_fusion(y, s, *weights, 5)
    for name, g, fn, args in (("slow branch", got_slow, ref.resolution_slow_branch, (x, *slow, (5, 5))),
                              ("fusion", got, ref.resolution_fusion, (y, s, *weights, (5, 5)))):  # fmt: skip
        baseline = fn(*args)
        truth = fn(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        assert_error_ratio(f"{name} ({dtype} GEMMs)", g, baseline, truth)


# ------------------------------------------------------------------------------------------------ the nn modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adapter_from_llava_hr_state_dict(dtype):
    """A ResolutionAdapter loaded from an S2FStitchAlignModuleV2-style state dict (names unchanged) gives the
    module's output."""
    module = _randomize(LlavaHrStyleAdapter(16, 24), 6).to(dtype)
    adapter = ResolutionAdapter(16, 24, dtype=dtype)
    adapter.load_state_dict(module.state_dict())
    converted = from_llava_hr(module.state_dict())
    y = torch.randn(2, 64, 16).to(dtype)
    x = torch.randn(2, 24, 16, 16).to(dtype)
    with torch.no_grad():
        expected = module(y, x)
        truth = module.double()(y.double(), x.double())
        for got in (adapter(y, x), converted(y, x)):
            assert_error_ratio("adapter", got, expected, truth)


def test_folded_projector_equals_projector_of_align():
    """The final align folded into the projector's first Linear equals projector(align(y, x))."""
    align = _randomize(ResolutionAlign(16, 24), 7)
    projector = _randomize(torch.nn.Linear(16, 32), 8)
    fast_w, slow_w, bias = align.folded_into(projector)
    y, x = torch.randn(2, 16, 16), torch.randn(2, 24, 8, 8)
    module = LlavaHrStyleAlign(16, 24)
    module.load_state_dict(align.state_dict())
    with torch.no_grad():
        expected = projector(module(y, x))
        torch.testing.assert_close(ops.fusion.folded_align(y, x, fast_w, slow_w, bias, 4), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="weight_x"):
            ops.fusion.folded_align(y, x, fast_w, slow_w[:, :5], bias, 4)


def _tiny_encoder(fold: bool, conv_side: int = 8):
    """A DualResolutionEncoder over small random parts: ViT blocks are Linear + GELU (any block works), the conv
    path a strided convolution."""
    torch.manual_seed(10)
    d, c, grid = 16, 24, 4
    blocks = [torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU()) for _ in range(4)]
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, d, 8, 8), torch.nn.Flatten(2))

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = stem

        def forward(self, pixels):
            return self.conv(pixels).transpose(1, 2)

    conv = torch.nn.Conv2d(3, c, 64 // conv_side, 64 // conv_side)
    adapters = [_randomize(ResolutionAdapter(d, c, 3), 20 + i) for i in range(2)]
    align = _randomize(ResolutionAlign(d, c), 30)
    projector = torch.nn.Linear(d, 40)
    encoder = fastmm.nn.DualResolutionEncoder(
        Stem(), blocks, conv, adapters, (0, 2), align, vit_resolution=32, grid=(grid, grid),
        projector_in=projector, fold_projector=fold,
    )  # fmt: skip
    return encoder.eval(), (Stem, blocks, conv, adapters, align, projector)


def llava_hr_copies(adapters, align):
    """LLaVA-HR-style NCHW modules holding the same weights: the independent formulation of the encoder."""
    modules = []
    for adapter in adapters:
        module = LlavaHrStyleAdapter(*adapter.slow_proj.weight.shape[:2], kernel_size=adapter.fast_conv.weight.shape[-1])
        module.load_state_dict(adapter.state_dict())
        modules.append(module)
    align_module = LlavaHrStyleAlign(*align.slow_proj.weight.shape)
    align_module.load_state_dict(align.state_dict())
    return modules, align_module


@pytest.mark.parametrize("conv_side", [4, 8], ids=["identity", "pool"])
def test_dual_resolution_encoder_equals_unfused_composition(conv_side):
    """The encoder (slow branches hoisted, align folded) against LLaVA-HR's wiring of NCHW modules: each adapter
    computes its own slow branch, the align and the projector run one after the other."""
    encoder, (_, blocks, conv, adapters, align, projector) = _tiny_encoder(fold=True, conv_side=conv_side)
    modules, align_module = llava_hr_copies(adapters, align)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = encoder(pixels)
        low = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=True)
        y = encoder.vit_stem(low)
        x = conv(pixels)
        for index, block in enumerate(blocks):
            y = block(y)
            if index in (0, 2):
                y = modules[(0, 2).index(index)](y, x)
        expected = projector(align_module(y, x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert encoder._fold_cache is not None


def test_fold_cache_follows_parameter_updates():
    encoder, (*_, align, projector) = _tiny_encoder(fold=True)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = encoder(pixels)
        projector.weight.mul_(2.0)
        after = encoder(pixels)
        encoder.fold_projector = False
        unfolded = encoder(pixels)
    torch.testing.assert_close(after, unfolded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_stacked_slow_branch_equals_each_adapter():
    """Adapter a's slice of the stacked op is that adapter's own slow branch (the reference, one adapter at a
    time, in fp64)."""
    adapters = [_randomize(ResolutionAdapter(8, 6), 40 + i) for i in range(3)]
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        stacked = stacked_slow_branch(adapters, x, (4, 4))
        for a, adapter in enumerate(adapters):
            weights = (w.double() for w in adapter.slow_weights())
            expected = ref.slow_branch(x.double(), *weights, (4, 4))
            torch.testing.assert_close(stacked[a].double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ bad input


def _good_fusion():
    _, y, _, weights = _adapter_args(1, (4, 4), 8, 6, (4, 4), 1, torch.float32)
    names = ("dw_w", "dw_b", "fast_proj_w", "fast_proj_b", "gate_w1", "gate_b1", "gate_w2", "gate_b2")
    return {"y": y, "s": torch.randn_like(y), **dict(zip(names, weights))}


BAD_FUSION = [
    ("d mismatch", dict(s=torch.randn(1, 16, 9)), ValueError, ["s", "[B, n, d]"]),
    ("even kernel", dict(dw_w=torch.randn(8, 4, 4)), ValueError, ["dw_w", "odd"]),
    ("fast_proj shape", dict(fast_proj_w=torch.randn(8, 6)), ValueError, ["fast_proj_w", "[d, d]"]),
    ("gate width", dict(gate_w1=torch.randn(4, 8)), ValueError, ["gate_w1", "2d"]),
    ("int y", dict(y=torch.zeros(1, 16, 8, dtype=torch.int64)), TypeError, ["y"]),
    ("non-square", dict(y=torch.randn(1, 15, 8), s=torch.randn(1, 15, 8)), ValueError, ["15 tokens", "grid"]),
    ("grid mismatch", dict(grid=(3, 4)), ValueError, ["grid", "16"]),
    ("empty", dict(y=torch.randn(0, 16, 8), s=torch.randn(0, 16, 8)), ValueError, ["empty"]),
]


@pytest.mark.parametrize("label,change,exc,words", BAD_FUSION, ids=[c[0] for c in BAD_FUSION])
def test_fusion_bad_input(label, change, exc, words):
    args = _good_fusion()
    args.update(change)
    with pytest.raises(exc) as info:
        ops.resolution_fusion(**args)
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


BAD_SLOW = [
    ("c mismatch", dict(slow_conv_w=torch.randn(1, 5, 5)), ValueError, ["slow_conv_w", "c = x.shape[1] = 6"]),
    ("proj c", dict(slow_proj_w=torch.randn(1, 8, 5)), ValueError, ["slow_proj_w", "[A, d, c]"]),
    ("unreachable grid", dict(grid=(3, 3)), ValueError, ["grid", "(4, 4)", "integer multiple"]),
    ("mixed grid", dict(x=torch.randn(1, 6, 2, 8)), ValueError, ["(2, 8)"]),
    ("3-D x", dict(x=torch.randn(6, 4, 4)), ValueError, ["x", "[B, c, hs, ws]"]),
    ("bad grid", dict(grid=(4, 0)), ValueError, ["grid", "positive"]),
    ("half weights on another dtype", dict(slow_conv_b=torch.zeros(1, 6, dtype=torch.int32)), TypeError, ["slow_conv_b"]),
]


@pytest.mark.parametrize("label,change,exc,words", BAD_SLOW, ids=[c[0] for c in BAD_SLOW])
def test_slow_branch_bad_input(label, change, exc, words):
    x, _, slow, _ = _adapter_args(1, (4, 4), 8, 6, (4, 4), 1, torch.float32)
    args = dict(zip(("x", "slow_conv_w", "slow_conv_b", "slow_proj_w", "slow_proj_b"), (x, *slow)), grid=(4, 4))
    args.update(change)
    with pytest.raises(exc) as info:
        ops.resolution_slow_branch(**args)
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


def test_from_llava_hr_missing_keys():
    state = LlavaHrStyleAdapter(8, 6).state_dict()
    del state["gate.0.weight"]
    with pytest.raises(KeyError, match="gate.0.weight"):
        from_llava_hr(state)
    adapter = ResolutionAdapter(8, 6)
    with pytest.raises(RuntimeError, match="fast_proj"):
        adapter.load_state_dict({k: v for k, v in LlavaHrStyleAdapter(8, 6).state_dict().items() if "fast_proj" not in k})


# ---------------------------------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck(backend, device):
    x, y, slow, weights = _adapter_args(2, (3, 3), 8, 6, (3, 3), 2, torch.float32, k=3)
    s = torch.randn_like(y)
    leaves = lambda ts: tuple(t.to(device).requires_grad_() for t in ts)  # noqa: E731
    with fastmm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastmm.resolution_slow_branch.default, (*leaves((x, *slow)), 3, 3))
        torch.library.opcheck(torch.ops.fastmm.resolution_fusion.default, (*leaves((y, s, *weights)), 3, 3))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    x, y, slow, weights = _adapter_args(1, (4, 4), 8, 6, (4, 4), 1, torch.float32, k=3)
    x, y, slow, weights = x.to(device), y.to(device), [t.to(device) for t in slow], [t.to(device) for t in weights]

    def adapter(x, y):
        s = ops.resolution_slow_branch(x, *slow, 4)[0]
        return ops.resolution_fusion(y, s, *weights, 4)

    with fastmm.use_backend(backend):
        got = torch.compile(adapter, fullgraph=True, backend="aot_eager")(x, y)
    expected = ref.resolution_fusion(y, ref.resolution_slow_branch(x, *slow, (4, 4))[0], *weights, (4, 4))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
