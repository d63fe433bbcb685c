"""fastmm.patch / fastmm.unpatch on tiny random-weight transformers models built offline from configs: Llama,
Qwen2, LLaVA (Llama + CLIP tower), Janus, Chameleon, Emu3, and Mistral / Gemma as model types without a plan.

The oracle is the unpatched transformers model: patched outputs are held to the error-ratio rule against its
fp64 run (tests/tolerance.py), with fastmm's ops seen running; unpatch is bit-identical; the weights are the
same Parameters with the same values; print shows the swaps; patching twice changes nothing; Janus's image
generation runs on fastmm's runtime and gives transformers' greedy tokens."""

from __future__ import annotations

import copy
import importlib
import logging
from collections import Counter

import pytest
import torch
from tolerance import assert_error_ratio

import fastmm
from fastmm.models import presets

T = pytest.importorskip("transformers")

patch_module = importlib.import_module("fastmm.integrations.patch")  # fastmm.integrations.patch is the function
janus_module = importlib.import_module("fastmm.integrations.janus")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
VQ = dict(embed_dim=8, base_channels=32, latent_channels=8, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
LLAVA_IMAGE, LLAVA_PATCHES = 150, 16  # image token id; a 32 x 32 image in 8 x 8 patches (CLS dropped)
PROMPT = [presets.BOS, 10, 11, 12, 13, 14, presets.BOI]


def _config(arch: str):
    if arch == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(**TEXT)
    if arch == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(**TEXT)
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(**TEXT)
    if arch == "gemma":
        return T.GemmaForCausalLM, T.GemmaConfig(**TEXT, head_dim=16)
    if arch == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
        text = dict(model_type="llama", **{**TEXT, "vocab_size": 160})
        return T.LlavaForConditionalGeneration, T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=LLAVA_IMAGE)
    if arch == "janus":
        return T.JanusForConditionalGeneration, T.JanusConfig(**presets.janus_config_dict("tiny"))
    if arch == "chameleon":
        vocabulary = {"<image>": 100, **{f"IMGIMG{chr(ord('A') + i)}Z": 101 + i for i in range(8)}}
        return T.ChameleonForConditionalGeneration, T.ChameleonConfig(
            **TEXT, vocabulary_map=vocabulary, vq_config=dict(**VQ, num_embeddings=64, resolution=16)
        )
    vocabulary = {"<image>": 100, "<|extra_200|>": 101, **{f"<|visual token {i:06d}|>": 102 + i for i in range(8)}}
    vq = dict(**VQ, codebook_size=64, temporal_downsample_factor=1, hidden_size=64)  # hidden: the mid-block channels
    return T.Emu3ForConditionalGeneration, T.Emu3Config(text_config=TEXT, vq_config=vq, vocabulary_map=vocabulary)


def build(arch: str, dtype: torch.dtype = torch.float32):
    """A random-weight model of ``arch`` (seed 0), eval mode; VQ codebooks spread far apart relative to rounding
    (as tests/test_nn_vq.py), so the nearest code is never a near-tie."""
    cls, config = _config(arch)
    torch.manual_seed(0)
    model = cls(config).eval()
    for module in model.modules():
        if type(module).__name__.endswith("VectorQuantizer"):
            with torch.no_grad():
                module.embedding.weight.normal_()
    if arch == "janus":
        model.generation_config = T.GenerationConfig(
            bos_token_id=presets.BOS, eos_token_id=presets.EOS, pad_token_id=presets.PAD,
            generation_kwargs={"boi_token_id": presets.BOI},
        )  # fmt: skip
    return model.to(dtype)


