"""Runs suites: times every provider of every case on one device and turns timings into result rows.

Per case: build the inputs once, call each provider once (lazy compilation, allocator warm-up, and the
output that is checked against fastmm's), time them all (on CPU in interleaved rounds), then compute the
fastmm row's speedup over each baseline. A provider that raises becomes a row with its error, and the run
goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from fastmm.bench import environment, memory, roofline, timer
from fastmm.bench.schema import BenchReport, BenchResult, TargetCheck, dtype_name
from fastmm.bench.suites import Case, Provider, Suite, Target

logger = logging.getLogger("fastmm")

# Relative L2 error above which a baseline is flagged as not computing what fastmm computes: far above the
# rounding of one extra cast (bf16: 2^-8), far below any real difference (a wrong weight row: ~10%).
_REL_ERR_LIMIT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

Progress = Callable[[int, int, str], None]  # (cases done, cases in all, label of the next case)


def _time_providers(fns: dict[str, Callable[[], Any]], device: torch.device, quick: bool) -> dict[str, Any]:
    """Timing (or the exception raised) per provider: interleaved rounds on CPU, do_bench per provider on CUDA
    (a GPU is not shared with neighbours). --quick times for a few ms."""
    if device.type == "cpu":
        return timer.cpu_time_interleaved(fns, min_time_s=0.02 if quick else 0.3)
    found: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            found[name] = timer.cuda_time(fn, rep_ms=_gpu_rep_ms(quick))
        except Exception as exc:  # reported in the provider's row
            found[name] = exc
    return found


def _gpu_rep_ms(quick: bool) -> float:
    return 20 if quick else 100


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _add_note(row: BenchResult, text: str) -> None:
    row.note = "; ".join(part for part in (row.note, text) if part)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; for integer outputs (code indices) the fraction of entries that differ."""
    if not ref.dtype.is_floating_point:
        return float((out.reshape(ref.shape).to(ref.device) != ref).float().mean())
    ref32 = ref.float()
    return float((out.float() - ref32).norm() / ref32.norm().clamp_min(1e-30))


def _peak(case: Case, device: torch.device, peaks: roofline.Peaks) -> tuple[float | None, str]:
    """(peak value in the row's unit, its label) for the case's bound."""
    if case.bound == "memory":
        kind = "copy" if device.type == "cpu" else "memory"
        bandwidth = peaks.bandwidth_gb_s
        return bandwidth, (f"{kind} bandwidth {bandwidth:.1f} GB/s" if bandwidth else "bandwidth unknown")
    dtype = dtype_name(case.dtype)
    gemm = peaks.gemm_gflop_s.get(dtype)
    return gemm, (f"{dtype} GEMM {gemm:.0f} GFLOP/s" if gemm else f"{dtype} GEMM peak unknown")


def _row(suite: str, case: Case, provider: Provider, device: torch.device, peak_label: str) -> BenchResult:
    return BenchResult(
        suite=suite,
        op=case.op,
        provider=provider.name,
        shape=dict(case.shape),
        dtype=dtype_name(case.dtype),
        device=environment.device_name(device),
        threads=torch.get_num_threads(),
        median_ms=None,
        p20_ms=None,
        p80_ms=None,
        reps=0,
        bytes=case.bytes,
        flops=case.flops,
        gb_per_s=None,
        gflop_per_s=None,
        pct_of_peak=None,
        peak=peak_label,
        speedup_vs={},
        backend=provider.backend,
        note=provider.note,
    )


def _fill_timing(row: BenchResult, timing: timer.Timing, case: Case, peak_value: float | None) -> None:
    seconds = timing.median_ms * 1e-3
    row.median_ms, row.p20_ms, row.p80_ms, row.reps, row.threads = (
        timing.median_ms, timing.p20_ms, timing.p80_ms, timing.reps, timing.threads
    )
    row.gb_per_s = case.bytes / seconds / 1e9
    row.ms_per_item = timing.median_ms / case.items if case.items > 1 else None
    row.gflop_per_s = case.flops / seconds / 1e9 if case.flops else None
    achieved = row.gb_per_s if case.bound == "memory" else row.gflop_per_s
    row.pct_of_peak = 100 * achieved / peak_value if peak_value and achieved is not None else None


def run_case(suite: str, case: Case, device: torch.device, peaks: roofline.Peaks, quick: bool) -> list[BenchResult]:
    providers = case.setup()
    if providers[0].name != "fastmm":
        raise ValueError(f"suite {suite}, {case.label}: the first provider must be 'fastmm', got {providers[0].name!r}")
    peak_value, peak_label = _peak(case, device, peaks)
    rows = {provider.name: _row(suite, case, provider, device, peak_label) for provider in providers}
    with torch.no_grad():  # forward benchmarks: nothing may record autograd (recipe modules hold parameters)
        _first_calls(providers, rows, case)
        live = {provider.name: provider.fn for provider in providers if not rows[provider.name].error}
        for name, timing in _time_providers(live, device, quick).items():
            if isinstance(timing, Exception):
                _fail(rows[name], case, timing)
            else:
                _fill_timing(rows[name], timing, case, peak_value)
        if case.measure_memory:
            for provider in providers:
                if not rows[provider.name].error:
                    rows[provider.name].peak_alloc_mib = memory.peak_torch_allocation(provider.fn, device) / 2**20
        if device.type == "cuda" and case.decode_size:
            for provider in providers:
                if provider.graph_safe and not rows[provider.name].error:
                    _time_graph(rows[provider.name], provider, quick)
    fastmm_row, *baseline_rows = rows.values()
    if fastmm_row.median_ms:
        fastmm_row.speedup_vs = {
            row.provider: row.median_ms / fastmm_row.median_ms for row in baseline_rows if row.median_ms is not None
        }
    return list(rows.values())


