"""Adding an op family touches only the family's own files (docs/architecture.md, "Adding an op family"): the
places every family passes through (dispatch, the op spec, the C++ module definition, the bench registry,
CMake) name no family, so nothing central has to be edited for a new one. The family-specific files exist for
every family that has them."""

from __future__ import annotations

import pathlib
import re

import pytest

from fastmm.ops._spec import DECLARED

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = tuple(sorted(DECLARED))  # every family that declares kernels
# Files every family goes through. They may mention a family only in prose (comments, docstrings); code that
# names one would be a registry to edit.
SHARED = (
    "fastmm/ops/_dispatch.py",
    "fastmm/ops/_spec.py",
    "fastmm/backend.py",
    "fastmm/bench/suites/__init__.py",
    "csrc/bindings.cpp",
    "CMakeLists.txt",
)


def _code(path: pathlib.Path) -> str:
    """The file without comments and string literals (Python docstrings, # and // comments)."""
    text = path.read_text()
    if path.suffix == ".py":
        text = re.sub(r'"""(?:.|\n)*?"""', "", text)
        text = re.sub(r"#.*", "", text)
    else:
        text = re.sub(r"//.*|#.*", "", text) if path.suffix in (".cpp", ".h") else re.sub(r"#.*", "", text)
    return text


@pytest.mark.parametrize("shared", SHARED)
def test_shared_files_name_no_family(shared):
    code = _code(ROOT / shared)
    named = [family for family in FAMILIES if re.search(rf"\b{family}\b", code)]
    assert not named, f"{shared} names the families {named} in code: adding a family would mean editing it"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_its_files(family):
    expected = [f"fastmm/reference/{family}.py", f"fastmm/ops/{family}.py", f"fastmm/triton/{family}.py",
                f"fastmm/bench/suites/{family}.py"]  # fmt: skip
    missing = [path for path in expected if not (ROOT / path).exists()]
    assert not missing, f"family {family}: {missing}"


def test_the_check_sees_a_registry(tmp_path):
    registry = tmp_path / "registry.py"
    registry.write_text('"""Mentions vq in prose only."""\nFAMILIES = ["norm"]  # and vq in a comment\n')
    code = _code(registry)
    assert re.search(r"\bnorm\b", code) and not re.search(r"\bvq\b", code)
