"""Writes a BenchReport as report.json, report.md (one table per suite and op) and PNG plots.

The tables are built once (``op_table``) and rendered both as markdown here and as rich tables by the CLI.
"""

from __future__ import annotations

import itertools
import math
import pathlib
from typing import Iterable

from fastmm.bench.schema import BenchReport, BenchResult, TargetCheck, shape_label
from fastmm.bench.suites import Suite


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _ms(row: BenchResult) -> str:
    if row.median_ms is None:
        return "error"
    digits = 3 if row.median_ms < 1 else 2
    return f"{row.median_ms:.{digits}f} ({row.p20_ms:.{digits}f}-{row.p80_ms:.{digits}f})"


def plot_path(suite: str, op: str) -> str:
    """Where the plot of one suite/op goes, relative to the report (report.md links it)."""
    return f"plots/{suite}_{op}.png"


def group(results: Iterable[BenchResult]) -> dict[tuple[str, str], list[BenchResult]]:
    """Rows by (suite, op), in run order."""
    groups: dict[tuple[str, str], list[BenchResult]] = {}
    for row in results:
        groups.setdefault((row.suite, row.op), []).append(row)
    return groups


def op_table(rows: list[BenchResult]) -> tuple[list[str], list[list[str]]]:
    """(headers, body) of one suite/op: a row per shape, dtype and provider; the fastmm rows carry the ratio
    against each baseline (baseline ms / fastmm ms: above 1 means fastmm is faster)."""
    baselines = list(dict.fromkeys(row.provider for row in rows if row.provider != "fastmm"))
    has_flops = any(row.flops for row in rows)
    has_graph = any(row.graph_ms is not None for row in rows)
    has_memory = any(row.peak_alloc_mib is not None for row in rows)
    has_items = any(row.ms_per_item is not None for row in rows)
    headers = ["shape", "dtype", "provider", "ms (p20-p80)"]
    headers += ["ms / item"] if has_items else []
    headers += ["graph ms"] if has_graph else []
    headers += ["GB/s"] + (["GFLOP/s"] if has_flops else []) + ["% of peak"]
    headers += ["peak alloc MiB"] if has_memory else []
    headers += [f"vs {name}" for name in baselines] + ["note"]
    body = []
    for row in rows:
        provider = row.provider if row.backend is None else f"{row.provider} ({row.backend})"
        line = [shape_label(row.shape), row.dtype, provider, _ms(row)]
        line += [_num(row.ms_per_item, 3)] if has_items else []
        line += [_num(row.graph_ms, 3)] if has_graph else []
        line += [_num(row.gb_per_s)] + ([_num(row.gflop_per_s, 0)] if has_flops else []) + [_num(row.pct_of_peak)]
        line += [_num(row.peak_alloc_mib, 2)] if has_memory else []
        line += [f"{row.speedup_vs[name]:.2f}x" if name in row.speedup_vs else "" for name in baselines]
        line.append("; ".join(part for part in (row.note, row.error) if part))
        body.append(line)
    return headers, body


def target_table(checks: list[TargetCheck]) -> tuple[list[str], list[list[str]]]:
    """(headers, body): goal, dtype, measured value, status (met / missed, or why it was not measured)."""
    status = {True: "met", False: "missed"}
    body = [
        [check.goal, check.dtype or "", _num(check.value, 2), status.get(check.met, check.note or "not measured")]
        for check in checks
    ]
    return ["goal", "dtype", "measured", "status"], body


def _markdown_table(headers: list[str], body: list[list[str]]) -> list[str]:
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(escape(cell) for cell in line) + " |" for line in body]


def markdown(report: BenchReport, suites: dict[str, Suite]) -> str:
    env = report.environment
    peaks = env.peaks
    roof = [f"memory bandwidth {peaks.bandwidth_gb_s:.1f} GB/s"] if peaks.bandwidth_gb_s else []
    roof += [f"{dtype} GEMM {value:,.0f} GFLOP/s" for dtype, value in peaks.gemm_gflop_s.items()]
    if peaks.fresh_copy_gb_s:
        roof.append(f"(copy into a new buffer, default allocator: {peaks.fresh_copy_gb_s:.1f} GB/s)")
    versions = ", ".join(f"{name} {version}" for name, version in env.versions.items())
    lines = [
        "# fastmm benchmark report",
        "",
        f"- date: {env.timestamp}",
        f"- commit: {env.git_sha or 'unknown (not a git checkout)'}",
        f"- versions: {versions}",
        f"- machine: {env.cpu}; benchmarked device: {env.device}; torch threads: {env.threads}; "
        f"load average at start: {' / '.join(f'{x:.2f}' for x in env.load_avg) if env.load_avg else 'unknown'}",
        f"- roofline ({peaks.source}): {', '.join(roof) or 'unknown'}",
        f"- host memory: {env.allocator}",
        "- times: median with p20-p80; ratios `vs X` = X's median / fastmm's median (same run, same inputs)",
        "- % of peak uses the minimal bytes of the op; shapes whose data fits in cache can pass 100% of the DRAM "
        "copy bandwidth",
    ]
    groups = group(report.results)
    for suite_name, keys in itertools.groupby(groups, key=lambda key: key[0]):
        suite = suites[suite_name]
        lines += ["", f"## Suite `{suite_name}`", "", suite.description, ""]
        lines += [f"- `{name}`: {text}" for name, text in suite.providers.items()]
        checks = [check for check in report.targets if check.suite == suite_name]
        if checks:
            lines += ["", "### Targets (reported, not asserted)", ""]
            lines += _markdown_table(*target_table(checks))
        for _, op in keys:
            rows = groups[(suite_name, op)]
            headers, body = op_table(rows)
            peaks_used = ", ".join(dict.fromkeys(row.peak for row in rows))
            lines += ["", f"### {op}", "", f"% of peak against: {peaks_used}", ""]
            lines += _markdown_table(headers, body)
            lines += ["", f"![{op}]({plot_path(suite_name, op)})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[BenchResult], path: pathlib.Path) -> None:
    """Median ms per provider across shapes, one panel per dtype, log scale (providers differ by 100x)."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, Agg for PNG

    dtypes = list(dict.fromkeys(row.dtype for row in rows))
    figure = Figure(figsize=(6 * len(dtypes), 4.5), layout="constrained")
    axes = figure.subplots(1, len(dtypes), squeeze=False)[0]
    for ax, dtype in zip(axes, dtypes):
        subset = [row for row in rows if row.dtype == dtype]
        shapes = list(dict.fromkeys(shape_label(row.shape) for row in subset))
        for provider in dict.fromkeys(row.provider for row in subset):
            times = {shape_label(row.shape): row.median_ms for row in subset if row.provider == provider}
            ax.plot(range(len(shapes)), [times.get(shape) or math.nan for shape in shapes], marker="o", label=provider)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(f"{rows[0].op} {dtype} on {rows[0].device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def write(report: BenchReport, suites: dict[str, Suite], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write report.json, report.md and plots/<suite>_<op>.png under ``out_dir``; returns the paths."""
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(report.to_json())
    written[1].write_text(markdown(report, suites))
    for (suite_name, op), rows in group(report.results).items():
        path = out_dir / plot_path(suite_name, op)
        plot(rows, path)
        written.append(path)
    return written
