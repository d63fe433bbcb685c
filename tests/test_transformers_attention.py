"""fastmm as transformers' attention implementation: conformance with transformers' own sdpa function, eager
functions and mask builder (the oracles), argument by argument, then whole tiny models (Llama, Qwen2 with sliding
windows, Gemma 2 with softcapping, gpt-oss with sinks, a SigLIP vision tower) compared with sdpa / eager."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases

import fastmm

transformers = pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    or_masks,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from fastmm.integrations import MaskLayout, attention_forward, mask_layout, register_with_transformers  # noqa: E402
from fastmm.reference.attention import allowed_keys  # noqa: E402

NAME = register_with_transformers()


class Module(torch.nn.Module):
    """What an attention module shows the attention function: is_causal, GQA groups, training."""

    def __init__(self, is_causal=True, groups=2):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def _qkv(B=2, Hq=4, Hkv=2, Lq=7, S=7, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen),
            torch.randn(B, Hkv, S, d, generator=gen))  # fmt: skip


def _sdpa(module, q, k, v, mask, **kwargs):
    """transformers' own sdpa function in fp64: the oracle."""
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    if kwargs.get("position_bias") is not None:
        kwargs = {**kwargs, "position_bias": kwargs["position_bias"].double()}
    return sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask, **kwargs)[0]


def _assert_matches_sdpa(module, q, k, v, mask, backend="native", atol=2e-5, **kwargs):
    expected = _sdpa(module, q, k, v, mask, **kwargs)
    with fastmm.use_backend(backend):
        out, weights = attention_forward(module, q, k, v, mask, **kwargs)
    assert weights is None
    torch.testing.assert_close(out.double(), expected, rtol=atol, atol=atol)


# ------------------------------------------------------------------------------ the attention function


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("Lq,S", [(7, 7), (1, 9), (3, 9)])
def test_none_mask_is_what_sdpa_makes_of_it(backend, device, Lq, S):
    """None: causal (SDPA's top-left is_causal) for causal modules with Lq > 1, every key otherwise; the
    is_causal kwarg overrides the module. The issue's reproduction: is_causal=False used to run causally."""
    q, k, v = _qkv(Lq=Lq, S=S)
    for module, kwargs in [(Module(True), {}), (Module(False), {}), (Module(True), {"is_causal": False}),
                           (Module(False), {"is_causal": True})]:  # fmt: skip
        _assert_matches_sdpa(module, q, k, v, None, backend, **kwargs)
    q, k, v = (torch.randn(1, 4, 16, 64) for _ in range(3))
    _assert_matches_sdpa(Module(groups=1), q, k, v, None, backend, scaling=0.125, is_causal=False)


