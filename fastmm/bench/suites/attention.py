"""Suite `attention`: span attention at prefill sizes and decode attention against a static cache.

Prefill: one document per row of text, then one or two image spans separated by text, head dim 128,
Hq = Hkv = 8 on CPU (32 on GPU). The spans are 576 tokens (Janus, LLaVA) where two fit, else L / 4 (at
L = 512). FLOPs count only the query-key pairs the mask allows (4 d per pair per head), so every provider
is held to the same useful work. Decode: one new token per row against a cache of S valid entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.reference import attention as reference

DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIM = 128
IMAGE_SPAN = 576


def _heads(device: torch.device) -> int:
    return 8 if device.type == "cpu" else 32


def span_layout(length: int, num_spans: int) -> torch.Tensor:
    """[1, length] modality: text, then num_spans image spans each followed by text, spread evenly."""
    span = min(IMAGE_SPAN, length // 4)
    gap = (length - num_spans * span) // (num_spans + 1)
    modality = torch.zeros(1, length, dtype=torch.int64)
    for index in range(num_spans):
        start = gap + index * (span + gap)
        modality[0, start : start + span] = 1
    return modality


def _flex_provider(q, k, v, kv_start, kv_end) -> Provider:
    """FlexAttention with the equivalent mask_mod, compiled (it only runs compiled on CPU). The block mask is
    built in each call: a new batch of prompts needs a new one."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    starts, ends = kv_start.long(), kv_end.long()

    def in_range(b, h, q_idx, kv_idx):
        return (starts[b, q_idx] <= kv_idx) & (kv_idx < ends[b, q_idx])

    B, _, L, _ = q.shape

    def run():
        block_mask = create_block_mask(in_range, B, None, L, L, device=q.device)
        return compiled(q, k, v, block_mask=block_mask)

    return Provider("flex_attention", run, graph_safe=False, note="block mask built per call")


def _gpu_providers(q, k, v) -> list[Provider]:
    """flash-attn and xformers plain causal (their masks cannot express image spans), when importable."""
    found = []
    try:
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        found.append(Provider("flash_attn_causal", lambda: flash_attn_func(qt, kt, vt, causal=True),
                              same_result=False, note="causal only"))  # fmt: skip
    except ImportError:
        pass
    try:
        from xformers.ops import LowerTriangularMask, memory_efficient_attention

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        found.append(Provider("xformers_causal", lambda: memory_efficient_attention(qt, kt, vt, LowerTriangularMask()),
                              same_result=False, note="causal only"))  # fmt: skip
    except ImportError:
        pass
    return found


def span_case(length: int, num_spans: int, dtype: torch.dtype, device: torch.device, flex: bool = True) -> Case:
    heads = _heads(device)
    size = torch.finfo(dtype).bits // 8
    kv_start, kv_end = reference.key_ranges(modality=span_layout(length, num_spans))
    pairs = int((kv_end - kv_start).sum())

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(length + num_spans)
        q, k, v = (torch.randn(1, heads, length, HEAD_DIM, generator=generator).to(device, dtype) for _ in range(3))
        starts, ends = kv_start.to(device), kv_end.to(device)
        dense = reference.dense_mask(starts, ends, length)
        backend = choose_backend("span_attention", device)
        providers = [
            Provider("fastmm", lambda: fastmm.ops.span_attention(q, k, v, starts, ends), backend=backend),
            Provider("sdpa_dense_mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                     note="[L, L] boolean mask"),  # fmt: skip
            Provider("sdpa_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     same_result=False, note="plain causal: the floor"),  # fmt: skip
        ]
        if flex:
            providers.append(_flex_provider(q, k, v, starts, ends))
        if device.type == "cuda":
            providers += _gpu_providers(q, k, v)
        return providers

    return Case(
        op="span_attention",
        shape={"L": length, "spans": num_spans, "H": heads, "d": HEAD_DIM},
        dtype=dtype,
        bytes=4 * heads * length * HEAD_DIM * size + 2 * length * 4,
        flops=4 * HEAD_DIM * heads * pairs,
        bound="compute",
        setup=setup,
        measure_memory=True,
    )


def decode_case(batch: int, cache: int, dtype: torch.dtype, device: torch.device) -> Case:
    heads = _heads(device)
    size = torch.finfo(dtype).bits // 8

    def setup() -> list[Provider]:
        generator = torch.Generator().manual_seed(batch * 7 + cache)
        q = torch.randn(batch, heads, 1, HEAD_DIM, generator=generator).to(device, dtype)
        k_cache, v_cache = (
            torch.randn(batch, heads, cache + 64, HEAD_DIM, generator=generator).to(device, dtype) for _ in range(2)
        )  # 64 slots of headroom past the valid part, as a static cache has
        cache_len = torch.full((batch,), cache, dtype=torch.int32, device=device)
        k_valid, v_valid = k_cache[:, :, :cache], v_cache[:, :, :cache]
        backend = choose_backend("decode_attention", device)
        return [
            Provider("fastmm", lambda: fastmm.ops.decode_attention(q, k_cache, v_cache, cache_len), backend=backend),
            Provider("sdpa", lambda: F.scaled_dot_product_attention(q, k_valid, v_valid),
                     note="over the valid part, its length known on the host"),  # fmt: skip
        ]

    return Case(
        op="decode_attention",
        shape={"B": batch, "S": cache, "H": heads, "d": HEAD_DIM},
        dtype=dtype,
        bytes=2 * batch * heads * cache * HEAD_DIM * size,
        flops=4 * HEAD_DIM * heads * batch * cache,
        bound="memory",
        setup=setup,
        decode_size=True,
    )


PROVIDERS = {
    "fastmm": "fastmm.ops.span_attention / decode_attention with the device's default backend",
    "sdpa_dense_mask": "torch SDPA with the dense [L, L] boolean mask of the same key ranges: what users run today",
    "sdpa_causal": "torch SDPA plain causal on the same q, k, v: fewer masked pairs than the spans, the floor to "
    "stay near",
    "flex_attention": "torch FlexAttention (compiled) with the equivalent mask_mod; the block mask is built in "
    "each call",
    "flash_attn_causal": "GPU only, when importable: flash-attn causal (cannot express the spans)",
    "xformers_causal": "GPU only, when importable: xformers memory-efficient attention, causal",
    "sdpa": "decode: torch SDPA over the valid part of the cache",
}

_PREFILL = {"L": 2048, "spans": 2}
_DECODE = {"B": 1, "S": 4096}


@register_suite(
    "attention",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("span_attention", _PREFILL, "speedup:sdpa_dense_mask", 1.5, "native"),
        Target("span_attention", _PREFILL, "speedup:flex_attention", 1.5, "native"),
        Target("span_attention", _PREFILL, "speedup:sdpa_causal", 0.83, "native"),  # within 1.2x its time
        Target("decode_attention", _DECODE, "speedup:sdpa", 1.5, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """Prefill L in {512, 2048, 4096} x {1, 2} spans and decode S in {1024, 4096} x B in {1, 2, 16}, fp32 and
    bf16; --quick: two tiny cases without FlexAttention (its compile takes seconds)."""
    if quick:
        return [span_case(64, 1, torch.float32, device, flex=False), decode_case(2, 100, torch.float32, device)]
    prefill = [span_case(L, n, dtype, device) for L in (512, 2048, 4096) for n in (1, 2) for dtype in DTYPES]
    decode = [decode_case(B, S, dtype, device) for S in (1024, 4096) for B in (1, 2, 16) for dtype in DTYPES]
    return prefill + decode
