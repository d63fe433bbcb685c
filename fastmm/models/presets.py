"""Random-weight Janus checkpoints in transformers' format, for tests, benchmarks and ``fastmm generate --demo``:
nothing is downloaded, a config is built offline and saved with save_pretrained.

Presets (decoder layers x hidden; every one keeps Janus's real image side: 576 tokens over a 16384-code
codebook with 8-dim codes, so guided sampling and the token loop run at true size):
    tiny   2 x 64    tests: seconds per image
    small  8 x 512   the CPU benchmark (the "8-layer hidden-512" config of the e2e targets)
    1b     24 x 2048 Janus-Pro-1B's decoder shape (vocabulary 102400), for GPU benchmarks
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Special token ids of the random checkpoints (Janus's real ids do not fit the small vocabularies).
BOS, EOS, PAD, BOI, IMAGE = 1, 2, 0, 5, 6

_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=102400),
}  # fmt: skip
_VISION = {
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4),
    "1b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}
_VQ = {  # tokenizer decoder: 24 x 24 tokens -> 24 * 2^(levels - 1) pixels per side
    "tiny": dict(base_channels=32, latent_channels=32, channel_multiplier=[1, 2], num_res_blocks=1),
    "small": dict(base_channels=32, latent_channels=64, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1),
    "1b": dict(base_channels=128, latent_channels=256, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2),
}
_DUAL_RESOLUTION = {  # LLaVA-HR's conv path at twice the ViT's resolution: the same 24 x 24 grid after stride 32
    "tiny": dict(conv_hidden_sizes=(16, 32, 48, 64), conv_depths=(1, 1, 1, 1), adapter_after=(0,)),
    "small": dict(conv_hidden_sizes=(32, 64, 128, 256), conv_depths=(1, 1, 2, 1), adapter_after=(0, 1)),
    "1b": dict(conv_hidden_sizes=(192, 384, 768, 1536), conv_depths=(3, 3, 27, 3), adapter_after=(5, 11, 17)),
}
PRESETS = tuple(_TEXT)


def janus_config_dict(preset: str) -> dict[str, Any]:
    """The JanusConfig keyword arguments of ``preset``."""
    if preset not in _TEXT:
        raise ValueError(f"janus preset must be one of {PRESETS}, got {preset!r}")
    hidden = _TEXT[preset]["hidden_size"]
    text = dict(model_type="llama", max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=PAD, **_TEXT[preset])  # fmt: skip
    vision = dict(image_size=384, patch_size=16, projection_dim=hidden, depth=2, num_image_tokens=576, **_VISION[preset])
    vq = dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden, image_token_embed_dim=hidden,
              num_hidden_layers=2, **_VQ[preset])  # fmt: skip
    return dict(text_config=text, vision_config=vision, vq_config=vq, image_token_id=IMAGE)


def save_random_janus(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight transformers JanusForConditionalGeneration of ``preset`` and save it (config.json,
    generation_config.json with the image-generation special tokens, model.safetensors) to ``path``.
    Needs transformers."""
    import torch
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(JanusConfig(**janus_config_dict(preset))).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, generation_kwargs={"boi_token_id": BOI}
    )
    model.save_pretrained(str(path))
    return Path(path)


def demo_config(preset: str = "tiny", dual_resolution: bool = False):
    """The UnifiedConfig of ``preset`` without transformers (``fastmm generate --demo`` builds the model from
    it with random weights). dual_resolution=True adds LLaVA-HR's high-resolution ConvNeXt path and adapters
    (images then come in at twice the ViT's side; building that model needs transformers)."""
    import dataclasses

    from fastmm.models.config import DualResolutionConfig
    from fastmm.models.convert import ARCHITECTURE, config_from_janus

    config = {"model_type": "janus", "architectures": [ARCHITECTURE], **janus_config_dict(preset)}
    generation = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "generation_kwargs": {"boi_token_id": BOI}}
    unified = config_from_janus(config, generation)
    if not dual_resolution:
        return unified
    dual = DualResolutionConfig(image_size=2 * unified.vision.image_size, **_DUAL_RESOLUTION[preset])
    return dataclasses.replace(unified, dual_resolution=dual)


def demo_model(preset: str = "tiny", dtype=None, device="cpu", dual_resolution: bool = False):
    """A random-weight UnifiedModel of ``preset`` (tiny, small, 1b), seeded, in eval mode, no checkpoint
    (``fastmm generate --demo``, ``fastmm profile --demo``). dtype defaults to float32."""
    import torch

    from fastmm.models.unified import UnifiedModel

    if preset not in PRESETS:
        raise ValueError(f"demo_model: preset must be one of {PRESETS}, got {preset!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = UnifiedModel(demo_config(preset, dual_resolution)).to(dtype or torch.float32).eval()
    model.refresh_generation_table()
    return model
