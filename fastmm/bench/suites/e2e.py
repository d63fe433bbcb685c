"""Suite `e2e`: image generation end to end, fastmm's runtime against transformers' Janus on the same weights.

A random-weight transformers Janus checkpoint (fastmm.models.presets) is built and saved to a temporary
directory, then loaded by both. Greedy decoding (temperature 0) with classifier-free guidance 5, a 7-token
prompt, one image: the conditional and unconditional rows make a decode batch of 2. Cases:
`time_to_first_token` (prompt prefill + first image token), `image_tokens` (all 576 image tokens; `ms / item`
is ms per image token, prompt included), `image_tokens_sampled` (the same at Janus's default sampling,
temperature 1: providers draw different images, so no outputs are compared) and `image_total` (tokens + VQ
decode to pixels). Greedy providers return the tokens; the note reports any token that differs. GB/s counts the decoder and generation-head
weights streamed once per token (the weight-bandwidth roofline of decoding) against the copy bandwidth on
CPU, HBM bandwidth on GPU. On CUDA, `fastmm_no_graph` runs the same loop without the CUDA graph.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Callable

import torch

from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.models import UnifiedModel, presets
from fastmm.runtime import Jacobi, generate_image
from fastmm.runtime.generate import start_image_generation

PROMPT = [presets.BOS, 10, 11, 12, 13, 14, presets.BOI]
CFG_SCALE = 5.0
QUICK_TOKENS = 16  # --quick: a short token loop on the tiny model (no pixels: the decoder needs 576 tokens)
JACOBI = Jacobi(window=8, init="copy")  # fastmm_sjd's setting
JACOBI_AUTO = Jacobi(init="copy")  # fastmm_sjd_auto's: the default window
SAMPLED = "image_tokens_sampled"  # Janus's default sampling: temperature 1, cfg 5


@functools.lru_cache(maxsize=None)
def _checkpoint(preset: str) -> str:
    """A random-weight Janus checkpoint of ``preset`` saved once per process (needs transformers)."""
    directory = tempfile.mkdtemp(prefix=f"fastmm-e2e-{preset}-")
    return str(presets.save_random_janus(directory, preset, seed=0))


def _hf_model(path: str, dtype: torch.dtype, device: torch.device):
    """transformers' JanusForConditionalGeneration on the checkpoint, or None when transformers is missing."""
    try:
        from transformers import JanusForConditionalGeneration
    except ImportError:
        return None
    return JanusForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()


def decode_weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step streams: every decoder layer (fused q/k/v, o, gate/up, down, two norms),
    the final norm and the generation head (with a shared vocabulary: the LM head's image rows)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inner, gen = config.hidden_size, config.intermediate_size, config.image_gen
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inner + 2 * hidden
    if gen.shared_vocab:
        head = gen.codebook_size * hidden
    else:
        head = gen.head_width * (hidden + 1) + gen.codebook_size * (gen.head_width + 1)
    return (config.num_layers * layer + hidden + head) * torch.finfo(dtype).bits // 8


def _hf_generate(hf, prompt: torch.Tensor, tokens: int, pixels: bool, sample: bool = False) -> torch.Tensor:
    """transformers' Janus image loop for ``tokens`` tokens (its count is read from the vision config), greedy
    or sampling at temperature 1."""
    config = hf.model.vision_model.config
    saved, config.num_image_tokens = config.num_image_tokens, tokens
    try:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=sample,
                          guidance_scale=CFG_SCALE, **({"temperature": 1.0} if sample else {}))  # fmt: skip
    finally:
        config.num_image_tokens = saved
    return hf.decode_image_tokens(out).permute(0, 3, 1, 2) if pixels else out


