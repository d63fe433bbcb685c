"""The fused decode step (fastmm.ops.decode_layer; native: one C++ call per decoder layer) against the Python layer
loop of Decoder.forward it replaces on CPU: hidden states, KV cache contents and lengths over several decode
steps, greedy image tokens, the runners' lifetime, and clear errors for what it cannot run."""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import pickle

import pytest
import torch
from torch import nn

from fastmm import use_backend
from fastmm.models import UnifiedModel, presets
from fastmm.native.decode_layer import DecodeLayerRunner
from fastmm.ops._dispatch import _implementation
from fastmm.reference import decode_layer as reference
from fastmm.runtime import generate_image
from fastmm.kv_cache import KVCache

CONFIGS = {
    "gqa": {},  # the tiny preset: 4 q heads over 2 kv heads, head_dim 16
    "mha": dict(num_kv_heads=4),
    "odd_sizes": dict(hidden_size=72, num_heads=3, num_kv_heads=1, head_dim=24, intermediate_size=100),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


# Runner against the Python path, per dtype: (tolerance, share of elements that must be bit-identical). fp32
# differs only where SiLU's exp does (an ulp now and then, carried by later layers). In 16 bits the runner
# rounds where the Python layers round, so nearly every element is identical (all of them on the development
# host); an exp ulp may flip one rounding now and then, by one 16-bit ulp (bf16 2^-8, fp16 2^-11 relative).
# A missed rounding point would change a large share of the elements.
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (2**-7, 0.99), torch.float16: (2**-10, 0.99)}


def assert_matches(native: torch.Tensor, python: torch.Tensor, dtype: torch.dtype) -> None:
    tol, identical = TOLERANCE[dtype]
    torch.testing.assert_close(native, python, rtol=tol, atol=tol)
    share = (native == python).float().mean().item()
    assert share >= identical, f"only {share:.1%} of the elements are bit-identical to the Python path's"


def random_decoder(dtype: torch.dtype = torch.float32, **overrides):
    """The decoder of a random tiny-preset UnifiedModel in ``dtype`` with ``overrides``, norm weights drawn too
    (the RoPE tables stay fp32, as from_pretrained leaves them)."""
    config = dataclasses.replace(presets.demo_config("tiny"), vision=None, image_gen=None, vq=None, **overrides)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval().to(dtype)
    model.rebuild_buffers("cpu")
    decoder = model.decoder
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return decoder


