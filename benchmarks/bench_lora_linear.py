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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowrank
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    DTYPES,
    LOWRANK_BACKENDS,
    MAX_INPUT_SETS,
    MODE_COLUMNS,
    MODES,
    ROTATION_BYTES,
    Layer,
    backend_skip_reasons,
    default_dtype_name,
    describe_device,
    describe_methods,
    describe_versions,
    format_mib,
    format_ms,
    positive_int,
    resolve_device,
    time_checked_providers,
    write_reports,
)
from lowrank.ops import lora_linear, lora_linear_reference

BASELINE = "linear_frozen"

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
    reasons.update(backend_skip_reasons(device))
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
        cells += [format_ms(row["median_ms"][mode]) if mode in row["median_ms"] else "—" for mode in MODES]
        cells += ["—" if ratio is None else f"{ratio:.2f}", format_mib(row["saved_bytes"])]
        cells += [format_mib(row["peak_bytes"])] if with_peak else []
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
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per mode (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE}, {QUICK_REPEATS} repeats: a smoke test")
    parser.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    return parser.parse_args(argv)


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
        **describe_methods(device),
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
