"""benchmarks/gpu_check.sh, the one-command GPU check, on a machine without a GPU: it parses, and --dry-run lists
its stages with their timeouts and exits 0 without writing anything."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
STAGES = ("setup", "env", "tests", "bench", "e2e-1b")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)


def test_script_parses():
    proc = _run("-n", str(SCRIPT))
    assert proc.returncode == 0, proc.stderr


def test_dry_run_lists_the_stages_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    proc = _run(str(SCRIPT), "--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"would write to {out}" in proc.stdout
    listed = re.findall(r"^\s+(\S+)\s+(\d+)s\s", proc.stdout, flags=re.MULTILINE)
    assert tuple(name for name, _ in listed) == STAGES
    assert sum(int(limit) for name, limit in listed if name != "setup") <= 480, "the check must fit 8 minutes"
    assert not out.exists()


def test_unknown_option_is_refused():
    proc = _run(str(SCRIPT), "--quick")
    assert proc.returncode == 2
    assert "unknown option --quick" in proc.stderr
