"""backend="auto": pick a backend per problem shape by measuring, once, and keep the pick.

The first call of an op for a problem key (the op's name, device, dtype and shape, with the row
count rounded up to a power of two so varying sequence lengths share a key) times a forward+
backward of every candidate backend on random inputs of that shape: WARMUP rounds, then REPEATS
rounds that each time every candidate once, in an order rotated per round, so drift on a busy
machine hits all alike. The first candidate (triton, cuda, torch on CUDA tensors; cpu, torch on
CPU tensors) is kept unless another's median is more than MARGIN faster, and again so in as many
new rounds: noise between backends of about equal speed rarely flips the pick from one run to the
next (pin the picks where it must never). Later calls, forward and backward alike, reuse the
pick. LOWRANK_AUTOTUNE=0 takes the first candidate without measuring.

Backends round differently (last bits of fp32), so a pick is part of a run's numbers. choices()
lists the picks of this process; save(path) writes them and load(path) pins them for a later run,
which then uses those backends without measuring; the Trainer records the picks in every
checkpoint and pins them on resume. Don't let the first call of a new shape happen inside CUDA
graph capture: measuring synchronises the device.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch

from lowrank import _backends
from lowrank._files import read_json

WARMUP = 2
REPEATS = 15
MARGIN = 0.03
FORMAT = "lowrank-autotune"

_choices: dict[tuple, str] = {}


def candidates(device: torch.device) -> tuple[str, ...]:
    """Usable backends for tensors on `device`, in order of preference."""
    preference = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    statuses = _backends.backends()
    return tuple(name for name in preference if statuses[name].available)


def measuring_enabled() -> bool:
    return os.environ.get("LOWRANK_AUTOTUNE", "1") != "0"


def choices() -> dict[tuple, str]:
    """What auto picked (or was pinned to) so far: {problem key: backend}."""
    return dict(_choices)


def clear() -> None:
    _choices.clear()


def bucket(rows: int) -> int:
    """Round a row count up to a power of two: the M part of a shape key."""
    return 1 << max(rows - 1, 0).bit_length()


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Median seconds of each step over REPEATS rounds after WARMUP, every round running each step
    once, starting one further along each round."""
    names, times = list(steps), {name: [] for name in steps}
    for round_index in range(WARMUP + REPEATS):
        first = round_index % len(names)
        for name in names[first:] + names[:first]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def choose(names: tuple[str, ...], seconds: dict[str, float]) -> str:
    """The first of `names` unless the fastest beats it by more than MARGIN."""
    fastest = min(names, key=seconds.__getitem__)
    return fastest if seconds[fastest] < (1.0 - MARGIN) * seconds[names[0]] else names[0]


def pick(key: tuple, device: torch.device, step_for: Callable[[str], Callable[[], None]]) -> str:
    """The backend auto uses for problem `key` on `device`; step_for(name) returns a callable that
    runs one forward+backward of that backend on inputs it made."""
    if key in _choices:  # the hot path: one dict lookup per call
        return _choices[key]
    names = candidates(device)
    if len(names) == 1 or not measuring_enabled():
        _choices[key] = names[0]
        return names[0]
    # Measuring draws random inputs: keep that off the caller's RNG streams, so a run's
    # results do not depend on whether this shape was met before in the process.
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        steps = {name: step_for(name) for name in names}
        choice = choose(names, time_interleaved(steps, device))
        if choice != names[0] and choose(names, time_interleaved(steps, device)) != choice:
            choice = names[0]  # leaving the preferred backend takes a second, independent win
    _choices[key] = choice
    return choice


# ------------------------------------------------------------------------ pinning the picks


def records() -> list[list]:
    """The picks as JSON-ready rows: [*key, backend]."""
    return [[*key, backend] for key, backend in _choices.items()]


def pin(rows: list, where: str) -> None:
    """Use the picks in `rows` (as records() returns them) from now on instead of measuring.
    Refuses a row whose backend cannot run tensors of its device here, naming `where`."""
    pinned = {}
    for row in rows:
        try:
            if not (isinstance(row, list) and len(row) >= 3 and all(isinstance(v, (str, int, bool)) for v in row)):
                raise ValueError
            key, backend, device = tuple(row[:-1]), row[-1], torch.device(row[1])
        except (ValueError, RuntimeError):
            raise ValueError(f"{where}: an autotune pick must be [op, device, sizes..., backend], got {row!r}") \
                from None
        if backend not in _backends.NAMES:
            raise ValueError(f"{where}: autotune pick {backend!r} for {key} is not a backend; expected one of "
                             f"{_backends.NAMES}")
        if (device.type == "cpu" or torch.cuda.is_available()) and backend not in candidates(device):
            raise ValueError(f"{where}: autotune pick {backend!r} for {key} cannot run here "
                             f"({_backends.backends()[backend].reason or 'not a backend for ' + device.type}); "
                             "lowrank.autotune.clear() and measure afresh, accepting other rounding")
        pinned[key] = backend
    _choices.update(pinned)


def save(path: str | os.PathLike) -> None:
    """Write this process's picks to `path` (JSON), for load() in another run."""
    with open(path, "w") as file:
        json.dump({"format": FORMAT, "version": 1, "torch": torch.__version__, "choices": records()}, file, indent=1)


def load(path: str | os.PathLike) -> None:
    """Pin the picks saved by save(path): the ops use them instead of measuring."""
    saved = read_json(path, "lowrank.autotune.load")
    if saved.get("format") != FORMAT or not isinstance(saved.get("choices"), list):
        raise ValueError(f"lowrank.autotune.load: {os.fspath(path)} is not a file written by lowrank.autotune.save")
    pin(saved["choices"], f"lowrank.autotune.load: {os.fspath(path)}")
