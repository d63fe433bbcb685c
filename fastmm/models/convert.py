r"""From a transformers Janus checkpoint (JanusForConditionalGeneration: config.json, generation_config.json,
safetensors) to UnifiedConfig and UnifiedModel's parameter names.

Name mapping, transformers -> fastmm ({i} a layer index, * the rest of the name unchanged):

    model.language_model.embed_tokens.weight                 decoder.embed_tokens.weight
    model.language_model.layers.{i}.self_attn.q_proj  \
    model.language_model.layers.{i}.self_attn.k_proj   >     decoder.layers.{i}.attn.qkv_proj   (rows q, k, v)
    model.language_model.layers.{i}.self_attn.v_proj  /
    model.language_model.layers.{i}.self_attn.o_proj         decoder.layers.{i}.attn.o_proj
    model.language_model.layers.{i}.mlp.gate_proj     \      decoder.layers.{i}.mlp.gate_up_proj (rows gate, up)
    model.language_model.layers.{i}.mlp.up_proj       /
    model.language_model.layers.{i}.mlp.down_proj            decoder.layers.{i}.mlp.down_proj
    model.language_model.layers.{i}.input_layernorm          decoder.layers.{i}.input_norm           ([D] -> [1, D])
    model.language_model.layers.{i}.post_attention_layernorm decoder.layers.{i}.post_attention_norm  ([D] -> [1, D])
    model.language_model.norm                                decoder.norm                            ([D] -> [1, D])
    lm_head                                                  lm_head (the token embeddings when tied)
    model.vision_model.embeddings.patch_embedding            vision.patch_embed
    model.vision_model.embeddings.position_embedding.weight  vision.position_embed
    model.vision_model.encoder.layers.{i}.layer_norm1 / 2    vision.blocks.{i}.norm1 / norm2         ([D] -> [1, D])
    model.vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj   vision.blocks.{i}.attn.{q,k,v}_proj
    model.vision_model.encoder.layers.{i}.self_attn.projection_layer  vision.blocks.{i}.attn.out_proj
    model.vision_model.encoder.layers.{i}.mlp.fc1 / fc2      vision.blocks.{i}.fc1 / fc2
    model.vision_model.post_layernorm                        vision.post_norm                        ([D] -> [1, D])
    model.aligner.*                                          vision.aligner.*
    model.generation_embeddings.weight                       gen_embed.weight
    model.generation_aligner.*                               gen_aligner.*
    model.generation_head.*                                  gen_head.*
    model.vqmodel.quantize.embedding.weight                  vq.quantize.weight
    model.vqmodel.*                                          vq.*  (encoder, decoder, quant_conv, post_quant_conv)

The fused rows are concatenated in the order shown; ``*.weight`` and, where present, ``*.bias`` alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from fastmm.models.config import ImageGenConfig, UnifiedConfig, VisionConfig, VQConfig

ARCHITECTURE = "JanusForConditionalGeneration"

# (transformers pattern, fastmm replacement), tried in order; the first match wins.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"model\.language_model\.embed_tokens\.", "decoder.embed_tokens."),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.layers.\1.attn.o_proj."),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.", r"decoder.layers.\1.mlp.down_proj."),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"decoder.layers.\1.input_norm."),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"decoder.layers.\1.post_attention_norm."),
    (r"model\.language_model\.norm\.", "decoder.norm."),
    (r"lm_head\.", "lm_head."),
    (r"model\.vision_model\.embeddings\.patch_embedding\.", "vision.patch_embed."),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight", "vision.position_embed"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision.blocks.\1.norm\2."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", r"vision.blocks.\1.attn.out_proj."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.", r"vision.blocks.\1.attn."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision.blocks.\1."),
    (r"model\.vision_model\.post_layernorm\.", "vision.post_norm."),
    (r"model\.aligner\.", "vision.aligner."),
    (r"model\.generation_embeddings\.", "gen_embed."),
    (r"model\.generation_aligner\.", "gen_aligner."),
    (r"model\.generation_head\.", "gen_head."),
    (r"model\.vqmodel\.quantize\.embedding\.", "vq.quantize."),
    (r"model\.vqmodel\.", "vq."),
)
# Projections stored as one fused matrix: fastmm name -> the transformers parts, in row order.
_FUSED = (
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", "decoder.layers.{0}.attn.qkv_proj.{2}", "qkv"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)", "decoder.layers.{0}.mlp.gate_up_proj.{2}", ("gate", "up")),
)  # fmt: skip
# Norms that are fastmm modality norms ([M, hidden] parameters, M = 1 here) over transformers' [hidden] ones.
_NORMS = re.compile(
    r"decoder\.(layers\.\d+\.(input_norm|post_attention_norm)|norm)\.weight"
    r"|vision\.(blocks\.\d+\.norm[12]|post_norm)\.(weight|bias)"
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"UnifiedModel.from_pretrained: {message}")


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def config_from_janus(config: dict[str, Any], generation: dict[str, Any] | None = None) -> UnifiedConfig:
    """UnifiedConfig from a transformers JanusConfig (config.json) and its generation_config.json."""
    architectures = config.get("architectures") or [ARCHITECTURE]
    _require(
        config.get("model_type") == "janus" and ARCHITECTURE in architectures,
        f"unknown architecture: expected model_type 'janus' ({ARCHITECTURE}), got model_type "
        f"{config.get('model_type')!r}, architectures {architectures}",
    )
    text, vision, vq = config.get("text_config") or {}, config.get("vision_config") or {}, config.get("vq_config") or {}
    _require(text.get("model_type", "llama") == "llama", f"text_config must be llama, got {text.get('model_type')!r}")
    _require(text.get("hidden_act", "silu") == "silu", f"text_config.hidden_act must be silu, got {text.get('hidden_act')!r}")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    _require(rope.get("rope_type", "default") == "default", f"only default RoPE is supported, got {rope}")
    _require(not vision.get("use_qk_norm", False), "vision_config.use_qk_norm is not supported")
    _require(not vq.get("double_latent", False), "vq_config.double_latent is not supported")
    for part, act in (("vision_config", vision.get("hidden_act", "gelu")), ("vq_config", vq.get("hidden_act", "gelu"))):
        _require(act == "gelu", f"{part}.hidden_act must be gelu, got {act!r}")
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    generation = generation or {}
    image_size, patch = vision.get("image_size", 384), vision.get("patch_size", 16)
    grid = image_size // patch
    num_image_tokens = vision.get("num_image_tokens", 576)
    _require(grid * grid == num_image_tokens, f"num_image_tokens {num_image_tokens} must be (image_size / patch_size)^2 = {grid * grid}")
    projection = vq.get("projection_dim", 2048)
    _require(vq.get("image_token_embed_dim", 2048) == hidden, "vq_config.image_token_embed_dim must equal the text hidden_size")
    return UnifiedConfig(
        vocab_size=text["vocab_size"],
        hidden_size=hidden,
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        max_position_embeddings=text.get("max_position_embeddings", 16384),
        tie_word_embeddings=config.get("tie_word_embeddings", True),
        attention_bias=text.get("attention_bias", False),
        mlp_bias=text.get("mlp_bias", False),
        image_token_id=config.get("image_token_id", 100581),
        bos_token_id=generation.get("bos_token_id", text.get("bos_token_id")),
        eos_token_id=generation.get("eos_token_id", text.get("eos_token_id")),
        pad_token_id=generation.get("pad_token_id", text.get("pad_token_id")),
        boi_token_id=(generation.get("generation_kwargs") or {}).get("boi_token_id"),
        vision=VisionConfig(
            hidden_size=vision.get("hidden_size", 1024),
            num_layers=vision.get("num_hidden_layers", 24),
            num_heads=vision.get("num_attention_heads", 16),
            image_size=image_size,
            patch_size=patch,
            num_channels=vision.get("num_channels", 3),
            mlp_ratio=vision.get("mlp_ratio", 4.0),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            aligner_width=vision.get("projection_dim", 2048),
            aligner_depth=vision.get("depth", 2),
        ),
        image_gen=ImageGenConfig(
            codebook_size=vq.get("num_embeddings", 16384),
            code_dim=vq.get("embed_dim", 8),
            aligner_width=projection,
            aligner_depth=vq.get("num_hidden_layers", 2),
            head_width=projection,
            num_image_tokens=num_image_tokens,
        ),
        vq=VQConfig(
            codebook_size=vq.get("num_embeddings", 16384),
            code_dim=vq.get("embed_dim", 8),
            latent_channels=vq.get("latent_channels", 256),
            base_channels=vq.get("base_channels", 128),
            channel_multiplier=tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
            num_res_blocks=vq.get("num_res_blocks", 2),
            in_channels=vq.get("in_channels", 3),
            out_channels=vq.get("out_channels", 3),
            grid=grid,
        ),
    )


def rename(name: str) -> str | None:
    """The fastmm name of an unfused transformers parameter, or None if no rule applies."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(f"^{pattern}", replacement, name)
    return None