def inputs(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (2, 13), generator=gen)
    if arch == "llava":
        image = torch.full((2, LLAVA_PATCHES), LLAVA_IMAGE)
        return {"input_ids": torch.cat([ids[:, :1], image, ids[:, 1:]], 1),
                "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}  # fmt: skip
    if arch == "janus":
        image = torch.full((1, 576), presets.IMAGE)
        return {"input_ids": torch.cat([ids[:1, :1], image, ids[:1, 1:]], 1),
                "pixel_values": torch.randn(1, 3, 384, 384, generator=gen)}  # fmt: skip
    return {"input_ids": ids}


@torch.no_grad()
def run(model, arch: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The logits, and for the VQ models the tokenizer's indices / quantized latents / loss on a random image."""
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs(arch).items()}
    found = {"logits": model(**batch).logits}
    vq = getattr(getattr(model, "model", None), "vqmodel", None)
    if vq is not None:
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)
        if arch == "emu3":
            found["image_tokens"] = torch.stack(vq.encode(pixels, torch.tensor([[16, 16]] * 2)).image_tokens)
        else:
            out = vq.encode(pixels)
            found.update(image_tokens=out.image_tokens, quantized=out.quantized_last_hidden_state, loss=out.embedding_loss)
    return found


class CountingOps:
    """Stands in for fastmm.ops inside fastmm.integrations.patch and counts the calls per op."""

    def __init__(self, real):
        self.real, self.calls = real, Counter()

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def spy(monkeypatch):
    """Counts of fastmm's ops called by the patched modules, the codebook search and the "fastmm" attention."""
    ops = CountingOps(patch_module.ops)
    monkeypatch.setattr(patch_module, "ops", ops)
    real_quantize = fastmm.nn.vq.vq_quantize

    def quantize(*args, **kwargs):
        ops.calls["vq_quantize"] += 1
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(fastmm.nn.vq, "vq_quantize", quantize)

    def attention(*args, **kwargs):
        ops.calls["attention"] += 1
        return fastmm.integrations.attention_forward(*args, **kwargs)

    def register(name):  # what patch registers, with the attention function counted
        fastmm.integrations.register_with_transformers(name)
        T.AttentionInterface.register(name, attention)

    monkeypatch.setattr(patch_module, "register_with_transformers", register)
    yield ops.calls
    fastmm.integrations.register_with_transformers()


def _attention_names(model) -> dict[str, str]:
    return {path: m.config._attn_implementation for path, m in model.named_modules() if isinstance(m, T.PreTrainedModel)}


EXPECTED_OPS = {
    "llama": {"modality_rms_norm", "linear", "attention"},
    "qwen2": {"modality_rms_norm", "linear", "attention"},
    "llava": {"modality_rms_norm", "modality_layer_norm", "linear", "attention"},
    "janus": {"modality_rms_norm", "modality_layer_norm", "linear", "attention", "vq_quantize"},
    "chameleon": {"modality_rms_norm", "modality_layer_norm", "linear", "attention", "vq_quantize"},
    "emu3": {"modality_rms_norm", "linear", "attention", "vq_quantize"},
}
CASES = [(arch, torch.float32) for arch in EXPECTED_OPS] + [("llama", torch.bfloat16)]


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_patched_matches_unpatched_and_unpatch_is_exact(arch, dtype, spy):
    model = build(arch, dtype)
    truth = run(copy.deepcopy(model).double(), arch, torch.float64)
    before = run(model, arch, dtype)
    params = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    names = _attention_names(model)

    report = fastmm.patch(model)
    spy.clear()
    patched = run(model, arch, dtype)
    assert EXPECTED_OPS[arch] <= set(spy), f"fastmm ops not called: {EXPECTED_OPS[arch] - set(spy)}; report:\n{report}"
    for key, value in patched.items():
        if value.is_floating_point():
            assert_error_ratio(f"{arch} {key}", value, before[key], truth[key])
        else:
            assert torch.equal(value, before[key]), f"{arch}: {key} differ"
    assert [name for name, _ in model.named_parameters()] == list(params)
    assert all(model.get_parameter(name) is p for name, p in params.items())  # the same Parameter objects
    assert all(torch.equal(p, values[name]) for name, p in params.items())

    fastmm.unpatch(model)
    after = run(model, arch, dtype)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert _attention_names(model) == names
    assert not any(name in m.__dict__ for m in model.modules()
                   for name in ("forward", "extra_repr", "_fastmm", "_kernel_repo"))  # fmt: skip


