"""pytest-benchmark tests live here, apart from the main suite (`pytest tests`).

They run only when asked for: `pytest benchmarks --benchmark-only` (or with the environment
variable FUSED_CONCEPT_BENCH=1); otherwise a stray `pytest` from the repository root skips
them instead of spending minutes timing headline shapes."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    wanted = os.environ.get("FUSED_CONCEPT_BENCH") == "1"
    try:
        wanted = wanted or bool(config.getoption("benchmark_only"))
    except ValueError:  # pytest-benchmark not installed
        pass
    if wanted:
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest benchmarks --benchmark-only`")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(here + os.sep):
            item.add_marker(skip)
