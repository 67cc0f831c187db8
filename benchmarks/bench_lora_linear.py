"""LoRA linear benchmark: speed and activation memory of lowrank's op against named baselines.

    python -m benchmarks.bench_lora_linear                    # default shapes for the device
    python -m benchmarks.bench_lora_linear --quick            # one small shape, few repeats: a smoke test
    python -m benchmarks.bench_lora_linear --device cuda --shapes 8192,4096,4096,16 --dropout 0 0.1 --plot

Every provider computes y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W, b frozen and x, A, B
requiring grad:
  linear_frozen      nn.Linear alone with its weight frozen: the floor any LoRA layer pays
  eager_peft_style   base(x) + lora_B(lora_A(dropout(x))) * s in nn.Linear modules, as PEFT writes it
  hf_peft            PEFT's own LoRA layer (peft.get_peft_model around a one-Linear module)
  unsloth_style      Unsloth's recipe: cuBLAS matmuls, the low-rank term added in place with
                     addmm_, a hand-written backward (dropout 0 only, as Unsloth requires)
  <baseline>_compiled  each of the four above through torch.compile (inductor compiles per
                     shape: unless named in --providers, CUDA runs time them at the first shape
                     only, CPU runs not at all, inductor's C++ builds being slow)
  lowrank_<backend>  lowrank.ops.lora_linear with that backend (auto: the fastest, measured per shape)

Modes: inference (forward under no_grad, adapter unmerged); forward; backward alone (on a
fresh forward graph each repeat, only the backward timed); forward+backward. --decode-shapes
are timed in the inference mode only (few rows: decoding). Each provider is checked against
lowrank.ops.lora_linear_reference before it is timed, with its dropout switched off (the masks
are random: torch's, or lowrank's hash mask, which tests/ checks bit for bit), and one that
disagrees is reported instead of timed (exit status 1). --max-minutes stops starting new shapes
(after the first) once the run has taken that long; the report lists what was not run.
Results: <out-dir>/lora_linear_<device-slug>_<dtype>[_<tag>].json (all raw numbers) and .md, and .png
with --plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowrank
from lowrank import _backends
from lowrank._machine import cpu_model
from lowrank.ops import lora_linear, lora_linear_reference

MODES = ("inference", "forward", "backward", "forward+backward")
MODE_COLUMNS = {"inference": "infer ms", "forward": "fwd ms", "backward": "bwd ms", "forward+backward": "fwd+bwd ms"}
BASELINE = "linear_frozen"
LOWRANK_BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")
# The device type each lowrank backend needs its tensors on (None: any).
BACKEND_DEVICE = {"torch": None, "cpu": "cpu", "triton": "cuda", "cuda": "cuda", "auto": None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"

# Inputs rotate among enough sets to total this many bytes, so no repeat finds the previous
# one's activations still in cache (an H100's L2 holds 50 MB).
ROTATION_BYTES = 256 << 20
MAX_INPUT_SETS = 16
CHECK_ROWS = 64
# Tolerance of the check against the float64 reference, relative to each tensor's largest
# entry; fp32 leaves room for the TF32 that Triton's tl.dot uses by default.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Shape:
    """x [M, K] through a K -> N linear layer with a rank-r adapter."""

    M: int
    K: int
    N: int
    r: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            M, K, N, r = (int(value) for value in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is M,K,N,r (four integers), got {text!r}") from None
        return cls(M, K, N, r)

    def __str__(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"


HEADLINE_SHAPE = Shape(8192, 4096, 4096, 16)  # the goals' shape, first so that a time budget never drops it
DEFAULT_SHAPES = {
    "cpu": [Shape(1024, 1024, 1024, 16), Shape(4096, 1024, 1024, 16), Shape(4096, 1024, 1024, 64)],
    "cuda": [HEADLINE_SHAPE] + [shape for shape in (Shape(M, KN, KN, r) for M in (1024, 8192, 32768)
                                                    for KN in (4096, 8192) for r in (8, 16, 64))
                                if shape != HEADLINE_SHAPE],
}
DEFAULT_DECODE_SHAPES = {"cpu": [], "cuda": [Shape(M, KN, KN, 16) for KN in (4096, 8192) for M in (1, 16, 256)]}
DEFAULT_DROPOUT = {"cpu": [0.0], "cuda": [0.0, 0.1]}
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
QUICK_SHAPE = Shape(256, 128, 128, 8)
QUICK_REPEATS = 3
QUICK_WARMUP = 1


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem:
    """The one LoRA layer every provider implements; each provider copies these values."""

    shape: Shape
    weight: Tensor  # [N, K], frozen
    bias: Tensor  # [N], frozen
    lora_A: Tensor  # [r, K]
    lora_B: Tensor  # [N, r]; nonzero, unlike PEFT's init, so no provider can skip the adapter
    lora_alpha: int
    dropout_p: float = 0.0  # lora_dropout, on the adapter's input only

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.shape.r  # PEFT's definition

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 dropout_p: float = 0.0) -> Problem:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    K, N, r = shape.K, shape.N, shape.r
    # Scaled so the base and adapter terms are both O(1): the check sees errors in either.
    return Problem(
        shape=shape,
        weight=randn(N, K, std=K**-0.5),
        bias=randn(N, std=0.1),
        lora_A=randn(r, K, std=K**-0.5),
        lora_B=randn(N, r, std=r**-0.5),
        lora_alpha=2 * r,
        dropout_p=dropout_p,
    )


def make_inputs(problem: Problem, count: int, rows: Optional[int] = None, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """`count` pairs (x requiring grad, gradient of y) of `rows` rows (default M)."""
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    rows = problem.shape.M if rows is None else rows
    inputs = []
    for _ in range(count):
        x = torch.randn(rows, problem.shape.K, generator=generator, device=problem.device).to(problem.dtype)
        grad_y = torch.randn(rows, problem.shape.N, generator=generator, device=problem.device).to(problem.dtype)
        inputs.append((x.requires_grad_(), grad_y))
    return inputs


def input_set_count(shape: Shape, dtype: torch.dtype) -> int:
    set_bytes = shape.M * (shape.K + shape.N) * dtype.itemsize
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)))


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


def _frozen_linear(problem: Problem) -> nn.Linear:
    N, K = problem.weight.shape
    linear = nn.Linear(K, N, device=problem.device, dtype=problem.dtype)
    with torch.no_grad():
        linear.weight.copy_(problem.weight)
        linear.bias.copy_(problem.bias)
    return linear.requires_grad_(False)


def _module_layer(module: nn.Module, lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None) -> Layer:
    return Layer(module, tuple(module.parameters()), lora_A, lora_B, module.train)


class EagerLoraLinear(nn.Module):
    """LoRA the way PEFT writes it, in plain nn.Linear modules."""

    def __init__(self, problem: Problem):
        super().__init__()
        r, K = problem.lora_A.shape
        N = problem.weight.shape[0]
        self.base = _frozen_linear(problem)
        self.dropout = nn.Dropout(problem.dropout_p) if problem.dropout_p > 0 else nn.Identity()  # as PEFT
        self.lora_A = nn.Linear(K, r, bias=False, device=problem.device, dtype=problem.dtype)
        self.lora_B = nn.Linear(r, N, bias=False, device=problem.device, dtype=problem.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(problem.lora_A)
            self.lora_B.weight.copy_(problem.lora_B)
        self.scaling = problem.scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class _OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one linear layer named `proj`."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def build_linear_frozen(problem: Problem) -> Layer:
    return _module_layer(_frozen_linear(problem))


def build_eager_peft_style(problem: Problem) -> Layer:
    module = EagerLoraLinear(problem)
    return _module_layer(module, module.lora_A.weight, module.lora_B.weight)


def build_hf_peft(problem: Problem) -> Layer:
    import peft  # only when asked for: it pulls in transformers

    config = peft.LoraConfig(
        r=problem.shape.r, lora_alpha=problem.lora_alpha, target_modules=["proj"], lora_dropout=problem.dropout_p
    )
    layer = peft.get_peft_model(_OneLinear(_frozen_linear(problem)), config).base_model.model.proj
    # PEFT keeps bf16/fp16 adapters in fp32 by default; time it in the dtype every other provider uses.
    layer.to(problem.dtype)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(problem.lora_A)
        lora_B.copy_(problem.lora_B)
    return _module_layer(layer, lora_A, lora_B)


class _AddmmLora(torch.autograd.Function):
    """Unsloth's LoRA recipe (its matmul_lora and LoRA_W): y = x·Wᵀ + b, then s·(x·Aᵀ)·Bᵀ added
    into y in place by addmm_; backward by hand, dx accumulated the same way."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()
        y = torch.addmm(bias, x, weight.t())
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        dyB = grad_y @ lora_B
        grad_x = grad_y @ weight
        grad_x.addmm_(dyB, lora_A, alpha=ctx.scaling)
        grad_A = (dyB.t() @ x).mul_(ctx.scaling)
        grad_B = (grad_y.t() @ xa).mul_(ctx.scaling)
        return grad_x, None, None, grad_A, grad_B, None


