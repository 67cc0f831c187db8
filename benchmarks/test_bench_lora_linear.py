"""pytest-benchmark view of the LoRA benchmark: forward+backward per provider, grouped by shape.

    pytest benchmarks/ --benchmark-only

Providers, problems and steps come from benchmarks.bench_lora_linear, so this suite times exactly what
the CLI times; the CLI adds the separate forward/backward modes, memory and the reports.
"""

import contextlib

import pytest
import torch

from benchmarks.bench_lora_linear import (
    PROVIDERS,
    Shape,
    build_layer,
    check_against_reference,
    make_problem,
    skip_reasons,
)
from benchmarks.harness import DTYPES, default_dtype_name, make_inputs, resolve_device, run_step, saved_activation_bytes

DEVICE = resolve_device("auto")
DTYPE = DTYPES[default_dtype_name(DEVICE)]
# Few and small on CPU, so the suite takes seconds per provider there.
SUITE_SHAPES = {
    "cpu": [Shape(1024, 1024, 1024, 16), Shape(1024, 1024, 1024, 64)],
    "cuda": [Shape(4096, 4096, 4096, 16), Shape(8192, 4096, 4096, 64)],
}
SKIPPED = skip_reasons(DEVICE)


@pytest.fixture(scope="module", params=SUITE_SHAPES[DEVICE.type], ids=str)
def problem(request):
    return make_problem(request.param, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, problem, provider):
    if provider in SKIPPED:
        pytest.skip(SKIPPED[provider])
    layer = build_layer(provider, problem)
    check_against_reference(layer, problem)  # timing a wrong provider would be worthless
    x, grad_y = make_inputs(problem, 1)[0]

    def step():
        run_step(layer, "forward+backward", x, grad_y, contextlib.nullcontext())  # pytest-benchmark times it all
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{problem.shape} {default_dtype_name(DEVICE)} {DEVICE.type}"
    benchmark.extra_info.update(
        provider=provider, shape=str(problem.shape), saved_bytes=saved_activation_bytes(layer, x)
    )
    benchmark(step)