def _masks(B, Lq, S, seed):
    """4D masks transformers and users build: padding left / right / in the middle, block-diagonal packing, a
    shared prefix, random holes; bool and additive float (0 / finfo.min), broadcast shapes."""
    gen = torch.Generator().manual_seed(seed)
    causal = torch.ones(Lq, S, dtype=torch.bool).tril(S - Lq)
    left, right, middle = (causal.expand(B, Lq, S).clone() for _ in range(3))
    left[1, :, :3] = False
    right[1, :, S - 2 :] = False
    middle[0, :, S // 2] = False
    packed = torch.zeros(Lq, S, dtype=torch.bool)
    packed[:, : S // 2] = causal[:, : S // 2]
    packed[Lq // 2 :, S // 2 :] = causal[Lq // 2 :, S // 2 :]
    prefix = causal.clone()
    prefix[-2:, -4:-2] = False  # two branches after a shared prefix
    holes = torch.rand(B, Lq, S, generator=gen) > 0.4
    bools = {"left": left[:, None], "right": right[:, None], "middle": middle[:, None], "packed": packed[None, None],
             "prefix": prefix[None, None], "holes": holes[:, None], "decode row": causal[-1:][None, None]}  # fmt: skip
    masks = dict(bools)
    minimum = torch.finfo(torch.float32).min
    for name in ("left", "holes", "prefix"):
        masks[f"{name} float"] = torch.zeros(bools[name].shape).masked_fill(~bools[name], minimum)
    bias = torch.randn(B, 1, Lq, S, generator=gen)
    masks["bias with -inf"] = bias.masked_fill(~holes[:, None], float("-inf"))
    return masks


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("Lq,S", [(9, 9), (1, 9), (4, 11)])
def test_any_4d_mask_matches_sdpa(backend, device, Lq, S):
    q, k, v = _qkv(Lq=Lq, S=S, seed=Lq)
    for name, mask in _masks(2, Lq, S, seed=S).items():
        if mask.shape[-2] not in (1, Lq):
            continue
        try:
            _assert_matches_sdpa(Module(), q, k, v, mask, backend)
        except AssertionError as error:
            raise AssertionError(f"mask {name!r}: {error}") from None


def test_per_head_mask_and_position_bias_match_sdpa():
    q, k, v = _qkv(Lq=6, S=6)
    holes = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    _assert_matches_sdpa(Module(), q, k, v, holes)
    bias = torch.randn(1, 4, 6, 6)
    _assert_matches_sdpa(Module(), q, k, v, None, position_bias=bias)
    _assert_matches_sdpa(Module(), q, k, v, holes, position_bias=bias)


def test_softcap_matches_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv(Lq=5, S=8, seed=2)
    q = q * 4  # logits large enough for the cap to matter
    mask = _masks(2, 5, 8, seed=0)["left float"]
    expected = eager_attention_forward(Module(), q, k, v, mask, scaling=0.25, softcap=3.0)[0]
    out = attention_forward(Module(), q, k, v, mask, scaling=0.25, softcap=3.0)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Lq,S", [(6, 6), (1, 9)])
def test_sinks_match_gpt_oss_eager(Lq, S):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv(Lq=Lq, S=S, seed=3)
    module = Module()
    module.sinks = torch.nn.Parameter(torch.linspace(-1.0, 2.0, 4))
    mask = _masks(2, Lq, S, seed=1)["left float"][..., -Lq:, :]
    expected = eager_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    out = attention_forward(module, q, k, v, mask, scaling=0.25, s_aux=module.sinks)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_output_attentions_returns_eager_weights():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v = _qkv(Lq=6, S=6, seed=4)
    mask = _masks(2, 6, 6, seed=2)["middle"]
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    expected_out, expected_weights = eager_attention_forward(Module(), q, k, v, float_mask, scaling=0.25)
    out, weights = attention_forward(Module(), q, k, v, mask, scaling=0.25, output_attentions=True)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_only():
    """dropout runs in training (a different output, the no-dropout mean over many draws) and not in eval."""
    q, k, v = _qkv(B=1, Lq=4, S=4, d=8)
    module = Module().eval()
    plain = attention_forward(module, q, k, v, None)[0]
    torch.testing.assert_close(attention_forward(module, q, k, v, None, dropout=0.5)[0], plain)
    module.train()
    torch.manual_seed(0)
    draws = torch.stack([attention_forward(module, q, k, v, None, dropout=0.5)[0] for _ in range(2000)])
    assert not torch.allclose(draws[0], plain)
    torch.testing.assert_close(draws.mean(0), plain, rtol=0.1, atol=0.1)


def test_sliding_window_on_a_none_mask():
    q, k, v = _qkv(Lq=8, S=8, seed=5)
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    expected = _sdpa(Module(), q, k, v, window[None, None])
    out = attention_forward(Module(), q, k, v, None, sliding_window=3)[0]
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)


def test_bad_masks_are_refused_clearly():
    q, k, v = _qkv(Lq=5, S=5)
    with pytest.raises(ValueError, match=r"attention_mask must broadcast to \[B, 1, Lq, S\]"):
        attention_forward(Module(), q, k, v, torch.ones(2, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating point"):
        attention_forward(Module(), q, k, v, torch.ones(2, 1, 5, 5, dtype=torch.int64))


# ---------------------------------------------------------------------------------- the mask function


MASK_FUNCTIONS = {
    "causal": causal_mask_function,
    "bidirectional": bidirectional_mask_function,
    "sliding 3": sliding_window_causal_mask_function(3),
    "image block": or_masks(causal_mask_function, lambda b, h, q, kv: (q >= 2) & (q < 5) & (kv >= 2) & (kv < 5)),
    "and overlay": and_masks(causal_mask_function, lambda b, h, q, kv: kv % 3 != 1),
}


@pytest.mark.parametrize("name", MASK_FUNCTIONS)
@pytest.mark.parametrize("q_length,kv_length,q_offset,kv_offset", [(7, 7, 0, 0), (1, 9, 8, 0), (3, 12, 4, 0),
                                                                   (2, 6, 9, 4)])  # fmt: skip
def test_mask_layout_is_transformers_mask(name, q_length, kv_length, q_offset, kv_offset):
    """The layout's keys are exactly what transformers' sdpa mask builder allows, with and without padding."""
    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.long)
    padding[1, :2] = 0
    for attention_mask in (None, padding):
        kwargs = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                      mask_function=MASK_FUNCTIONS[name], attention_mask=attention_mask)  # fmt: skip
        expected = sdpa_mask(**kwargs, allow_is_causal_skip=False, use_vmap=name in ("image block", "and overlay"))
        layout = mask_layout(**kwargs, use_vmap=name in ("image block", "and overlay"))
        assert isinstance(layout, MaskLayout)
        keys = allowed_keys(layout.kv_start, layout.kv_end, kv_length, layout.key_keep, layout.mask)
        assert torch.equal(keys, expected.expand_as(keys)), name


def test_mask_layout_to_moves_and_rounds_like_a_dense_mask():
    """.to(device) keeps every part; .to(half) rounds the float mask as casting the dense mask would (values stay
    float32, -inf stays -inf); the ranges and key padding are not floating and keep their dtypes."""
    mask = torch.tensor([[[0.0, -1.0001, float("-inf")], [0.1, 0.0, -70000.0]]])
    layout = MaskLayout(torch.zeros(1, 2, dtype=torch.int32), torch.full((1, 2), 3, dtype=torch.int32),
                        torch.tensor([[True, True, False]]), mask)  # fmt: skip
    moved = layout.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(
        (moved.kv_start, moved.kv_end, moved.key_keep, moved.mask),
        (layout.kv_start, layout.kv_end, layout.key_keep, layout.mask)))  # fmt: skip
    half = layout.to(torch.float16)
    assert half.mask.dtype == torch.float32 and torch.equal(half.mask, mask.half().float())
    assert half.kv_end.dtype == torch.int32 and half.key_keep.dtype == torch.bool
    assert torch.equal(layout.to(device="cpu", dtype=torch.float32).mask, mask)
    with pytest.raises(ValueError, match="MaskLayout.to: memory_format"):
        layout.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- models


def _model(config, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _llama():
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _qwen2_sliding():
    return transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                    layer_types=["full_attention", "sliding_attention"])  # fmt: skip


def _gemma2():
    return transformers.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     attn_logit_softcapping=0.5, max_position_embeddings=64)  # fmt: skip


