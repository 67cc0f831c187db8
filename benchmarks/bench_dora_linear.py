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
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import lowrank
from benchmarks.bench_lora_linear import (
    Problem,
    Shape,
    _dropout_rate,
    _frozen_linear,
    _OneLinear,
    input_set_count,
    make_inputs,
    make_problem as make_lora_problem,
)
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    DTYPES,
    LOWRANK_BACKENDS,
    MODE_COLUMNS,
    MODES,
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
from lowrank.ops import (
    WeightNormCache,
    dora_linear,
    dora_linear_reference,
    dora_magnitude,
    lora_linear,
    lora_linear_reference,
)

OURS, FLOOR, PEFT = "lowrank_auto", "lowrank_lora", "hf_peft"
GOAL_MODE = "forward+backward"
CHECK_ROWS = 64
# Relative to each tensor's largest entry; fp32 leaves room for the TF32 Triton's tl.dot may use.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
DEFAULT_SHAPES = {
    "cpu": [Shape(4096, 1024, 1024, 16)],
    "cuda": [Shape(8192, 4096, 4096, 16), Shape(4096, 4096, 4096, 16), Shape(8192, 4096, 4096, 64)],
}
DEFAULT_DROPOUT = {"cpu": [0.0], "cuda": [0.0, 0.1]}
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
QUICK_SHAPE = Shape(256, 128, 128, 8)
QUICK_REPEATS = 3
QUICK_WARMUP = 1


@dataclass
class DoraProblem(Problem):
    """The LoRA benchmark's problem with DoRA's magnitude, away from the norm so that g ≠ 1."""

    magnitude: Optional[Tensor] = None  # [N]


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 dropout_p: float = 0.0) -> DoraProblem:
    lora = make_lora_problem(shape, device, dtype, seed, dropout_p)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    norm = dora_magnitude(lora.weight.double(), lora.lora_A.double(), lora.lora_B.double(), lora.scaling)
    factor = 0.5 + torch.rand(shape.N, generator=generator, device=device, dtype=torch.float64)
    fields = {field.name: getattr(lora, field.name) for field in dataclasses.fields(lora)}
    return DoraProblem(**fields, magnitude=(norm * factor).to(dtype))


@dataclass
class DoraLayer(Layer):
    """A provider's layer with its trained magnitude (None for lowrank_lora)."""

    magnitude: Optional[Tensor] = None

    def clear_grads(self, x: Tensor) -> None:
        super().clear_grads(x)
        if self.magnitude is not None:
            self.magnitude.grad = None


def _trained(problem: DoraProblem) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.clone().requires_grad_() for t in (problem.lora_A, problem.lora_B, problem.magnitude))


class _DropoutSwitch:
    """The dropout rate a functional provider passes: the problem's, or 0 while it is checked."""

    def __init__(self, dropout_p: float):
        self.dropout_p, self.on = dropout_p, True

    def rate(self) -> float:
        return self.dropout_p if self.on else 0.0

    def set(self, enabled: bool) -> None:
        self.on = enabled


def _lowrank_builder(backend: str) -> Callable[[DoraProblem], DoraLayer]:
    def build(problem: DoraProblem) -> DoraLayer:
        weight, bias = problem.weight.clone(), problem.bias.clone()
        lora_A, lora_B, magnitude = _trained(problem)
        norm_cache, dropout = WeightNormCache(), _DropoutSwitch(problem.dropout_p)

        def forward(x: Tensor) -> Tensor:
            return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, problem.scaling, dropout.rate(),
                               weight_norm_sq=norm_cache(weight), backend=backend)

        return DoraLayer(forward, (weight, bias, lora_A, lora_B, magnitude), lora_A, lora_B, dropout.set, magnitude)

    return build


def build_lowrank_lora(problem: DoraProblem) -> DoraLayer:
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A, lora_B, _ = _trained(problem)
    dropout = _DropoutSwitch(problem.dropout_p)

    def forward(x: Tensor) -> Tensor:
        return lora_linear(x, weight, bias, lora_A, lora_B, problem.scaling, dropout.rate(), backend="auto")

    return DoraLayer(forward, (weight, bias, lora_A, lora_B), lora_A, lora_B, dropout.set)


