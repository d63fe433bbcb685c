"""Benchmark suites, one module per op family, each registered with ``@register_suite(name)``.

A suite is a function ``(device, quick) -> list[Case]``. A Case is one op at one shape and dtype; its
``setup`` builds the inputs once and returns the providers (fastmm and the baselines) that all read them, so
every ratio compares runs on the same tensors in the same process.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import torch

from fastmm.bench.schema import dtype_name, shape_label


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[[], Any]  # one call of the op, inputs bound
    same_result: bool = True  # computes the op's result (checked against fastmm); False for a "floor" baseline
    graph_safe: bool = True  # may be captured in a CUDA graph: no host sync, no data-dependent shapes
    backend: str | None = None  # fastmm providers: the backend that runs (after any fallback)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    bytes: int  # minimal traffic of the op: every input read once, every output written once
    flops: int
    bound: str  # "memory" (held to peak bandwidth) or "compute" (held to the GEMM peak of its dtype)
    setup: Callable[[], list[Provider]]  # builds inputs on the suite's device; "fastmm" first
    decode_size: bool = False  # small enough that CUDA-graph replay is the figure that matters
    measure_memory: bool = False  # also record each provider's peak allocation (fastmm.bench.memory)
    items: int = 1  # what one call produces (e.g. 576 image tokens): rows also report ms per item

    @property
    def label(self) -> str:
        return f"{self.op} {shape_label(self.shape)} {dtype_name(self.dtype)}"


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for a fastmm provider (``provider``, "fastmm" unless set), written in the report with the measured
    value (never asserted)."""

    op: str
    where: dict[str, int]  # the shape entries of the rows it applies to
    # "pct_of_peak", "speedup:<baseline provider>", or "memory_pct:<baseline provider>" (fastmm's peak
    # allocation as a percentage of the baseline's)
    metric: str
    goal: float  # reached when the metric is >= goal (for memory_pct: <= goal)
    backend: str  # fastmm backend the goal is set for (a native CPU goal says nothing of triton)
    dtype: str | None = None  # the one dtype name ("float32") the goal is set for; None: every dtype run
    provider: str = "fastmm"  # the provider whose rows the goal is for

    @property
    def lower_is_better(self) -> bool:
        return self.metric.startswith("memory_pct:")

    def describe(self) -> str:
        baseline = self.metric.split(":", 1)[-1]
        if self.metric == "pct_of_peak":
            what = f">= {self.goal:g}% of peak"
        elif self.lower_is_better:
            what = f"peak allocation <= {self.goal:g}% of {baseline}'s"
        else:
            what = f">= {self.goal:g}x {baseline}"
        dtype = f" {self.dtype}" if self.dtype else ""
        who = "" if self.provider == "fastmm" else f" {self.provider}"
        return f"{self.op} {shape_label(self.where)}{dtype} ({self.backend}){who}: {what}"


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    description: str  # a paragraph for the report: what is measured and how
    providers: dict[str, str]  # provider name -> what it is, for the report's legend
    cases: Callable[[torch.device, bool], list[Case]]  # (device, quick) -> cases
    targets: tuple[Target, ...] = ()


_SUITES: dict[str, Suite] = {}


def register_suite(
    name: str, *, description: str, providers: dict[str, str], targets: tuple[Target, ...] = ()
) -> Callable[[Callable[[torch.device, bool], list[Case]]], Callable[[torch.device, bool], list[Case]]]:
    def decorate(fn: Callable[[torch.device, bool], list[Case]]) -> Callable[[torch.device, bool], list[Case]]:
        if name in _SUITES:
            raise ValueError(f"register_suite: suite {name!r} is already registered")
        _SUITES[name] = Suite(name, description, providers, fn, targets)
        return fn

    return decorate


def suites() -> dict[str, Suite]:
    """Every registered suite, by name; imports each module of this package first so that all register."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_SUITES.items()))