def _gpt_oss():
    return transformers.GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64)  # fmt: skip


MODELS = {"llama": (_llama, "sdpa"), "qwen2 sliding": (_qwen2_sliding, "sdpa"), "gemma2 softcap": (_gemma2, "eager"),
          "gpt-oss sinks": (_gpt_oss, "eager")}  # fmt: skip


def _run(model, implementation, ids, mask, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **kwargs).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=0) if mask is None or mask.dim() == 2 else None  # fmt: skip
    return logits, tokens


@pytest.mark.parametrize("name", MODELS)
def test_model_logits_and_generation_match(name):
    """Left padding, a zero inside the mask, no mask: logits within 1e-4 of the oracle, identical greedy tokens
    (generation decodes against a cache: decode_attention with padding)."""
    make_config, oracle = MODELS[name]
    model = _model(make_config())
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    masks = [torch.ones(2, 11, dtype=torch.long) for _ in range(2)]
    masks[0][1, :3] = 0
    masks[1][0, 5] = 0
    for mask in (*masks, None):
        expected_logits, expected_tokens = _run(model, oracle, ids, mask)
        logits, tokens = _run(model, NAME, ids, mask)
        keep = (mask if mask is not None else torch.ones(2, 11)).bool()
        torch.testing.assert_close(logits[keep], expected_logits[keep], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tokens, expected_tokens)


def test_custom_4d_mask_and_packed_sequences_match_sdpa():
    """A shared-prefix 4D mask (transformers' test_custom_4d_attention_mask) and packed sequences given by
    position ids alone."""
    model = _model(_llama())
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    prefix = torch.ones(10, 10, dtype=torch.bool).tril()
    prefix[6:, 3:6] = False  # a second continuation of the 3-token prefix, beside the first
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~prefix, torch.finfo(torch.float32).min)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 6]])
    expected, _ = _run(model, "sdpa", ids, mask, position_ids=positions)
    logits, _ = _run(model, NAME, ids, mask, position_ids=positions)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    expected, _ = _run(model, "sdpa", ids, None, position_ids=packed)
    logits, _ = _run(model, NAME, ids, None, position_ids=packed)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_right_padded_generation_and_static_cache_match_sdpa():
    model = _model(_llama())
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: the new tokens see the prompt, the gap, then themselves
    for kwargs in ({}, {"cache_implementation": "static"}):
        outputs = {}
        for implementation in ("sdpa", NAME):
            model.set_attn_implementation(implementation)
            outputs[implementation] = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                                     pad_token_id=0, **kwargs)  # fmt: skip
        torch.testing.assert_close(outputs[NAME], outputs["sdpa"])


def test_vision_tower_is_bidirectional():
    """A SigLIP vision tower (is_causal False, no mask) matches sdpa: the bug this issue reported ran it
    causally."""
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(pixels).last_hidden_state
        model.set_attn_implementation(NAME)
        out = model(pixels).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_training_gradients_match_sdpa():
    model = _model(_llama())
    model.train()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    grads = {}
    for implementation in ("sdpa", NAME):
        model.zero_grad()
        model.set_attn_implementation(implementation)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads[implementation] = [p.grad.clone() for p in model.parameters()]
    for ours, theirs in zip(grads[NAME], grads["sdpa"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_forward_compiles_with_fullgraph():
    """The mask layout and attention trace without a graph break or a host read of tensor values."""
    model = _model(_llama())
    model.set_attn_implementation(NAME)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        out = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
