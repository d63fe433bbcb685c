"""Profiling of the unified model's generation: where the time, the memory and the energy of one run go.

    report = fastmm.profile(model, image="random", trace="trace.json", png="profile.png", json_path="profile.json")
    fastmm profile --demo --trace trace.json        # the same from the command line

Layout: run (``profile``: the runs and the report), stages (stage and per-token timing on the device's
clock), memory (peak), telemetry (NVML on a background thread), trace (torch.profiler Chrome trace), nvtx
(Nsight ranges), inputs (image, default prompts); demo_model is fastmm.models.presets', report (schema, JSON, tables), plot (PNG).
"""

from fastmm.models.presets import demo_model
from fastmm.profiling.report import ProfileReport
from fastmm.profiling.run import profile

__all__ = ["profile", "ProfileReport", "demo_model"]
