"""Value checks without a host sync (fastmm._validate): on CPU tensors they read the values and name them; on
CUDA tensors they are device-side asserts (torch._assert_async), or host reads with the exact values under
FASTMM_CHECK_VALUES=host. On this CPU machine the device branch runs on CPU tensors, where torch._assert_async
raises at once; with CUDA, every op and the decode loops run eagerly under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmm
from fastmm import _validate as v

ops = fastmm.ops
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def device_mode(monkeypatch):
    """Checks on CPU tensors take the branch CUDA tensors take by default: torch._assert_async."""
    monkeypatch.setattr(v, "value_check_mode", lambda t: "device")


# ------------------------------------------------------------------------------------------- CPU


def test_assert_on_device_passes_true_and_raises_false_with_the_message():
    v.assert_on_device(torch.tensor([True, True]), "op: x must be in [0, 2)")
    with pytest.raises(RuntimeError, match=r"op: x must be in \[0, 2\) \(device-side check; FASTMM_CHECK_VALUES=host"):
        v.assert_on_device(torch.tensor([True, False]), "op: x must be in [0, 2)")


def test_assert_on_device_clips_a_message_longer_than_the_kernel_buffer():
    """torch._assert_async refuses messages of 255 bytes or more; the helper clips instead of failing a valid call."""
    long = "op: " + "x" * 400
    v.assert_on_device(torch.tensor(True), long)
    with pytest.raises(RuntimeError) as info:
        v.assert_on_device(torch.tensor(False), long)
    assert str(info.value).startswith(long[:200]) and "x" * 260 not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_device_id_range_is_exact_for_narrow_dtypes(device_mode, dtype):
    """A bound past the dtype's range (an int8 id against 16384 codes) must not wrap in the comparison."""
    v.check_id_range("op", "ids", torch.tensor([0, 3, 100], dtype=dtype), 16384, "K")
    v.check_id_range("op", "ids", torch.tensor([0, 3, 100], dtype=dtype), 101, "K")
    with pytest.raises(RuntimeError, match=r"op: ids must be in \[0, 100\) \(K\)"):
        v.check_id_range("op", "ids", torch.tensor([0, 3, 100], dtype=dtype), 100, "K")


def test_device_id_range_catches_negative_ids(device_mode):
    with pytest.raises(RuntimeError, match=r"op: ids must be in \[0, 4\)"):
        v.check_id_range("op", "ids", torch.tensor([[0, -1], [2, 3]]), 4, "M")


def test_device_checks_through_the_ops(device_mode):
    x, weight = torch.randn(3, 8), torch.randn(2, 8)
    good, bad = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 1])
    ops.modality_rms_norm(x, good, weight)
    for call, message in [
        (lambda: ops.modality_rms_norm(x, bad, weight), r"modality_rms_norm: modality must be in \[0, 2\)"),
        (lambda: ops.modality_layer_norm(x, bad, weight), r"modality_layer_norm: modality must be in \[0, 2\)"),
        (lambda: ops.routed_linear(x, bad, torch.randn(2, 4, 8)), r"routed_linear: modality must be in \[0, 2\)"),
        (lambda: ops.vq_embed(torch.tensor([5, 300]), torch.randn(300, 4)), r"vq_embed: indices must be in \[0, 300\)"),
        (lambda: ops.vq_quantize(torch.randn(4, 8), torch.full((5, 8), float("nan"))),
         r"vq_quantize: codebook must be finite \(no NaN or inf\)"),
    ]:  # fmt: skip
        with pytest.raises(RuntimeError, match=message):
            call()


def test_device_finite_check_passes_a_finite_fp16_whose_sum_overflows(device_mode):
    v.check_finite("op", "codebook", torch.full((4, 8), 60000.0, dtype=torch.float16))


