"""The shared harness of the benchmarks: a provider's layer, interleaved timing of the modes,
memory accounting, checked timing of every provider, the machine and versions of a report, and
the command-line helpers. Each benchmark (bench_<op>.py) brings its problem, providers, reference
check and report; the timing and accounting are these, so every benchmark measures alike."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import lowrank
from lowrank import _backends
from lowrank._machine import cpu_model

LOWRANK_BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")
# The device type each lowrank backend needs its tensors on (None: any).
BACKEND_DEVICE = {"torch": None, "cpu": "cpu", "triton": "cuda", "cuda": "cuda", "auto": None}
MODES = ("inference", "forward", "backward", "forward+backward")


MODE_COLUMNS = {"inference": "infer ms", "forward": "fwd ms", "backward": "bwd ms", "forward+backward": "fwd+bwd ms"}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results" / "kernels"


# Inputs rotate among enough sets to total this many bytes, so no repeat finds the previous
# one's activations still in cache (an H100's L2 holds 50 MB).
ROTATION_BYTES = 256 << 20


MAX_INPUT_SETS = 16


def _no_dropout(enabled: bool) -> None:
    """The dropout switch of a layer without dropout."""


@dataclass
class Layer:
    """One provider's implementation of a Problem: y = forward(x)."""

    forward: Callable[[Tensor], Tensor]
    held: tuple[Tensor, ...]  # the weights it holds: not activations, so not counted as saved
    lora_A: Optional[Tensor] = None  # the trained tensors; None for linear_frozen
    lora_B: Optional[Tensor] = None
    set_dropout: Callable[[bool], None] = _no_dropout  # off while checked against the reference

    def clear_grads(self, x: Tensor) -> None:
        """Drop gradients so each repeat allocates them afresh, as after zero_grad(set_to_none=True)."""
        for tensor in (x, self.lora_A, self.lora_B):
            if tensor is not None:
                tensor.grad = None


class HostTimer:
    """A host clock around a step; CPU ops finish before they return, so no synchronisation."""

    clock = staticmethod(time.perf_counter)

    def __enter__(self) -> "HostTimer":
        self._start = self.clock()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ms = (self.clock() - self._start) * 1e3

    def elapsed_ms(self) -> float:
        return self._ms


class WallTimer(HostTimer):
    """time.perf_counter: wall time."""


class CpuTimer(HostTimer):
    """time.process_time: the CPU time of this process. With one torch thread it is the step's
    cost without the time other jobs on a shared machine take the core away."""

    clock = staticmethod(time.process_time)


class CudaEventTimer:
    """CUDA events around a step: GPU time, readable once the device has been synchronised."""

    def __enter__(self) -> "CudaEventTimer":
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record()
        return self

    def __exit__(self, *exc_info) -> None:
        self._end.record()

    def elapsed_ms(self) -> float:
        return self._start.elapsed_time(self._end)


def run_step(layer: Layer, mode: str, x: Tensor, grad_y: Tensor, timer) -> None:
    """One repeat of `mode`, with only what the mode measures inside `timer`."""
    layer.clear_grads(x)
    if mode == "inference":
        with torch.no_grad(), timer:
            layer.forward(x)
    elif mode == "forward":
        with timer:
            y = layer.forward(x)
        del y  # the graph is freed outside the timer
    elif mode == "backward":
        y = layer.forward(x)
        with timer:
            y.backward(grad_y)
    else:
        with timer:
            layer.forward(x).backward(grad_y)


def time_mode(
    layers: dict[str, Layer], inputs: list[tuple[Tensor, Tensor]], mode: str, repeats: int, warmup: int,
    cpu_clock: bool = False,
) -> dict[str, list[float]]:
    """Milliseconds of each repeat per provider, providers interleaved so drift hits all alike
    (cpu_clock: CPU tensors timed by CpuTimer rather than the wall clock)."""
    on_cuda = inputs[0][0].is_cuda
    timer_class = CudaEventTimer if on_cuda else CpuTimer if cpu_clock else WallTimer
    names = list(layers)
    timers: dict[str, list] = {name: [] for name in names}
    for step in range(warmup + repeats):
        x, grad_y = inputs[step % len(inputs)]
        first = step % len(names)
        for name in names[first:] + names[:first]:  # rotated, so no provider always follows the same one
            timer = timer_class()
            run_step(layers[name], mode, x, grad_y, timer)
            if step >= warmup:
                timers[name].append(timer)
    if on_cuda:
        torch.cuda.synchronize()  # once, at the end: reading timers earlier would drain the queue each repeat
    return {name: [timer.elapsed_ms() for timer in timer_list] for name, timer_list in timers.items()}


