"""The profile's picture: per-token decode latency with its percentiles, the stage breakdown, and (when NVML
telemetry ran) power and SM clock over the image generation. matplotlib's object API with the Agg canvas:
no pyplot, no global backend."""

from __future__ import annotations

import math
from pathlib import Path

from fastmm.profiling.report import ProfileReport


def plot(report: ProfileReport, path: str | Path) -> Path:
    """Write the PNG to ``path`` and return it."""
    from matplotlib.figure import Figure

    telemetry = report.telemetry if report.telemetry["available"] else None
    panels = 3 if telemetry else 2
    figure = Figure(figsize=(8, 2.6 * panels), layout="constrained")
    axes = figure.subplots(panels, 1)
    model = report.model
    figure.suptitle(f"fastmm profile: {model['source']} ({model['layers']} x {model['hidden']}, {model['dtype']}) "
                    f"on {report.environment['device']}", fontsize=10)  # fmt: skip

    ax = axes[0]
    image = report.image
    tokens = range(2, len(image.per_token_ms) + 2)
    ax.plot(tokens, image.per_token_ms, linewidth=0.7, color="tab:blue", label="decode step")
    if image.decode is not None:
        for key, style in (("p50_ms", "-"), ("p90_ms", "--"), ("p99_ms", ":")):
            value = getattr(image.decode, key)
            ax.axhline(value, color="tab:red", linestyle=style, linewidth=1, label=f"{key[:3]} {value:.3g} ms")
    ax.set_xlabel("image token")
    ax.set_ylabel("ms")
    ax.set_title(f"per-token latency (time to first token {image.time_to_first_token_ms:.3g} ms)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1]
    names, times = list(report.stages), list(report.stages.values())
    bars = ax.barh(range(len(names)), times, color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # run order, top to bottom
    ax.bar_label(bars, [f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms" for ms in times], fontsize=7, padding=2)
    ax.set_xlabel("ms")
    ax.set_xlim(right=1.2 * max(times))
    ax.set_title("stage breakdown", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)

    if telemetry:
        ax = axes[2]
        series = telemetry["series"]
        ax.plot(series["t_s"], _floats(series["power_w"]), color="tab:orange", label="power W")
        ax.set_xlabel("s into the image generation")
        ax.set_ylabel("W")
        clock = ax.twinx()
        clock.plot(series["t_s"], _floats(series["sm_clock_mhz"]), color="tab:purple", label="SM clock MHz")
        clock.set_ylabel("MHz")
        energy = telemetry["energy_per_image_j"]
        ax.set_title("NVML telemetry" + (f": {energy:.3g} J per image" if energy is not None else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(handles=ax.get_lines() + clock.get_lines(), fontsize=7, loc="lower right")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


def _floats(values: list[float | None]) -> list[float]:
    """A sample NVML could not read is a gap in the line."""
    return [math.nan if value is None else value for value in values]
