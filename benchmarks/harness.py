"""The shared harness of the benchmarks: a provider's layer, interleaved timing of the modes,
memory accounting, the machine and versions of a report, and the command-line helpers; and for
the layer benchmarks (bench_lora_linear, bench_adapter: y = layer(x) of one op), the shape and
problem types, their inputs, the check against a float64 reference, checked timing of every
provider, the command line, the report and its table. Each benchmark (bench_<op>.py) brings its
sizes, tensors, providers, reference and its own columns; the rest is here, so every benchmark
measures and reports alike."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
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


# Repeats of the layer benchmarks: timed, and untimed warm-up before them.
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
QUICK_REPEATS = 3
QUICK_WARMUP = 1
QUICK_NOTE = " QUICK MODE: a smoke test, not a measurement."


CHECK_ROWS = 64
# Tolerance of the check against the float64 reference, relative to each tensor's largest
# entry; fp32 leaves room for the TF32 that Triton's tl.dot uses by default.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _no_dropout(enabled: bool) -> None:
    """The dropout switch of a layer without dropout."""


@dataclass
class Layer:
    """One provider's implementation of a LayerProblem: y = forward(x)."""

    forward: Callable[[Tensor], Tensor]
    held: tuple[Tensor, ...]  # the weights it holds: not activations, so not counted as saved
    # Its copies of the tensors the op trains, in the order the benchmark's check names them
    # (LoRA: lora_A, lora_B); none for a frozen baseline.
    trained: tuple[Tensor, ...] = ()
    set_dropout: Callable[[bool], None] = _no_dropout  # off while checked against the reference

    def clear_grads(self, x: Tensor) -> None:
        """Drop gradients so each repeat allocates them afresh, as after zero_grad(set_to_none=True)."""
        for tensor in (x, *self.trained):
            tensor.grad = None


class WallTimer:
    """A host clock around a step, by default wall time (time.perf_counter); CPU ops finish
    before they return, so no synchronisation."""

    clock = staticmethod(time.perf_counter)

    def __enter__(self) -> "WallTimer":
        self._start = self.clock()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ms = (self.clock() - self._start) * 1e3

    def elapsed_ms(self) -> float:
        return self._ms


class CpuTimer(WallTimer):
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


# ---------------------------------------------------------------- a layer benchmark's problem