def build_unsloth_style(problem: Problem) -> Layer:
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A = problem.lora_A.clone().requires_grad_()
    lora_B = problem.lora_B.clone().requires_grad_()
    scaling = problem.scaling

    def forward(x: Tensor) -> Tensor:
        return _AddmmLora.apply(x, weight, bias, lora_A, lora_B, scaling)

    return Layer(forward, (weight, bias, lora_A, lora_B), lora_A, lora_B)


def _lowrank_builder(backend: str) -> Callable[[Problem], Layer]:
    def build(problem: Problem) -> Layer:
        weight, bias = problem.weight.clone(), problem.bias.clone()
        lora_A = problem.lora_A.clone().requires_grad_()
        lora_B = problem.lora_B.clone().requires_grad_()
        scaling = problem.scaling
        dropout = {"on": True}

        def forward(x: Tensor) -> Tensor:
            dropout_p = problem.dropout_p if dropout["on"] else 0.0
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend=backend)

        def set_dropout(enabled: bool) -> None:
            dropout["on"] = enabled

        return Layer(forward, (weight, bias, lora_A, lora_B), lora_A, lora_B, set_dropout)

    return build


def _compiled(build: Callable[[Problem], Layer]) -> Callable[[Problem], Layer]:
    """A baseline through torch.compile (inductor): what a compiler buys without our kernels."""

    def build_compiled(problem: Problem) -> Layer:
        layer = build(problem)
        return dataclasses.replace(layer, forward=torch.compile(layer.forward))

    return build_compiled