def _first_calls(providers: list[Provider], rows: dict[str, BenchResult], case: Case) -> None:
    """Call each provider once: lazy compilation and first allocations happen here, out of the timing, and
    each baseline that computes the op is checked against fastmm's output."""
    expected: torch.Tensor | None = None
    for provider in providers:
        row = rows[provider.name]
        try:
            out = provider.fn()
        except Exception as exc:  # one broken provider must not cost the rest of a long run
            _fail(row, case, exc)
            continue
        if provider.name == "fastmm":
            expected = out
        elif provider.same_result and expected is not None:
            row.rel_err = _rel_err(out, expected)
            if row.rel_err > _REL_ERR_LIMIT[case.dtype]:
                if expected.dtype.is_floating_point:
                    _add_note(row, f"output differs from fastmm (rel err {row.rel_err:.2g})")
                else:
                    _add_note(row, f"differs from fastmm on {100 * row.rel_err:.2g}% of entries")
                logger.warning("%s: %s: %s", case.label, provider.name, row.note)


def _fail(row: BenchResult, case: Case, exc: Exception) -> None:
    row.error = _describe(exc)
    logger.warning("%s: provider %s failed: %s", case.label, row.provider, row.error)


def _time_graph(row: BenchResult, provider: Provider, quick: bool) -> None:
    try:
        row.graph_ms = timer.cuda_graph_time(provider.fn, rep_ms=_gpu_rep_ms(quick)).median_ms
    except Exception as exc:  # a capture failure is a finding about the provider, not a lost row
        _add_note(row, f"graph capture failed: {_describe(exc)}")


def _target_value(target: Target, row: BenchResult, rows: list[BenchResult]) -> float | None:
    """The metric of ``target`` on the provider's ``row`` (rows: the whole run, for the baselines)."""
    if target.metric == "pct_of_peak":
        return row.pct_of_peak
    kind, baseline = target.metric.split(":", 1)
    same_case = [
        other for other in rows
        if other.provider == baseline and other.op == row.op and other.shape == row.shape and other.dtype == row.dtype
    ]  # fmt: skip
    if kind == "speedup":
        if baseline in row.speedup_vs:
            return row.speedup_vs[baseline]
        if not same_case or same_case[0].median_ms is None or not row.median_ms:
            return None
        return same_case[0].median_ms / row.median_ms
    if not same_case or not same_case[0].peak_alloc_mib or row.peak_alloc_mib is None:
        return None
    return 100 * row.peak_alloc_mib / same_case[0].peak_alloc_mib


def check_targets(suite: Suite, rows: list[BenchResult]) -> list[TargetCheck]:
    """Each target of ``suite`` evaluated on every fastmm row it applies to (one per dtype), or one unmeasured
    check saying why none applies (shape not run, fastmm on another backend, fastmm failed)."""
    checks = []
    for target in suite.targets:
        at_shape = [
            row for row in rows
            if row.suite == suite.name and row.op == target.op and row.provider == target.provider
            and all(row.shape.get(key) == value for key, value in target.where.items())
            and target.dtype in (None, row.dtype)
        ]
        for row in at_shape:
            if row.backend != target.backend or row.median_ms is None:
                who = target.provider
                why = f"{who} failed: {row.error}" if row.median_ms is None else f"{who} ran on {row.backend}"
                checks.append(TargetCheck(suite.name, target.describe(), row.dtype, None, None, why))
                continue
            value = _target_value(target, row, rows)
            met = None if value is None else (value <= target.goal if target.lower_is_better else value >= target.goal)
            checks.append(TargetCheck(suite.name, target.describe(), row.dtype, value, met))
        if not at_shape:
            checks.append(TargetCheck(suite.name, target.describe(), None, None, None, "shape not in this run"))
    return checks


def run(
    selected: list[Suite], device: torch.device, quick: bool = False, progress: Progress | None = None
) -> BenchReport:
    """Run ``selected`` suites on ``device`` and return the report (environment, rows, targets)."""
    peaks = roofline.device_peaks(device, quick=quick)  # first: its copy into a new buffer shows the default
    allocator = environment.keep_freed_memory()
    env = environment.capture(device, peaks, allocator)
    planned = [(suite, case) for suite in selected for case in suite.cases(device, quick)]
    rows: list[BenchResult] = []
    for done, (suite, case) in enumerate(planned):
        if progress is not None:
            progress(done, len(planned), f"{suite.name}: {case.label}")
        rows += run_case(suite.name, case, device, peaks, quick)
    if progress is not None:
        progress(len(planned), len(planned), "done")
    targets = [check for suite in selected for check in check_targets(suite, rows)]
    return BenchReport(env, rows, targets)
