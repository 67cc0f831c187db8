"""backend="auto": pick the fastest backend per problem shape by measuring, once.

The first call of lora_linear for a (device, dtype, M bucket, K, N, r, dropout?) key times a
forward+backward of every candidate backend on random inputs of that shape and caches the
winner for the process; later calls, forward and backward alike, reuse it. M is rounded up to
a power of two so that varying sequence lengths do not trigger a measurement each.
LOWRANK_AUTOTUNE=0 skips measuring and takes the first candidate (triton, cuda, torch on CUDA
tensors; cpu, torch on CPU tensors). Don't let the first call of a new shape happen inside
CUDA graph capture: measuring synchronises the device.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from lowrank import _backends

WARMUP = 1
REPEATS = 3

_choices: dict[tuple, str] = {}


def candidates(device: torch.device) -> tuple[str, ...]:
    """Usable backends for tensors on `device`, in order of preference when not measuring."""
    preference = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    statuses = _backends.backends()
    return tuple(name for name in preference if statuses[name].available)


def measuring_enabled() -> bool:
    return os.environ.get("LOWRANK_AUTOTUNE", "1") != "0"


def choices() -> dict[tuple, str]:
    """What auto picked so far: {(device, dtype, M bucket, K, N, r, dropout): backend}."""
    return dict(_choices)


def clear() -> None:
    _choices.clear()


def _bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_backend(implementation, inputs, scaling, dropout_p, seed) -> float:
    x, weight, bias, lora_A, lora_B, grad_y = inputs
    device = x.device
    times = []
    for step in range(WARMUP + REPEATS):
        _synchronize(device)
        start = time.perf_counter()
        _, xa = implementation.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        implementation.backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, True, False, False)
        _synchronize(device)
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pick(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, implementation_of) -> str:
    """The backend auto uses for this problem; `implementation_of(name)` gives a backend's functions."""
    names = candidates(x.device)
    if len(names) == 1 or not measuring_enabled():
        return names[0]
    K, N, r = x.shape[1], weight.shape[0], lora_A.shape[0]
    key = (str(x.device), x.dtype, _bucket(x.shape[0]), K, N, r, dropout_p > 0.0)
    if key not in _choices:
        rows = key[2]
        with torch.no_grad():
            make = lambda *shape: torch.randn(*shape, device=x.device, dtype=x.dtype)  # noqa: E731
            inputs = (make(rows, K), make(N, K), make(N), make(r, K), make(N, r), make(rows, N))
            seed = torch.zeros((), dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None
            times = {name: _time_backend(implementation_of(name), inputs, 0.5, dropout_p, seed) for name in names}
        _choices[key] = min(times, key=times.get)
    return _choices[key]
