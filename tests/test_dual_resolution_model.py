"""The unified model's dual-resolution understanding path (LLaVA-HR: ConvNeXt + ViT fused by adapters) against the
unfused composition, generate_text with it, and image rows routed to the image modality in prefill."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_fusion import llava_hr_copies

from fastmm.models import presets
from fastmm.models.unified import UnifiedModel
from fastmm.runtime import generate_text

pytest.importorskip("transformers")  # the conv path is transformers' ConvNext


@pytest.fixture(scope="module")
def dual_model():
    model = presets.demo_model("tiny", dual_resolution=True)
    with torch.no_grad():  # the adapters' random init is small; larger weights make the test see them
        for adapter in model.vision.encoder.adapters:
            for p in adapter.parameters():
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    return model


def _unfused_features(model, pixels):
    """The vision path the way LLaVA-HR's tower runs it: every adapter computes its own slow branch (NCHW
    module), the final align runs as two Linears, then the whole aligner."""
    vision = model.vision
    encoder = vision.encoder
    low = torch.nn.functional.interpolate(pixels, size=(vision.config.image_size,) * 2, mode="bilinear", align_corners=True)
    y = encoder.vit_stem(low)
    x = encoder.conv_path(pixels)
    modules, align = llava_hr_copies(encoder.adapters, encoder.align)
    for index, block in enumerate(encoder.vit_blocks):
        y = block(y)
        if index in encoder.adapter_after:
            y = modules[encoder.adapter_after.index(index)](y, x)
    y = encoder.vit_norm(y)
    hidden = encoder.projector_in(align(y, x))  # the aligner: its first Linear, then (GELU, Linear)s
    for layer in vision.aligner_layers:
        hidden = layer(torch.nn.functional.gelu(hidden))
    return hidden


def test_dual_resolution_vision_equals_unfused(dual_model):
    config = dual_model.config
    side = config.dual_resolution.image_size
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        got = dual_model.vision(pixels)
        expected = _unfused_features(dual_model, pixels)
    vit_tokens = (config.vision.image_size // config.vision.patch_size) ** 2
    assert got.shape == (2, vit_tokens, config.hidden_size)  # as many tokens as the plain ViT path
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_no_parameter_is_registered_twice(dual_model):
    storages = [t.data_ptr() for t in dual_model.vision.state_dict().values()]
    assert len(storages) == len(set(storages))


def test_generate_text_with_dual_resolution(dual_model):
    config = dual_model.config
    tokens = (config.vision.image_size // config.vision.patch_size) ** 2
    ids = torch.tensor([[presets.BOS, *[presets.IMAGE] * tokens, 10, 11, 12]])
    side = config.dual_resolution.image_size
    images = torch.randn(1, 3, side, side)
    out = generate_text(dual_model, ids, images=images, max_new_tokens=4, seed=0)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 4
    # the fold of the final align into the aligner changes nothing the sampler sees
    dual_model.vision.encoder.fold_projector = False
    try:
        unfolded = generate_text(dual_model, ids, images=images, max_new_tokens=4, seed=0)
    finally:
        dual_model.vision.encoder.fold_projector = True
    assert torch.equal(out, unfolded)


def test_dual_resolution_refuses_low_resolution_images(dual_model):
    side = dual_model.config.vision.image_size
    with pytest.raises(ValueError, match="images must be"):
        dual_model.vision(torch.randn(1, 3, side, side))


def test_three_stage_conv_path_pools_to_the_vit_grid():
    """A three-stage ConvNeXt has stride 16, not 32: its map is twice the ViT grid here and is pooled."""
    config = presets.demo_config("tiny", dual_resolution=True)
    dual = dataclasses.replace(config.dual_resolution, conv_hidden_sizes=(16, 32, 48), conv_depths=(1, 1, 1))
    config = dataclasses.replace(config, dual_resolution=dual)
    assert dual.conv_stride == 16 and dual.conv_grid == 2 * config.vision.image_size // config.vision.patch_size
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    pixels = torch.randn(1, 3, dual.image_size, dual.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model.vision(pixels), _unfused_features(model, pixels), rtol=1e-4, atol=1e-4)


def test_dual_resolution_config_checks():
    config = presets.demo_config("tiny", dual_resolution=True)
    with pytest.raises(ValueError, match="adapter_after"):
        dataclasses.replace(config, dual_resolution=dataclasses.replace(config.dual_resolution, adapter_after=(3,)))
    with pytest.raises(ValueError, match="conv grid"):
        dataclasses.replace(config, dual_resolution=dataclasses.replace(config.dual_resolution, image_size=32 * 36))
    with pytest.raises(ValueError, match="needs vision"):
        dataclasses.replace(config, vision=None)


def test_prefill_routes_image_rows_to_the_image_modality():
    """A modality-adaptive (mPLUG-Owl2) model: generate_text's prefill gives image positions modality 1, so
    their rows take the image norms and K / V projections. The reference marks the image rows by their
    positions, which the test placed by hand."""
    config = dataclasses.replace(presets.demo_config("tiny"), modality_adaptive=True, image_gen=None, vq=None)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    with torch.no_grad():  # make the image modality's weights differ from the text ones
        for name, p in model.decoder.named_parameters():
            if p.dim() >= 2 and p.shape[0] == 2 and ("norm" in name or "kv_proj" in name):
                p[1].normal_(0, 0.5 if "norm" in name else p.shape[-1] ** -0.5)
    tokens = config.vision.num_patches
    prefix, suffix = [presets.BOS, 10], [11, 12, 13]
    ids = torch.tensor([[*prefix, *[presets.IMAGE] * tokens, *suffix]])
    images = torch.randn(1, 3, config.vision.image_size, config.vision.image_size)

    by_hand = torch.zeros(ids.shape, dtype=torch.int64)
    by_hand[:, len(prefix) : len(prefix) + tokens] = 1
    with torch.no_grad():
        embeds = model.embed_prompt(ids, images)
        hidden = model.decoder(embeds, by_hand, model.decoder.new_cache(1, ids.shape[1]), prefill=True)[:, -1]
        expected = model.text_logits(hidden).argmax(-1)
        as_text = model.decoder(embeds, torch.zeros_like(by_hand), model.decoder.new_cache(1, ids.shape[1]), prefill=True)
        wrong = model.text_logits(as_text[:, -1])
    assert not torch.allclose(wrong, model.text_logits(hidden)), "the image modality's weights must matter here"
    first = generate_text(model, ids, images=images, max_new_tokens=1)
    assert torch.equal(first[:, 0], expected)
    assert torch.equal(model.prompt_modality(ids, with_images=True), by_hand)
    assert not model.prompt_modality(ids, with_images=False).any()
