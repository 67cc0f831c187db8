"""Mixed-batch multi-adapter LoRA benchmark: lowrank's multi_lora_linear against PEFT's
mixed-batch inference, an eager loop over the adapters, and a single adapter (the floor).

    python -m benchmarks.bench_multi_lora_linear                    # M=4096, K=N=1024, r=16; 1, 4, 16 adapters
    python -m benchmarks.bench_multi_lora_linear --quick            # one small shape, few repeats: a smoke test
    python -m benchmarks.bench_multi_lora_linear --threads 1 --cpu-clock --repeats 15 --tag threads1
                                       # one thread, timed by CPU time: steady on a shared machine

The problem: x [M, K] through a frozen K -> N linear layer (W, b) with n LoRA adapters of rank r
(A [n, r, K], B [n, N, r], scaling alpha/r = 2), each row's adapter drawn uniformly at random.
Providers:
  linear_frozen       nn.Linear alone: the base GEMM every provider pays
  single_lora         lowrank.ops.lora_linear (auto) with one adapter for every row: the floor a
                      mixed batch is measured against (on CPU it may merge W + s·B·A, which a
                      mixed batch cannot)
  masked_loop         eager PyTorch: base(x), then for each adapter its rows (index == a) through
                      lora_B(lora_A(x[rows]))·s, added back with index_add; differentiable
  hf_peft_mixed       PEFT's LoraModel (one nn.Linear holding n adapters) called with
                      adapter_names=[...]: inference only, PEFT refuses adapter_names in training
  lowrank_<backend>   lowrank.ops.multi_lora_linear with that backend (auto: the fastest, measured)
Modes: inference (forward under no_grad) and forward+backward (training; x, A and B get
gradients). Each provider is checked against multi_lora_linear_reference in float64 first (the
output; and the gradients for the training providers); one that disagrees is reported, not timed
(exit status 1). The goals, as ratios of medians measured in the same run: lowrank_auto training
at 16 adapters / single_lora training <= 1.15, and hf_peft_mixed inference / lowrank_auto
inference >= 2; beside the latter, its bound (hf_peft_mixed / linear_frozen: every provider pays
the frozen GEMM) and the ratio of what each adds to linear_frozen. The report lists what auto chose.
Results: <out-dir>/multi_lora_linear_<device-slug>_<dtype>[_<tag>].json (all raw numbers) and .md.
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
import torch.nn.functional as F
from torch import Tensor, nn

import lowrank
from benchmarks.bench_lora_linear import Shape, _frozen_linear, _OneLinear, input_set_count, make_inputs
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    DTYPES,
    LOWRANK_BACKENDS,
    MODE_COLUMNS,
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
from lowrank import autotune
from lowrank.ops import lora_linear, multi_lora_linear, multi_lora_linear_reference

MODES = ("inference", "forward+backward")
INFERENCE_ONLY = ("hf_peft_mixed",)
FLOOR = "single_lora"
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TRAINING_GOAL, INFERENCE_GOAL = 1.15, 2.0

DEFAULT_SHAPE = Shape(4096, 1024, 1024, 16)
DEFAULT_ADAPTERS = (1, 4, 16)
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
QUICK_SHAPE = Shape(256, 128, 128, 8)
QUICK_ADAPTERS = (1, 4)
QUICK_REPEATS = 3
QUICK_WARMUP = 1


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem:
    """The mixed batch every provider computes; each provider copies these values."""

    shape: Shape
    weight: Tensor  # [N, K], frozen
    bias: Tensor  # [N], frozen
    lora_A: Tensor  # [n, r, K]
    lora_B: Tensor  # [n, N, r]; nonzero, unlike PEFT's init, so no provider can skip an adapter
    adapter_index: Tensor  # [M], uniform over the n adapters

    @property
    def adapters(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        return 2.0  # lora_alpha = 2r, PEFT's alpha / r

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def make_problem(shape: Shape, adapters: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    K, N, r = shape.K, shape.N, shape.r
    # Scaled so the base and adapter terms are both O(1): the check sees errors in either.
    return Problem(
        shape=shape,
        weight=randn(N, K, std=K**-0.5),
        bias=randn(N, std=0.1),
        lora_A=randn(adapters, r, K, std=K**-0.5),
        lora_B=randn(adapters, N, r, std=r**-0.5),
        adapter_index=torch.randint(0, adapters, (shape.M,), generator=generator, device=device),
    )


@dataclass
class MixedLayer(Layer):
    """A provider's layer, with the adapter of each row it applies (None: no adapter at all);
    lora_A, lora_B are [n, r, K], [n, N, r], or [r, K], [N, r] for single_lora's one adapter."""

    index: Optional[Tensor] = None