def test_host_messages_name_the_values():
    """CPU tensors are read on the host (with or without the flag): the message holds the offending values."""
    x, weight = torch.randn(3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError) as info:
        ops.modality_rms_norm(x, torch.tensor([0, 5, -1]), weight)
    expected = "modality_rms_norm: modality must be in [0, 2) (M = weight.shape[0]), got values in [-1, 5]"
    assert str(info.value) == expected
    codebook = torch.randn(5, 8)
    codebook[1, 2], codebook[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError) as info:
        ops.vq_quantize(torch.randn(4, 8), codebook)
    assert str(info.value) == (
        "vq_quantize: codebook must be finite, got 2 NaN or inf entries in shape (5, 8), dtype torch.float32, "
        "device cpu"
    )


def test_check_mode_by_device_flag_and_tracing(monkeypatch):
    monkeypatch.delenv(v.CHECK_VALUES_ENV, raising=False)
    assert v.cuda_check_mode() == "device"
    monkeypatch.setenv(v.CHECK_VALUES_ENV, " host ")
    assert v.cuda_check_mode() == "host"
    monkeypatch.setenv(v.CHECK_VALUES_ENV, "off")
    with pytest.raises(ValueError, match=r"FASTMM_CHECK_VALUES: expected one of \('device', 'host'\), got 'off'"):
        v.cuda_check_mode()
    assert v.value_check_mode(torch.zeros(2)) == "host"  # CPU: the flag plays no part
    assert v.value_check_mode(torch.zeros(2, device="meta")) is None

    def traced(x):
        return x + (1 if v.value_check_mode(x) is None else 0)

    assert torch.equal(torch.compile(traced, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))


# ------------------------------------------------------------------------------------------- CUDA


OPS = ("modality_rms_norm", "modality_layer_norm", "routed_linear", "vq_quantize", "vq_embed", "linear_decode",
       "linear_prefill", "cfg_sample", "span_attention_causal", "span_attention_ranges", "decode_attention")


def _op_calls(device: str) -> dict:
    """One valid eager call of every public op (decode- and prefill-sized). Every input is built here, outside
    the calls: a tensor made from host data inside one would be a synchronizing copy itself."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    x, residual, weight, bias = randn(2, 3, 64), randn(2, 3, 64), randn(2, 64), randn(2, 64)
    modality = torch.tensor([[0, 1, 1], [1, 0, 0]], device=device)
    rows, routed_weight = randn(5, 64), randn(2, 32, 64)
    z, codes, indices = randn(2, 8, 3, 5), randn(300, 8), torch.tensor([[3, 299]], device=device)
    linear_weight, prefill, prefill_weight, prefill_bias = randn(32, 64), randn(40, 64), randn(32, 64), randn(32)
    logits = randn(4, 100)
    offset, out = torch.zeros(1, dtype=torch.int64, device=device), torch.empty(2, dtype=torch.int64, device=device)
    q, k = randn(2, 4, 9, 16), randn(2, 2, 9, 16)
    kv_start, kv_end = ops.key_ranges(modality=torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0]] * 2, device=device))
    k_cache, v_cache, cache_len = randn(2, 2, 12, 16), randn(2, 2, 12, 16), torch.tensor([5, 12], device=device)
    return {
        "modality_rms_norm": lambda: ops.modality_rms_norm(x, modality, weight, residual=residual),
        "modality_layer_norm": lambda: ops.modality_layer_norm(x, modality, weight, bias, residual=residual),
        "routed_linear": lambda: ops.routed_linear(rows, modality.reshape(-1)[:5], routed_weight),
        "vq_quantize": lambda: ops.vq_quantize(z, codes),
        "vq_embed": lambda: ops.vq_embed(indices, codes),
        "linear_decode": lambda: ops.linear(x[:, :1], linear_weight),
        "linear_prefill": lambda: ops.linear(prefill, prefill_weight, prefill_bias),
        "cfg_sample": lambda: ops.cfg_sample(logits, (5.0,), top_k=10, top_p=0.9, seed=1, offset=offset, out=out),
        "span_attention_causal": lambda: ops.span_attention(q, k, k),
        "span_attention_ranges": lambda: ops.span_attention(q, k, k, kv_start, kv_end),
        "decode_attention": lambda: ops.decode_attention(q[:, :, :1], k_cache, v_cache, cache_len),
    }


def test_op_calls_are_valid_on_cpu():
    """The calls the CUDA test below makes, run here: valid inputs, one per public op."""
    calls = _op_calls("cpu")
    assert tuple(calls) == OPS
    for call in calls.values():
        call()


class _SyncFree:
    """Inside the block any synchronizing CUDA call raises (torch.cuda.set_sync_debug_mode("error"))."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", OPS)