def build_eager_dora(problem: DoraProblem) -> DoraLayer:
    """The paper's DoRA in plain torch ops (PEFT's dropout convention), W + s·B·A formed each call."""
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A, lora_B, magnitude = _trained(problem)
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

    return DoraLayer(forward, (weight, bias, lora_A, lora_B, magnitude), lora_A, lora_B, dropout.train, magnitude)


def build_hf_peft(problem: DoraProblem) -> DoraLayer:
    import peft  # only when asked for: it pulls in transformers

    config = peft.LoraConfig(r=problem.shape.r, lora_alpha=problem.lora_alpha, target_modules=["proj"],
                             lora_dropout=problem.dropout_p, use_dora=True)
    layer = peft.get_peft_model(_OneLinear(_frozen_linear(problem)), config).base_model.model.proj
    layer.to(problem.dtype)  # PEFT keeps half-precision adapters in fp32; time it in everyone's dtype
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        lora_A.copy_(problem.lora_A)
        lora_B.copy_(problem.lora_B)
        magnitude.copy_(problem.magnitude)
    return DoraLayer(layer, tuple(layer.parameters()), lora_A, lora_B, layer.train, magnitude)


BUILDERS: dict[str, Callable[[DoraProblem], DoraLayer]] = {
    PEFT: build_hf_peft,
    "eager_dora": build_eager_dora,
    FLOOR: build_lowrank_lora,
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: DoraProblem) -> DoraLayer:
    return BUILDERS[provider](problem)


def skip_reasons(device: torch.device) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why."""
    reasons = backend_skip_reasons(device)
    if importlib.util.find_spec("peft") is None:
        reasons[PEFT] = "peft is not installed (pip install peft)"
    return reasons


def check_against_reference(layer: DoraLayer, problem: DoraProblem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference
    (DoRA's, or LoRA's for a layer without a magnitude)."""
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
    lora_A64, lora_B64 = (t.double().requires_grad_() for t in (problem.lora_A, problem.lora_B))
    comparisons = [("grad of x", x.grad, x64), ("grad of lora_A", layer.lora_A.grad, lora_A64),
                   ("grad of lora_B", layer.lora_B.grad, lora_B64)]
    if layer.magnitude is None:
        y64 = lora_linear_reference(x64, weight64, bias64, lora_A64, lora_B64, problem.scaling)
    else:
        magnitude64 = problem.magnitude.double().requires_grad_()
        y64 = dora_linear_reference(x64, weight64, bias64, lora_A64, lora_B64, magnitude64, problem.scaling)
        comparisons.append(("grad of magnitude", layer.magnitude.grad, magnitude64))
    y64.backward(grad_y.double())
    tolerance = CHECK_TOLERANCE[problem.dtype]
    for what, actual, expected in [("output", y, y64), *((w, a, e.grad) for w, a, e in comparisons)]:
        if actual is None:
            raise AssertionError(f"{what} was not computed")
        torch.testing.assert_close(
            actual.detach().double(), expected.detach(), rtol=tolerance, atol=tolerance * expected.abs().max().item(),
            msg=lambda message: f"{what} differs from the reference: {message}",
        )


def benchmark_shape(shape: Shape, providers: list[str], device: torch.device, dtype: torch.dtype, repeats: int,
                    warmup: int, dropout_p: float = 0.0) -> tuple[list[dict], list[dict]]:
    """(one result row per provider, the providers that failed their check) for one shape and rate."""
    problem = make_problem(shape, device, dtype, dropout_p=dropout_p)
    inputs = make_inputs(problem, input_set_count(shape, dtype))
    rows, failures = time_checked_providers(shape, problem, providers, build_layer, check_against_reference, inputs,
                                            repeats, warmup)
    floor = next((row for row in rows if row["provider"] == FLOOR), None)
    for row in rows:
        row["dropout_p"] = dropout_p
        row["ratio_to_lora"] = row["median_ms"][GOAL_MODE] / floor["median_ms"][GOAL_MODE] if floor else None
    return rows, failures


def goal_ratios(results: list[dict]) -> list[dict]:
    """Per shape and rate: lowrank_auto / lowrank_lora and hf_peft / lowrank_auto, forward+backward."""
    ratios = []
    for key in dict.fromkeys((Shape(**row["shape"]), row["dropout_p"]) for row in results):
        ms = {row["provider"]: row["median_ms"][GOAL_MODE] for row in results
              if (Shape(**row["shape"]), row["dropout_p"]) == key}
        ratios.append({
            "shape": dataclasses.asdict(key[0]),
            "dropout_p": key[1],
            "dora_over_lora": ms[OURS] / ms[FLOOR] if OURS in ms and FLOOR in ms else None,
            "peft_over_dora": ms[PEFT] / ms[OURS] if OURS in ms and PEFT in ms else None,
        })
    return ratios


