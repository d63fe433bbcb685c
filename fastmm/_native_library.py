"""FASTMM_NATIVE_LIBRARY=/path/to/_C.so loads the C++ extension from that file instead of the installed one.

`make test-sanitize` uses it to run the tests against a build with AddressSanitizer and
UndefinedBehaviorSanitizer (build/sanitize) without reinstalling the package. It runs when fastmm is first
imported, before any module imports fastmm._C.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ENV = "FASTMM_NATIVE_LIBRARY"


def load_from_env(package) -> None:
    """Import fastmm._C from $FASTMM_NATIVE_LIBRARY, if set, as the package's extension."""
    path = os.environ.get(ENV)
    if not path or "fastmm._C" in sys.modules:
        return
    if not os.path.isfile(path):
        raise ImportError(f"{ENV}={path!r}: no such file (expected a built fastmm extension, _C*.so)")
    spec = importlib.util.spec_from_file_location("fastmm._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastmm._C"] = module
    spec.loader.exec_module(module)
    package._C = module
