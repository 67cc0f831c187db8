"""pytest-benchmark view of the adapter benchmark.

    pytest benchmarks/ --benchmark-only

Providers and checks come from benchmarks.bench_adapter, so this suite times exactly what the
CLI times; the CLI adds the other modes and the reports.
"""

import pytest

from benchmarks import bench_adapter
from benchmarks.harness import DTYPES, default_dtype_name, resolve_device

DEVICE = resolve_device("auto")
DTYPE_NAME = default_dtype_name(DEVICE)
DTYPE = DTYPES[DTYPE_NAME]
ADAPTER_SHAPES = {
    "cpu": [bench_adapter.Shape(4096, 1024, 64)],
    "cuda": [bench_adapter.Shape(16384, 4096, 64), bench_adapter.Shape(4096, 768, 256)],
}


@pytest.mark.parametrize("shape", ADAPTER_SHAPES[DEVICE.type], ids=str)
@pytest.mark.parametrize("provider", bench_adapter.PROVIDERS)
def test_adapter_forward_backward(time_layer_step, shape, provider):
    problem = bench_adapter.make_problem(shape, "relu", DEVICE, DTYPE)
    time_layer_step(bench_adapter, problem, provider, f"adapter {shape} {DTYPE_NAME} {DEVICE.type}")
