"""Keep the benchmark suite out of ordinary test runs.

`pytest` alone collects only tests/ (testpaths in pyproject.toml); this also makes `pytest .` or
`pytest benchmarks/` skip the benchmarks unless --benchmark-only asks for them, so no CI job pays
for timing runs by accident.
"""

import contextlib
from pathlib import Path

import pytest
import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with pytest benchmarks/ --benchmark-only")
    for item in items:
        if item.path.is_relative_to(BENCHMARKS_DIR):
            item.add_marker(skip)


@pytest.fixture
def time_layer_step(benchmark):
    """time_layer_step(bench, problem, provider, group): pytest-benchmark's timing of one
    forward+backward of `provider` of the layer benchmark module `bench` (bench_lora_linear,
    bench_dora_linear, bench_adapter) on `problem`, in the benchmark group `group`; skipped where
    the provider cannot run, and checked against the reference first (timing a wrong provider
    would be worthless)."""
    from benchmarks import harness

    def time_step(bench, problem, provider: str, group: str) -> None:
        skipped = bench.skip_reasons(problem.device)
        if provider in skipped:
            pytest.skip(skipped[provider])
        layer = bench.build_layer(provider, problem)
        bench.check_against_reference(layer, problem)
        x, grad_y = harness.make_inputs(problem, 1)[0]

        def step():
            harness.run_step(layer, "forward+backward", x, grad_y, contextlib.nullcontext())  # all of it is timed
            if problem.device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.group = group
        benchmark.extra_info.update(provider=provider, shape=str(problem.shape),
                                    saved_bytes=harness.saved_activation_bytes(layer, x))
        benchmark(step)

    return time_step
