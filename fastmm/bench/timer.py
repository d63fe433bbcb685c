"""Timers: wall clock on CPU, CUDA events on GPU (with an L2 flush), and CUDA-graph replay for decode sizes.

Every timer runs the function a few times first (warm-up: caches, allocator, lazy compilation), then repeats
it until both a minimum count and a minimum total time are reached, and reports the median with the 20th and
80th percentiles. Medians, not means: one preempted run on a shared 2-core machine must not move the figure.
Providers compared on CPU are timed in interleaved rounds, so that a neighbour's load hits all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import numpy as np
import torch

# do_bench (Triton) flushes L2 by writing a buffer larger than any L2 before each run, so every run reads
# its inputs from HBM as a real layer would. 256 MiB is several times the largest L2 of today (H100: 50 MiB).
L2_FLUSH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float  # the best run: what a peak measurement reports (STREAM does the same)
    reps: int  # timed runs behind the percentiles
    threads: int  # torch.get_num_threads() while timing: CPU figures mean nothing without it


def summarize(times_ms: list[float]) -> Timing:
    p20, median, p80 = np.percentile(times_ms, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), min(times_ms), len(times_ms), torch.get_num_threads())


def cpu_samples(fn: Callable[[], Any], *, min_time_s: float, min_reps: int = 1, max_reps: int = 100_000) -> list[float]:
    """Run-times (ms, time.perf_counter) of ``fn()`` repeated until ``min_reps`` runs and ``min_time_s`` of total
    time; ``max_reps`` only caps sub-microsecond calls. No warm-up."""
    times: list[float] = []
    total = 0.0
    while (len(times) < min_reps or total < min_time_s) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        times.append(elapsed * 1e3)
        total += elapsed
    return times


def cpu_time(fn: Callable[[], Any], *, warmup_s: float = 0.05, min_time_s: float = 0.3, min_reps: int = 3) -> Timing:
    """Time ``fn()``: warm up for ``warmup_s`` (at least one call), then repeat until ``min_reps`` runs and
    ``min_time_s`` of total time. A call of seconds therefore runs 1 + min_reps times; a call of microseconds
    runs for min_time_s."""
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup_s:
        fn()
    return summarize(cpu_samples(fn, min_time_s=min_time_s, min_reps=min_reps))


def cpu_time_interleaved(
    fns: dict[str, Callable[[], Any]], *, min_time_s: float = 0.3, rounds: int = 3
) -> dict[str, Timing | Exception]:
    """Time several functions in turns: ``rounds`` rounds, each giving every function min_time_s / rounds (at
    least one run). On a shared machine a neighbour's burst then slows every function alike instead of one,
    which keeps the ratios between them honest. Callers warm each function up first (one call is enough).
    A function that raises is dropped from later rounds; its exception stands in place of its Timing."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                samples[name] += cpu_samples(fn, min_time_s=min_time_s / rounds)
            except Exception as exc:  # reported per function by the caller
                failed[name] = exc
    return {name: failed.get(name) or summarize(samples[name]) for name in fns}


@functools.lru_cache(maxsize=None)
def _flush_buffer(device_index: int) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", device_index))


def _cuda_events_time(
    call: Callable[[], Any],
    before: Callable[[], Any] | None,
    warmup_ms: float,
    rep_ms: float,
    min_reps: int,
    max_reps: int,
) -> Timing:
    """do_bench: estimate one run, size warm-up and repeats in time, then time each run with its own pair of
    events. ``before`` (the L2 flush) runs outside the events."""
    def once() -> None:
        if before is not None:
            before()
        call()

    once()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        once()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        once()
    reps = min(max(min_reps, int(rep_ms / estimate_ms)), max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if before is not None:
            before()
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def cuda_time(
    fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 10, max_reps: int = 1000
) -> Timing:
    """Time ``fn()`` on the current CUDA stream with events, flushing L2 before every run (cold-cache figure,
    launch overhead included)."""
    flush = _flush_buffer(torch.cuda.current_device())
    return _cuda_events_time(fn, flush.zero_, warmup_ms, rep_ms, min_reps, max_reps)


def cuda_graph_time(
    fn: Callable[[], Any], *, warmup: int = 3, rep_ms: float = 100, min_reps: int = 10, max_reps: int = 1000
) -> Timing:
    """Capture ``fn()`` once as a CUDA graph and time its replays: the figure a decode step sees, where the
    whole step is one graph and launch overhead is gone. No L2 flush here, on purpose: in a decode step the
    inputs of each kernel were just written by the previous one. ``fn`` must not sync the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires (lazy init, autotuning)
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _cuda_events_time(graph.replay, None, 0.0, rep_ms, min_reps, max_reps)
