"""What a profiled run feeds the model: the image for the vision encoder, default prompts."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastmm.models import UnifiedModel

PROMPT_TEXT = (10, 11, 12, 13)  # ids between the special tokens of a default prompt


def image_prompt(model: UnifiedModel) -> list[int]:
    """BOS, a few text ids, BOI: a prompt that starts an image (the special ids from the model's config)."""
    config = model.config
    if config.boi_token_id is None:
        raise ValueError("profile: prompt_ids is required: the model's config has no boi_token_id to end a default prompt")
    bos = [config.bos_token_id] if config.bos_token_id is not None else []
    return bos + list(PROMPT_TEXT) + [config.boi_token_id]


def text_prompt(model: UnifiedModel, with_image: bool) -> torch.Tensor:
    """[1, L] ids of an understanding prompt: BOS, the image's placeholders (one per ViT patch) when
    ``with_image``, a few text ids."""
    config = model.config
    ids = [config.bos_token_id] if config.bos_token_id is not None else []
    if with_image:
        ids += [config.image_token_id] * config.vision.num_patches
    device = model.decoder.embed_tokens.weight.device
    return torch.tensor([ids + list(PROMPT_TEXT)], device=device)


def random_image(model: UnifiedModel, seed: int = 0) -> torch.Tensor:
    """[1, 3, S, S] uniform in [-1, 1] at the vision encoder's size, on the model's device."""
    vision = vision_config(model, "image")
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator) * 2 - 1
    return pixels.to(model.decoder.embed_tokens.weight.device)


def load_image(model: UnifiedModel, path: str | Path) -> torch.Tensor:
    """An image file (PNG, or any format Pillow reads) -> [1, 3, S, S] in [-1, 1], resized to the encoder's
    size S x S (Janus's normalization: mean 0.5, std 0.5)."""
    from matplotlib.image import imread

    vision = vision_config(model, "image")
    if not Path(path).is_file():
        raise FileNotFoundError(f"profile: image must be an image file, got {str(path)!r} (no such file)")
    array = torch.from_numpy(imread(str(path)))
    if array.dtype == torch.uint8:
        array = array.float() / 255
    if array.dim() == 2:  # grayscale
        array = array[..., None].expand(*array.shape, 3)
    pixels = array[..., :3].permute(2, 0, 1)[None].float()  # (1, 3, H, W) in [0, 1], alpha dropped
    size = vision.image_size
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (pixels * 2 - 1).to(model.decoder.embed_tokens.weight.device)


def vision_config(model: UnifiedModel, argument: str):
    """The model's VisionConfig; an error naming ``argument`` when it has no vision encoder."""
    if model.config.vision is None:
        raise ValueError(f"profile: {argument} given, but the model has no vision encoder (config.vision is None)")
    return model.config.vision
