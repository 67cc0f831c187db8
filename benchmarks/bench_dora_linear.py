"""DoRA linear benchmark: lowrank's fused DoRA op against HF PEFT's DoRA layer, an eager unfused
DoRA, and lowrank's own LoRA op (the floor a DoRA layer cannot beat).

    python -m benchmarks.bench_dora_linear                    # the default shapes for the device
    python -m benchmarks.bench_dora_linear --quick            # one small shape, few repeats: a smoke test
    python -m benchmarks.bench_dora_linear --device cuda --shapes 8192,4096,4096,16 --dropout 0 0.1

Every provider computes PEFT's DoRA layer, y = g⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b with g = m / ‖W + s·B·A‖_row
(its training form with dropout), with W, b frozen and x, A, B, m requiring grad:
  hf_peft            PEFT's LoRA layer with use_dora=True (peft.get_peft_model around a one-Linear module)
  eager_dora         DoRA in plain torch ops, as the paper writes it: W + s·B·A formed, its norm
                     detached, g⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b
  lowrank_lora       lowrank.ops.lora_linear (auto), the same layer without the magnitude: the floor
  lowrank_<backend>  lowrank.ops.dora_linear with that backend (auto: the fastest, measured per
                     shape), ‖W‖²_row cached across calls (WeightNormCache), as a module would

Each provider is checked against lowrank.ops.dora_linear_reference (lowrank_lora against
lora_linear_reference) before it is timed, with its dropout off, and one that disagrees is
reported instead of timed (exit status 1). Timing, interleaving of the providers repeat by repeat,
input rotation and memory accounting are benchmarks.harness's. The report gives, per shape, the
ratios of the goals: lowrank_auto / lowrank_lora and hf_peft / lowrank_auto (forward+backward).
Results: <out-dir>/dora_linear_<device-slug>_<dtype>[_<tag>].json (all raw numbers) and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from benchmarks import bench_lora_linear, harness
from benchmarks.bench_lora_linear import Shape, _dropout_rate
from benchmarks.harness import Layer
from lowrank.ops import WeightNormCache, dora_linear, dora_linear_reference, dora_magnitude

OURS, FLOOR, PEFT = "lowrank_auto", "lowrank_lora", "hf_peft"
GOAL_MODE = "forward+backward"
SOFTWARE = ("torch", "cuda", "triton", "peft")  # the versions the markdown names
DEFAULT_SHAPES = {
    "cpu": [Shape(4096, 1024, 1024, 16)],
    "cuda": [Shape(8192, 4096, 4096, 16), Shape(4096, 4096, 4096, 16), Shape(8192, 4096, 4096, 64)],
}
DEFAULT_DROPOUT = {"cpu": [0.0], "cuda": [0.0, 0.1]}
QUICK_SHAPE = bench_lora_linear.QUICK_SHAPE


@dataclass
class Problem(bench_lora_linear.Problem):
    """The LoRA benchmark's problem with DoRA's magnitude, away from the norm so that g ≠ 1."""

    magnitude: Optional[Tensor] = None  # [N]; a default only because the LoRA problem's last field has one


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 dropout_p: float = 0.0) -> Problem:
    lora = bench_lora_linear.make_problem(shape, device, dtype, seed, dropout_p)
    norm = dora_magnitude(lora.weight.double(), lora.lora_A.double(), lora.lora_B.double(), lora.scaling)
    factor = 0.5 + torch.rand(shape.N, generator=torch.Generator(device=device).manual_seed(seed + 1), device=device,
                              dtype=torch.float64)
    fields = {field.name: getattr(lora, field.name) for field in dataclasses.fields(lora)}
    return Problem(**fields, magnitude=(norm * factor).to(dtype))


def _trained(problem: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """The provider's own copies of lora_A, lora_B and magnitude, requiring grad."""
    return tuple(t.clone().requires_grad_() for t in (problem.lora_A, problem.lora_B, problem.magnitude))


def _lowrank_builder(backend: str) -> Callable[[Problem], Layer]:
    def build(problem: Problem) -> Layer:
        weight, bias = problem.weight.clone(), problem.bias.clone()
        trained = _trained(problem)
        norm_cache, dropout = WeightNormCache(), {"on": True}

        def forward(x: Tensor) -> Tensor:
            dropout_p = problem.dropout_p if dropout["on"] else 0.0
            return dora_linear(x, weight, bias, *trained, problem.scaling, dropout_p,
                               weight_norm_sq=norm_cache(weight), backend=backend)

        def set_dropout(enabled: bool) -> None:
            dropout["on"] = enabled

        return Layer(forward, (weight, bias, *trained), trained, set_dropout)

    return build


