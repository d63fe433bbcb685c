"""UnifiedModel against transformers' Janus on a tiny random-weight checkpoint built offline and saved with
save_pretrained: loading, every part's output, and clear errors for bad checkpoints and inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastmm.models import UnifiedModel, convert, presets

transformers = pytest.importorskip("transformers")


PROMPT = torch.tensor([[presets.BOS, 10, 11, 12, 13, 14, presets.BOI]])


@torch.no_grad()
def test_prefill_logits_match_transformers(model, hf_model):
    expected = hf_model(input_ids=PROMPT).logits
    hidden_expected = hf_model.model.language_model(input_ids=PROMPT).last_hidden_state
    cache = model.decoder.new_cache(1, 16)
    hidden = model.decoder(model.embed_prompt(PROMPT), torch.zeros_like(PROMPT), cache, prefill=True)
    logits = model.text_logits(hidden)
    image_logits = model.image_logits(hidden)
    torch.testing.assert_close(hidden, hidden_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_logits, hf_model.model.generation_head(hidden_expected), rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [[PROMPT.shape[1]]] * model.config.num_layers
    assert cache.positions.tolist() == [PROMPT.shape[1]]


@torch.no_grad()
def test_bf16_prefill_is_as_accurate_as_transformers_bf16(janus_dir, hf_model):
    """bf16 tolerance by error ratio: fastmm's bf16 logits may be at most twice as far from the fp32 logits as
    transformers' own bf16 run, plus a small floor."""
    expected = hf_model(input_ids=PROMPT).logits
    theirs = transformers.JanusForConditionalGeneration.from_pretrained(str(janus_dir), dtype=torch.bfloat16).eval()
    their_error = (theirs(input_ids=PROMPT).logits.float() - expected).abs().max()
    ours = UnifiedModel.from_pretrained(janus_dir, dtype=torch.bfloat16)
    hidden = ours.decoder(ours.embed_prompt(PROMPT), torch.zeros_like(PROMPT), ours.decoder.new_cache(1, 16), prefill=True)
    our_error = (ours.text_logits(hidden).float() - expected).abs().max()
    assert our_error <= 2 * their_error + 1e-2, f"fastmm bf16 error {our_error:.3g} vs transformers bf16 {their_error:.3g}"


@torch.no_grad()
def test_decode_steps_continue_the_prefill(model):
    """Prefill of L tokens == prefill of L - 2 tokens then two single-token decode steps (KV cache path)."""
    embeds = model.embed_prompt(PROMPT)
    full_cache = model.decoder.new_cache(1, 16)
    full = model.decoder(embeds, torch.zeros_like(PROMPT), full_cache, prefill=True)
    cache = model.decoder.new_cache(1, 16)
    parts = [model.decoder(embeds[:, :-2], torch.zeros_like(PROMPT[:, :-2]), cache, prefill=True)]
    for t in (-2, -1):
        parts.append(model.decoder(embeds[:, t:t + 1 if t + 1 else None], torch.zeros_like(PROMPT[:, :1]), cache, prefill=False))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generation_table_is_the_aligned_embedding(model, hf_model):
    ids = torch.tensor([[0], [7], [16383]])
    expected = hf_model.prepare_embeddings_for_image_generation(ids)[:, 0]
    torch.testing.assert_close(model.image_embeds(ids[:, 0]), expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_vq_decode_and_encode_match_transformers(model, hf_model):
    tokens = torch.randint(0, 16384, (2, 576), generator=torch.Generator().manual_seed(1))
    expected = hf_model.decode_image_tokens(tokens).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.decode_image_tokens(tokens), expected, rtol=1e-4, atol=1e-4)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    expected_tokens = hf_model.model.vqmodel.encode(pixels).image_tokens.view(1, -1)
    assert torch.equal(model.vq.encode(pixels), expected_tokens)


@torch.no_grad()
def test_vision_features_match_transformers(model, hf_model):
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(3))
    expected = hf_model.model.get_image_features(pixels).pooler_output
    torch.testing.assert_close(model.vision(pixels), expected, rtol=1e-5, atol=1e-5)


def test_config_mapping(janus_dir):
    config = convert.config_from_janus(convert.read_json(janus_dir / "config.json"),
                                       convert.read_json(janus_dir / "generation_config.json"))  # fmt: skip
    text = presets.janus_config_dict("tiny")["text_config"]
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"])
    assert (config.bos_token_id, config.pad_token_id, config.boi_token_id) == (presets.BOS, presets.PAD, presets.BOI)
    assert config.image_gen.num_image_tokens == 576 and config.vq.grid == 24