def _trained_copies(problem: Problem) -> tuple[Tensor, Tensor]:
    return problem.lora_A.clone().requires_grad_(), problem.lora_B.clone().requires_grad_()


def build_linear_frozen(problem: Problem) -> MixedLayer:
    linear = _frozen_linear(problem)
    return MixedLayer(linear, tuple(linear.parameters()))


def build_single_lora(problem: Problem) -> MixedLayer:
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A, lora_B = problem.lora_A[0].clone().requires_grad_(), problem.lora_B[0].clone().requires_grad_()

    def forward(x: Tensor) -> Tensor:
        return lora_linear(x, weight, bias, lora_A, lora_B, problem.scaling, backend="auto")

    return MixedLayer(forward, (weight, bias, lora_A, lora_B), lora_A, lora_B,
                      index=torch.zeros_like(problem.adapter_index))


class MaskedLoop(nn.Module):
    """The eager baseline: every adapter's rows selected by mask and added back with index_add."""

    def __init__(self, problem: Problem):
        super().__init__()
        self.base = _frozen_linear(problem)
        self.lora_A, self.lora_B = (nn.Parameter(t) for t in _trained_copies(problem))
        self.adapter_index = problem.adapter_index
        self.scaling = problem.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        for adapter in range(self.lora_A.shape[0]):
            rows = (self.adapter_index == adapter).nonzero().squeeze(1)
            low_rank = F.linear(F.linear(x[rows], self.lora_A[adapter]), self.lora_B[adapter]) * self.scaling
            y = y.index_add(0, rows, low_rank)
        return y


def build_masked_loop(problem: Problem) -> MixedLayer:
    module = MaskedLoop(problem)
    return MixedLayer(module, tuple(module.parameters()), module.lora_A, module.lora_B, index=problem.adapter_index)


