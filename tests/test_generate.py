"""The generation runtime against transformers' Janus on a tiny random-weight checkpoint: greedy image tokens
(576 of them, cfg 5) and greedy text equal transformers'; seeded sampling reproduces; the decode step compiles
with torch.compile(fullgraph=True) (so it never syncs the host); the CUDA-graph path when CUDA is present."""

from __future__ import annotations

import pytest
import torch

from fastmm.models import UnifiedModel, presets
from fastmm.runtime import generate_image, generate_text
from fastmm.runtime.generate import start_image_generation

transformers = pytest.importorskip("transformers")

PROMPT = [presets.BOS, 10, 11, 12, 13, 14, presets.BOI]
NEAR_TIE = 1e-5  # a differing greedy step is accepted only where the guided top-2 gap is below this


class GuidedGapRecorder(transformers.LogitsProcessor):
    """Sees transformers' raw [cond; uncond] scores at every image step and records the top-2 gap of the
    guided logits (the CFG processor itself runs after it)."""

    def __init__(self, scale: float):
        self.scale, self.gaps = scale, []

    def __call__(self, input_ids, scores):
        cond, uncond = scores.chunk(2)
        top2 = (uncond + (cond - uncond) * self.scale).topk(2, dim=-1).values
        self.gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        return scores


def test_greedy_image_tokens_match_transformers(model, hf_model):
    recorder = GuidedGapRecorder(5.0)
    prompt = torch.tensor([PROMPT])
    expected = hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=False, guidance_scale=5.0,
        logits_processor=transformers.LogitsProcessorList([recorder]),
    )  # fmt: skip
    result = generate_image(model, PROMPT, cfg_scale=5.0, temperature=0.0, decode_pixels=False)
    assert result.tokens.shape == expected.shape == (1, 576)
    differing = (result.tokens != expected).nonzero()
    if len(differing):
        step = int(differing[0, 1])
        gap = recorder.gaps[step]
        assert gap < NEAR_TIE, f"image token {step} differs ({int(result.tokens[0, step])} vs {int(expected[0, step])}) with a guided top-2 gap of {gap:.3g}: not a near-tie"
        pytest.xfail(f"token {step} of 576 differs at a documented near-tie (top-2 gap {gap:.3g} < {NEAR_TIE})")


def test_greedy_text_matches_transformers(model, hf_model):
    prompt = torch.tensor([PROMPT[:-1], [presets.BOS, 20, 21, 22, 23, 24]])
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    tokens = generate_text(model, prompt, max_new_tokens=12)
    assert torch.equal(tokens, expected[:, prompt.shape[1]:])


def test_greedy_text_with_an_image_matches_transformers(model, hf_model):
    prompt = torch.tensor([[presets.BOS] + [presets.IMAGE] * 576 + [30, 31]])
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    expected = hf_model.generate(prompt, pixel_values=pixels, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    tokens = generate_text(model, prompt, images=pixels, max_new_tokens=6)
    assert torch.equal(tokens, expected[:, prompt.shape[1]:])


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(cfg_scale=5.0, temperature=1.0, top_k=100, top_p=0.9, decode_pixels=False, num_images=2)
    first = generate_image(model, PROMPT, seed=7, **kwargs).tokens
    again = generate_image(model, PROMPT, seed=7, **kwargs).tokens
    other = generate_image(model, PROMPT, seed=8, **kwargs).tokens
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1]), "two images of one call must draw independently"


def test_decode_step_runs_without_autograd(model, monkeypatch):
    """A step called with autograd on must not record a graph (on CPU it would also leave the native layer)."""
    step = start_image_generation(model, PROMPT, temperature=0.0, seed=0)
    seen = []
    forward = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda *a, **k: seen.append(torch.is_grad_enabled()) or forward(*a, **k))
    with torch.enable_grad():
        step()
    assert seen == [False]


def test_pixels_are_decoded(model):
    result = generate_image(model, PROMPT, temperature=0.0)
    assert result.pixels.shape == (1, 3, 48, 48) and torch.isfinite(result.pixels).all()
    assert torch.equal(result.pixels, model.decode_image_tokens(result.tokens))


def test_cfg_scale_one_runs_one_row_per_image(model):
    step = start_image_generation(model, PROMPT, cfg_scale=1.0, temperature=0.0, num_images=3)
    assert step.cache.k.shape[1] == 3  # no unconditional rows
    cache = model.decoder.new_cache(1, 16)
    prompt = torch.tensor([PROMPT])
    hidden = model.decoder(model.embed_prompt(prompt), torch.zeros_like(prompt), cache, prefill=True)[:, -1]
    assert step.tokens[:, 0].tolist() == [int(model.image_logits(hidden).argmax())] * 3


def test_decode_step_compiles_fullgraph(model):
    """torch.compile(fullgraph=True) fails on any graph break, a host read of a tensor included: the step is
    free of host syncs. Compiled and eager steps give the same tokens."""
    eager = start_image_generation(model, PROMPT, temperature=1.0, seed=3)
    compiled_state = start_image_generation(model, PROMPT, temperature=1.0, seed=3)
    compiled = torch.compile(compiled_state, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(4):
            eager()
            compiled()
    assert torch.equal(compiled_state.tokens[:, :5], eager.tokens[:, :5])
    assert torch.equal(compiled_state.cache.lengths, eager.cache.lengths)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager(janus_dir):
    model = UnifiedModel.from_pretrained(janus_dir, device="cuda")
    kwargs = dict(temperature=1.0, seed=11, decode_pixels=False)
    graphed = generate_image(model, PROMPT, use_cuda_graph=True, **kwargs)
    eager = generate_image(model, PROMPT, use_cuda_graph=False, **kwargs)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert torch.equal(graphed.tokens, eager.tokens)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(cfg_scale=-0.5), "cfg_scale must be a finite number >= 0"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number >= 0"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(num_images=0), "num_images must be an int >= 1"),
        (dict(seed=-1), r"seed must be None or an int in \[0, 2\^32\)"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, error):
    with pytest.raises(ValueError, match=error):
        generate_image(model, PROMPT, **kwargs)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, 256\)"):
        generate_image(model, [presets.BOS, 300, presets.BOI])
    with pytest.raises(ValueError, match="prompt_ids must be one non-empty prompt"):
        generate_image(model, [])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        generate_text(model, torch.tensor([PROMPT]), max_new_tokens=0)
