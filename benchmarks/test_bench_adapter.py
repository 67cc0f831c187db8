"""pytest-benchmark view of the adapter and gradient-reversal benchmarks.

    pytest benchmarks/ --benchmark-only

Providers and checks come from benchmarks.bench_adapter and benchmarks.bench_grl, so this suite
times exactly what those CLIs time; the CLIs add the other modes, bandwidth and the reports.
"""

import contextlib

import pytest
import torch

from benchmarks import bench_adapter, bench_grl
from benchmarks.bench_lora import DTYPES, default_dtype_name, resolve_device, run_step

DEVICE = resolve_device("auto")
DTYPE_NAME = default_dtype_name(DEVICE)
DTYPE = DTYPES[DTYPE_NAME]
ADAPTER_SHAPES = {
    "cpu": [bench_adapter.Shape(4096, 1024, 64)],
    "cuda": [bench_adapter.Shape(16384, 4096, 64), bench_adapter.Shape(4096, 768, 256)],
}
GRL_SIZES = {"cpu": [1 << 22], "cuda": [1 << 26]}
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
    h, grad_out = bench_adapter.make_inputs(problem, 1)[0]

    def step():
        run_step(layer, "forward+backward", h, grad_out, contextlib.nullcontext())
        _synchronize()

    benchmark.group = f"adapter {shape} {DTYPE_NAME} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, shape=str(shape))
    benchmark(step)


GRL_FORWARDS, GRL_SKIPPED = bench_grl.providers(DEVICE)


@pytest.mark.parametrize("size", GRL_SIZES[DEVICE.type])
@pytest.mark.parametrize("provider", ["naive", *(f"lowrank_{b}" for b in bench_grl.LOWRANK_BACKENDS)])
def test_grad_reverse_backward(benchmark, size, provider):
    if provider in GRL_SKIPPED:
        pytest.skip(GRL_SKIPPED[provider])
    forward = GRL_FORWARDS[provider]
    bench_grl.check(forward, DEVICE, DTYPE)
    x = torch.randn(size, device=DEVICE).to(DTYPE).requires_grad_()
    grad = torch.randn(size, device=DEVICE).to(DTYPE)

    def setup():
        x.grad = None
        return (forward(x),), {}

    def step(y):
        y.backward(grad)
        _synchronize()

    benchmark.group = f"grad_reverse backward {size} {DTYPE_NAME} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, elements=size)
    benchmark.pedantic(step, setup=setup, rounds=20, warmup_rounds=2)
