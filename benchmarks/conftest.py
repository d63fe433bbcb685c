"""pytest-benchmark setup: the host-memory policy of `fastmm bench`, and collection of bench_<family>.py files
(pytest only collects test_*.py by default), so that both `pytest benchmarks --benchmark-only` and
`pytest benchmarks/bench_norm.py --benchmark-only` work."""

import pytest

from fastmm.bench.environment import keep_freed_memory


def pytest_configure(config):
    # Freed memory is kept for reuse, as in `fastmm bench`: large outputs are not page-faulted in on every call.
    keep_freed_memory()


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself: collecting it here too would
    # run every benchmark twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