@dataclass(frozen=True)
class LayerShape:
    """The sizes of a layer benchmark's problem, x [M, in_features] -> y [M, out_features]. A
    benchmark subclasses it as a frozen dataclass with its other sizes as int fields (after M:
    the order --shapes takes them in) and properties in_features and out_features naming x's and
    y's widths, as bench_lora_linear.Shape does."""

    M: int  # rows of x (tokens)

    @classmethod
    def metavar(cls) -> str:
        """The sizes' names as --shapes takes them: M,K,N,r."""
        return ",".join(field.name for field in dataclasses.fields(cls))

    @classmethod
    def parse(cls, text: str) -> "LayerShape":
        """A shape from its sizes written as --shapes takes them: 8192,4096,4096,16."""
        count = len(dataclasses.fields(cls))
        try:
            sizes = [int(value) for value in text.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != count:
            raise argparse.ArgumentTypeError(f"a shape is {cls.metavar()} ({count} integers), got {text!r}")
        return cls(*sizes)

    def __str__(self) -> str:
        return shape_text(dataclasses.asdict(self))


def shape_text(sizes: dict[str, int]) -> str:
    """A shape's sizes (a report's row["shape"]) as the reports write them: M=256 K=128 N=128 r=8."""
    return " ".join(f"{name}={value}" for name, value in sizes.items())


@dataclass
class LayerProblem:
    """The one layer every provider of a layer benchmark implements, each copying its values. A
    benchmark subclasses it with the op's tensors (and settings) as fields, which its
    make_problem fills from seeded_randn."""

    shape: LayerShape
    device: torch.device
    dtype: torch.dtype


def seeded_randn(device: torch.device, dtype: torch.dtype, seed: int) -> Callable[..., Tensor]:
    """randn(*size, std=...): normal values times std in `dtype`, all drawn from one generator on
    `device` seeded with `seed`, so a problem's tensors are the same in every run."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    return randn


def make_inputs(problem: LayerProblem, count: int, rows: Optional[int] = None,
                seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """`count` pairs (x requiring grad, gradient of y) of `rows` rows (default M)."""
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    shape = problem.shape
    rows = shape.M if rows is None else rows
    inputs = []
    for _ in range(count):
        x = torch.randn(rows, shape.in_features, generator=generator, device=problem.device).to(problem.dtype)
        grad_y = torch.randn(rows, shape.out_features, generator=generator, device=problem.device).to(problem.dtype)
        inputs.append((x.requires_grad_(), grad_y))
    return inputs


def _input_set_count(problem: LayerProblem) -> int:
    shape = problem.shape
    set_bytes = shape.M * (shape.in_features + shape.out_features) * problem.dtype.itemsize
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)))


def check_against_reference(layer: Layer, problem: LayerProblem, reference: Callable[..., Tensor],
                            trained: dict[str, Tensor], x_name: str = "x") -> None:
    """Raise AssertionError unless the layer's output and the gradients of x and of its trained
    tensors match reference(x, *trained) computed in float64. `trained`: the problem's values of
    the tensors in layer.trained, by name, in the same order; the layer runs with its dropout off
    (the masks are random)."""
    x, grad_y = make_inputs(problem, 1, rows=min(CHECK_ROWS, problem.shape.M), seed=2)[0]
    layer.clear_grads(x)
    layer.set_dropout(False)
    try:
        y = layer.forward(x)
        y.backward(grad_y)
    finally:
        layer.set_dropout(True)

    x64 = x.detach().double().requires_grad_()
    trained64 = [value.double().requires_grad_() for value in trained.values()]
    y64 = reference(x64, *trained64)
    y64.backward(grad_y.double())

    comparisons = [("output", y, y64), (f"grad of {x_name}", x.grad, x64.grad)]
    comparisons += [(f"grad of {name}", ours.grad, expected.grad)
                    for name, ours, expected in zip(trained, layer.trained, trained64, strict=True)]
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


def time_checked_providers(report: dict, problem: LayerProblem, providers: list[str], build, check,
                           modes: tuple[str, ...] = MODES,
                           provider_modes: Optional[Callable[[str], tuple[str, ...]]] = None) -> list[dict]:
    """Build each provider, check it against the float64 reference, time the ones that pass in
    every mode of `modes` (or of provider_modes(provider), for providers that cannot run them
    all; the report's repeats, warmup and clock) on inputs rotated as ROTATION_BYTES asks. Adds a
    row per timed provider to report["results"] and one per failed check to
    report["failed_checks"]; returns the new result rows, for the benchmark's own columns.
    `build(provider, problem)`, `check(layer, problem)`."""
    modes_of = provider_modes or (lambda provider: modes)
    shape = dataclasses.asdict(problem.shape)
    layers = {}
    for provider in providers:
        try:
            layer = build(provider, problem)
            check(layer, problem)
        except Exception as exc:  # a broken provider is reported; the others are still measured
            error = f"{type(exc).__name__}: {exc}"
            report["failed_checks"].append({"shape": shape, "provider": provider, "error": error})
            continue
        layers[provider] = layer
    if not layers:
        return []

    inputs = make_inputs(problem, _input_set_count(problem))
    times = {}
    for mode in modes:
        timed = {provider: layer for provider, layer in layers.items() if mode in modes_of(provider)}
        times[mode] = time_mode(timed, inputs, mode, report["repeats"], report["warmup"], report["cpu_clock"])
    x, grad_y = inputs[0]
    on_cuda = x.is_cuda
    rows = []
    for provider, layer in layers.items():
        timed_modes = [mode for mode in modes if mode in modes_of(provider)]
        training = "forward+backward" in timed_modes
        rows.append({
            "shape": shape,
            "provider": provider,
            "median_ms": {mode: statistics.median(times[mode][provider]) for mode in timed_modes},
            "times_ms": {mode: times[mode][provider] for mode in timed_modes},
            "saved_bytes": saved_activation_bytes(layer, x) if training else None,
            "peak_bytes": peak_cuda_bytes(layer, x, grad_y) if on_cuda and training else None,
            "input_sets": len(inputs),
        })
    report["results"] += rows
    return rows


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


# ---------------------------------------------------------------- a layer benchmark's command line


def _per_device(values: dict[str, int]) -> str:
    return f"{values['cpu']} on CPU, {values['cuda']} on CUDA"


def layer_parser(prog: str, description: str, shape_type: type[LayerShape], providers: tuple[str, ...],
                 quick_shape: LayerShape) -> argparse.ArgumentParser:
    """The options every layer benchmark takes (read by start_layer_report); each adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--shapes", nargs="+", type=shape_type.parse, metavar=shape_type.metavar(),
                        help="default: a set per device")
    parser.add_argument("--providers", nargs="+", choices=providers, help="default: every provider that can run here")
    parser.add_argument("--repeats", type=positive_int,
                        help=f"timed repeats per mode (default {_per_device(DEFAULT_REPEATS)})")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed repeats before them (default {_per_device(DEFAULT_WARMUP)})")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time CPU runs by process CPU time, not wall time: with --threads 1, each step's cost "
                             "without what other jobs on a shared machine take")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument("--quick", action="store_true", help=f"{quick_shape}, {QUICK_REPEATS} repeats: a smoke test")
    return parser


