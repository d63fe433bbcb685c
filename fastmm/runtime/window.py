"""The default Jacobi window of a device and dtype, from the roofline of the linear kernel that runs a decoder pass.

A decoder pass streams every weight once, and its GEMMs' arithmetic grows with its rows (images x guidance
groups x window slots). While the rows stay below the crossover

    rows* = (bytes per weight x FLOP/s) / (2 x bytes/s)

the pass costs what a one-token step costs; past it every further row adds its FLOPs. The default window fills
the rows up to the crossover: W = rows* // rows per slot, kept within [MIN_WINDOW, MAX_WINDOW] and the tokens left.

Both rates are those of fastmm.ops.linear on the device (the kernel a pass runs), measured once per process
and (device, dtype): the time of one row over a weight larger than the caches (bandwidth) and of PROBE_ROWS rows
(arithmetic). With t(1) the one-row time and t(R) the R-row time, rows* = R t(1) / t(R): R rows cost R / rows*
times one row once compute-bound. The crossover assumes nothing about the acceptance rate, which only the model
decides: a window past it still pays when most drafts are accepted (the README's measurements).
"""

from __future__ import annotations

import functools
import time

import torch

from fastmm import ops

PROBE_SHAPE = (4096, 2048)  # out x in features: 32 MiB in fp32, 16 MiB in 16-bit types, past the L2 caches
PROBE_ROWS = 16  # a decode-sized batch: fastmm.native.linear hands larger ones to F.linear
PROBE_REPEATS = 5
MIN_WINDOW, MAX_WINDOW = 2, 16


def _median_seconds(fn, device: torch.device) -> float:
    fn()  # warm-up: first-touch page faults, lazy initialization
    times = []
    for _ in range(PROBE_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def crossover_rows(device: torch.device, dtype: torch.dtype) -> float:
    """rows*: the rows of x at which fastmm.ops.linear on ``device`` in ``dtype`` turns from bandwidth-bound to
    compute-bound (measured, cached per process)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_SHAPE, generator=generator).to(device, dtype)
    one_row = torch.randn(1, PROBE_SHAPE[1], generator=generator).to(device, dtype)
    many_rows = torch.randn(PROBE_ROWS, PROBE_SHAPE[1], generator=generator).to(device, dtype)
    single = _median_seconds(lambda: ops.linear(one_row, weight), device)
    multi = _median_seconds(lambda: ops.linear(many_rows, weight), device)
    return PROBE_ROWS * single / multi


def default_window(device: torch.device, dtype: torch.dtype, rows_per_slot: int, tokens_left: int) -> int:
    """The window for a batch of ``rows_per_slot`` decoder rows per window slot (images x guidance groups) with
    ``tokens_left`` tokens to decode after the first."""
    window = int(crossover_rows(torch.device(device), dtype) // rows_per_slot)
    window = min(MAX_WINDOW, max(MIN_WINDOW, window))
    return max(1, min(window, tokens_left))
