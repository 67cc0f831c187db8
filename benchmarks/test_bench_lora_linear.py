"""pytest-benchmark view of the LoRA benchmark: forward+backward per provider, grouped by shape.

    pytest benchmarks/ --benchmark-only

Providers, problems and steps come from benchmarks.bench_lora_linear, so this suite times exactly what
the CLI times; the CLI adds the separate forward/backward modes, memory and the reports.
"""

import pytest

from benchmarks import bench_lora_linear
from benchmarks.harness import DTYPES, default_dtype_name, resolve_device

DEVICE = resolve_device("auto")
DTYPE = DTYPES[default_dtype_name(DEVICE)]
# Few and small on CPU, so the suite takes seconds per provider there.
SUITE_SHAPES = {
    "cpu": [bench_lora_linear.Shape(1024, 1024, 1024, 16), bench_lora_linear.Shape(1024, 1024, 1024, 64)],
    "cuda": [bench_lora_linear.Shape(4096, 4096, 4096, 16), bench_lora_linear.Shape(8192, 4096, 4096, 64)],
}


@pytest.fixture(scope="module", params=SUITE_SHAPES[DEVICE.type], ids=str)
def problem(request):
    return bench_lora_linear.make_problem(request.param, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", bench_lora_linear.PROVIDERS)
def test_forward_backward(time_layer_step, problem, provider):
    time_layer_step(bench_lora_linear, problem, provider, f"{problem.shape} {default_dtype_name(DEVICE)} {DEVICE.type}")
