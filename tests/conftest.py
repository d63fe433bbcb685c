"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter on CPU tensors: the variable must be
set before triton is imported, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmm.backend import backend_status  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases() -> list:
    """(backend, device) pairs: every backend on CPU (triton through the interpreter when there is no GPU),
    reference and triton on CUDA. A pair that cannot run here is skipped with the reason."""
    cases = []
    for device in DEVICES:
        backends = ["reference", "native", "triton"] if device == "cpu" else ["reference", "triton"]
        for backend in backends:
            if device == "cpu" and backend == "triton" and torch.cuda.is_available():
                continue  # with a GPU, triton is tested on CUDA tensors instead of the interpreter
            ok, reason = backend_status(backend, torch.device(device))
            marks = [] if ok else [pytest.mark.skip(reason=reason)]
            cases.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return cases