def build_hf_peft_mixed(problem: Problem) -> MixedLayer:
    import peft  # only when asked for: it pulls in transformers

    r = problem.shape.r
    config = peft.LoraConfig(r=r, lora_alpha=int(problem.scaling * r), target_modules=["proj"])
    names = [f"adapter{a}" for a in range(problem.adapters)]
    model = peft.get_peft_model(_OneLinear(_frozen_linear(problem)), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.proj
    layer.to(problem.dtype)  # PEFT keeps half-precision adapters in fp32 by default
    with torch.no_grad():
        for adapter, name in enumerate(names):
            layer.lora_A[name].weight.copy_(problem.lora_A[adapter])
            layer.lora_B[name].weight.copy_(problem.lora_B[adapter])
    model.eval()  # PEFT takes adapter_names only in eval mode
    adapter_names = [names[a] for a in problem.adapter_index.tolist()]

    def forward(x: Tensor) -> Tensor:
        return model(x, adapter_names=adapter_names)

    return MixedLayer(forward, tuple(model.parameters()), index=problem.adapter_index)


def _lowrank_builder(backend: str) -> Callable[[Problem], MixedLayer]:
    def build(problem: Problem) -> MixedLayer:
        weight, bias = problem.weight.clone(), problem.bias.clone()
        lora_A, lora_B = _trained_copies(problem)
        index = problem.adapter_index.clone()

        def forward(x: Tensor) -> Tensor:
            return multi_lora_linear(x, weight, bias, index, lora_A, lora_B, problem.scaling, backend=backend)

        return MixedLayer(forward, (weight, bias, lora_A, lora_B), lora_A, lora_B, index=index)

    return build


BUILDERS: dict[str, Callable[[Problem], MixedLayer]] = {
    "linear_frozen": build_linear_frozen,
    FLOOR: build_single_lora,
    "masked_loop": build_masked_loop,
    "hf_peft_mixed": build_hf_peft_mixed,
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: Problem) -> MixedLayer:
    return BUILDERS[provider](problem)


def provider_modes(provider: str) -> tuple[str, ...]:
    return ("inference",) if provider in INFERENCE_ONLY else MODES


def skip_reasons(device: torch.device) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why."""
    reasons = {}
    if importlib.util.find_spec("peft") is None:
        reasons["hf_peft_mixed"] = "peft is not installed (pip install peft)"
    reasons.update(backend_skip_reasons(device))
    return reasons


def check_against_reference(layer: MixedLayer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output (and, if it trains, its gradients) match
    multi_lora_linear_reference in float64, on a full batch (a provider is bound to its rows)."""
    x, grad_y = make_inputs(problem, 1, seed=2)[0]
    trains = layer.lora_A is not None
    layer.clear_grads(x)
    with torch.enable_grad() if trains else torch.no_grad():
        y = layer.forward(x)
        if trains:
            y.backward(grad_y)

    index = layer.index if layer.index is not None else torch.full_like(problem.adapter_index, -1)
    x64 = x.detach().double().requires_grad_()
    lora_A64 = problem.lora_A.double().requires_grad_()
    lora_B64 = problem.lora_B.double().requires_grad_()
    y64 = multi_lora_linear_reference(x64, problem.weight.double(), problem.bias.double(), index, lora_A64, lora_B64,
                                      problem.scaling)
    comparisons = [("output", y, y64)]
    if trains:
        y64.backward(grad_y.double())
        single = layer.lora_A.dim() == 2  # single_lora's one adapter is adapter 0
        comparisons += [
            ("grad of x", x.grad, x64.grad),
            ("grad of lora_A", layer.lora_A.grad, lora_A64.grad[0] if single else lora_A64.grad),
            ("grad of lora_B", layer.lora_B.grad, lora_B64.grad[0] if single else lora_B64.grad),
        ]
    tolerance = CHECK_TOLERANCE[problem.dtype]
    for what, actual, expected in comparisons:
        if actual is None:
            raise AssertionError(f"{what} was not computed")
        torch.testing.assert_close(
            actual.detach().double(), expected.detach(), rtol=tolerance, atol=tolerance * expected.abs().max().item(),
            msg=lambda message: f"{what} differs from the reference: {message}",
        )


# ---------------------------------------------------------------- timing and reports


def benchmark_problem(shape: Shape, adapters: int, providers: list[str], device: torch.device, dtype: torch.dtype,
                      repeats: int, warmup: int, cpu_clock: bool = False) -> tuple[list[dict], list[dict]]:
    """(one result row per provider, the providers that failed their check) for one shape and
    adapter count; each row with its ratio to single_lora in each mode both timed."""
    problem = make_problem(shape, adapters, device, dtype)
    inputs = make_inputs(problem, input_set_count(shape, dtype))
    rows, failures = time_checked_providers(shape, problem, providers, build_layer, check_against_reference, inputs,
                                            repeats, warmup, MODES, provider_modes, cpu_clock)
    floor = next((row for row in rows if row["provider"] == FLOOR), None)
    for row in rows + failures:
        row["adapters"] = adapters
    for row in rows:
        row["ratio_to_single_lora"] = {mode: ms / floor["median_ms"][mode] for mode, ms in row["median_ms"].items()
                                       if floor is not None and mode in floor["median_ms"]}
    return rows, failures


def goal_ratios(report: dict) -> list[dict]:
    """The goals' ratios (and, beside them, ratios that explain them: goal None) for each shape
    and adapter count where their providers were timed."""
    goals = []
    problems = dict.fromkeys((Shape(**row["shape"]), row["adapters"]) for row in report["results"])
    for shape, adapters in problems:
        timed = {row["provider"]: row["median_ms"] for row in report["results"]
                 if (Shape(**row["shape"]), row["adapters"]) == (shape, adapters)}
        auto = timed.get("lowrank_auto")
        if auto is None:
            continue
        where = dict(shape=dataclasses.asdict(shape), adapters=adapters)
        if FLOOR in timed:
            ratio = auto["forward+backward"] / timed[FLOOR]["forward+backward"]
            goals.append(dict(where, what="lowrank_auto / single_lora, forward+backward", ratio=ratio,
                              goal=f"<= {TRAINING_GOAL}", met=ratio <= TRAINING_GOAL))
        if "hf_peft_mixed" in timed:
            ratio = timed["hf_peft_mixed"]["inference"] / auto["inference"]
            goals.append(dict(where, what="hf_peft_mixed / lowrank_auto, inference", ratio=ratio,
                              goal=f">= {INFERENCE_GOAL}", met=ratio >= INFERENCE_GOAL))
            if "linear_frozen" in timed:
                # Both contain the frozen layer's GEMM, which bounds the ratio above by
                # hf_peft_mixed / linear_frozen; what each adds to it is the adapters' cost.
                base, peft = timed["linear_frozen"]["inference"], timed["hf_peft_mixed"]["inference"]
                goals.append(dict(where, what="hf_peft_mixed / linear_frozen, inference (the bound of the goal ratio)",
                                  ratio=peft / base, goal=None, met=None))
                if auto["inference"] > base:
                    goals.append(dict(where, what="(hf_peft_mixed - linear_frozen) / (lowrank_auto - linear_frozen), "
                                      "inference: the adapters' cost", ratio=(peft - base) / (auto["inference"] - base),
                                      goal=None, met=None))
    return goals


def markdown_table(report: dict) -> str:
    header = ["M", "K", "N", "r", "adapters", "provider", *(MODE_COLUMNS[mode] for mode in MODES),
              *(f"× {FLOOR} {MODE_COLUMNS[mode].split()[0]}" for mode in MODES), "saved MiB"]
    alignments = ["---" if name == "provider" else "---:" for name in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    for row in report["results"]:
        shape = row["shape"]
        cells = [str(shape[dim]) for dim in ("M", "K", "N", "r")] + [str(row["adapters"]), row["provider"]]
        cells += [format_ms(row["median_ms"][mode]) if mode in row["median_ms"] else "—" for mode in MODES]
        cells += [f"{row['ratio_to_single_lora'][mode]:.2f}" if mode in row["ratio_to_single_lora"] else "—"
                  for mode in MODES]
        cells.append(format_mib(row["saved_bytes"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_notes(report: dict) -> list[str]:
    notes = [f"- {goal['adapters']} adapters at {Shape(**goal['shape'])}: {goal['what']} = {goal['ratio']:.3f}"
             + ("" if goal["goal"] is None else f" (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
             for goal in report["goals"]]
    notes += [f"- auto chose {backend} for {key}" for key, backend in report["auto_choices"].items()]
    notes += [f"- skipped {provider}: {reason}" for provider, reason in report["skipped"].items()]
    for failure in report["failed_checks"]:
        first_line = failure["error"].splitlines()[0]
        notes.append(f"- FAILED CHECK, not timed: {failure['provider']} at {Shape(**failure['shape'])} with "
                     f"{failure['adapters']} adapters: {first_line}")
    return notes


def markdown_report(report: dict) -> str:
    versions = report["versions"]
    software = ", ".join(f"{name} {versions[name]}" for name in ("torch", "cuda", "triton", "peft") if versions[name])
    context = (
        f"{report['dtype']}; {software}. Rows of each batch spread uniformly at random over the adapters. "
        f"{report['timing']}. Median of {report['repeats']} repeats after {report['warmup']} warm-up. "
        f"{report['memory']}. Ratios are of medians measured in this run."
    )
    if report["quick"]:
        context += " QUICK MODE: a smoke test, not a measurement."
    title = f"# Mixed-batch multi-adapter LoRA benchmark: {report['device']['name']}"
    return "\n".join([title, "", context, "", markdown_table(report), "", *report_notes(report), ""])


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_multi_lora_linear",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--shapes", nargs="+", type=Shape.parse, metavar="M,K,N,r", help=f"default: {DEFAULT_SHAPE}")
    parser.add_argument("--adapters", nargs="+", type=positive_int, help="adapters mixed per batch (default 1 4 16)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: every provider that can run here")
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per mode (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time CPU runs by process CPU time, not wall time: with --threads 1, each step's cost "
                             "without what other jobs on a shared machine take")
    parser.add_argument("--tag", help="appended to the result files' names (multi_lora_linear_<device>_<dtype>_<tag>)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SHAPE} with {QUICK_ADAPTERS} adapters, {QUICK_REPEATS} repeats: a smoke test")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every problem; the report with all raw numbers."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    shapes = args.shapes or [QUICK_SHAPE if args.quick else DEFAULT_SHAPE]
    adapter_counts = args.adapters or (QUICK_ADAPTERS if args.quick else DEFAULT_ADAPTERS)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    requested = args.providers or PROVIDERS
    skipped = {provider: reason for provider, reason in skip_reasons(device).items() if provider in requested}
    providers = [provider for provider in requested if provider not in skipped]
    report = {
        "benchmark": "multi_lora_linear",
        "device": describe_device(device),
        "versions": describe_versions(),
        "dtype": dtype_name,
        "quick": args.quick,
        "repeats": repeats,
        "warmup": warmup,
        **describe_methods(device, args.cpu_clock),
        "lowrank_backends": {name: status._asdict() for name, status in lowrank.backends().items()},
        "skipped": skipped,
        "failed_checks": [],
        "results": [],
    }
    for shape in shapes:
        for adapters in adapter_counts:
            print(f"{shape}, {adapters} adapters: timing {', '.join(providers)}", file=sys.stderr, flush=True)
            rows, failures = benchmark_problem(shape, adapters, providers, device, DTYPES[dtype_name], repeats, warmup,
                                               args.cpu_clock)
            report["results"] += rows
            report["failed_checks"] += failures
    report["goals"] = goal_ratios(report)
    report["auto_choices"] = {repr(key): backend for key, backend in autotune.choices().items()}
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    name = "_".join(["multi_lora_linear", report["device"]["slug"], report["dtype"]] + ([args.tag] if args.tag else []))
    write_reports(args.out_dir, name, report, markdown_report(report))
    print("\n".join(["", *report_notes(report), "", markdown_table(report)]))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
