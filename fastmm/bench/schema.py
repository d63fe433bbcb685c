"""The one result schema of every benchmark: rows of BenchResult under an Environment header, as JSON.

    {"schema": 1,
     "environment": {timestamp, git_sha, versions, cpu, device, threads, peaks},
     "results": [BenchResult, ...],
     "targets": [TargetCheck, ...]}

The environment is written once, not per row: every row of a report comes from the same run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastmm.bench.environment import Environment

SCHEMA_VERSION = 1


def shape_label(shape: dict[str, int]) -> str:
    """{"T": 2048, "D": 4096} -> "T=2048 D=4096"."""
    return " ".join(f"{key}={value}" for key, value in shape.items())


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class BenchResult:
    suite: str  # registered suite name, e.g. "norm"
    op: str  # e.g. "modality_rms_norm"
    provider: str  # "fastmm" or a named baseline, e.g. "mplug_owl2"
    shape: dict[str, int]  # e.g. {"T": 2048, "D": 4096}
    dtype: str  # torch dtype name: "float32", "bfloat16"
    device: str  # "cpu" or the CUDA device name
    threads: int  # torch.get_num_threads() during the timing
    median_ms: float | None  # None when the provider failed (see error)
    p20_ms: float | None
    p80_ms: float | None
    reps: int  # timed runs
    bytes: int  # minimal bytes the op must move (inputs read + outputs written), the same for every provider
    flops: int  # floating-point operations of the op (0 when it is memory-bound by nature)
    gb_per_s: float | None  # bytes / median time
    gflop_per_s: float | None  # flops / median time; None when flops == 0
    pct_of_peak: float | None  # the fraction of `peak`, in percent; None without a known peak
    peak: str  # which peak pct_of_peak refers to, with its value, e.g. "copy bandwidth 26.6 GB/s"
    speedup_vs: dict[str, float]  # fastmm rows only: baseline median / fastmm median, per baseline of the run
    graph_ms: float | None = None  # CUDA only, decode sizes: median of CUDA-graph replays (no launch overhead)
    backend: str | None = None  # fastmm rows: the backend that actually ran (after any fallback)
    rel_err: float | None = None  # baselines computing the same op: |out - fastmm out| / |fastmm out| (L2), or for
    # integer outputs (code indices) the fraction of entries that differ
    peak_alloc_mib: float | None = None  # cases that measure memory: torch allocations held at once by one call
    ms_per_item: float | None = None  # cases whose call produces several items (image tokens): median / items
    note: str = ""
    error: str = ""  # why the provider could not run; the row then has no timing


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    """A performance goal of a suite, evaluated on one fastmm row. Reported, never asserted."""

    suite: str
    goal: str  # human-readable, e.g. "modality_rms_norm T=8192 D=4096: >= 60% of copy bandwidth"
    dtype: str | None  # the row it was evaluated on; None when no row matched
    value: float | None
    met: bool | None  # None when not measured
    note: str = ""  # why it was not measured


@dataclasses.dataclass
class BenchReport:
    environment: Environment
    results: list[BenchResult]
    targets: list[TargetCheck]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
