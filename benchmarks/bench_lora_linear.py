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

from benchmarks import harness
from benchmarks.harness import MODES, Layer, LayerProblem, LayerShape
from lowrank.ops import lora_linear, lora_linear_reference

BASELINE = "linear_frozen"
SOFTWARE = ("torch", "cuda", "triton", "peft")  # the versions the markdown names


@dataclass(frozen=True)
class Shape(LayerShape):
    """x [M, K] through a K -> N linear layer with a rank-r adapter."""

    K: int
    N: int
    r: int

    in_features = property(lambda shape: shape.K)
    out_features = property(lambda shape: shape.N)


HEADLINE_SHAPE = Shape(8192, 4096, 4096, 16)  # the goals' shape, first so that a time budget never drops it
DEFAULT_SHAPES = {
    "cpu": [Shape(1024, 1024, 1024, 16), Shape(4096, 1024, 1024, 16), Shape(4096, 1024, 1024, 64)],
    "cuda": [HEADLINE_SHAPE] + [shape for shape in (Shape(M, KN, KN, r) for M in (1024, 8192, 32768)
                                                    for KN in (4096, 8192) for r in (8, 16, 64))
                                if shape != HEADLINE_SHAPE],
}
DEFAULT_DECODE_SHAPES = {"cpu": [], "cuda": [Shape(M, KN, KN, 16) for KN in (4096, 8192) for M in (1, 16, 256)]}
DEFAULT_DROPOUT = {"cpu": [0.0], "cuda": [0.0, 0.1]}
QUICK_SHAPE = Shape(256, 128, 128, 8)


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem(LayerProblem):
    """The one LoRA layer every provider implements; each provider copies these values."""

    weight: Tensor  # [N, K], frozen
    bias: Tensor  # [N], frozen
    lora_A: Tensor  # [r, K]
    lora_B: Tensor  # [N, r]; nonzero, unlike PEFT's init, so no provider can skip the adapter
    lora_alpha: int
    dropout_p: float = 0.0  # lora_dropout, on the adapter's input only

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.shape.r  # PEFT's definition


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 dropout_p: float = 0.0, adapters: Optional[int] = None) -> Problem:
    """adapters: n stacks n adapters' factors, lora_A [n, r, K] and lora_B [n, N, r] (the mixed
    batches of bench_multi_lora_linear); None: one adapter's."""
    randn = harness.seeded_randn(device, dtype, seed)
    K, N, r = shape.K, shape.N, shape.r
    stack = () if adapters is None else (adapters,)
    # Scaled so the base and adapter terms are both O(1): the check sees errors in either.
    return Problem(
        shape,
        device,
        dtype,
        weight=randn(N, K, std=K**-0.5),
        bias=randn(N, std=0.1),
        lora_A=randn(*stack, r, K, std=K**-0.5),
        lora_B=randn(*stack, N, r, std=r**-0.5),
        lora_alpha=2 * r,
        dropout_p=dropout_p,
    )


def _frozen_linear(problem: Problem) -> nn.Linear:
    N, K = problem.weight.shape
    linear = nn.Linear(K, N, device=problem.device, dtype=problem.dtype)
    with torch.no_grad():
        linear.weight.copy_(problem.weight)
        linear.bias.copy_(problem.bias)
    return linear.requires_grad_(False)


def _module_layer(module: nn.Module, trained: tuple[Tensor, ...] = ()) -> Layer:
    return Layer(module, tuple(module.parameters()), trained, module.train)


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
    return _module_layer(module, (module.lora_A.weight, module.lora_B.weight))


def peft_layer(problem: Problem, **config) -> tuple[nn.Module, Tensor, Tensor]:
    """(PEFT's LoRA layer with the problem's weights, its lora_A, its lora_B); `config`: further
    LoraConfig options (use_dora=True for bench_dora_linear)."""
    import peft  # only when asked for: it pulls in transformers

    config = peft.LoraConfig(r=problem.shape.r, lora_alpha=problem.lora_alpha, target_modules=["proj"],
                             lora_dropout=problem.dropout_p, **config)
    layer = peft.get_peft_model(_OneLinear(_frozen_linear(problem)), config).base_model.model.proj
    # PEFT keeps bf16/fp16 adapters in fp32 by default; time it in the dtype every other provider uses.
    layer.to(problem.dtype)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(problem.lora_A)
        lora_B.copy_(problem.lora_B)
    return layer, lora_A, lora_B