def e2e_cases(preset: str, dtype: torch.dtype, device: torch.device, tokens: int, with_pixels: bool) -> list[Case]:
    """The three e2e cases of one preset; models load lazily, once, on first setup."""
    text = presets.janus_config_dict(preset)["text_config"]
    shape = {"layers": text["num_hidden_layers"], "hidden": text["hidden_size"], "tokens": tokens}

    @functools.lru_cache(maxsize=None)
    def models():
        path = _checkpoint(preset)
        model = UnifiedModel.from_pretrained(path, dtype=dtype, device=device)
        model.config.image_gen.num_image_tokens = tokens
        return model, _hf_model(path, dtype, device)

    def providers(kind: str) -> list[Provider]:
        model, hf = models()
        prompt = torch.tensor([PROMPT], device=device)
        backend = choose_backend("modality_rms_norm", device)

        temperature = 1.0 if kind == SAMPLED else 0.0

        def ours(use_graph: bool, parallel: Jacobi | None = None) -> Callable[[], torch.Tensor]:
            if kind == "time_to_first_token":
                return lambda: start_image_generation(model, PROMPT, CFG_SCALE, temperature=0.0, seed=0).tokens[:, :1]
            pixels = kind == "image_total"

            def run() -> torch.Tensor:
                result = generate_image(model, PROMPT, CFG_SCALE, temperature=temperature, seed=0,
                                        use_cuda_graph=use_graph, decode_pixels=pixels, parallel=parallel)  # fmt: skip
                run.passes, run.window = result.decoder_passes, result.window
                return result.pixels if pixels else result.tokens

            return run

        found = [Provider("fastmm", ours(True), graph_safe=False, backend=backend)]
        if device.type == "cuda" and kind != "time_to_first_token":
            found.append(Provider("fastmm_no_graph", ours(False), graph_safe=False, note="no CUDA graph"))
        if kind in ("image_tokens", SAMPLED):
            for name, parallel in (("fastmm_sjd", JACOBI), ("fastmm_sjd_auto", JACOBI_AUTO)):
                sjd = ours(False, parallel)
                sjd()  # one run for the acceptance statistics of the note (the same seed: the same run as timed)
                note = (f"window {sjd.window} ({parallel.init}): {sjd.passes} decoder passes, "
                        f"{(tokens - 1) / sjd.passes:.2f} tokens per pass")  # fmt: skip
                found.append(Provider(name, sjd, same_result=kind != SAMPLED, graph_safe=False, note=note,
                                      backend=backend))  # fmt: skip
        if hf is not None:
            count = 1 if kind == "time_to_first_token" else tokens
            sample = kind == SAMPLED
            found.append(Provider("transformers", lambda: _hf_generate(hf, prompt, count, kind == "image_total", sample),
                                  graph_safe=False, same_result=not sample,
                                  note="generate(generation_mode='image')"))  # fmt: skip
        return found

    step_bytes = decode_weight_bytes(presets.demo_config(preset), dtype)

    def case(kind: str, steps: int) -> Case:
        passes = 1 if kind == "time_to_first_token" else tokens  # decoder passes: one per token
        return Case(op=kind, shape=shape, dtype=dtype, bytes=passes * step_bytes, flops=0, bound="memory",
                    setup=lambda: providers(kind), items=steps)  # fmt: skip

    kinds = [("time_to_first_token", 1), ("image_tokens", tokens), (SAMPLED, tokens)]
    kinds += [("image_total", 1)] if with_pixels else []
    return [case(kind, steps) for kind, steps in kinds]


PROVIDERS = {
    "fastmm": "fastmm.runtime.generate_image (greedy, cfg 5) on UnifiedModel.from_pretrained; on CUDA the decode "
    "step is a replayed CUDA graph; the backend of fastmm's ops is shown next to it",
    "fastmm_no_graph": "the same without the CUDA graph (CUDA only)",
    "fastmm_sjd": "generate_image(parallel=Jacobi(window=8, init='copy')): speculative Jacobi decoding, lossless "
    "(greedy: the same tokens); on the CPU each window runs through the native multi-token decode layer; the note "
    "gives the decoder passes and tokens per pass",
    "fastmm_sjd_auto": "the same with the default window=\"auto\" (the device's roofline crossover; the note gives the "
    "window chosen)",
    "transformers": "JanusForConditionalGeneration.generate(generation_mode='image', do_sample=False, "
    "guidance_scale=5) on the same checkpoint (+ decode_image_tokens for image_total)",
}
_SMALL = {"layers": 8, "hidden": 512, "tokens": 576}
_ONE_B = {"layers": 24, "hidden": 2048, "tokens": 576}


@register_suite(
    "e2e",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers=PROVIDERS,
    targets=(
        Target("image_tokens", _SMALL, "speedup:transformers", 10, "native", dtype="float32"),
        Target("image_tokens", _SMALL, "speedup:transformers", 10, "native", dtype="float32", provider="fastmm_sjd"),
        Target(SAMPLED, _SMALL, "speedup:fastmm", 1.5, "native", provider="fastmm_sjd"),
        Target("time_to_first_token", _SMALL, "speedup:transformers", 2, "native", dtype="bfloat16"),
        Target("image_tokens", _ONE_B, "pct_of_peak", 75, "triton", dtype="bfloat16"),
        Target("image_tokens", _ONE_B, "speedup:fastmm_no_graph", 3, "triton", dtype="bfloat16"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """The 8-layer hidden-512 model in fp32 (the target's) and in bf16 (tokens only: the pixels add nothing
    new); on CUDA also the 1B-shaped model in bf16. --quick: the tiny model, a 16-token loop."""
    if quick:
        return e2e_cases("tiny", torch.float32, device, QUICK_TOKENS, with_pixels=False)
    found = e2e_cases("small", torch.float32, device, 576, with_pixels=True)
    found += e2e_cases("small", torch.bfloat16, device, 576, with_pixels=False)
    if device.type == "cuda":
        found += e2e_cases("1b", torch.bfloat16, device, 576, with_pixels=True)
    return found