def test_bf16_load_casts_every_weight(janus_dir):
    model = UnifiedModel.from_pretrained(janus_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.gen_table.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ bad input


def _copy(janus_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(janus_dir, target)
    return target


def test_missing_directory_and_files(janus_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        UnifiedModel.from_pretrained(tmp_path / "nowhere")
    broken = _copy(janus_dir, tmp_path)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        UnifiedModel.from_pretrained(broken)


def test_pickled_weights_are_refused(janus_dir, tmp_path):
    broken = _copy(janus_dir, tmp_path)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights"):
        UnifiedModel.from_pretrained(broken)


def test_unknown_architecture(janus_dir, tmp_path):
    broken = _copy(janus_dir, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"], config["architectures"] = "chameleon", ["ChameleonForConditionalGeneration"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture"):
        UnifiedModel.from_pretrained(broken)


def test_missing_tensor(janus_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = _copy(janus_dir, tmp_path)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.language_model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing .*layers.1.mlp.down_proj"):
        UnifiedModel.from_pretrained(broken)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_file_is_named(janus_dir, tmp_path, damage):
    broken = _copy(janus_dir, tmp_path)
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        UnifiedModel.from_pretrained(broken)


def _with_tensor(janus_dir, tmp_path, name, make):
    """A copy of the checkpoint whose tensor ``name`` is replaced by make(tensor)."""
    from safetensors.torch import load_file, save_file

    broken = _copy(janus_dir, tmp_path)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors[name] = make(tensors[name])
    save_file(tensors, str(broken / "model.safetensors"))
    return broken


@pytest.mark.parametrize(
    "name,make,words",
    [
        ("model.language_model.layers.1.mlp.down_proj.weight", lambda t: t[:, :-1].contiguous(),
         r"layers\.1\.mlp\.down_proj\.weight: \(\d+, \d+\) torch\.float32, expected"),
        ("model.language_model.layers.0.mlp.down_proj.weight", lambda t: t.to(torch.int32),
         r"layers\.0\.mlp\.down_proj\.weight: .* torch\.int32, expected"),
        ("model.language_model.layers.0.self_attn.k_proj.weight", lambda t: t[:, :-2].contiguous(),
         r"do not stack"),
    ],
    ids=["shape", "dtype", "fused part"],
)  # fmt: skip
def test_tensor_of_the_wrong_shape_or_dtype_is_named(janus_dir, tmp_path, name, make, words):
    broken = _with_tensor(janus_dir, tmp_path, name, make)
    with pytest.raises(ValueError, match=words):
        UnifiedModel.from_pretrained(broken)


def test_config_that_contradicts_the_weights(janus_dir, tmp_path):
    broken = _copy(janus_dir, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match its config .*mlp"):
        UnifiedModel.from_pretrained(broken)


def test_prompt_ids_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 256\)"):
        model.embed_prompt(torch.tensor([[1, 256]]))
    with pytest.raises(TypeError, match="input_ids must hold integer ids"):
        model.embed_prompt(torch.tensor([[1.0, 2.0]]))


def test_image_placeholder_count_is_checked(model):
    ids = torch.tensor([[presets.BOS] + [presets.IMAGE] * 10])
    with pytest.raises(ValueError, match="10 image_token_id"):
        model.embed_prompt(ids, torch.zeros(1, 3, 384, 384))


@torch.no_grad()
def test_modality_adaptive_decoder_routes_norms_and_kv_by_modality():
    """mPLUG-Owl2 switch: with the image weights equal to the text weights the modality ids change nothing;
    changing the image weights changes the image positions and what follows, never the text before them."""
    import dataclasses

    config = dataclasses.replace(presets.demo_config("tiny"), modality_adaptive=True, vision=None, image_gen=None, vq=None)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    routed = [p for name, p in model.named_parameters() if name.endswith(("norm.weight", "kv_proj.weight"))]
    assert routed and all(p.shape[0] == 2 for p in routed)
    for p in routed:
        p[1] = p[0]
    ids = torch.tensor([[presets.BOS, 10, 11, 12, 13, 14]])
    modality = torch.tensor([[0, 0, 1, 1, 0, 0]])

    def run(modality):
        cache = model.decoder.new_cache(1, 8)
        return model.decoder(model.embed_prompt(ids), modality, cache, prefill=True)

    torch.testing.assert_close(run(modality), run(torch.zeros_like(modality)))
    for p in routed:
        p[1] += 0.5
    changed = (run(modality) - run(torch.zeros_like(modality))).abs().amax(dim=-1)[0]
    assert changed[:2].max() == 0 and changed[2:].min() > 0