def test_report_and_print_show_the_swaps():
    model = build("chameleon")
    report = fastmm.patch(model)
    swapped = Counter(entry.what for entry in report.swapped)
    assert swapped["ops.modality_rms_norm"] == 5 and swapped["ops.modality_layer_norm(modality=head)"] == 4
    assert swapped["ops.linear"] == 15 and swapped["nn.VQCodebook"] == 1
    assert swapped["attention: AttentionInterface 'fastmm' (was 'sdpa')"] == 2  # the model and its decoder
    assert any(e.path == "model.vqmodel.encoder.mid.attn_1" and "AttentionInterface" in e.what for e in report.skipped)
    text = repr(model)
    assert "ChameleonRMSNorm((64,), eps=1e-05, fastmm=ops.modality_rms_norm)" in text
    assert "(q_norm): ChameleonLayerNorm((16,), eps=1e-05, elementwise_affine=True, bias=True, fastmm=ops.modality_layer_norm(modality=head))" in text
    assert "Linear(in_features=64, out_features=128, bias=False, fastmm=ops.linear)" in text
    lines = text.splitlines()
    quantizer = next(i for i, line in enumerate(lines) if "(quantize): ChameleonVQVAEVectorQuantizer(" in line)
    assert lines[quantizer + 1].strip() == "fastmm=nn.VQCodebook"
    assert text.startswith("ChameleonForConditionalGeneration(\n  fastmm=attn_implementation='fastmm'")
    fastmm.unpatch(model)
    assert "fastmm" not in repr(model)


def test_kernel_aware_norms_go_through_the_kernels_package():
    """transformers marks its RMSNorms kernel-aware; with the kernels package installed they are swapped by
    kernels.kernelize with fastmm's layer (and only they: the rest of the model keeps no kernel repository)."""
    pytest.importorskip("kernels")
    if getattr(T.models.llama.modeling_llama.LlamaRMSNorm, "kernel_layer_name", None) != "RMSNorm":
        pytest.skip("the installed kernels release is outside the range this transformers accepts: no hook to use")
    model = build("llama")
    fastmm.patch(model)
    norms = [m for m in model.modules() if isinstance(m, T.models.llama.modeling_llama.LlamaRMSNorm)]
    assert norms and all(str(m.__dict__.get("_kernel_repo")) == "fastmm (RMSNorm)" for m in norms)
    assert "LlamaRMSNorm((64,), eps=1e-06, fastmm=ops.modality_rms_norm via kernels.kernelize)" in repr(model)
    assert not any("_kernel_repo" in m.__dict__ for m in model.modules() if m not in norms)
    x = torch.randn(2, 3, 64)
    assert_error_ratio("kernelized norm", norms[0](x), type(norms[0]).forward(norms[0], x),
                       type(norms[0]).forward(copy.deepcopy(norms[0]).double(), x.double()))  # fmt: skip
    fastmm.unpatch(model)
    assert not any("_kernel_repo" in m.__dict__ or "forward" in m.__dict__ for m in norms)


def test_patching_twice_is_idempotent():
    model = build("llava")
    first = fastmm.patch(model)
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    second = fastmm.patch(model)
    assert second == first
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    fastmm.unpatch(model)
    assert _attention_names(model)["model.language_model"] == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_unknown_model_types_are_patched_by_structure_and_reported(caplog):
    """Mistral: its RMSNorm recognized by structure. Gemma: its RMSNorm scales by 1 + weight, so the probe refuses
    it. A bare nn.Module: no attention to name. None of them raises."""
    for arch in ("mistral", "gemma"):
        model = build(arch)
        truth, before = run(copy.deepcopy(model).double(), arch, torch.float64), run(model, arch, torch.float32)
        with caplog.at_level(logging.INFO, logger="fastmm"):
            report = fastmm.patch(model)
        assert any(f"model_type {arch!r} has no plan" in e.what for e in report.skipped)
        assert f"fastmm.patch({type(model).__name__})" in caplog.text
        swapped = {e.what for e in report.swapped}
        assert "ops.linear" in swapped and "attention: AttentionInterface 'fastmm' (was 'sdpa')" in swapped
        norms = [e for e in report.swapped + report.skipped if "RMSNorm" in e.what or e.what == "ops.modality_rms_norm"]
        if arch == "mistral":
            assert {e.what for e in norms} == {"ops.modality_rms_norm"}
        else:
            assert norms and all("is not ops.modality_rms_norm's" in e.what for e in norms)
        assert_error_ratio(arch, run(model, arch, torch.float32)["logits"], before["logits"], truth["logits"])
        fastmm.unpatch(model)
        assert torch.equal(run(model, arch, torch.float32)["logits"], before["logits"])

    bare = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GroupNorm(2, 8))
    report = fastmm.patch(bare)
    assert [e.what for e in report.swapped] == ["ops.linear", "ops.modality_layer_norm"]
    assert {e.what.split(":")[0] for e in report.skipped} >= {"GroupNorm", "attention"}
    fastmm.unpatch(bare)