def state_dict_from_janus(tensors: dict[str, torch.Tensor], config: UnifiedConfig) -> dict[str, torch.Tensor]:
    """Map a Janus state dict to UnifiedModel's names: fused projections concatenated, norm weights given a
    modality dim. Raises on a name with no rule (an unexpected checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    order: dict[str, tuple[str, ...]] = {}
    unknown = []
    for name, tensor in tensors.items():
        for pattern, target, part_order in _FUSED:
            match = re.fullmatch(pattern, name)
            if match:
                fused = target.format(*match.groups())
                parts.setdefault(fused, {})[match.group(2)] = tensor
                order[fused] = tuple(part_order)
                break
        else:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the LM head is the token embedding
            new = rename(name)
            if new is None:
                unknown.append(name)
                continue
            out[new] = tensor[None] if _NORMS.fullmatch(new) else tensor
    _require(not unknown, f"unexpected tensors in the checkpoint (no mapping): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    for fused, pieces in parts.items():
        missing = [p for p in order[fused] if p not in pieces]
        _require(not missing, f"{fused} needs parts {order[fused]}, missing {missing}")
        shapes = {p: tuple(pieces[p].shape) for p in order[fused]}
        _require(len({shape[1:] for shape in shapes.values()}) == 1, f"{fused}: parts of shapes {shapes} do not stack")
        out[fused] = torch.cat([pieces[p] for p in order[fused]], dim=0)
    return out
