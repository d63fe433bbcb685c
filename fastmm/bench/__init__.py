"""Benchmarks: timers, the machine's roofline, suites of cases, one result schema, reports and plots.

    fastmm bench norm --out bench-results        # or: python -m fastmm.cli bench all

Layout: timer (CPU wall clock, CUDA events, CUDA-graph replay), roofline (peaks), environment (versions,
commit, machine), schema (BenchResult, BenchReport), suites/ (one module per op family), runner (cases ->
rows), report (JSON, markdown, PNG).
"""
