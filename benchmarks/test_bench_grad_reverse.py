"""pytest-benchmark view of the gradient-reversal benchmark: the backward through autograd.

    pytest benchmarks/ --benchmark-only

Providers and checks come from benchmarks.bench_grad_reverse, so this suite times exactly what
the CLI times; the CLI adds the forward, bandwidth against copy_ and the reports.
"""

import pytest
import torch

from benchmarks import bench_grad_reverse
from benchmarks.harness import DTYPES, default_dtype_name, resolve_device

DEVICE = resolve_device("auto")
DTYPE_NAME = default_dtype_name(DEVICE)
DTYPE = DTYPES[DTYPE_NAME]
SIZES = {"cpu": [1 << 22], "cuda": [1 << 26]}


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


FORWARDS, SKIPPED = bench_grad_reverse.providers(DEVICE)


@pytest.mark.parametrize("size", SIZES[DEVICE.type])
@pytest.mark.parametrize("provider", ["naive", *(f"lowrank_{b}" for b in bench_grad_reverse.LOWRANK_BACKENDS)])
def test_grad_reverse_backward(benchmark, size, provider):
    if provider in SKIPPED:
        pytest.skip(SKIPPED[provider])
    forward = FORWARDS[provider]
    bench_grad_reverse.check(forward, DEVICE, DTYPE)
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
