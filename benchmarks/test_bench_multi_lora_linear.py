"""pytest-benchmark view of the mixed-batch multi-adapter LoRA benchmark: forward+backward per
training provider at 16 adapters, grouped by shape.

    pytest benchmarks/ --benchmark-only

Providers, problems and steps come from benchmarks.bench_multi_lora_linear, so this suite times
exactly what the CLI times; the CLI adds the inference mode (and PEFT's mixed batch, which has
only that), memory, the goal ratios and the reports.
"""

import pytest

from benchmarks import bench_multi_lora_linear as bench
from benchmarks.harness import DTYPES, default_dtype_name, resolve_device

DEVICE = resolve_device("auto")
DTYPE = DTYPES[default_dtype_name(DEVICE)]
SUITE_SHAPES = {"cpu": [bench.Shape(1024, 1024, 1024, 16, 16)], "cuda": [bench.Shape(8192, 4096, 4096, 16, 16)]}
TRAINING_PROVIDERS = [provider for provider in bench.PROVIDERS if "forward+backward" in bench.provider_modes(provider)]


@pytest.fixture(scope="module", params=SUITE_SHAPES[DEVICE.type], ids=str)
def problem(request):
    return bench.make_problem(request.param, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", TRAINING_PROVIDERS)
def test_forward_backward(time_layer_step, problem, provider):
    time_layer_step(bench, problem, provider, f"multi-LoRA {problem.shape} {default_dtype_name(DEVICE)} {DEVICE.type}")