def test_cuda_eager_op_never_syncs(name, monkeypatch):
    monkeypatch.delenv(v.CHECK_VALUES_ENV, raising=False)
    call = _op_calls("cuda")[name]
    call()  # first call: Triton compilation and autotuning may sync, the calls after it may not
    with _SyncFree():
        call()
        call()


@pytest.mark.gpu
@needs_cuda
def test_cuda_eager_decode_loops_never_sync(janus_dir, monkeypatch):
    from fastmm.models import UnifiedModel, presets
    from fastmm.runtime import generate_text
    from fastmm.runtime.generate import start_image_generation

    monkeypatch.delenv(v.CHECK_VALUES_ENV, raising=False)
    model = UnifiedModel.from_pretrained(janus_dir, device="cuda")
    step = start_image_generation(model, [presets.BOS, 10, 11, 12, presets.BOI], temperature=1.0, seed=0)
    prompt = torch.tensor([[presets.BOS, 10, 11, 12]], device="cuda")
    step()
    generate_text(model, prompt, max_new_tokens=3)
    with _SyncFree():
        step()
        step()
        generate_text(model, prompt, max_new_tokens=3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_text_stop_one_step_late_gives_the_same_tokens(janus_dir):
    """On CUDA generate_text reads the all-finished flag one step late and drops that step's tokens."""
    from fastmm.models import UnifiedModel, presets
    from fastmm.runtime import generate_text

    model = UnifiedModel.from_pretrained(janus_dir, device="cuda")
    prompt = torch.tensor([[presets.BOS, 10, 11, 12]], device="cuda")
    model.config.eos_token_id = None
    free = generate_text(model, prompt, max_new_tokens=8)
    eos = int(free[0, 3])
    model.config.eos_token_id = eos
    stopped = generate_text(model, prompt, max_new_tokens=8)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(stopped, free[:, : first + 1])


@pytest.mark.gpu
@needs_cuda
def test_cuda_host_flag_names_the_values(monkeypatch):
    monkeypatch.setenv(v.CHECK_VALUES_ENV, "host")
    x, weight = torch.randn(3, 8, device="cuda"), torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError) as info:
        ops.modality_rms_norm(x, torch.tensor([0, 2, 1], device="cuda"), weight)
    expected = "modality_rms_norm: modality must be in [0, 2) (M = weight.shape[0]), got values in [0, 2]"
    assert str(info.value) == expected


@pytest.mark.gpu
@needs_cuda
def test_cuda_device_assert_fires_at_the_next_sync():
    """A device-side assert ruins the process's CUDA context, so the bad call runs in a child process."""
    code = textwrap.dedent(
        """
        import torch, fastmm
        x, weight = torch.randn(4, 64, device="cuda"), torch.ones(2, 64, device="cuda")
        fastmm.ops.modality_rms_norm(x, torch.tensor([0, 1, 2, 0], device="cuda"), weight)
        print("returned without a sync", flush=True)
        torch.cuda.synchronize()
        """
    )
    env = {key: value for key, value in os.environ.items() if key != v.CHECK_VALUES_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "returned without a sync" in output, output
    assert "device-side assert" in output, output
    assert "modality_rms_norm: modality must be in [0, 2)" in output, f"the kernel did not print the message:\n{output}"