BASELINE_BUILDERS: dict[str, Callable[[Problem], Layer]] = {
    "linear_frozen": build_linear_frozen,
    "eager_peft_style": build_eager_peft_style,
    "hf_peft": build_hf_peft,
    "unsloth_style": build_unsloth_style,
}
BUILDERS: dict[str, Callable[[Problem], Layer]] = {
    **BASELINE_BUILDERS,
    **{f"{name}_compiled": _compiled(build) for name, build in BASELINE_BUILDERS.items()},
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)
COMPILED_PROVIDERS = tuple(f"{name}_compiled" for name in BASELINE_BUILDERS)
# Unsloth's fast path needs lora_dropout=0; at other rates these are left out.
DROPOUT_FREE_PROVIDERS = ("unsloth_style", "unsloth_style_compiled")


def build_layer(provider: str, problem: Problem) -> Layer:
    return BUILDERS[provider](problem)


def skip_reasons(device: torch.device, named: tuple[str, ...] = ()) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why; `named`: the providers the
    user asked for by name."""
    reasons = {}
    if importlib.util.find_spec("peft") is None:
        reasons["hf_peft"] = reasons["hf_peft_compiled"] = "peft is not installed (pip install peft)"
    if device.type != "cuda":
        # Inductor compiles C++ for the CPU for tens of seconds per shape; ask with --providers.
        for provider in COMPILED_PROVIDERS:
            if provider not in named:
                reasons.setdefault(provider, "CPU runs time torch.compile only when named in --providers")
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


def check_against_reference(layer: Layer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference."""
    x, grad_y = make_inputs(problem, 1, rows=min(CHECK_ROWS, problem.shape.M), seed=2)[0]
    layer.clear_grads(x)
    layer.set_dropout(False)
    try:
        y = layer.forward(x)
        y.backward(grad_y)
    finally:
        layer.set_dropout(True)

    x64 = x.detach().double().requires_grad_()
    weight64, bias64 = problem.weight.double(), problem.bias.double()
    if layer.lora_A is None:
        y64 = F.linear(x64, weight64, bias64)
    else:
        lora_A64 = problem.lora_A.double().requires_grad_()
        lora_B64 = problem.lora_B.double().requires_grad_()
        y64 = lora_linear_reference(x64, weight64, bias64, lora_A64, lora_B64, problem.scaling)
    y64.backward(grad_y.double())

    comparisons = [("output", y, y64), ("grad of x", x.grad, x64.grad)]
    if layer.lora_A is not None:
        comparisons += [
            ("grad of lora_A", layer.lora_A.grad, lora_A64.grad),
            ("grad of lora_B", layer.lora_B.grad, lora_B64.grad),
        ]
    tolerance = CHECK_TOLERANCE[problem.dtype]
    for what, actual, expected in comparisons:
        if actual is None:
            raise AssertionError(f"{what} was not computed")
        torch.testing.assert_close(
            actual.detach().double(),
            expected.detach(),
            rtol=tolerance,
            atol=tolerance * expected.abs().max().item(),
            msg=lambda message: f"{what} differs from the reference: {message}",
        )


