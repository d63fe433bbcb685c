"""The Chameleon / Emu3 layout: image tokens are a range of the text vocabulary (ImageGenConfig.shared_vocab_start).
Image logits read only those rows of the LM head and image embeddings are those rows of embed_tokens; greedy image
generation equals a reference loop that scores the whole vocabulary and masks every id outside the image range
(what a model without the option has to do)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastmm.models import UnifiedConfig, UnifiedModel, presets
from fastmm.runtime import generate_image

TEXT_VOCAB, CODES, TOKENS, CFG = 256, 512, 24, 5.0
PROMPT = [presets.BOS, 10, 11, 12, 13, presets.BOI]


def shared_config(start=TEXT_VOCAB) -> UnifiedConfig:
    """The tiny preset with CODES image ids from ``start`` after its TEXT_VOCAB text ids, an LM head of its own
    (untied), no ViT and no VQ tokenizer."""
    base = presets.demo_config("tiny")
    gen = dataclasses.replace(base.image_gen, codebook_size=CODES, num_image_tokens=TOKENS, shared_vocab_start=start)
    return dataclasses.replace(base, vocab_size=TEXT_VOCAB + CODES, image_gen=gen, vision=None, vq=None,
                               tie_word_embeddings=False)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel(shared_config()).eval()


def test_image_rows_of_the_shared_vocabulary(model):
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert names == {"decoder", "lm_head"}, "a shared vocabulary has no generation embeddings, aligner or head"
    hidden = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 7, CODES - 1]])
    with torch.no_grad():
        torch.testing.assert_close(model.image_logits(hidden), model.text_logits(hidden)[..., TEXT_VOCAB:])
        assert torch.equal(model.image_embeds(ids), model.decoder.embed_tokens(ids + TEXT_VOCAB))


@torch.no_grad()
def masked_full_vocab_generation(model: UnifiedModel) -> torch.Tensor:
    """Greedy guided generation the long way: full-vocabulary logits, every non-image id masked after the
    guidance mix, the winner fed back through embed_tokens."""
    config = model.config
    cond = torch.tensor([PROMPT])
    keep = (cond == config.bos_token_id) | (cond == config.boi_token_id)
    rows = torch.cat([cond, torch.where(keep, cond, torch.full_like(cond, config.pad_token_id))])
    cache = model.decoder.new_cache(2, len(PROMPT) + TOKENS)
    modality = torch.zeros_like(rows)
    hidden = model.decoder(model.embed_prompt(rows), modality, cache, prefill=True)[:, -1]
    tokens = []
    for _ in range(TOKENS):
        conditional, unconditional = model.text_logits(hidden)
        mixed = unconditional + CFG * (conditional - unconditional)
        mixed[:TEXT_VOCAB] = float("-inf")
        token = int(mixed.argmax())
        tokens.append(token - TEXT_VOCAB)
        embeds = model.decoder.embed_tokens(torch.tensor([[token], [token]]))
        hidden = model.decoder(embeds, modality[:, :1], cache, prefill=False)[:, -1]
    return torch.tensor([tokens])


def test_greedy_generation_equals_the_masked_full_vocabulary(model):
    tokens = generate_image(model, PROMPT, cfg_scale=CFG, temperature=0.0, decode_pixels=False).tokens
    assert torch.equal(tokens, masked_full_vocab_generation(model))


def test_seeded_sampling_stays_in_the_image_range(model):
    kwargs = dict(cfg_scale=CFG, temperature=1.0, top_k=50, decode_pixels=False, num_images=2)
    first = generate_image(model, PROMPT, seed=3, **kwargs).tokens
    assert torch.equal(first, generate_image(model, PROMPT, seed=3, **kwargs).tokens)
    assert 0 <= int(first.min()) and int(first.max()) < CODES


@pytest.mark.parametrize("start", [-1, TEXT_VOCAB + 1, 1.5])
def test_image_range_must_fit_the_vocabulary(start):
    with pytest.raises(ValueError, match="shared_vocab_start must be an int with shared_vocab_start \\+ codebook_size"):
        shared_config(start)
