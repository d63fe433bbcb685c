"""Visual-token pruning in the unified model (fastmm.runtime.prune, Decoder.prefill): the definition of correct
pruning is that every layer computes what the unpruned decoder computes on the tokens that reach it, at their
original positions. The oracle runs each row alone, without padding, caches or compaction: the decoder's own
layers on index-selected token lists, and FastV's ranking from dense eager softmax probabilities (FastV's
recipe), not from ops.attention_importance. Batches mix rows of different lengths and image layouts; decoding
after pruning is checked against the oracle's full recompute at every step, and greedy generate_text too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmm
from fastmm.models import UnifiedModel, presets
from fastmm.nn.rope import apply_rope
from fastmm.runtime import VTW, FastV, PyramidDrop, generate_text

LAYERS = 4


def random_decoder(modality_adaptive: bool = False):
    config = dataclasses.replace(presets.demo_config("tiny"), vision=None, image_gen=None, vq=None, num_layers=LAYERS,
                                 modality_adaptive=modality_adaptive)  # fmt: skip
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    model.rebuild_buffers("cpu")
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.decoder


# Row layouts: (prompt length, image runs). Rows of one batch differ in length, image count and place.
LAYOUTS = [(15, [(2, 9)]), (12, [(1, 4), (6, 10)]), (9, [])]


def _batch(hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    L = max(length for length, _ in LAYOUTS)
    embeds = torch.randn(len(LAYOUTS), L, hidden, generator=gen)
    image = torch.zeros(len(LAYOUTS), L, dtype=torch.bool)
    for b, (_, runs) in enumerate(LAYOUTS):
        for start, end in runs:
            image[b, start:end] = True
    lengths = torch.tensor([length for length, _ in LAYOUTS])
    return embeds, image, lengths


# --------------------------------------------------------------------------------------------- the oracle


def _eager_rated_attention(layer, x, residual, modality, positions, decoder, rated):
    """Layer ``layer``'s softmax probabilities over every key, mean over heads and the rated query rows (a bool
    mask): [n] fp64, from its q / k projections and a dense causal softmax (FastV's eager recipe)."""
    h = layer.input_norm(x, modality) if residual is None else layer.input_norm(x, modality, residual)[0]
    attn = layer.attn
    Hq, Hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    heads = attn._project(h, modality).view(1, x.shape[1], Hq + 2 * Hkv, d).transpose(1, 2)
    cos, sin = decoder.rope_cos[positions][None, None], decoder.rope_sin[positions][None, None]
    q, k = apply_rope(heads[:, :Hq], cos, sin), apply_rope(heads[:, Hq : Hq + Hkv], cos, sin)
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * d**-0.5
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return probs[0][:, rated].mean(dim=(0, 1))


def oracle_drops(decoder, embeds, image, policy, modality_adaptive=False):
    """{layer: original indices dropped before it} for one row (embeds [n, H], image [n]) under ``policy``."""
    return _staged(decoder, embeds, image, policy, None, modality_adaptive)[1]


def oracle_hidden(decoder, embeds, image, drops, modality_adaptive=False):
    """The final-normed hidden states [kept, H] of one row with ``drops`` applied, and the kept indices."""
    return _staged(decoder, embeds, image, None, drops, modality_adaptive)[0]


def _staged(decoder, embeds, image, policy, drops, modality_adaptive=False):
    n = embeds.shape[0]
    tokens = torch.arange(n)
    modality_all = image.long() if modality_adaptive else torch.zeros(n, dtype=torch.int64)
    x, residual, chosen, saved = embeds[None], None, {}, None
    for index, layer in enumerate(decoder.layers):
        drop = None
        if drops is not None:
            drop = drops.get(index)
        elif isinstance(policy, VTW) and index == policy.layer:
            drop = tokens[image[tokens]]
        elif isinstance(policy, (FastV, PyramidDrop)) and index in (
            (policy.layer,) if isinstance(policy, FastV) else policy.layers
        ):
            drop = _fastv_choice(saved, tokens, image, policy.ratio)
        if drop is not None and len(drop):
            stay = ~torch.isin(tokens, drop)
            x, tokens = x[:, stay], tokens[stay]
            residual = None if residual is None else residual[:, stay]
        if drop is not None:
            chosen[index] = drop
        modality = modality_all[tokens][None]
        if policy is not None and not isinstance(policy, VTW) and policy.needs_stats(index):
            rated = ~image[tokens] if policy.rater == "text" else torch.arange(len(tokens)) == len(tokens) - 1
            saved = _eager_rated_attention(layer, x, residual, modality, tokens, decoder, rated)
        cos, sin = decoder.rope_cos[tokens][None, None], decoder.rope_sin[tokens][None, None]
        x, residual = layer(x, residual, modality, cos, sin, None, index, True)
    return (decoder.norm(x, modality, residual)[0][0], tokens), chosen


def _fastv_choice(probs, tokens, image, ratio):
    """The image tokens FastV drops: all but the n - floor(n * ratio) with the most attention (ties: earlier)."""
    images = torch.nonzero(image[tokens])[:, 0]
    keep = len(images) - int(len(images) * ratio)
    order = sorted(images.tolist(), key=lambda i: (-float(probs[i]), i))
    return tokens[sorted(order[keep:])]


POLICIES = [VTW(0), VTW(2), FastV(1, 0.5), FastV(3, 0.75), PyramidDrop((1, 3), 0.5)]
POLICY_IDS = ["vtw0", "vtw2", "fastv1", "fastv3", "pyramid"]


# ----------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("policy", POLICIES, ids=POLICY_IDS)
@pytest.mark.parametrize("modality_adaptive", [False, True], ids=["plain", "adaptive"])
@torch.no_grad()
def test_pruned_prefill_equals_the_unpruned_decoder_on_the_kept_tokens(policy, modality_adaptive):
    decoder = random_decoder(modality_adaptive)
    embeds, image, lengths = _batch(decoder.config.hidden_size)
    modality = image.long() if modality_adaptive else torch.zeros_like(image, dtype=torch.int64)
    cache = decoder.new_cache(len(LAYOUTS), 20)
    out = decoder.prefill(embeds, modality, cache, lengths, image, policy)
    for b, length in enumerate(lengths.tolist()):
        drops = oracle_drops(decoder, embeds[b, :length], image[b, :length], policy, modality_adaptive)
        expected, kept = oracle_hidden(decoder, embeds[b, :length], image[b, :length], drops, modality_adaptive)
        assert int(out.count[b]) == len(kept)
        torch.testing.assert_close(out.hidden[b, : len(kept)], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.last[b], expected[-1], rtol=1e-5, atol=1e-5)
        # layer i's cache holds the tokens that reached layer i; positions count the whole prompt
        reached = [length - sum(len(d) for i, d in drops.items() if i <= layer) for layer in range(LAYERS)]
        assert cache.lengths[:, b].tolist() == reached
        assert int(cache.positions[b]) == length


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("policy", [VTW(2), FastV(1, 0.5)], ids=["vtw2", "fastv1"])
@torch.no_grad()
def test_decoding_after_pruning_equals_the_oracle(backend, policy):
    """Prefill with pruning, then decode 4 tokens per row (the fused native step where it runs, the Python layer
    loop on triton): each step's hidden state equals the oracle's recompute of prompt + new tokens with the same
    drops (new tokens are text: never dropped)."""
    decoder = random_decoder()
    embeds, image, lengths = _batch(decoder.config.hidden_size)
    new = torch.randn(len(LAYOUTS), 4, decoder.config.hidden_size, generator=torch.Generator().manual_seed(5))
    zeros = torch.zeros_like(image, dtype=torch.int64)
    with fastmm.use_backend(backend):
        cache = decoder.new_cache(len(LAYOUTS), 20)
        decoder.prefill(embeds, zeros, cache, lengths, image, policy)
        steps = [decoder(new[:, t : t + 1], zeros[:, :1], cache, prefill=False)[:, 0] for t in range(4)]
    for b, length in enumerate(lengths.tolist()):
        drops = oracle_drops(decoder, embeds[b, :length], image[b, :length], policy)
        for t in range(4):
            sequence = torch.cat([embeds[b, :length], new[b, : t + 1]])
            with_new = torch.cat([image[b, :length], torch.zeros(t + 1, dtype=torch.bool)])
            expected, _ = oracle_hidden(decoder, sequence, with_new, drops)
            torch.testing.assert_close(steps[t][b], expected[-1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- generate_text


@pytest.fixture(scope="module")
def model():
    return presets.demo_model("tiny")


def _prompts():
    I = presets.IMAGE
    return [[presets.BOS, 20] + [I] * 576 + [30, 31, 32], [presets.BOS] + [I] * 576 + [40, 41, 42, 43, 44, 45]]


@pytest.mark.parametrize("policy", [VTW(1), FastV(1, 0.5, "last"), FastV(1, 0.25, "text")], ids=["vtw", "fastv", "fastv-text"])
@torch.no_grad()
def test_greedy_generate_text_after_pruning_equals_the_oracle(model, policy):
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    tokens = generate_text(model, _prompts(), images=pixels, max_new_tokens=5, prune=policy)
    for b, prompt in enumerate(_prompts()):
        ids = torch.tensor([prompt])
        embeds = model.embed_prompt(ids, pixels[b : b + 1])[0]
        image = ids[0] == presets.IMAGE
        drops = oracle_drops(model.decoder, embeds, image, policy)
        generated = []
        for _ in range(tokens.shape[1]):
            hidden, _ = oracle_hidden(model.decoder, embeds, torch.cat([image, torch.zeros(len(generated), dtype=torch.bool)]), drops)
            token = int(model.text_logits(hidden[-1]).argmax())
            generated.append(token)
            embeds = torch.cat([embeds, model.decoder.embed_tokens(torch.tensor([token]))])
            if token == presets.EOS:
                break
        assert tokens[b, : len(generated)].tolist() == generated


@torch.no_grad()
def test_generate_text_takes_padded_batches_and_lists(model):
    """Prompts of different lengths give each row what it gets alone: as a list, left-padded with an attention
    mask, and right-padded with one."""
    prompts = [[presets.BOS, 10, 11, 12, 13, 14, 15], [presets.BOS, 20, 21], [presets.BOS, 30, 31, 32, 33]]
    alone = [generate_text(model, torch.tensor([p]), max_new_tokens=6) for p in prompts]
    L = max(map(len, prompts))
    left = torch.tensor([[presets.PAD] * (L - len(p)) + p for p in prompts])
    right = torch.tensor([p + [presets.PAD] * (L - len(p)) for p in prompts])
    for batch in (generate_text(model, prompts, max_new_tokens=6),
                  generate_text(model, left, attention_mask=left != presets.PAD, max_new_tokens=6),
                  generate_text(model, right, attention_mask=(right != presets.PAD).long(), max_new_tokens=6)):  # fmt: skip
        for b, expected in enumerate(alone):
            n = expected.shape[1]
            assert batch[b, :n].tolist() == expected[0].tolist()


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: VTW(-1), "VTW: layer must be an int >= 0, got -1"),
        (lambda: FastV(0), "FastV: layer must be an int >= 1, got 0"),
        (lambda: FastV(2, 1.0), r"ratio must be a number in \[0, 1\)"),
        (lambda: FastV(2, -0.1), r"ratio must be a number in \[0, 1\)"),
        (lambda: FastV(2, 0.5, "first"), "rater must be one of"),
        (lambda: PyramidDrop((4, 2)), "layers must increase"),
        (lambda: PyramidDrop(()), "layers must be a non-empty sequence"),
    ],
)
def test_policy_bad_arguments(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("policy,words", [(VTW(4), "VTW: layer = 4 is out of range for a decoder of 4 layers"),
                                          (FastV(7), "FastV: layer = 7 is out of range"),
                                          (PyramidDrop((1, 5)), "PyramidDrop: the last layer = 5 is out of range")])  # fmt: skip
@torch.no_grad()
def test_policy_layer_out_of_range(policy, words):
    decoder = random_decoder()
    embeds, image, lengths = _batch(decoder.config.hidden_size)
    with pytest.raises(ValueError, match=words):
        decoder.prefill(embeds, torch.zeros_like(image, dtype=torch.int64), decoder.new_cache(3, 20), lengths, image, policy)


def test_generate_text_bad_prompts(model):
    with pytest.raises(ValueError, match="every row of attention_mask must keep at least one token"):
        generate_text(model, torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of input_ids' shape"):
        generate_text(model, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one non-empty prompt"):
        generate_text(model, [[1, 2], []])
