"""The import rule of DESIGN.md section 1, read from the source: data flows one way, cli -> runtime -> models -> nn
-> ops -> {reference, native, triton}, integrations beside cli; shared leaves (the KV cache, input checks, backend
choice) may be imported from every layer; nothing imports cli. Every import counts, including those inside
functions and under TYPE_CHECKING: an annotation that names an upper layer couples the layers all the same."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastmm"
LEAVES = {"_validate", "kv_cache", "backend"}
BACKENDS = {"reference", "native", "triton"}
BELOW_OPS = BACKENDS | LEAVES | {"_C"}

# What each layer may import of fastmm besides itself. Tools (bench, profiling) sit beside cli and may reach
# anything under it: benchmarks time the backends' kernels directly as baselines.
ALLOWED: dict[str, set[str]] = {
    "reference": set(),
    "_validate": set(),
    "backend": set(),
    "kv_cache": {"_validate"},
    "native": {"_C", "_validate", "kv_cache"},
    "triton": {"reference", "_validate", "backend"},
    "ops": BELOW_OPS,
    "nn": {"ops"} | LEAVES,
    "models": {"nn", "ops"} | LEAVES,
    "runtime": {"models", "nn", "ops"} | LEAVES,
    "integrations": {"runtime", "models", "nn", "ops"} | LEAVES,
    "profiling": {"bench", "runtime", "models", "nn", "ops", "image_io"} | BELOW_OPS,
    "bench": {"fastmm", "runtime", "models", "nn", "ops", "integrations"} | BELOW_OPS,
    "image_io": set(),
    "_native_library": set(),  # loads fastmm._C from $FASTMM_NATIVE_LIBRARY, first thing on import
    "fastmm": {"ops", "nn", "runtime", "integrations", "backend", "profiling", "_native_library"},  # public face
    "cli": {"fastmm", "runtime", "models", "nn", "ops", "integrations", "bench", "profiling", "image_io"} | BELOW_OPS,
}


def _layer(module: str) -> str:
    """fastmm.ops.attention -> "ops"; fastmm -> "fastmm"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fastmm"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file; ``from fastmm import ops`` counts as fastmm.ops."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, f"<relative import, level {node.level}>"))
            elif node.module == "fastmm":
                found += [(node.lineno, f"fastmm.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_layer_has_a_rule():
    layers = {_layer(_module_name(path)) for path in SOURCES}
    assert layers <= set(ALLOWED), f"layers without a rule in ALLOWED: {sorted(layers - set(ALLOWED))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    source = _layer(_module_name(path))
    wrong = []
    for line, module in _imports(path):
        if module.startswith("<relative"):
            wrong.append(f"line {line}: {module} (write fastmm imports absolute, so the rule can read them)")
            continue
        if module != "fastmm" and not module.startswith("fastmm."):
            third_party = module.split(".")[0] not in sys.stdlib_module_names and module.split(".")[0] != "torch"
            if source == "reference" and third_party:
                wrong.append(f"line {line}: {module} (the reference imports only torch and the standard library)")
            continue
        target = _layer(module)
        if target != source and target not in ALLOWED[source]:
            wrong.append(f"line {line}: {module} ({source} may import {sorted(ALLOWED[source]) or 'nothing of fastmm'})")
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports upward or sideways:\n" + "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The reader sees imports inside functions and under TYPE_CHECKING, and resolves ``from fastmm import x``."""
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastmm.models.decoder import Decoder\n"
                      "def f():\n    from fastmm import runtime\n")  # fmt: skip
    imported = [name for _, name in _imports(module)]
    assert "fastmm.models.decoder" in imported and "fastmm.runtime" in imported
    assert _layer("fastmm.models.decoder") not in ALLOWED["native"] and "runtime" not in ALLOWED["nn"]
