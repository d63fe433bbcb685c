"""Backend choice: defaults by device, FASTMM_BACKEND, use_backend(), and fallback with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

import fastmm
from fastmm import backend
from fastmm.reference.norm import modality_rms_norm as reference_rms_norm


def test_default_by_device(monkeypatch):
    monkeypatch.delenv("FASTMM_BACKEND", raising=False)
    assert backend.default_backend(torch.device("cuda")) == "triton"
    assert backend.default_backend(torch.device("cpu")) == "native"
    assert backend.default_backend(torch.device("meta")) == "reference"


def test_env_and_context(monkeypatch):
    monkeypatch.setenv("FASTMM_BACKEND", "reference")
    assert backend.choose_backend("test", torch.device("cpu")) == "reference"
    with fastmm.use_backend("triton"):  # the context manager wins over the variable
        assert backend.requested_backend() == "triton"
    assert backend.requested_backend() == "reference"


def test_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with fastmm.use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTMM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTMM_BACKEND.*'fast'"):
        backend.requested_backend()


def test_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_warned", set())
    x, modality, weight = torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(2, 8)
    expected = reference_rms_norm(x, modality, weight)
    with caplog.at_level(logging.WARNING, logger="fastmm"), fastmm.use_backend("triton"):
        for _ in range(3):
            torch.testing.assert_close(fastmm.ops.modality_rms_norm(x, modality, weight), expected)
    messages = [r.getMessage() for r in caplog.records if "modality_rms_norm" in r.getMessage()]
    assert len(messages) == 1 and "TRITON_INTERPRET" in messages[0]


def test_native_reports_why():
    ok, reason = backend.backend_status("native", torch.device("meta"))
    assert not ok and "CPU" in reason