# ---------------------------------------------------------------- reports


def markdown_table(report: dict) -> str:
    header = ["M", "K", "N", "r", "p", "provider", *MODE_COLUMNS.values(), "× lowrank_lora", "saved MiB"]
    alignments = ["---" if name == "provider" else "---:" for name in header]  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    for row in report["results"]:
        shape, ratio = row["shape"], row["ratio_to_lora"]
        cells = [str(shape[dim]) for dim in ("M", "K", "N", "r")] + [f"{row['dropout_p']:g}", row["provider"]]
        cells += [format_ms(row["median_ms"][mode]) for mode in MODES]
        cells += ["—" if ratio is None else f"{ratio:.2f}", format_mib(row["saved_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(report: dict) -> list[str]:
    def text(value: Optional[float]) -> str:
        return "—" if value is None else f"{value:.3f}"

    return [f"- {Shape(**item['shape'])} p={item['dropout_p']:g}: {OURS} / {FLOOR} = {text(item['dora_over_lora'])}"
            f" (goal ≤ 1.15 on CPU), {PEFT} / {OURS} = {text(item['peft_over_dora'])} (goal ≥ 1.5 on CPU)"
            for item in report["goals"]]


def report_notes(report: dict) -> list[str]:
    notes = [f"- skipped {provider}: {reason}" for provider, reason in report["skipped"].items()]
    for failure in report["failed_checks"]:
        notes.append(f"- FAILED CHECK, not timed: {failure['provider']} at {Shape(**failure['shape'])}: "
                     f"{failure['error'].splitlines()[0]}")
    return notes


def markdown_report(report: dict) -> str:
    versions = report["versions"]
    software = ", ".join(f"{name} {versions[name]}" for name in ("torch", "cuda", "triton", "peft") if versions[name])
    context = (f"{report['dtype']}; {software}. {report['timing']}. Median of {report['repeats']} repeats after "
               f"{report['warmup']} warm-up, all providers in one run. {report['memory']}.")
    if report["quick"]:
        context += " QUICK MODE: a smoke test, not a measurement."
    return "\n".join([f"# DoRA linear benchmark: {report['device']['name']}", "", context, "",
                      "Ratios of forward+backward medians:", "", *goal_lines(report), "", markdown_table(report), "",
                      *report_notes(report), ""])


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dora_linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--shapes", nargs="+", type=Shape.parse, metavar="M,K,N,r", help="default: a set per device")
    parser.add_argument("--dropout", nargs="+", type=_dropout_rate, metavar="P",
                        help="lora_dropout rates (default: 0 on CPU; 0 and 0.1 on CUDA)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: every provider that can run here")
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per mode (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--tag", help="appended to the result files' names (dora_linear_<device>_<dtype>_<tag>)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE}, {QUICK_REPEATS} repeats: a smoke test")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    shapes = args.shapes or ([QUICK_SHAPE] if args.quick else DEFAULT_SHAPES[device.type])
    dropout_rates = args.dropout or ([0.0] if args.quick else DEFAULT_DROPOUT[device.type])
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    requested = args.providers or PROVIDERS
    skipped = {provider: reason for provider, reason in skip_reasons(device).items() if provider in requested}
    providers = [provider for provider in requested if provider not in skipped]
    report = {
        "benchmark": "dora_linear",
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
        "results": [],
    }
    for shape in shapes:
        for dropout_p in dropout_rates:
            print(f"{shape} p={dropout_p:g}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
            rows, failures = benchmark_shape(shape, providers, device, DTYPES[dtype_name], repeats, warmup, dropout_p)
            report["results"] += rows
            report["failed_checks"] += failures
    report["goals"] = goal_ratios(report["results"])
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    name = "_".join(["dora_linear", report["device"]["slug"], report["dtype"]] + ([args.tag] if args.tag else []))
    write_reports(args.out_dir, name, report, markdown_report(report))
    print("\n".join(["", *goal_lines(report), *report_notes(report), "", markdown_table(report)]))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
