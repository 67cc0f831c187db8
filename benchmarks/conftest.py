"""Keep the benchmark suite out of ordinary test runs.

`pytest` alone collects only tests/ (testpaths in pyproject.toml); this also makes `pytest .` or
`pytest benchmarks/` skip the benchmarks unless --benchmark-only asks for them, so no CI job pays
for timing runs by accident.
"""

from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with pytest benchmarks/ --benchmark-only")
    for item in items:
        if item.path.is_relative_to(BENCHMARKS_DIR):
            item.add_marker(skip)
