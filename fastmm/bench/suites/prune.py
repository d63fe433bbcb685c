"""Suite `prune`: visual-token pruning (FastV, VTW) in the unified model's prefill, and its scoring step.

LLaVA-1.5's layout: 5 text tokens, 576 image tokens, 55 text tokens (L = 636), batch 1. Decoders: the small
preset (8 layers x 512, GQA 8 / 4 heads) and a 7B-shaped stack (hidden 4096, 32 heads of 128, MLP 11008)
cut to 4 layers to fit the machine. `prune_prefill` runs FastV(K=2, R=0.5) (rated by the last token) and
`prune_prefill_vtw` VTW with K = half the layers; both against the same decoder's unpruned prefill, and FastV
against FastV's recipe (eager softmax probabilities [B, H, L, L] of layer K - 1, computed besides the layer's
flash attention, then the same selection and compaction). FLOPs count the pruned prefill's work (linear layers
and causal attention); its targets are the unpruned time times the FLOP fraction pruning leaves, within 10%.
`prune_importance` times the scoring step alone at L = 640 with 7B heads (32 x 128): fastmm's
attention_importance from span attention's log-sum-exp against the eager probabilities, with peak allocations.
`prune_decode` times one decode step (CPU: the fused native step) after a VTW prefill against one after an
unpruned prefill. bf16 prefill cases run only where the CPU has bf16 matrix instructions: elsewhere torch's
bf16 GEMM takes a slow path (the report's roofline line shows it) and one prefill takes minutes.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.models import UnifiedModel, presets
from fastmm.native.fusion import gemm_dtype
from fastmm.runtime.prune import FastV, VTW

TEXT_BEFORE, IMAGE_TOKENS, TEXT_AFTER = 5, 576, 55
FASTV = FastV(2, 0.5)

DECODERS = {  # name -> UnifiedConfig overrides on the small preset
    "small": {},
    "7b_cut": dict(hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008, num_layers=4),
    "tiny": None,  # --quick
}


def decoder_config(name: str):
    base = presets.demo_config("tiny" if name == "tiny" else "small")
    return dataclasses.replace(base, vision=None, image_gen=None, vq=None, **(DECODERS[name] or {}))


def layer_params(config) -> int:
    """Weights of one decoder layer's linear layers (q / k / v, o, gate / up, down)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return config.hidden_size * (q + 2 * kv) + q * config.hidden_size + 3 * config.hidden_size * config.intermediate_size


def prefill_flops(config, tokens_per_layer: list[int]) -> int:
    """Linear layers (2 n params per layer) and causal attention (2 n^2 Hq d: q k^T and p v over half the pairs)."""
    q = config.num_heads * config.head_dim
    return sum(2 * n * layer_params(config) + 2 * n * n * q for n in tokens_per_layer)


def tokens_per_layer(policy, config, images: int, text: int) -> list[int]:
    counts, left = [], images
    for index in range(config.num_layers):
        left = left if policy is None else policy.survivors(index, left)
        counts.append(left + text)
    return counts


def flop_fraction(policy, name: str) -> float:
    """The share of the unpruned prefill's FLOPs that ``policy`` leaves on decoder ``name``."""
    config = decoder_config(name)
    text = TEXT_BEFORE + TEXT_AFTER
    pruned = prefill_flops(config, tokens_per_layer(policy, config, IMAGE_TOKENS, text))
    return pruned / prefill_flops(config, tokens_per_layer(None, config, IMAGE_TOKENS, text))


