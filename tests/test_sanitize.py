"""The native-library override behind `make test-sanitize` (fastmm/_native_library.py).

Under `make test-sanitize` (FASTMM_NATIVE_LIBRARY set) the loaded extension must be the sanitized build, with
the ASan runtime in the process: otherwise the run would test the installed build and prove nothing. In the
plain suite: a missing file is refused with the variable's name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastmm
from fastmm.backend import native_status


def test_a_missing_native_library_is_refused():
    env = dict(os.environ, FASTMM_NATIVE_LIBRARY="/nonexistent/_C.so")
    run = subprocess.run([sys.executable, "-c", "import fastmm"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "FASTMM_NATIVE_LIBRARY='/nonexistent/_C.so': no such file" in run.stderr


@pytest.mark.skipif("FASTMM_NATIVE_LIBRARY" not in os.environ, reason="only under make test-sanitize")
def test_the_sanitized_build_is_loaded():
    assert native_status()[0], native_status()[1]
    from fastmm import _C

    assert os.path.samefile(_C.__file__, os.environ["FASTMM_NATIVE_LIBRARY"])
    assert fastmm._C is _C
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read(), "the ASan runtime is not loaded"
    with open(_C.__file__, "rb") as library:  # instrumented: calls into both sanitizers' runtimes
        code = library.read()
    assert b"__asan_report_load" in code and b"__ubsan_handle" in code