def saved_activation_bytes(layer: Layer, x: Tensor) -> int:
    """Bytes of the distinct storages the forward saves for backward, the layer's weights excluded."""
    weight_storages = {tensor.untyped_storage().data_ptr() for tensor in layer.held}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weight_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer.forward(x)
    return sum(saved.values())


def peak_cuda_bytes(layer: Layer, x: Tensor, grad_y: Tensor) -> int:
    """Peak CUDA memory one forward+backward allocates above what was allocated before it."""
    layer.clear_grads(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    layer.forward(x).backward(grad_y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_checked_providers(shape, problem, providers: list[str], build, check, inputs: list, repeats: int,
                           warmup: int, modes: tuple[str, ...] = MODES,
                           provider_modes: Optional[Callable[[str], tuple[str, ...]]] = None,
                           cpu_clock: bool = False) -> tuple[list[dict], list[dict]]:
    """Build each provider, check it against the float64 reference, time the ones that pass in
    every mode of `modes` (or of provider_modes(provider), for providers that cannot run them
    all) with time_mode: (one result row per timed provider, the providers that failed their
    check). Shared by the LoRA, adapter benchmarks: `build(provider, problem)`, `check(layer, problem)`."""
    modes_of = provider_modes or (lambda provider: modes)
    layers, failures = {}, []
    for provider in providers:
        try:
            layer = build(provider, problem)
            check(layer, problem)
        except Exception as exc:  # a broken provider is reported; the others are still measured
            error = f"{type(exc).__name__}: {exc}"
            failures.append({"shape": dataclasses.asdict(shape), "provider": provider, "error": error})
            continue
        layers[provider] = layer
    if not layers:
        return [], failures

    times = {}
    for mode in modes:
        timed_layers = {provider: layer for provider, layer in layers.items() if mode in modes_of(provider)}
        times[mode] = time_mode(timed_layers, inputs, mode, repeats, warmup, cpu_clock) if timed_layers else {}
    x, grad_y = inputs[0]
    on_cuda = x.is_cuda
    rows = []
    for provider, layer in layers.items():
        timed = [mode for mode in modes if mode in modes_of(provider)]
        training = "forward+backward" in timed
        rows.append({
            "shape": dataclasses.asdict(shape),
            "provider": provider,
            "median_ms": {mode: statistics.median(times[mode][provider]) for mode in timed},
            "times_ms": {mode: times[mode][provider] for mode in timed},
            "saved_bytes": saved_activation_bytes(layer, x) if training else None,
            "peak_bytes": peak_cuda_bytes(layer, x, grad_y) if on_cuda and training else None,
            "input_sets": len(inputs),
        })
    return rows, failures


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "slug": _slug(name)}
    model = cpu_model()
    return {
        "type": "cpu",
        "name": f"{model}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "slug": f"cpu-{_slug(model)}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "peft": _package_version("peft"),
        "lowrank": lowrank.__version__,
        "lowrank_extension": dict(_backends.EXTENSION.build_info()) if _backends.EXTENSION is not None else None,
    }


def format_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def format_mib(nbytes: Optional[int]) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.2f}"


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(choice)


def default_dtype_name(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def write_reports(out_dir: Path, name: str, report: dict, markdown: str) -> Path:
    """<out_dir>/<name>.json (every raw number) and .md; the stem, for further files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / name
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")
    return stem


def backend_skip_reasons(device: torch.device) -> dict[str, str]:
    """The lowrank_<backend> providers that cannot be timed on `device`, each with why."""
    reasons = {}
    statuses = lowrank.backends()
    for backend in LOWRANK_BACKENDS:
        provider, needed_device = f"lowrank_{backend}", BACKEND_DEVICE[backend]
        status = statuses.get(backend, _backends.BackendStatus(True, "measured choice per shape"))
        if not status.available:
            reasons[provider] = status.reason
        elif backend == "triton" and _backends.triton_interpret():
            reasons[provider] = "TRITON_INTERPRET=1: the interpreter is for correctness checks, far too slow to time"
        elif needed_device is not None and needed_device != device.type:
            reasons[provider] = f"backend {backend!r} needs {needed_device} tensors; this run is on {device.type}"
    return reasons


def describe_methods(device: torch.device, cpu_clock: bool = False) -> dict[str, str]:
    """How this run timed and measured, in words, for the reports."""
    clock = "time.process_time (CPU time)" if cpu_clock else "time.perf_counter"
    if device.type == "cuda":
        clock = "CUDA events"
    memory = "saved = distinct storages saved for backward, the layer's weights excluded"
    if device.type == "cuda":
        memory += "; peak = max_memory_allocated above the allocation before one forward+backward"
    return {
        "timing": f"{clock}, providers interleaved round-robin, inputs rotated among up to {MAX_INPUT_SETS} sets",
        "memory": memory,
    }
