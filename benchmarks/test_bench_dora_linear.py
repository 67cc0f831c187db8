"""pytest-benchmark view of the DoRA benchmark: forward+backward per provider, grouped by shape.

    pytest benchmarks/ --benchmark-only

Providers, problems and steps come from benchmarks.bench_dora_linear, so this suite times exactly
what the CLI times; the CLI adds the separate modes, memory, the goal ratios and the reports.
"""

import pytest

from benchmarks import bench_dora_linear
from benchmarks.harness import DTYPES, default_dtype_name, resolve_device

DEVICE = resolve_device("auto")
DTYPE = DTYPES[default_dtype_name(DEVICE)]
SUITE_SHAPES = {"cpu": [bench_dora_linear.Shape(1024, 1024, 1024, 16)],
                "cuda": [bench_dora_linear.Shape(8192, 4096, 4096, 16)]}


@pytest.fixture(scope="module", params=SUITE_SHAPES[DEVICE.type], ids=str)
def problem(request):
    return bench_dora_linear.make_problem(request.param, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", bench_dora_linear.PROVIDERS)
def test_forward_backward(time_layer_step, problem, provider):
    group = f"DoRA {problem.shape} {default_dtype_name(DEVICE)} {DEVICE.type}"
    time_layer_step(bench_dora_linear, problem, provider, group)