def start_layer_report(benchmark: str, args: argparse.Namespace, default_shapes: dict[str, list],
                       quick_shape: LayerShape, skip_reasons: Callable[[torch.device, tuple[str, ...]], dict[str, str]],
                       providers: tuple[str, ...], **described) -> tuple:
    """(device, shapes, the providers to time, the report so far) of a layer benchmark run with
    `args` (layer_parser's options): the device's defaults, or --quick's, overridden by the
    options given; `skip_reasons(device, the providers named)`: the ones that cannot run here;
    `described`: the benchmark's own settings, for the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shapes = args.shapes or ([quick_shape] if args.quick else default_shapes[device.type])
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    requested = args.providers or providers
    skipped = {provider: reason for provider, reason in skip_reasons(device, tuple(args.providers or ())).items()
               if provider in requested}
    report = {
        **report_header(benchmark, device, args.dtype or default_dtype_name(device), **described, quick=args.quick,
                        repeats=repeats, warmup=warmup, cpu_clock=args.cpu_clock),
        **describe_methods(device, args.cpu_clock),
        "lowrank_backends": {name: status._asdict() for name, status in lowrank.backends().items()},
        "skipped": skipped,
        "failed_checks": [],
        "results": [],
    }
    return device, shapes, [provider for provider in requested if provider not in skipped], report


# ---------------------------------------------------------------- reports


def report_header(benchmark: str, device: torch.device, dtype_name: str, **settings) -> dict:
    """The first keys of every report: the benchmark, the machine, the software, the dtype, then `settings`."""
    return {"benchmark": benchmark, "device": describe_device(device), "versions": describe_versions(),
            "dtype": dtype_name, **settings}


def measurement_sentence(report: dict, software: tuple[str, ...]) -> str:
    """The versions of `software` and how the report's times were taken, for its markdown."""
    versions = report["versions"]
    named = ", ".join(f"{name} {versions[name]}" for name in software if versions[name])
    return f"{named}. {report['timing']}. Median of {report['repeats']} repeats after {report['warmup']} warm-up."


