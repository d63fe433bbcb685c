"""Timing of the stages of a run and of every decode step, on the device that runs them.

CPU: time.perf_counter. CUDA: an event recorded on the current stream at each mark, read once after the run,
so timing never syncs the host between steps (a replayed CUDA graph keeps its pace). A stage is also an NVTX
range on CUDA and a torch.profiler range while a profiler records, both named ``fastmm/<stage>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Union

import numpy as np
import torch

from fastmm.profiling.nvtx import nvtx_range
from fastmm.profiling.trace import profiler_range

Mark = Union[float, torch.cuda.Event]


@dataclasses.dataclass(frozen=True)
class Latency:
    """Percentiles of per-token latencies, ms."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    count: int  # latencies behind the figures

    @classmethod
    def of(cls, times_ms: list[float]) -> Latency | None:
        """The percentiles of ``times_ms``, None when there are none."""
        if not times_ms:
            return None
        p50, p90, p99 = (float(value) for value in np.percentile(times_ms, [50, 90, 99]))
        return cls(p50, p90, p99, float(np.mean(times_ms)), min(times_ms), max(times_ms), len(times_ms))


class Clock:
    """Marks in time on ``device``'s timeline: ``mark()`` now, ``ms(start, end)`` between two marks after
    ``sync()``."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> Mark:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def sync(self) -> None:
        """Wait for the device: every recorded mark becomes readable."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def ms(start: Mark, end: Mark) -> float:
        if isinstance(start, float):
            return (end - start) * 1e3
        return start.elapsed_time(end)

    def intervals_ms(self, marks: list[Mark]) -> list[float]:
        """The times between consecutive marks."""
        return [self.ms(a, b) for a, b in zip(marks, marks[1:])]


class Stages:
    """Named stages of a run, in order: ``with stages.stage("prefill"): ...``; ``durations_ms()`` after a sync."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._spans: list[tuple[str, Mark, Mark]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with step_range(name, self.clock.device):
            start = self.clock.mark()
            yield
            self._spans.append((name, start, self.clock.mark()))

    def span(self, name: str, start: Mark, end: Mark) -> None:
        """A stage between two marks taken elsewhere."""
        self._spans.append((name, start, end))

    def durations_ms(self) -> dict[str, float]:
        self.clock.sync()
        return {name: self.clock.ms(start, end) for name, start, end in self._spans}


@contextlib.contextmanager
def step_range(name: str, device: torch.device) -> Iterator[None]:
    """``fastmm/<name>`` as an NVTX range on CUDA and as a profiler range while a profiler records."""
    label = f"fastmm/{name}"
    with nvtx_range(label, device), profiler_range(label):
        yield
