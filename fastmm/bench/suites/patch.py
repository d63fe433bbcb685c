"""Suite `patch`: transformers models patched with fastmm.patch against the same models unpatched.

Each case builds one random-weight transformers model offline (seed 0) and a deep copy of it that fastmm.patch
swaps in place; both run the same call on the same inputs, under torch.no_grad (inference: fastmm.ops.linear
hands calls autograd records to F.linear). Cases: `janus_image_tokens`, JanusForConditionalGeneration.generate(
generation_mode="image", do_sample=False, guidance_scale=5) for one 7-token prompt and 576 image tokens
(`ms / item` is ms per image token, prompt included), patched = routed to fastmm.runtime.generate_image on a
UnifiedModel over the model's own weights, at the tiny (2 x 64) and small (8 x 512) presets; `llama_forward` and
`qwen2_forward`, one forward of a 4-layer hidden-1024 decoder (16 heads, 4 KV heads, SwiGLU 2816, vocabulary
1024) over 512 tokens, patched = "fastmm" attention through AttentionInterface, fastmm RMSNorm and
fastmm.ops.linear, unpatched = transformers' sdpa attention and its own modules. FLOPs count the GEMMs and the
causal half of the attention scores.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

import fastmm
from fastmm.backend import choose_backend
from fastmm.bench.suites import Case, Provider, Target, register_suite
from fastmm.bench.suites.e2e import decode_weight_bytes
from fastmm.models import presets

PROMPT = [presets.BOS, 10, 11, 12, 13, 14, presets.BOI]
TOKENS, QUICK_TOKENS = 576, 16
DECODER = dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048)  # fmt: skip
QUICK_DECODER = dict(DECODER, num_hidden_layers=1, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
LENGTH, QUICK_LENGTH = 512, 64


def _pair(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unpatched, patched) copies of one freshly built model."""
    torch.manual_seed(0)
    model = build().eval()
    patched = copy.deepcopy(model)
    fastmm.patch(patched)
    return model, patched


def _janus(preset: str):
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

    model = JanusForConditionalGeneration(JanusConfig(**presets.janus_config_dict(preset)))
    model.generation_config = GenerationConfig(bos_token_id=presets.BOS, eos_token_id=presets.EOS,
                                               pad_token_id=presets.PAD, generation_kwargs={"boi_token_id": presets.BOI})  # fmt: skip
    return model


def janus_case(preset: str, tokens: int, device: torch.device) -> Case:
    text = presets.janus_config_dict(preset)["text_config"]

    def setup() -> list[Provider]:
        prompt = torch.tensor([PROMPT], device=device)

        def generate(model) -> Callable[[], torch.Tensor]:
            model.model.vision_model.config.num_image_tokens = tokens

            @torch.no_grad()
            def run() -> torch.Tensor:
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                      do_sample=False, guidance_scale=5.0)  # fmt: skip

            return run

        unpatched, patched = (model.to(device) for model in _pair(lambda: _janus(preset)))
        backend = choose_backend("modality_rms_norm", device)
        return [Provider("fastmm", generate(patched), graph_safe=False, backend=backend, note="fastmm.patch"),
                Provider("transformers", generate(unpatched), graph_safe=False)]  # fmt: skip

    step_bytes = decode_weight_bytes(presets.demo_config(preset), torch.float32)
    shape = {"layers": text["num_hidden_layers"], "hidden": text["hidden_size"], "tokens": tokens}
    return Case(op="janus_image_tokens", shape=shape, dtype=torch.float32, bytes=tokens * step_bytes, flops=0,
                bound="memory", setup=setup, items=tokens)  # fmt: skip


def forward_case(model_type: str, decoder: dict, length: int, device: torch.device) -> Case:
    def build():
        import transformers

        if model_type == "llama":
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder))
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder))

    def setup() -> list[Provider]:
        unpatched, patched = (model.to(device) for model in _pair(build))
        ids = torch.randint(0, decoder["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1)).to(device)

        def forward(model) -> Callable[[], torch.Tensor]:
            return torch.no_grad()(lambda: model(input_ids=ids).logits)

        backend = choose_backend("modality_rms_norm", device)
        return [Provider("fastmm", forward(patched), backend=backend, note="fastmm.patch"),
                Provider("sdpa", forward(unpatched))]  # fmt: skip

    hidden, layers = decoder["hidden_size"], decoder["num_hidden_layers"]
    head_dim = hidden // decoder["num_attention_heads"]
    kv = decoder["num_key_value_heads"] * head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * decoder["intermediate_size"]
    gemm_flops = 2 * length * (layers * per_layer + hidden * decoder["vocab_size"])
    attention_flops = layers * 2 * length * length * hidden  # QK^T and PV, causal half of 4 L^2 hidden
    weights = (layers * (per_layer + 2 * hidden) + 2 * hidden * decoder["vocab_size"]) * 4
    shape = {"layers": layers, "hidden": hidden, "L": length}
    return Case(op=f"{model_type}_forward", shape=shape, dtype=torch.float32, bytes=weights,
                flops=gemm_flops + attention_flops, bound="compute", setup=setup)  # fmt: skip


@register_suite(
    "patch",
    description=__doc__.split("\n\n", 1)[1].strip(),
    providers={
        "fastmm": "the transformers model after fastmm.patch (the backend of fastmm's ops is shown next to it)",
        "transformers": "the same JanusForConditionalGeneration unpatched: transformers' own image loop",
        "sdpa": "the same decoder unpatched: transformers' sdpa attention, RMSNorm and nn.Linear",
    },
    targets=(
        Target("janus_image_tokens", {"layers": 2, "hidden": 64}, "speedup:transformers", 5, "native"),
        Target("llama_forward", {"layers": 4, "hidden": 1024}, "speedup:sdpa", 1, "native"),
        Target("qwen2_forward", {"layers": 4, "hidden": 1024}, "speedup:sdpa", 1, "native"),
    ),
)
def cases(device: torch.device, quick: bool) -> list[Case]:
    """Janus image generation at the tiny and small presets, Llama and Qwen2 forwards (fp32); --quick: the tiny
    Janus for 16 tokens and a 1-layer hidden-128 decoder over 64 tokens."""
    if quick:
        return [janus_case("tiny", QUICK_TOKENS, device)] + [
            forward_case(kind, QUICK_DECODER, QUICK_LENGTH, device) for kind in ("llama", "qwen2")
        ]
    found = [janus_case(preset, TOKENS, device) for preset in ("tiny", "small")]
    return found + [forward_case(kind, DECODER, LENGTH, device) for kind in ("llama", "qwen2")]
