"""`fastmm profile` and fastmm.profile: the report's fields are present and agree with each other and with what
was generated, the trace names fastmm's kernels, telemetry says why it is unavailable, the plot is a PNG.
No speed is asserted: only that times are positive and ordered where their definitions order them."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types

import pytest
import torch
from typer.testing import CliRunner

import fastmm
from fastmm.cli import app
from fastmm.ops import _dispatch
from fastmm.profiling import demo_model, telemetry
from fastmm.profiling.plot import plot
from fastmm.profiling.stages import Latency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT_TOKENS = 4
TRACE_TOKENS = 8


@pytest.fixture(scope="module")
def tiny():
    return demo_model("tiny")


def _check_generation(run: dict, tokens: int, sequences: int) -> None:
    """Fields of one generation agree: counts, percentiles, means and rates."""
    assert run["tokens"] == tokens and run["sequences"] == sequences
    assert len(run["per_token_ms"]) == tokens - 1
    assert run["time_to_first_token_ms"] > 0 and run["tokens_per_s"] > 0
    assert all(ms > 0 for ms in run["per_token_ms"])
    if tokens == 1:
        assert run["decode"] is None and run["time_per_output_token_ms"] is None
        return
    decode = run["decode"]
    assert decode["count"] == tokens - 1
    assert decode["min_ms"] <= decode["p50_ms"] <= decode["p90_ms"] <= decode["p99_ms"] <= decode["max_ms"]
    assert run["time_per_output_token_ms"] == pytest.approx(sum(run["per_token_ms"]) / (tokens - 1))
    assert decode["mean_ms"] == pytest.approx(run["time_per_output_token_ms"])
    # every token comes after the first, at the rate the report states
    elapsed_s = tokens * sequences / run["tokens_per_s"]
    assert elapsed_s * 1e3 == pytest.approx(run["time_to_first_token_ms"] + sum(run["per_token_ms"]), rel=0.05)


def test_demo_cli_writes_consistent_json_trace_and_png(tmp_path):
    paths = {name: tmp_path / name for name in ("report.json", "trace.json", "profile.png")}
    result = CliRunner().invoke(app, [
        "profile", "--demo", "--device", "cpu", "--warmup", "0", "--text-tokens", str(TEXT_TOKENS),
        "--trace", str(paths["trace.json"]), "--trace-tokens", str(TRACE_TOKENS), "--png", str(paths["profile.png"]),
        "--json", str(paths["report.json"]),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fastmm profile: stages" in result.output
    report = json.loads(paths["report.json"].read_text())

    assert report["schema"] == 1 and report["model"]["device"] == "cpu" and report["model"]["layers"] == 2
    assert list(report["stages"]) == ["vision_encode", "prefill", "decode", "vq_decode", "text_prefill", "text_decode"]
    assert all(ms > 0 for ms in report["stages"].values())
    image_tokens = fastmm.models.presets.demo_config("tiny").image_gen.num_image_tokens
    _check_generation(report["image"], image_tokens, 1)
    assert report["image"]["prompt_tokens"] == len(report["settings"]["prompt_ids"])
    assert sum(report["image"]["per_token_ms"]) <= report["stages"]["decode"]
    text = report["text"]
    assert 1 <= text["tokens"] <= TEXT_TOKENS
    _check_generation(text, text["tokens"], 1)
    assert text["time_to_first_token_ms"] == pytest.approx(report["stages"]["text_prefill"])
    assert report["decode_weight_read"]["bytes_per_step"] > 0 and report["decode_weight_read"]["gb_s"] > 0
    assert report["memory"]["peak_bytes"] >= 0 and report["memory"]["measure"]

    if not torch.cuda.is_available():
        assert report["telemetry"]["available"] is False and report["telemetry"]["reason"]

    assert report["trace"] == str(paths["trace.json"])
    events = json.loads(paths["trace.json"].read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"fastmm::linear", "fastmm::cfg_sample", "fastmm::span_attention", "fastmm::decode_layer",
            "fastmm/decode_step"} <= names
    assert report["trace_ranges"]["fastmm/decode_step"] == TRACE_TOKENS - 1

    assert report["png"] == str(paths["profile.png"])
    assert paths["profile.png"].read_bytes()[:8] == PNG_MAGIC


def test_model_cli_on_a_saved_checkpoint(janus_dir, tmp_path):
    path = tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "profile", "--model", str(janus_dir), "--device", "cpu", "--warmup", "1", "--cfg-scale", "1",
        "--num-images", "2", "--png", str(tmp_path / "p.png"), "--json", str(path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["model"]["source"] == str(janus_dir)
    assert list(report["stages"]) == ["prefill", "decode", "vq_decode"]  # no image given, no text asked
    assert report["text"] is None and report["trace"] is None
    _check_generation(report["image"], 576, 2)
    assert report["settings"]["warmup"] == 1 and report["settings"]["cuda_graph"] is False


def test_python_api_with_a_short_text_run(tiny):
    image = torch.rand(1, 3, 384, 384) * 2 - 1
    report = fastmm.profile(tiny, [1, 20, 21, 5], image, text_tokens=1, warmup=0, temperature=0.0)
    assert list(report.stages)[0] == "vision_encode" and "text_decode" not in report.stages
    assert report.text.tokens == 1 and report.text.decode is None and report.text.prompt_tokens == 1 + 576 + 4
    assert report.image.prompt_tokens == 4 and report.png is None
    assert report.telemetry["available"] is False  # a CPU run: NVML reads GPUs only


def test_kernels_are_profiler_ranges_only_while_a_profiler_records():
    device = torch.device("cpu")
    plain = _dispatch.kernel_function("linear", "linear", "linear_fwd", device)
    assert plain is _dispatch.backend_module(fastmm.backend.choose_backend("linear", device), "linear").linear_fwd
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as recorder:
        with torch.no_grad():
            y = fastmm.ops.linear(x, w)
    assert "fastmm::linear" in {event.name for event in recorder.events()}
    torch.testing.assert_close(y, x @ w.T)


def test_telemetry_of_a_cpu_run_is_unavailable_with_the_reason(monkeypatch):
    with telemetry.Telemetry(torch.device("cpu"), 0.01) as reader:
        pass
    result = reader.result(images=1)
    assert result["available"] is False and result["reason"]
    monkeypatch.setattr(telemetry, "nvml_status", lambda: (True, "1 device(s)"))  # a driver, but a CPU run
    with telemetry.Telemetry(torch.device("cpu"), 0.01) as reader:
        pass
    assert "cpu" in reader.result(images=1)["reason"]


class _FakeNVML(types.ModuleType):
    """pynvml's calls that telemetry makes, on a pretend 300 W GPU whose energy counter adds 1 J per read."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    class NVMLError(Exception):
        pass

    def __init__(self, energy_counter: bool):
        super().__init__("pynvml")
        self.energy_counter, self.energy_mj = energy_counter, 0

    def nvmlInit(self): pass  # noqa: E704
    def nvmlShutdown(self): pass  # noqa: E704
    def nvmlDeviceGetCount(self): return 1  # noqa: E704
    def nvmlDeviceGetHandleByUUID(self, uuid): return uuid  # noqa: E704
    def nvmlDeviceGetPowerUsage(self, handle): return 300_000  # noqa: E704  (mW)
    def nvmlDeviceGetClockInfo(self, handle, kind): return 1980 if kind == self.NVML_CLOCK_SM else 3201  # noqa: E704

    def nvmlDeviceGetUtilizationRates(self, handle):
        raise self.NVMLError("Not Supported")  # a quantity this part does not report

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.energy_counter:
            raise self.NVMLError("Not Supported")
        self.energy_mj += 1000
        return self.energy_mj