def report_notes(report: dict) -> list[str]:
    """The report's markdown list: the providers skipped and why, what the time budget left
    out (not_run), the providers that failed their check."""
    notes = [f"- skipped {provider}: {reason}" for provider, reason in report["skipped"].items()]
    notes += [f"- not run, over the --max-minutes budget: {item}" for item in report.get("not_run", [])]
    for failure in report.get("failed_checks", []):
        where = f" at {shape_text(failure['shape'])}" if "shape" in failure else ""
        first_line = failure["error"].splitlines()[0]
        notes.append(f"- FAILED CHECK, not timed: {failure['provider']}{where}: {first_line}")
    return notes


def markdown_document(report: dict, title: str, context: str, table: str) -> str:
    """A report's markdown: `title` on the device, the `context` paragraph (marked a smoke test
    under --quick), the table, the notes."""
    if report["quick"]:
        context += QUICK_NOTE
    heading = f"# {title}: {report['device']['name']}"
    return "\n".join([heading, "", context, "", table, "", *report_notes(report), ""])


Column = tuple[str, Callable[[dict], str]]  # a table's column: its header, and its cell of a result row


def format_table(rows: list[dict], columns: list[Column]) -> str:
    """One table line per row; numbers right-aligned (every column but the provider's)."""
    header = [name for name, _ in columns]
    alignments = ["---" if name == "provider" else "---:" for name in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def _mode_cell(mode: str) -> Callable[[dict], str]:
    return lambda row: format_ms(row["median_ms"][mode]) if mode in row["median_ms"] else "—"


def layer_table(report: dict, shape_type: type[LayerShape], before_provider: tuple[Column, ...] = (),
                after_modes: tuple[Column, ...] = (), modes: tuple[str, ...] = MODES) -> str:
    """A layer benchmark's table, one line per result: the shape's sizes, `before_provider`, the
    provider, the median ms of each of the benchmark's `modes` (— where it was not timed),
    `after_modes`, saved MiB and on CUDA peak MiB."""
    columns = [(field.name, lambda row, name=field.name: str(row["shape"][name]))
               for field in dataclasses.fields(shape_type)]
    columns += [*before_provider, ("provider", lambda row: row["provider"])]
    columns += [(MODE_COLUMNS[mode], _mode_cell(mode)) for mode in modes]
    columns += [*after_modes, ("saved MiB", lambda row: format_mib(row["saved_bytes"]))]
    if report["device"]["type"] == "cuda":
        columns.append(("peak MiB", lambda row: format_mib(row["peak_bytes"])))
    return format_table(report["results"], columns)


def console_summary(report: dict, table: str) -> str:
    """What a benchmark prints when done: the notes, then the table, last so a terminal keeps it in view."""
    return "\n".join(["", *report_notes(report), "", table])


def report_name(report: dict, *variants: Optional[str]) -> str:
    """A layer benchmark's file stem, <benchmark>_<device slug>_<dtype>[_<variant>...], leaving out
    variants that are None (an option not given)."""
    parts = [report["benchmark"], report["device"]["slug"], report["dtype"], *variants]
    return "_".join(part for part in parts if part)


def write_reports(out_dir: Path, name: str, report: dict, markdown: str) -> Path:
    """<out_dir>/<name>.json (every raw number) and .md; the stem, for further files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / name
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")
    return stem


def publish(report: dict, out_dir: Path, name: str, markdown: str, summary: str) -> int:
    """Write the report (write_reports), print `summary`; the exit status: 1 if a provider failed its check."""
    write_reports(out_dir, name, report, markdown)
    print(summary)
    return 1 if report.get("failed_checks") else 0


def publish_with_goals(report: dict, args: argparse.Namespace, markdown: str, table: str, goals: list[str]) -> int:
    """publish for a layer benchmark with goal ratios: the files named by report_name with --tag,
    then the goals (markdown list lines) and the console summary printed, the table last."""
    summary = "\n".join(["", *goals, console_summary(report, table)])
    return publish(report, args.out_dir, report_name(report, args.tag), markdown, summary)