# ---------------------------------------------------------------- timing and memory


class _WallTimer:
    """perf_counter around a step; CPU ops finish before they return, so no synchronisation."""

    def __enter__(self) -> "_WallTimer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ms = (time.perf_counter() - self._start) * 1e3

    def elapsed_ms(self) -> float:
        return self._ms


class _CudaEventTimer:
    """CUDA events around a step: GPU time, readable once the device has been synchronised."""

    def __enter__(self) -> "_CudaEventTimer":
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
    layers: dict[str, Layer], inputs: list[tuple[Tensor, Tensor]], mode: str, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of each repeat per provider, providers interleaved so drift hits all alike."""
    on_cuda = inputs[0][0].is_cuda
    timer_class = _CudaEventTimer if on_cuda else _WallTimer
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
                           warmup: int, modes: tuple[str, ...] = MODES) -> tuple[list[dict], list[dict]]:
    """Build each provider, check it against the float64 reference, time the ones that pass in
    every mode of `modes`: (one result row per timed provider, the providers that failed their
    check). Shared by the LoRA, adapter benchmarks: `build(provider, problem)`, `check(layer, problem)`."""
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

    times = {mode: time_mode(layers, inputs, mode, repeats, warmup) for mode in modes}
    x, grad_y = inputs[0]
    on_cuda = x.is_cuda
    training = "forward+backward" in modes
    rows = [
        {
            "shape": dataclasses.asdict(shape),
            "provider": provider,
            "median_ms": {mode: statistics.median(times[mode][provider]) for mode in modes},
            "times_ms": {mode: times[mode][provider] for mode in modes},
            "saved_bytes": saved_activation_bytes(layer, x) if training else None,
            "peak_bytes": peak_cuda_bytes(layer, x, grad_y) if on_cuda and training else None,
            "input_sets": len(inputs),
        }
        for provider, layer in layers.items()
    ]
    return rows, failures


def benchmark_shape(
    shape: Shape, providers: list[str], device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
    dropout_p: float = 0.0, modes: tuple[str, ...] = MODES,
) -> tuple[list[dict], list[dict]]:
    """(one result row per provider, the providers that failed their check) for one shape and
    dropout rate. The ratio to linear_frozen is of forward+backward, or of inference when only
    that mode is timed."""
    problem = make_problem(shape, device, dtype, dropout_p=dropout_p)
    inputs = make_inputs(problem, input_set_count(shape, dtype))
    rows, failures = time_checked_providers(
        shape, problem, providers, build_layer, check_against_reference, inputs, repeats, warmup, modes
    )
    ratio_mode = "forward+backward" if "forward+backward" in modes else modes[0]
    baseline = next((row for row in rows if row["provider"] == BASELINE), None)
    for row in rows:
        row["dropout_p"] = dropout_p
        row["ratio_mode"] = ratio_mode
        row["ratio_to_linear_frozen"] = (
            row["median_ms"][ratio_mode] / baseline["median_ms"][ratio_mode] if baseline else None
        )
    return rows, failures


# ---------------------------------------------------------------- environment and reports


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


def _format_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _format_mib(nbytes: Optional[int]) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.2f}"


def markdown_table(report: dict) -> str:
    """One row per (shape, dropout, provider); × linear_frozen is of fwd+bwd, or of inference on
    the decode rows (the only mode they time)."""
    with_peak = report["device"]["type"] == "cuda"
    header = ["M", "K", "N", "r", "p", "provider", *MODE_COLUMNS.values(), "× linear_frozen", "saved MiB"]
    header += ["peak MiB"] if with_peak else []
    alignments = ["---" if name == "provider" else "---:" for name in header]  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    for row in report["results"]:
        shape, ratio = row["shape"], row["ratio_to_linear_frozen"]
        cells = [str(shape[dim]) for dim in ("M", "K", "N", "r")] + [f"{row['dropout_p']:g}", row["provider"]]
        cells += [_format_ms(row["median_ms"][mode]) if mode in row["median_ms"] else "—" for mode in MODES]
        cells += ["—" if ratio is None else f"{ratio:.2f}", _format_mib(row["saved_bytes"])]
        cells += [_format_mib(row["peak_bytes"])] if with_peak else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_notes(report: dict) -> list[str]:
    notes = [f"- skipped {provider}: {reason}" for provider, reason in report["skipped"].items()]
    notes += [f"- not run, over the --max-minutes budget: {item}" for item in report["not_run"]]
    for failure in report["failed_checks"]:
        first_line = failure["error"].splitlines()[0]
        notes.append(f"- FAILED CHECK, not timed: {failure['provider']} at {Shape(**failure['shape'])}: {first_line}")
    return notes


def markdown_report(report: dict) -> str:
    versions = report["versions"]
    software = ", ".join(f"{name} {versions[name]}" for name in ("torch", "cuda", "triton", "peft") if versions[name])
    context = (
        f"{report['dtype']}; {software}. {report['timing']}. Median of {report['repeats']} repeats "
        f"after {report['warmup']} warm-up. {report['memory']}."
    )
    if report["quick"]:
        context += " QUICK MODE: a smoke test, not a measurement."
    title = f"# LoRA linear benchmark: {report['device']['name']}"
    return "\n".join([title, "", context, "", markdown_table(report), "", *report_notes(report), ""])


def write_plot(report: dict, path: Path) -> bool:
    """A PNG of forward+backward time per provider, one panel per shape; False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # lazily: the benchmark itself does not need matplotlib
    except ImportError:
        return False
    panels = list(dict.fromkeys((Shape(**row["shape"]), row["dropout_p"], row["ratio_mode"])
                                for row in report["results"]))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 0.4 * len(PROVIDERS) * rows + 1.5), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for axis, (shape, dropout_p, mode) in zip(axes, panels):
        panel_rows = [row for row in report["results"]
                      if (Shape(**row["shape"]), row["dropout_p"], row["ratio_mode"]) == (shape, dropout_p, mode)]
        axis.barh([row["provider"] for row in panel_rows], [row["median_ms"][mode] for row in panel_rows])
        axis.invert_yaxis()  # providers top to bottom in table order
        axis.set_title(f"{shape} p={dropout_p:g}", fontsize=9)
        axis.set_xlabel(f"{mode} ms (median)")
    for axis in axes[len(panels) :]:
        axis.set_axis_off()
    figure.suptitle(f"LoRA linear, {report['device']['name']}, {report['dtype']}")
    figure.savefig(path, dpi=120)
    return True