def vtw_for(name: str) -> VTW:
    return VTW(decoder_config(name).num_layers // 2)


class EagerFastV(FastV):
    """FastV's recipe for the scores: the layer's softmax probabilities materialized as [B, Hq, L, L] (what
    switching the layer to eager attention gives), their mean over heads at each row's last query, then the top
    image tokens. The selection rule and what follows are fastmm's, so the outputs must agree."""

    def keep_images(self, layer_index, tokens, stats):
        if layer_index != self.layer:
            return None
        q, k = stats.q.float(), stats.k.float()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        j = torch.arange(k.shape[2], device=q.device)
        allowed = (j >= tokens.kv_start[..., None]) & (j < tokens.kv_end[..., None])  # [B, L, L]
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
        rows = torch.arange(q.shape[0], device=q.device)
        scores = probs.mean(dim=1)[rows, tokens.count - 1].masked_fill(~tokens.image, float("-inf"))  # [B, L]
        images = tokens.image.sum(dim=1)
        kept = images - torch.floor(images.double() * self.ratio).long()
        return fastmm.ops.top_k_mask(scores, kept, tokens.image)


@functools.lru_cache(maxsize=2)
def _decoder(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = UnifiedModel(decoder_config(name)).eval().to(dtype)
    model.rebuild_buffers("cpu")
    return model.decoder


def _prompt(decoder, device, dtype):
    L = TEXT_BEFORE + IMAGE_TOKENS + TEXT_AFTER
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, L, decoder.config.hidden_size, generator=gen).to(device, dtype)
    image = torch.zeros(1, L, dtype=torch.bool, device=device)
    image[:, TEXT_BEFORE : TEXT_BEFORE + IMAGE_TOKENS] = True
    return embeds, image, torch.zeros(1, L, dtype=torch.int64, device=device)


def _prefill_fn(decoder, cache, embeds, modality, image, policy):
    def run():
        cache.reset()
        return decoder.prefill(embeds, modality, cache, None, image, policy).last

    return run


def prefill_case(name: str, policy, dtype: torch.dtype, device: torch.device) -> Case:
    vtw = isinstance(policy, VTW)
    config = decoder_config(name)
    text = TEXT_BEFORE + TEXT_AFTER
    counts = tokens_per_layer(policy, config, IMAGE_TOKENS, text)

    def setup() -> list[Provider]:
        decoder = _decoder(name, dtype).to(device)
        embeds, image, modality = _prompt(decoder, device, dtype)
        cache = decoder.new_cache(1, embeds.shape[1])
        backend = choose_backend("span_attention", device)
        providers = [
            Provider("fastmm", _prefill_fn(decoder, cache, embeds, modality, image, policy), graph_safe=False,
                     backend=backend),
            Provider("unpruned", _prefill_fn(decoder, cache, embeds, modality, image, None), same_result=False,
                     graph_safe=False),
        ]  # fmt: skip
        if not vtw:
            eager = EagerFastV(policy.layer, policy.ratio)
            providers.append(Provider("fastv_recipe", _prefill_fn(decoder, cache, embeds, modality, image, eager),
                                      graph_safe=False))  # fmt: skip
        return providers

    size = torch.finfo(dtype).bits // 8
    return Case(
        op="prune_prefill_vtw" if vtw else "prune_prefill",
        shape={"layers": config.num_layers, "hidden": config.hidden_size, "L": counts[0], "K": policy.layer},
        dtype=dtype,
        bytes=config.num_layers * layer_params(config) * size,
        flops=prefill_flops(config, counts),
        bound="compute",
        setup=setup,
    )


def importance_case(rows: int, dtype: torch.dtype, device: torch.device, L: int = 640, heads: int = 32,
                    head_dim: int = 128) -> Case:  # fmt: skip
    span = (TEXT_BEFORE, TEXT_BEFORE + min(IMAGE_TOKENS, L - TEXT_BEFORE - rows))  # the image, before the rows

    def setup() -> list[Provider]:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, L, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(1, heads, L, head_dim, generator=gen).to(device, dtype)
        kv_start, kv_end = fastmm.ops.key_ranges(modality=torch.zeros(1, L, dtype=torch.int64, device=device))
        lse = fastmm.ops.span_attention(q, k, k, kv_start, kv_end, return_lse=True)[1]
        rated = torch.arange(L - rows, L, device=device)[None]
        starts, ends = torch.tensor([[span[0]]], device=device), torch.tensor([[span[1]]], device=device)

        def fastmm_scores():
            return fastmm.ops.attention_importance(q, k, kv_start, kv_end, rated, starts, ends, lse=lse)

        def own_lse():
            return fastmm.ops.attention_importance(q, k, kv_start, kv_end, rated, starts, ends)

        def eager():
            logits = q.float() @ k.float().transpose(-1, -2) * head_dim**-0.5
            j = torch.arange(L, device=device)
            allowed = (j >= kv_start[..., None]) & (j < kv_end[..., None])
            probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
            return probs.mean(dim=1)[:, L - rows :].mean(dim=1)[:, span[0] : span[1]]

        backend = choose_backend("attention_importance", device)
        return [
            Provider("fastmm", fastmm_scores, backend=backend, note="with span attention's lse"),
            Provider("fastmm_own_lse", own_lse, backend=backend, note="computes the rows' lse itself"),
            Provider("fastv_eager", eager, note="[B, H, L, L] probabilities, then the rows and the span"),
        ]

    size = torch.finfo(dtype).bits // 8
    n = span[1] - span[0]
    return Case(
        op="prune_importance",
        shape={"L": L, "H": heads, "d": head_dim, "rows": rows, "span": n},
        dtype=dtype,
        bytes=(rows * heads * head_dim + n * heads * head_dim) * size + (rows * heads + n) * 4,
        flops=2 * rows * heads * n * head_dim,
        bound="memory",
        setup=setup,
        measure_memory=True,
    )


def decode_case(name: str, dtype: torch.dtype, device: torch.device) -> Case:
    policy = vtw_for(name)
    config = decoder_config(name)

    def setup() -> list[Provider]:
        decoder = _decoder(name, dtype).to(device)
        embeds, image, modality = _prompt(decoder, device, dtype)
        token = embeds[:, -1:].clone()
        text = modality[:, :1]

        def step(policy):
            cache = decoder.new_cache(1, embeds.shape[1] + 1)
            decoder.prefill(embeds, modality, cache, None, image, policy)
            lengths, positions = cache.lengths.clone(), cache.positions.clone()

            def run():  # every timed step decodes at the same position
                cache.lengths.copy_(lengths)
                cache.positions.copy_(positions)
                return decoder(token, text, cache, prefill=False)

            return run

        backend = choose_backend("decode_attention", device)
        return [Provider("fastmm", step(policy), backend=backend, note=f"after VTW(K={policy.layer})"),
                Provider("unpruned", step(None), same_result=False)]  # fmt: skip

    size = torch.finfo(dtype).bits // 8
    return Case(
        op="prune_decode",
        shape={"layers": config.num_layers, "hidden": config.hidden_size, "K": policy.layer},
        dtype=dtype,
        bytes=config.num_layers * layer_params(config) * size,
        flops=0,
        bound="memory",
        setup=setup,
        decode_size=True,
    )


def _prefill_targets() -> tuple[Target, ...]:
    targets = []
    for name in ("small", "7b_cut"):
        config = decoder_config(name)
        for op, policy in (("prune_prefill", FASTV), ("prune_prefill_vtw", vtw_for(name))):
            goal = round(0.9 / flop_fraction(policy, name), 2)
            where = {"layers": config.num_layers, "hidden": config.hidden_size, "K": policy.layer}
            targets.append(Target(op, where, "speedup:unpruned", goal, "native", dtype="float32"))
    return tuple(targets)


PROVIDERS = {
    "fastmm": "the pruned prefill (Decoder.prefill with fastmm.runtime.prune's policy), the scoring op "
    "(fastmm.ops.attention_importance) or a decode step after a pruned prefill; the device's default backend",
    "fastmm_own_lse": "attention_importance without span attention's lse (it computes the rated rows' own: one "
    "[R, S] product per head)",
    "unpruned": "the same decoder's prefill or decode step without pruning",
    "fastv_recipe": "FastV's scoring: eager softmax probabilities [B, H, L, L] of layer K - 1, mean over heads, the "
    "last row's image columns; then the same selection and compaction",
    "fastv_eager": "FastV's scoring step alone: eager probabilities [B, H, L, L], then the rated rows and the span",
}


@register_suite(
    "prune",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        *_prefill_targets(),
        Target("prune_importance", {"L": 640}, "speedup:fastv_eager", 5.0, "native"),
        Target("prune_importance", {"L": 640}, "memory_pct:fastv_eager", 5.0, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """Prefill (FastV, VTW) on both decoders and the scoring step, fp32 and bf16; decode after VTW on the small
    decoder; or tiny shapes (--quick)."""
    if quick:
        return [prefill_case("tiny", FastV(1, 0.5), torch.float32, device),
                importance_case(1, torch.float32, device, L=64, heads=4, head_dim=32)]  # fmt: skip
    fast_bf16 = device.type != "cpu" or gemm_dtype(torch.bfloat16) == torch.bfloat16
    prefill_dtypes = (torch.float32, torch.bfloat16) if fast_bf16 else (torch.float32,)
    out = []
    for name in ("small", "7b_cut"):
        for dtype in prefill_dtypes:
            out += [prefill_case(name, FASTV, dtype, device), prefill_case(name, vtw_for(name), dtype, device)]
    for dtype in (torch.float32, torch.bfloat16):
        out += [importance_case(rows, dtype, device) for rows in (1, TEXT_AFTER)]
    out += [decode_case("small", dtype, device) for dtype in (torch.float32, torch.bfloat16)]
    return out