def build_eager_dora(problem: Problem) -> Layer:
    """The paper's DoRA in plain torch ops (PEFT's dropout convention), W + s·B·A formed each call."""
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A, lora_B, magnitude = trained = _trained(problem)
    dropout = nn.Dropout(problem.dropout_p)

    def forward(x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(weight + problem.scaling * (lora_B @ lora_A), dim=1).detach()
        scale = magnitude / norm
        base = nn.functional.linear(x, weight, bias)
        if problem.dropout_p == 0 or not dropout.training:
            return base + (scale - 1) * (base - bias) + scale * problem.scaling * ((x @ lora_A.t()) @ lora_B.t())
        x_drop = dropout(x)
        low_rank = (x_drop @ lora_A.t()) @ lora_B.t()
        return base + (scale - 1) * nn.functional.linear(x_drop, weight) + scale * problem.scaling * low_rank

    return Layer(forward, (weight, bias, *trained), trained, dropout.train)


def build_hf_peft(problem: Problem) -> Layer:
    layer, lora_A, lora_B = bench_lora_linear.peft_layer(problem, use_dora=True)
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        magnitude.copy_(problem.magnitude)
    return Layer(layer, tuple(layer.parameters()), (lora_A, lora_B, magnitude), layer.train)


BUILDERS: dict[str, Callable[[Problem], Layer]] = {
    PEFT: build_hf_peft,
    "eager_dora": build_eager_dora,
    FLOOR: bench_lora_linear.BUILDERS["lowrank_auto"],  # the same problem without its magnitude
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in harness.LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: Problem) -> Layer:
    return BUILDERS[provider](problem)


def skip_reasons(device: torch.device, named: tuple[str, ...] = ()) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why."""
    reasons = harness.backend_skip_reasons(device)
    if importlib.util.find_spec("peft") is None:
        reasons[PEFT] = "peft is not installed (pip install peft)"
    return reasons


def check_against_reference(layer: Layer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference:
    DoRA's, or LoRA's for lowrank_lora (which trains no magnitude)."""
    if len(layer.trained) == 2:
        bench_lora_linear.check_against_reference(layer, problem)
        return
    weight64, bias64 = problem.weight.double(), problem.bias.double()

    def reference(x: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor) -> Tensor:
        return dora_linear_reference(x, weight64, bias64, lora_A, lora_B, magnitude, problem.scaling)

    trained = {"lora_A": problem.lora_A, "lora_B": problem.lora_B, "magnitude": problem.magnitude}
    harness.check_against_reference(layer, problem, reference, trained)


def benchmark_shape(report: dict, shape: Shape, providers: list[str], device: torch.device,
                    dropout_p: float = 0.0) -> None:
    """Check and time `providers` at one shape and dropout rate, into the report, with each row's
    forward+backward ratio to lowrank_lora and the goals' ratios."""
    problem = make_problem(shape, device, harness.DTYPES[report["dtype"]], dropout_p=dropout_p)
    rows = harness.time_checked_providers(report, problem, providers, build_layer, check_against_reference)
    ms = {row["provider"]: row["median_ms"][GOAL_MODE] for row in rows}
    for row in rows:
        row["dropout_p"] = dropout_p
        row["ratio_to_lora"] = row["median_ms"][GOAL_MODE] / ms[FLOOR] if FLOOR in ms else None
    report["goals"].append({
        "shape": dataclasses.asdict(shape),
        "dropout_p": dropout_p,
        "dora_over_lora": ms[OURS] / ms[FLOOR] if OURS in ms and FLOOR in ms else None,
        "peft_over_dora": ms[PEFT] / ms[OURS] if OURS in ms and PEFT in ms else None,
    })


# ---------------------------------------------------------------- reports


def markdown_table(report: dict) -> str:
    dropout_column = ("p", lambda row: f"{row['dropout_p']:g}")
    ratio_column = ("× lowrank_lora",
                    lambda row: "—" if row["ratio_to_lora"] is None else f"{row['ratio_to_lora']:.2f}")
    return harness.layer_table(report, Shape, before_provider=(dropout_column,), after_modes=(ratio_column,))


def goal_lines(report: dict) -> list[str]:
    def text(value: Optional[float]) -> str:
        return "—" if value is None else f"{value:.3f}"

    return [f"- {Shape(**item['shape'])} p={item['dropout_p']:g}: {OURS} / {FLOOR} = {text(item['dora_over_lora'])}"
            f" (goal ≤ 1.15 on CPU), {PEFT} / {OURS} = {text(item['peft_over_dora'])} (goal ≥ 1.5 on CPU)"
            for item in report["goals"]]


def markdown_report(report: dict) -> str:
    context = (f"{report['dtype']}; {harness.measurement_sentence(report, SOFTWARE)} All providers in one run. "
               f"{report['memory']}.\n\nRatios of forward+backward medians:\n\n" + "\n".join(goal_lines(report)))
    return harness.markdown_document(report, "DoRA linear benchmark", context, markdown_table(report))


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = harness.layer_parser("python -m benchmarks.bench_dora_linear", __doc__, Shape, PROVIDERS, QUICK_SHAPE)
    parser.add_argument("--dropout", nargs="+", type=_dropout_rate, metavar="P",
                        help="lora_dropout rates (default: 0 on CPU; 0 and 0.1 on CUDA)")
    parser.add_argument("--tag", help="appended to the result files' names (dora_linear_<device>_<dtype>_<tag>)")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device, shapes, providers, report = harness.start_layer_report(
        "dora_linear", args, DEFAULT_SHAPES, QUICK_SHAPE, skip_reasons, PROVIDERS)
    report["goals"] = []
    for shape in shapes:
        for dropout_p in args.dropout or ([0.0] if args.quick else DEFAULT_DROPOUT[device.type]):
            print(f"{shape} p={dropout_p:g}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
            benchmark_shape(report, shape, providers, device, dropout_p)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    return harness.publish_with_goals(report, args, markdown_report(report), markdown_table(report), goal_lines(report))


if __name__ == "__main__":
    sys.exit(main())