# ---------------------------------------------------------------- command line


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(choice)


def default_dtype_name(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _dropout_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a dropout rate is in [0, 1), got {text}")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_lora_linear",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--shapes", nargs="+", type=Shape.parse, metavar="M,K,N,r", help="default: a set per device")
    parser.add_argument("--decode-shapes", nargs="*", type=Shape.parse, metavar="M,K,N,r",
                        help="timed in the inference mode only (default: M=1,16,256 at K=N=4096,8192, r=16 on "
                             "CUDA; none on CPU)")
    parser.add_argument("--dropout", nargs="+", type=_dropout_rate, metavar="P",
                        help="lora_dropout rates of the training shapes (default: 0 on CPU; 0 and 0.1 on CUDA)")
    parser.add_argument("--max-minutes", type=float,
                        help="start no shape but the first after this long (default: no limit)")
    parser.add_argument("--tag", help="appended to the result files' names (lora_linear_<device>_<dtype>_<tag>)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: every provider that can run here")
    parser.add_argument("--repeats", type=_positive_int, help="timed repeats per mode (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE}, {QUICK_REPEATS} repeats: a smoke test")
    parser.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    return parser.parse_args(argv)


def _methods(device: torch.device) -> dict[str, str]:
    """How this run timed and measured, in words, for the reports."""
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    memory = "saved = distinct storages saved for backward, the layer's weights excluded"
    if device.type == "cuda":
        memory += "; peak = max_memory_allocated above the allocation before one forward+backward"
    return {
        "timing": f"{clock}, providers interleaved round-robin, inputs rotated among up to {MAX_INPUT_SETS} sets",
        "memory": memory,
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    shapes = args.shapes or ([QUICK_SHAPE] if args.quick else DEFAULT_SHAPES[device.type])
    decode_shapes = args.decode_shapes if args.decode_shapes is not None else (
        [] if args.quick or args.shapes else DEFAULT_DECODE_SHAPES[device.type])
    dropout_rates = args.dropout or ([0.0] if args.quick else DEFAULT_DROPOUT[device.type])
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    requested = args.providers or PROVIDERS
    skipped = {provider: reason for provider, reason in skip_reasons(device, tuple(args.providers or ())).items()
               if provider in requested}
    providers = [provider for provider in requested if provider not in skipped]
    runs = [(shape, dropout_p, MODES) for shape in shapes for dropout_p in dropout_rates]
    runs += [(shape, 0.0, ("inference",)) for shape in decode_shapes]

    report = {
        "benchmark": "lora_linear",
        "device": describe_device(device),
        "versions": describe_versions(),
        "dtype": dtype_name,
        "quick": args.quick,
        "repeats": repeats,
        "warmup": warmup,
        **_methods(device),
        "lowrank_backends": {name: status._asdict() for name, status in lowrank.backends().items()},
        "skipped": skipped,
        "failed_checks": [],
        "not_run": [],
        "results": [],
    }
    started = time.perf_counter()
    for index, (shape, dropout_p, modes) in enumerate(runs):
        what = f"{shape} p={dropout_p:g}" + ("" if modes == MODES else f" ({', '.join(modes)} only)")
        over_budget = args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes
        if index and over_budget:  # the first (the headline shape by default) always runs
            report["not_run"].append(what)
            continue
        run_providers = providers
        if index and not args.providers:  # inductor compiles per shape: by default, the first shape only
            run_providers = [provider for provider in providers if provider not in COMPILED_PROVIDERS]
            for provider in set(providers) - set(run_providers):
                report["skipped"][f"{provider} after the first shape"] = (
                    "compiled baselines run at the first shape unless named in --providers")
        if dropout_p > 0:
            run_providers = [provider for provider in run_providers if provider not in DROPOUT_FREE_PROVIDERS]
            for provider in DROPOUT_FREE_PROVIDERS:
                if provider in providers:
                    report["skipped"][f"{provider} at p={dropout_p:g}"] = "Unsloth's fast path needs lora_dropout=0"
        print(f"{what}: timing {', '.join(run_providers)}", file=sys.stderr, flush=True)
        rows, failures = benchmark_shape(shape, run_providers, device, DTYPES[dtype_name], repeats, warmup,
                                         dropout_p, modes)
        report["results"] += rows
        report["failed_checks"] += failures
    return report


def write_reports(out_dir: Path, name: str, report: dict, markdown: str) -> Path:
    """<out_dir>/<name>.json (every raw number) and .md; the stem, for further files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / name
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")
    return stem


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    name = "_".join(["lora_linear", report["device"]["slug"], report["dtype"]] + ([args.tag] if args.tag else []))
    stem = write_reports(args.out_dir, name, report, markdown_report(report))
    if args.plot and report["results"]:
        if write_plot(report, Path(f"{stem}.png")):
            print(f"wrote {stem}.png")
        else:
            print("no plot: matplotlib is not installed", file=sys.stderr)
    print("\n".join(["", *report_notes(report), "", markdown_table(report)]))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
