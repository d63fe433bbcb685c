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


@pytest.fixture(scope="session")
def janus_dir(tmp_path_factory):
    """A tiny random-weight transformers Janus checkpoint saved once per test session (needs transformers)."""
    pytest.importorskip("transformers")
    from fastmm.models import presets

    return presets.save_random_janus(tmp_path_factory.mktemp("janus") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def hf_model(janus_dir):
    """transformers' JanusForConditionalGeneration on janus_dir."""
    import transformers

    return transformers.JanusForConditionalGeneration.from_pretrained(str(janus_dir)).eval()


@pytest.fixture(scope="session")
def model(janus_dir):
    """fastmm's UnifiedModel on janus_dir (fp32, CPU)."""
    from fastmm.models import UnifiedModel

    return UnifiedModel.from_pretrained(janus_dir)
