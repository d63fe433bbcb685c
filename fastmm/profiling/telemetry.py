"""GPU telemetry over a run from NVML (nvidia-ml-py): power, SM and memory clocks, utilization, energy.

A background thread reads the device every ``interval_s``; the energy of the run comes from the driver's
energy counter (Volta and later) or, where it has none, from integrating the power samples. Without the
package, the driver library or a CUDA run, the result says "unavailable" and why; nothing fails.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np
import torch

# Sampled quantities: JSON key -> reader of a pynvml device handle. Each returns a float or raises NVMLError.
_READERS: dict[str, Callable[[Any, Any], float]] = {
    "power_w": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
    "sm_clock_mhz": lambda nvml, h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
    "memory_clock_mhz": lambda nvml, h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
    "gpu_util_pct": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
    "memory_util_pct": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).memory,
}


class PeriodicSampler:
    """Calls ``probe()`` every ``interval_s`` on a daemon thread between ``start()`` and ``stop()``, keeping
    (seconds since start, value) pairs; a probe that returns None is not kept."""

    def __init__(self, probe: Callable[[], Any], interval_s: float):
        if not interval_s > 0:
            raise ValueError(f"PeriodicSampler: interval_s must be > 0, got {interval_s!r}")
        self.probe, self.interval_s = probe, interval_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastmm-sampler", daemon=True)
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()
        self._take()
        self._thread.start()

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join()
        self._take()
        return self.samples

    def _take(self) -> None:
        value = self.probe()
        if value is not None:
            self.samples.append((time.perf_counter() - self._start, value))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()


def nvml_status() -> tuple[bool, str]:
    """(available, reason): whether NVML can be read here (the package, the driver library, a device)."""
    try:
        import pynvml
    except ImportError:
        return False, "nvidia-ml-py (pynvml) not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return False, f"nvmlInit failed: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return count > 0, (f"{count} device(s)" if count else "NVML sees no device")


def _handle(pynvml, device: torch.device):
    """The NVML handle of torch's CUDA ``device``: by UUID (right under CUDA_VISIBLE_DEVICES), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class Telemetry:
    """NVML samples over a block: ``with Telemetry(device, 0.05) as t: ...``, then ``t.result(images)``."""

    def __init__(self, device: torch.device, interval_s: float):
        self.device, self.interval_s = device, interval_s
        self.reason = ""
        self._nvml = self._handle_ = self._sampler = None
        self._energy: list[float] = []  # the driver's energy counter (J) at the start and end, when it has one
        self._started = self._elapsed_s = 0.0

    def __enter__(self) -> Telemetry:
        available, reason = nvml_status()
        if available and self.device.type != "cuda":
            available, reason = False, f"the run is on {self.device.type}: NVML reads NVIDIA GPUs only"
        if not available:
            self.reason = reason
            return self
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._handle_ = pynvml, _handle(pynvml, self.device)
        self._read_energy()
        self._sampler = PeriodicSampler(self._read, self.interval_s)
        self._started = time.perf_counter()
        self._sampler.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._sampler is None:
            return
        self._sampler.stop()
        self._elapsed_s = time.perf_counter() - self._started
        self._read_energy()
        self._nvml.nvmlShutdown()

    def _read_energy(self) -> None:
        try:
            self._energy.append(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle_) / 1e3)  # mJ -> J
        except self._nvml.NVMLError:
            pass

    def _read(self) -> dict[str, float | None]:
        values = {}
        for key, reader in _READERS.items():
            try:
                values[key] = float(reader(self._nvml, self._handle_))
            except self._nvml.NVMLError:  # a quantity this part or driver does not report
                values[key] = None
        return values

    def result(self, images: int) -> dict[str, Any]:
        """The report's telemetry: per quantity mean and max plus the series, energy and energy per image."""
        if self._sampler is None:
            return {"available": False, "reason": self.reason}
        samples = self._sampler.samples
        times = [t for t, _ in samples]
        series = {key: [values[key] for _, values in samples] for key in _READERS}
        summary = {}
        for key, values in series.items():
            known = [v for v in values if v is not None]
            summary[key] = {"mean": float(np.mean(known)), "max": max(known)} if known else None
        if len(self._energy) == 2:
            energy, source = self._energy[1] - self._energy[0], "driver energy counter"
        else:
            points = [(t, p) for t, p in zip(times, series["power_w"]) if p is not None]
            pairs = list(zip(points, points[1:]))  # trapezoids between consecutive samples
            energy = sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in pairs) if pairs else None
            source = f"power samples integrated over time (every {1e3 * self.interval_s:g} ms)"
        return {
            "available": True,
            "device": torch.cuda.get_device_name(self.device),
            "interval_ms": 1e3 * self.interval_s,
            "samples": len(samples),
            "window_s": self._elapsed_s,
            **summary,
            "energy_j": energy,
            "energy_per_image_j": None if energy is None else energy / images,
            "energy_source": source,
            "series": {"t_s": times, **series},
        }
