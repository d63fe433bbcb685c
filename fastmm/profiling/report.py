"""The profile report: one schema, written as JSON (``--json``) and shown as tables (the CLI renders them).

Times are milliseconds. ``image`` is the image-generation run (per image: time to first token, then one decode
step per further token), ``text`` the optional understanding run, ``stages`` the breakdown of the run in order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fastmm.profiling.stages import Latency

SCHEMA = 1


@dataclasses.dataclass
class Generation:
    """One generation run (image tokens or text tokens)."""

    prompt_tokens: int  # prompt length, image placeholders included
    tokens: int  # tokens generated per sequence (per image / per answer)
    sequences: int  # images (or answers) generated together in one batch
    time_to_first_token_ms: float  # start to the first token sampled (prompt prefill included)
    time_per_output_token_ms: float | None  # mean time of each later token (decode step); None with one token
    tokens_per_s: float  # tokens of all sequences / time from the start to the last token
    decode: Latency | None  # percentiles of the per-token times (one decode step each)
    per_token_ms: list[float]  # the time of token 2, 3, ... of each step (tokens - 1 values)


@dataclasses.dataclass
class ProfileReport:
    model: dict[str, Any]  # source, layers, hidden, parameters, dtype, device
    environment: dict[str, Any]  # timestamp, git sha, versions, cpu, device, threads, load average
    settings: dict[str, Any]  # what the run was asked to do (prompt, guidance, seed, warm-up runs, ...)
    stages: dict[str, float]  # stage -> ms, in run order: vision_encode, prefill, (cuda_graph_capture), decode,
    #                           vq_decode, (text_prefill, text_decode)
    image: Generation
    text: Generation | None
    decode_weight_read: dict[str, Any]  # GB/s of the weights a decode step streams, % of the datasheet peak
    memory: dict[str, Any]  # peak_bytes (beyond what was held before the runs), total_peak_bytes, MiB, measure
    telemetry: dict[str, Any]  # {"available": False, "reason": ...} or NVML figures (see profiling.telemetry)
    trace: str | None = None  # Chrome trace written (a separate run after the measured one)
    trace_ranges: dict[str, int] = dataclasses.field(default_factory=dict)  # fastmm range -> count in the trace
    png: str | None = None  # the plot of per-token latency and stage breakdown
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def tables(report: ProfileReport) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of the human view: the stages, the generation figures, memory and telemetry."""
    total = sum(report.stages.values())
    stages = [[name, _ms(ms), f"{100 * ms / total:.1f}%"] for name, ms in report.stages.items()]
    stages.append(["total", _ms(total), "100%"])
    runs = [("image", report.image)] + ([("text", report.text)] if report.text is not None else [])
    figures = []
    for name, run in runs:
        d = run.decode
        figures.append([name, str(run.tokens * run.sequences), _ms(run.time_to_first_token_ms),
                        _ms(run.time_per_output_token_ms), f"{run.tokens_per_s:,.1f}",
                        *(_ms(getattr(d, key)) if d else "" for key in ("p50_ms", "p90_ms", "p99_ms"))])  # fmt: skip
    headers = ["run", "tokens", "TTFT ms", "TPOT ms", "tokens/s", "p50 ms", "p90 ms", "p99 ms"]
    model, memory = report.model, report.memory
    device = model["device"] + ("" if report.environment["device"] == model["device"] else f" ({report.environment['device']})")
    machine = [["device", device],
               ["model", f"{model['source']}: {model['layers']} x {model['hidden']}, {model['dtype']}"],
               ["peak memory", f"{_mib(memory['peak_mib'])} beyond the model, {_mib(memory['total_peak_mib'])} in all "
                               f"({memory['measure']})"]]  # fmt: skip
    read = report.decode_weight_read
    if read["gb_s"] is not None:
        machine.append(["decode weight read", f"{read['gb_s']:,.1f} GB/s" + (
            f" ({read['pct_of_peak']:.1f}% of {read['peak_gb_s']:,.0f} GB/s)" if read["pct_of_peak"] is not None else "")])
    telemetry = report.telemetry
    if telemetry["available"]:
        for key in ("power_w", "sm_clock_mhz", "memory_clock_mhz", "gpu_util_pct", "memory_util_pct"):
            if telemetry[key] is not None:
                machine.append([key, f"mean {telemetry[key]['mean']:,.1f}, max {telemetry[key]['max']:,.1f}"])
        if telemetry["energy_per_image_j"] is not None:
            machine.append(["energy per image", f"{telemetry['energy_per_image_j']:,.2f} J ({telemetry['energy_source']})"])
    else:
        machine.append(["telemetry", f"unavailable: {telemetry['reason']}"])
    machine += [[name, str(path)] for name, path in (("trace", report.trace), ("png", report.png)) if path]
    return [("stages", ["stage", "ms", "share"], stages), ("generation", headers, figures), ("run", ["item", "value"], machine)]


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} MiB"