# ------------------------------------------------------------------------------------- Janus image generation


@pytest.fixture(scope="module")
def janus():
    """The tiny Janus model (presets), with a short image (transformers and the route both read the token count at
    every call); the expected transformers outputs are computed before patching."""
    model = build("janus")
    model.model.vision_model.config.num_image_tokens = 24
    prompt = torch.tensor([PROMPT])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=False,
                            guidance_scale=5.0)  # fmt: skip
    penalized = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                               do_sample=False, repetition_penalty=1.5)  # fmt: skip
    return model, prompt, {"greedy": greedy, "penalized": penalized}


def test_janus_image_generation_runs_on_fastmm_with_transformers_greedy_tokens(janus, monkeypatch):
    model, prompt, expected = janus
    calls = []
    monkeypatch.setattr(janus_module, "generate_image", lambda *a, **k: calls.append(k) or fastmm.runtime.generate_image(*a, **k))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    fastmm.patch(model)
    try:
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                do_sample=False, guidance_scale=5.0)  # fmt: skip
        assert calls and calls[0]["temperature"] == 0.0 and calls[0]["cfg_scale"] == 5.0
        assert torch.equal(tokens, expected["greedy"])
        torch.manual_seed(3)
        sampled = model.generate(torch.cat([prompt, prompt]), generation_mode="image", do_sample=True, top_k=50,
                                 top_p=0.9, temperature=0.8, num_return_sequences=2)  # fmt: skip
        torch.manual_seed(3)
        again = model.generate(torch.cat([prompt, prompt]), generation_mode="image", do_sample=True, top_k=50,
                               top_p=0.9, temperature=0.8, num_return_sequences=2)  # fmt: skip
        assert calls[-1] == {"cfg_scale": 5.0, "num_images": 2, "decode_pixels": False, "temperature": 0.8, "top_k": 50, "top_p": 0.9}
        assert sampled.shape == (4, 24) and sampled.dtype == torch.int64 and torch.equal(sampled, again)
        assert 0 <= int(sampled.min()) and int(sampled.max()) < model.config.vq_config.num_embeddings
        assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    finally:
        fastmm.unpatch(model)
    assert "generate" not in model.__dict__


def test_janus_falls_back_to_transformers_with_the_reason_logged(janus, caplog):
    """What fastmm's sampler does not apply runs transformers' own loop, its language model on "fastmm" attention
    (transformers' image loop moves the prepared mask with .to(device): MaskLayout.to)."""
    model, prompt, expected = janus
    fastmm.patch(model)
    try:
        with caplog.at_level(logging.WARNING, logger="fastmm"):
            penalized = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                       do_sample=False, repetition_penalty=1.5)  # fmt: skip
            assert torch.equal(penalized, expected["penalized"])
            processor = T.LogitsProcessorList([T.TemperatureLogitsWarper(0.5)])
            custom = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                    do_sample=False, logits_processor=processor)  # fmt: skip
            assert torch.equal(custom, expected["greedy"])  # a temperature does not move an argmax
            full = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                  do_sample=False, return_dict_in_generate=True)  # fmt: skip
            assert torch.equal(full.sequences, expected["greedy"])
        for reason in ("['RepetitionPenaltyLogitsProcessor']", "a custom logits_processor (['TemperatureLogitsWarper'])",
                       "return_dict_in_generate=True"):  # fmt: skip
            assert reason in caplog.text
    finally:
        fastmm.unpatch(model)