@pytest.mark.parametrize("energy_counter", [True, False], ids=["energy-counter", "integrated-power"])
def test_telemetry_summarizes_nvml_samples(monkeypatch, tiny, tmp_path, energy_counter):
    """The GPU path of telemetry (and the plot's telemetry panel) on a fake NVML: this machine has no GPU."""
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML(energy_counter))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="fake"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with telemetry.Telemetry(torch.device("cuda", 0), 0.005) as reader:
        time.sleep(0.05)
    result = reader.result(images=2)
    assert result["available"] is True and result["device"] == "NVIDIA H200" and result["samples"] >= 2
    assert result["power_w"] == {"mean": 300.0, "max": 300.0} and result["sm_clock_mhz"]["max"] == 1980
    assert result["gpu_util_pct"] is None and result["series"]["gpu_util_pct"][0] is None
    assert len(result["series"]["t_s"]) == result["samples"] == len(result["series"]["power_w"])
    if energy_counter:
        assert result["energy_j"] == 1.0 and result["energy_source"] == "driver energy counter"
    else:  # 300 W over the span of the samples
        span = result["series"]["t_s"][-1] - result["series"]["t_s"][0]
        assert result["energy_j"] == pytest.approx(300 * span) and "integrated" in result["energy_source"]
    assert result["energy_per_image_j"] == pytest.approx(result["energy_j"] / 2)

    report = fastmm.profile(tiny, warmup=0, temperature=0.0)
    path = plot(dataclasses.replace(report, telemetry=result), tmp_path / "with_telemetry.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_latency_percentiles():
    latency = Latency.of([float(ms) for ms in range(1, 101)])
    assert latency.p50_ms == pytest.approx(50.5) and latency.p90_ms == pytest.approx(90.1)
    assert latency.p99_ms == pytest.approx(99.01) and latency.count == 100
    assert Latency.of([]) is None


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"text_tokens": -1}, "text_tokens"),
        ({"warmup": 1.5}, "warmup"),
        ({"image": torch.zeros(1, 3, 8, 8)}, "image"),
        ({"telemetry_interval_s": 0}, "telemetry_interval_s"),
        ({"trace_tokens": 0}, "trace_tokens"),
    ],
)
def test_bad_arguments_are_named(tiny, kwargs, named):
    with pytest.raises(ValueError, match=named):
        fastmm.profile(tiny, **kwargs)


def test_cli_needs_a_model_or_the_demo():
    result = CliRunner().invoke(app, ["profile"])
    assert result.exit_code != 0 and "--model" in result.output