def build_hf_peft(problem: Problem) -> Layer:
    layer, lora_A, lora_B = peft_layer(problem)
    return _module_layer(layer, (lora_A, lora_B))


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

    return Layer(forward, (weight, bias, lora_A, lora_B), (lora_A, lora_B))


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

        return Layer(forward, (weight, bias, lora_A, lora_B), (lora_A, lora_B), set_dropout)

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
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in harness.LOWRANK_BACKENDS},
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
    reasons.update(harness.backend_skip_reasons(device))
    return reasons


def check_against_reference(layer: Layer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference."""
    weight64, bias64 = problem.weight.double(), problem.bias.double()
    if not layer.trained:  # linear_frozen
        harness.check_against_reference(layer, problem, lambda x: F.linear(x, weight64, bias64), {})
        return

    def reference(x: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        return lora_linear_reference(x, weight64, bias64, lora_A, lora_B, problem.scaling)

    harness.check_against_reference(layer, problem, reference, {"lora_A": problem.lora_A, "lora_B": problem.lora_B})


# ---------------------------------------------------------------- timing and memory


def benchmark_shape(report: dict, shape: Shape, providers: list[str], device: torch.device, dropout_p: float = 0.0,
                    modes: tuple[str, ...] = MODES) -> None:
    """Check and time `providers` at one shape and dropout rate, into the report. The ratio to
    linear_frozen is of forward+backward, or of inference when only that mode is timed."""
    problem = make_problem(shape, device, harness.DTYPES[report["dtype"]], dropout_p=dropout_p)
    rows = harness.time_checked_providers(report, problem, providers, build_layer, check_against_reference, modes)
    ratio_mode = "forward+backward" if "forward+backward" in modes else modes[0]
    baseline = next((row for row in rows if row["provider"] == BASELINE), None)
    for row in rows:
        row["dropout_p"] = dropout_p
        row["ratio_mode"] = ratio_mode
        row["ratio_to_linear_frozen"] = (
            row["median_ms"][ratio_mode] / baseline["median_ms"][ratio_mode] if baseline else None
        )


# ---------------------------------------------------------------- environment and reports


def _ratio_cell(row: dict) -> str:
    ratio = row["ratio_to_linear_frozen"]
    return "—" if ratio is None else f"{ratio:.2f}"


def markdown_table(report: dict) -> str:
    """One row per (shape, dropout, provider); × linear_frozen is of fwd+bwd, or of inference on
    the decode rows (the only mode they time)."""
    dropout_column = ("p", lambda row: f"{row['dropout_p']:g}")
    return harness.layer_table(report, Shape, before_provider=(dropout_column,),
                               after_modes=(("× linear_frozen", _ratio_cell),))


def markdown_report(report: dict) -> str:
    context = f"{report['dtype']}; {harness.measurement_sentence(report, SOFTWARE)} {report['memory']}."
    return harness.markdown_document(report, "LoRA linear benchmark", context, markdown_table(report))


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
    parser = harness.layer_parser("python -m benchmarks.bench_lora_linear", __doc__, Shape, PROVIDERS, QUICK_SHAPE)
    parser.add_argument("--decode-shapes", nargs="*", type=Shape.parse, metavar=Shape.metavar(),
                        help="timed in the inference mode only (default: M=1,16,256 at K=N=4096,8192, r=16 on "
                             "CUDA; none on CPU)")
    parser.add_argument("--dropout", nargs="+", type=_dropout_rate, metavar="P",
                        help="lora_dropout rates of the training shapes (default: 0 on CPU; 0 and 0.1 on CUDA)")
    parser.add_argument("--max-minutes", type=float,
                        help="start no shape but the first after this long (default: no limit)")
    parser.add_argument("--tag", help="appended to the result files' names (lora_linear_<device>_<dtype>_<tag>)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device, shapes, providers, report = harness.start_layer_report(
        "lora_linear", args, DEFAULT_SHAPES, QUICK_SHAPE, skip_reasons, PROVIDERS)
    report["not_run"] = []
    decode_shapes = args.decode_shapes if args.decode_shapes is not None else (
        [] if args.quick or args.shapes else DEFAULT_DECODE_SHAPES[device.type])
    dropout_rates = args.dropout or ([0.0] if args.quick else DEFAULT_DROPOUT[device.type])
    runs = [(shape, dropout_p, MODES) for shape in shapes for dropout_p in dropout_rates]
    runs += [(shape, 0.0, ("inference",)) for shape in decode_shapes]

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
        benchmark_shape(report, shape, run_providers, device, dropout_p, modes)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    stem = harness.write_reports(args.out_dir, harness.report_name(report, args.tag), report, markdown_report(report))
    if args.plot and report["results"]:
        if write_plot(report, Path(f"{stem}.png")):
            print(f"wrote {stem}.png")
        else:
            print("no plot: matplotlib is not installed", file=sys.stderr)
    print(harness.console_summary(report, markdown_table(report)))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
