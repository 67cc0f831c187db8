"""pytest-benchmark view of the adapter benchmark.

    pytest benchmarks/ --benchmark-only

Providers and checks come from benchmarks.bench_adapter, so this suite times exactly what the
CLI times; the CLI adds the other modes and the reports.
"""

import contextlib

import pytest
import torch

from benchmarks import bench_adapter
from benchmarks.harness import DTYPES, default_dtype_name, make_inputs, resolve_device, run_step

DEVICE = resolve_device("auto")
DTYPE_NAME = default_dtype_name(DEVICE)
DTYPE = DTYPES[DTYPE_NAME]
ADAPTER_SHAPES = {
    "cpu": [bench_adapter.Shape(4096, 1024, 64)],
    "cuda": [bench_adapter.Shape(16384, 4096, 64), bench_adapter.Shape(4096, 768, 256)],
}
ADAPTER_SKIPPED = bench_adapter.skip_reasons(DEVICE)


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", ADAPTER_SHAPES[DEVICE.type], ids=str)
@pytest.mark.parametrize("provider", bench_adapter.PROVIDERS)
def test_adapter_forward_backward(benchmark, shape, provider):
    if provider in ADAPTER_SKIPPED:
        pytest.skip(ADAPTER_SKIPPED[provider])
    problem = bench_adapter.make_problem(shape, "relu", DEVICE, DTYPE)
    layer = bench_adapter.build_layer(provider, problem)
    bench_adapter.check_against_reference(layer, problem)  # timing a wrong provider would be worthless
    h, grad_out = make_inputs(problem, 1)[0]

    def step():
        run_step(layer, "forward+backward", h, grad_out, contextlib.nullcontext())
        _synchronize()

    benchmark.group = f"adapter {shape} {DTYPE_NAME} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, shape=str(shape))
    benchmark(step)