def prefilled(decoder, batch: int = 2, max_len: int = 12) -> KVCache:
    """A cache after a 5-token random prompt, row 1 then cut to 4 tokens (rows of different lengths, as a
    conditional and an unconditional prompt) of which its layers keep 3, 2, ... (as a pruned prefill leaves
    them: each layer's own length, the RoPE position past all of them)."""
    cache = decoder.new_cache(batch, max_len)
    prompt = torch.randn(batch, 5, decoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(decoder.embed_tokens.weight.dtype)
    with torch.no_grad():
        decoder(prompt, torch.zeros(batch, 5, dtype=torch.int64), cache, prefill=True)
    cache.positions[1] = 4
    cache.lengths[:, 1] = torch.arange(3, 3 - cache.lengths.shape[0], -1).clamp(min=1)
    return cache


def runner(decoder, cache: KVCache, batch: int) -> DecodeLayerRunner:
    """The native runner over ``decoder``'s layers, built directly (the fused step builds it the same way)."""
    return DecodeLayerRunner(decoder.decode_layer_weights(), decoder.config.num_heads, cache, decoder.rope_cos,
                             decoder.rope_sin, batch)  # fmt: skip


def uses_runner(decoder, cache: KVCache) -> bool:
    token = torch.zeros(cache.k.shape[1], 1, decoder.config.hidden_size, dtype=cache.k.dtype)
    return isinstance(decoder._fused_decode_runner(token, cache, False), DecodeLayerRunner)


@torch.no_grad()
@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tokens", [1, 3], ids=["one-token", "window-3"])
def test_runner_matches_the_python_path(name, dtype, tokens, monkeypatch):
    decoder = random_decoder(dtype, **CONFIGS[name])
    native_cache, python_cache = prefilled(decoder), prefilled(decoder)
    B, H = 2, decoder.config.hidden_size
    modality = torch.zeros(B, tokens, dtype=torch.int64)
    generator = torch.Generator().manual_seed(2)
    native, python = [], []
    for _ in range(6 // tokens):
        token = torch.randn(B, tokens, H, generator=generator).to(dtype)
        native.append(decoder(token, modality, native_cache, prefill=False))
        with monkeypatch.context() as patch:
            patch.setattr(decoder, "_fused_decode_runner", lambda *args: None)
            python.append(decoder(token, modality, python_cache, prefill=False))
    assert uses_runner(decoder, native_cache)
    assert_matches(torch.cat(native, dim=1), torch.cat(python, dim=1), dtype)
    assert torch.equal(native_cache.lengths, python_cache.lengths)
    assert_matches(native_cache.k, python_cache.k, dtype)
    assert_matches(native_cache.v, python_cache.v, dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tokens", [1, 3], ids=["one-token", "window-3"])
def test_reference_matches_the_python_path(name, dtype, tokens, monkeypatch):
    """The reference, written from the formulas, against the decoder's layer loop (modules on ops), and the
    native runner against the reference, over several steps into caches of rows of different lengths."""
    decoder = random_decoder(dtype, **CONFIGS[name])
    caches = {"reference": prefilled(decoder), "python": prefilled(decoder), "native": prefilled(decoder)}
    B, H = 2, decoder.config.hidden_size
    modality = torch.zeros(B, tokens, dtype=torch.int64)
    generator = torch.Generator().manual_seed(3)
    outputs = {key: [] for key in caches}
    for _ in range(max(4 // tokens, 2)):
        token = torch.randn(B, tokens, H, generator=generator).to(dtype)
        with use_backend("reference"):
            outputs["reference"].append(decoder(token, modality, caches["reference"], prefill=False))
        outputs["native"].append(decoder(token, modality, caches["native"], prefill=False))
        with monkeypatch.context() as patch:
            patch.setattr(decoder, "_fused_decode_runner", lambda *args: None)
            outputs["python"].append(decoder(token, modality, caches["python"], prefill=False))
    with use_backend("reference"):
        assert isinstance(decoder._fused_decode_runner(token, caches["reference"], False), reference.DecodeLayerRunner)
    # The reference rounds the MLP product once (fp32 SiLU times up), the layers twice: 16-bit results differ
    # by an ulp or two, so no share of identical elements is asked of them.
    tol = TOLERANCE[dtype][0] * (1 if dtype == torch.float32 else 4)
    for other in ("python", "native"):
        torch.testing.assert_close(torch.cat(outputs[other], 1), torch.cat(outputs["reference"], 1), rtol=tol, atol=tol)
        torch.testing.assert_close(caches[other].k, caches["reference"].k, rtol=tol, atol=tol)
        torch.testing.assert_close(caches[other].v, caches["reference"].v, rtol=tol, atol=tol)
        assert torch.equal(caches[other].lengths, caches["reference"].lengths)


def test_runner_types_share_one_interface():
    for method in ("__init__", "run"):
        native, ref = (inspect.signature(getattr(cls, method)) for cls in (DecodeLayerRunner, reference.DecodeLayerRunner))
        assert list(native.parameters) == list(ref.parameters), method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_greedy_image_tokens_equal_the_python_path(dtype, monkeypatch):
    torch.manual_seed(0)
    model = UnifiedModel(presets.demo_config("tiny")).eval().to(dtype)
    model.rebuild_buffers("cpu")
    prompt = [presets.BOS, 10, 11, 12, 13, presets.BOI]
    steps = []
    run = DecodeLayerRunner.run
    monkeypatch.setattr(DecodeLayerRunner, "run", lambda self, *args: steps.append(1) or run(self, *args))
    native = generate_image(model, prompt, temperature=0.0, decode_pixels=False).tokens
    assert len(steps) == native.shape[1]  # the runner ran the short prompt and every decode step
    monkeypatch.setattr(model.decoder, "_fused_decode_runner", lambda *args: None)
    python = generate_image(model, prompt, temperature=0.0, decode_pixels=False).tokens
    assert torch.equal(native, python)


@torch.no_grad()
def test_python_path_where_the_runner_does_not_apply():
    decoder = random_decoder()
    cache = prefilled(decoder)
    token = torch.zeros(2, 1, decoder.config.hidden_size)
    assert decoder._fused_decode_runner(token, cache, prefill=True) is None
    window = decoder._fused_decode_runner(torch.zeros(2, 2, decoder.config.hidden_size), cache, False)
    assert window.tokens == 2  # several tokens per row (a speculative window) run fused too
    assert decoder._fused_decode_runner(token.double(), cache, False) is None
    with torch.enable_grad():
        assert decoder._fused_decode_runner(token, cache, False) is None
    with use_backend("reference"):  # the reference has a runner: the functional spec
        assert isinstance(decoder._fused_decode_runner(token, cache, False), reference.DecodeLayerRunner)
    assert _implementation("triton", "decode_layer", "DecodeLayerRunner") is None  # triton: the layer loop
    decoder.rope_cos = decoder.rope_cos.bfloat16()  # as a module-wide .to(torch.bfloat16) leaves it
    assert decoder._fused_decode_runner(token, cache, False) is None
    adaptive = random_decoder(modality_adaptive=True)
    assert adaptive._fused_decode_runner(token, prefilled(adaptive), False) is None


@torch.no_grad()
def test_runners_are_per_cache_and_never_copied():
    decoder = random_decoder()
    cache, other = prefilled(decoder), prefilled(decoder)
    token = torch.zeros(2, 1, decoder.config.hidden_size)
    runner = decoder._fused_decode_runner(token, cache, False)
    assert decoder._fused_decode_runner(token, cache, False) is runner
    assert decoder._fused_decode_runner(token, other, False) is not runner
    cache.reset()
    decoder(torch.zeros(2, 5, decoder.config.hidden_size), torch.zeros(2, 5, dtype=torch.int64), cache, prefill=True)
    assert decoder._fused_decode_runner(token, cache, False) is not runner  # a new sequence, a new runner
    for clone in (copy.deepcopy(decoder), pickle.loads(pickle.dumps(decoder))):
        assert len(clone.decode_runners) == 0  # the pointers belong to the original's tensors
    del cache, other
    gc.collect()
    assert len(decoder.decode_runners) == 0  # runners die with their caches


def transposed_down_proj(decoder):
    down = decoder.layers[1].mlp.down_proj
    down.weight = nn.Parameter(down.weight.t().contiguous().t())  # same shape, column-major


def double_norm(decoder):
    norm = decoder.layers[0].input_norm
    norm.weight = nn.Parameter(norm.weight.double())


def bf16_gate_up(decoder):
    decoder.layers[1].mlp.gate_up_proj.bfloat16()


def narrow_o_proj(decoder):
    decoder.layers[0].attn.o_proj = nn.Linear(decoder.config.num_heads * decoder.config.head_dim, 8)


def half_rope_table(decoder):
    decoder.rope_cos = decoder.rope_cos[:, :8]


@pytest.mark.parametrize(
    "spoil, error",
    [
        (transposed_down_proj, r"layers\[1\]\.down must be a contiguous CPU torch.float32 tensor"),
        (double_norm, r"layers\[0\]\.input_norm must be a contiguous CPU torch.float32 tensor"),
        (bf16_gate_up, r"layers\[1\]\.gate_up must be a contiguous CPU torch.float32 .* got torch.bfloat16"),
        (narrow_o_proj, r"layers\[0\]\.o must be .* of shape \(64, 64\)"),
        (half_rope_table, r"rope_cos must be .* of shape \(2048, 16\)"),
    ],
)
def test_bad_decoders_are_refused(spoil, error):
    decoder = random_decoder()
    cache = decoder.new_cache(2, 8)
    spoil(decoder)
    with pytest.raises(ValueError, match=error):
        runner(decoder, cache, 2)


def test_unsupported_dtypes_are_refused():
    decoder = random_decoder().double()
    with pytest.raises(ValueError, match="weights' dtype must be float32, bfloat16 or float16, got torch.float64"):
        runner(decoder, decoder.new_cache(2, 8), 2)


def test_bad_caches_are_refused():
    decoder = random_decoder()
    config = decoder.config
    with pytest.raises(ValueError, match="batch must be the cache's batch, got 3"):
        runner(decoder, decoder.new_cache(2, 8), 3)
    with pytest.raises(ValueError, match="cache.k must be a contiguous CPU torch.float32 tensor"):
        runner(decoder, decoder.new_cache(2, 8, dtype=torch.bfloat16), 2)
    with pytest.raises(ValueError, match=r"cache.k must be .* of shape \(2, 2, 2, 8, 16\)"):
        runner(decoder, KVCache(3, 2, config.num_kv_heads, 8, config.head_dim), 2)
    too_long = KVCache(config.num_layers, 2, config.num_kv_heads, config.max_position_embeddings + 1, config.head_dim)
    with pytest.raises(ValueError, match="exceeds the RoPE tables' 2048 positions"):
        runner(decoder, too_long, 2)
    with pytest.raises(ValueError, match="routed kv_proj"):
        random_decoder(modality_adaptive=True).decode_layer_weights()


@torch.no_grad()
def test_bad_steps_are_refused():
    decoder = random_decoder()
    cache = prefilled(decoder, max_len=6)
    step = runner(decoder, cache, 2)
    token, modality = torch.zeros(2, 1, decoder.config.hidden_size), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"embeds must be a CPU torch.float32 tensor of shape \(2, 1, 64\)"):
        step.run(token[:1], modality)
    with pytest.raises(ValueError, match=r"embeds must be a CPU torch.float32 tensor .* got torch.bfloat16"):
        step.run(token.bfloat16(), modality)
    with pytest.raises(ValueError, match=r"modality must be a CPU int64 tensor of shape \(2, 1\)"):
        step.run(token, modality.int())
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 1\), got values in \[0, 1\]"):
        step.run(token, torch.tensor([[0], [1]]))
    step.run(token, modality)
    cache.advance(1)  # row 0 now holds 6 of 6 positions
    full = r"the cache is full or corrupt: lengths must be in \[0, max_len - 1 = 5\] before a decode step of 1 tokens"
    with pytest.raises(ValueError, match=full):
        step.run(token, modality)
