"""backend="auto": pick the fastest backend per problem shape by measuring, once.

The first call of an op for a problem key (the op's name, device, dtype and shape, with the
row count rounded up to a power of two so varying sequence lengths share a key) times a
forward+backward of every candidate backend on random inputs of that shape, and caches the
winner for the process; later calls, forward and backward alike, reuse it.
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
    """What auto picked so far: {problem key: backend}."""
    return dict(_choices)


def clear() -> None:
    _choices.clear()


def bucket(rows: int) -> int:
    """Round a row count up to a power of two: the M part of a shape key."""
    return 1 << max(rows - 1, 0).bit_length()


def time_call(step, device: torch.device) -> float:
    """Median seconds of `step()` over REPEATS runs after WARMUP."""
    times = []
    for index in range(WARMUP + REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pick(key: tuple, device: torch.device, measure) -> str:
    """The backend auto uses for problem `key` on `device`; `measure(name)` times one backend."""
    if key in _choices:  # the hot path: one dict lookup per call
        return _choices[key]
    names = candidates(device)
    if len(names) == 1 or not measuring_enabled():
        return names[0]
    # Measuring draws random inputs: keep that off the caller's RNG streams, so a run's
    # results do not depend on whether this shape was met before in the process.
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        _choices[key] = min(names, key=measure)
    return _choices[key]
