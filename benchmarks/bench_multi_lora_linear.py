"""Mixed-batch multi-adapter LoRA benchmark: lowrank's multi_lora_linear against PEFT's
mixed-batch inference, an eager loop over the adapters, and a single adapter (the floor).

    python -m benchmarks.bench_multi_lora_linear                    # 1, 4 and 16 adapters at the device's shape
    python -m benchmarks.bench_multi_lora_linear --quick            # one small shape, few repeats: a smoke test
    python -m benchmarks.bench_multi_lora_linear --threads 1 --cpu-clock --repeats 15 --tag threads1
                                       # one thread, timed by CPU time: steady on a shared machine

The problem: x [M, K] through a frozen K -> N linear layer (W, b) with n LoRA adapters of rank r
(A [n, r, K], B [n, N, r], scaling alpha/r = 2), each row's adapter drawn uniformly at random;
--shapes takes M,K,N,r,adapters. Providers:
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
output and the gradients of x and of what it trains); one that disagrees is reported, not timed
(exit status 1). The goals, as ratios of medians measured in the same run: lowrank_auto training
at 16 adapters / single_lora training <= 1.15, and hf_peft_mixed inference / lowrank_auto
inference >= 2; beside the latter, its bound (hf_peft_mixed / linear_frozen: every provider pays
the frozen GEMM) and the ratio of what each adds to linear_frozen. The report lists auto's picks.
Results: <out-dir>/multi_lora_linear_<device-slug>_<dtype>[_<tag>].json (all raw numbers) and .md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import bench_lora_linear as lora, harness
from benchmarks.harness import Layer
from lowrank import autotune
from lowrank.ops import lora_linear, multi_lora_linear, multi_lora_linear_reference

MODES = ("inference", "forward+backward")
INFERENCE_ONLY = ("hf_peft_mixed",)
FLOOR = "single_lora"
SOFTWARE = ("torch", "cuda", "triton", "peft")  # the versions the markdown names
TRAINING_GOAL, INFERENCE_GOAL = 1.15, 2.0


@dataclass(frozen=True)
class Shape(lora.Shape):
    """x [M, K] through a K -> N linear layer with `adapters` rank-r adapters mixed over its rows."""

    adapters: int


DEFAULT_SHAPES = {
    "cpu": [Shape(4096, 1024, 1024, 16, adapters) for adapters in (1, 4, 16)],
    "cuda": [Shape(8192, 4096, 4096, 16, adapters) for adapters in (1, 4, 16)],
}
QUICK_SHAPE = Shape(256, 128, 128, 8, 4)


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem(lora.Problem):
    """LoRA's problem with the adapters stacked, lora_A [n, r, K] and lora_B [n, N, r], and each
    row's adapter, adapter_index [M] (uniform over the n adapters)."""

    adapter_index: Optional[Tensor] = None


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    problem = lora.make_problem(shape, device, dtype, seed, adapters=shape.adapters)
    generator = torch.Generator(device=device).manual_seed(seed)
    index = torch.randint(0, shape.adapters, (shape.M,), generator=generator, device=device)
    return Problem(**vars(problem), adapter_index=index)


@dataclass
class MixedLayer(Layer):
    """A provider's layer with the adapter it applies to each row of a full batch (every builder
    sets it; -1: none); layers take the first rows of a shorter x. Its trained tensors are lora_A
    and lora_B, [n, r, K] and [n, N, r], or single_lora's one adapter, [r, K] and [N, r]."""

    index: Optional[Tensor] = None


def _trained_copies(problem: Problem) -> tuple[Tensor, Tensor]:
    return problem.lora_A.clone().requires_grad_(), problem.lora_B.clone().requires_grad_()


def build_linear_frozen(problem: Problem) -> MixedLayer:
    layer = lora.build_linear_frozen(problem)
    return MixedLayer(layer.forward, layer.held, index=torch.full_like(problem.adapter_index, -1))


def build_single_lora(problem: Problem) -> MixedLayer:
    weight, bias = problem.weight.clone(), problem.bias.clone()
    lora_A, lora_B = problem.lora_A[0].clone().requires_grad_(), problem.lora_B[0].clone().requires_grad_()

    def forward(x: Tensor) -> Tensor:
        return lora_linear(x, weight, bias, lora_A, lora_B, problem.scaling, backend="auto")

    return MixedLayer(forward, (weight, bias, lora_A, lora_B), (lora_A, lora_B),
                      index=torch.zeros_like(problem.adapter_index))


class MaskedLoop(nn.Module):
    """The eager baseline: every adapter's rows selected by mask and added back with index_add."""

    def __init__(self, problem: Problem):
        super().__init__()
        self.base = lora._frozen_linear(problem)
        self.lora_A, self.lora_B = (nn.Parameter(t) for t in _trained_copies(problem))
        self.adapter_index = problem.adapter_index
        self.scaling = problem.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        index = self.adapter_index[: x.shape[0]]
        for adapter in range(self.lora_A.shape[0]):
            rows = (index == adapter).nonzero().squeeze(1)
            low_rank = F.linear(F.linear(x[rows], self.lora_A[adapter]), self.lora_B[adapter]) * self.scaling
            y = y.index_add(0, rows, low_rank)
        return y


def build_masked_loop(problem: Problem) -> MixedLayer:
    module = MaskedLoop(problem)
    return MixedLayer(module, tuple(module.parameters()), (module.lora_A, module.lora_B),
                      index=problem.adapter_index)


def build_hf_peft_mixed(problem: Problem) -> MixedLayer:
    import peft  # only when asked for: it pulls in transformers

    config = peft.LoraConfig(r=problem.shape.r, lora_alpha=problem.lora_alpha, target_modules=["proj"])
    names = [f"adapter{a}" for a in range(problem.shape.adapters)]
    model = peft.get_peft_model(lora._OneLinear(lora._frozen_linear(problem)), config, adapter_name=names[0])
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
        return model(x, adapter_names=adapter_names[: x.shape[0]])

    return MixedLayer(forward, tuple(model.parameters()), index=problem.adapter_index)


def _lowrank_builder(backend: str) -> Callable[[Problem], MixedLayer]:
    def build(problem: Problem) -> MixedLayer:
        weight, bias = problem.weight.clone(), problem.bias.clone()
        lora_A, lora_B = _trained_copies(problem)
        index = problem.adapter_index.clone()

        def forward(x: Tensor) -> Tensor:
            return multi_lora_linear(x, weight, bias, index[: x.shape[0]], lora_A, lora_B, problem.scaling,
                                     backend=backend)

        return MixedLayer(forward, (weight, bias, lora_A, lora_B), (lora_A, lora_B), index=index)

    return build


BUILDERS: dict[str, Callable[[Problem], MixedLayer]] = {
    "linear_frozen": build_linear_frozen,
    FLOOR: build_single_lora,
    "masked_loop": build_masked_loop,
    "hf_peft_mixed": build_hf_peft_mixed,
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in harness.LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: Problem) -> MixedLayer:
    return BUILDERS[provider](problem)


def provider_modes(provider: str) -> tuple[str, ...]:
    return ("inference",) if provider in INFERENCE_ONLY else MODES


def skip_reasons(device: torch.device, named: tuple[str, ...] = ()) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why (`named`: those asked for)."""
    reasons = {}
    if importlib.util.find_spec("peft") is None:
        reasons["hf_peft_mixed"] = "peft is not installed (pip install peft)"
    reasons.update(harness.backend_skip_reasons(device))
    return reasons


def check_against_reference(layer: MixedLayer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and the gradients of x and of what it trains
    match multi_lora_linear_reference in float64 with the adapters the layer applies (single_lora:
    adapter 0 alone; linear_frozen: none)."""
    weight64, bias64 = problem.weight.double(), problem.bias.double()
    factors = {"lora_A": problem.lora_A, "lora_B": problem.lora_B}
    if layer.trained and layer.trained[0].dim() == 2:  # single_lora's one adapter
        factors = {name: factor[0] for name, factor in factors.items()}

    def reference(x: Tensor, lora_A: Tensor = factors["lora_A"].double(),
                  lora_B: Tensor = factors["lora_B"].double()) -> Tensor:
        if lora_A.dim() == 2:
            lora_A, lora_B = lora_A[None], lora_B[None]
        return multi_lora_linear_reference(x, weight64, bias64, layer.index[: x.shape[0]], lora_A, lora_B,
                                           problem.scaling)

    harness.check_against_reference(layer, problem, reference, factors if layer.trained else {})


# ---------------------------------------------------------------- timing and reports


def benchmark_shape(report: dict, shape: Shape, providers: list[str], device: torch.device) -> None:
    """Check and time `providers` at one shape, into the report; each row with its ratio to
    single_lora in each mode both timed."""
    problem = make_problem(shape, device, harness.DTYPES[report["dtype"]])
    rows = harness.time_checked_providers(report, problem, providers, build_layer, check_against_reference, MODES,
                                          provider_modes)
    floor = next((row for row in rows if row["provider"] == FLOOR), None)
    for row in rows:
        row["ratio_to_single_lora"] = {mode: ms / floor["median_ms"][mode] for mode, ms in row["median_ms"].items()
                                       if floor is not None and mode in floor["median_ms"]}


def goal_ratios(report: dict) -> list[dict]:
    """The goals' ratios (and, beside them, ratios that explain them: goal None) for each shape
    where their providers were timed."""
    goals = []
    for shape in dict.fromkeys(Shape(**row["shape"]) for row in report["results"]):
        timed = {row["provider"]: row["median_ms"] for row in report["results"] if Shape(**row["shape"]) == shape}
        auto = timed.get("lowrank_auto")
        if auto is None:
            continue
        where = dict(shape=dataclasses.asdict(shape))
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


def _ratio_cell(mode: str) -> Callable[[dict], str]:
    return lambda row: f"{row['ratio_to_single_lora'][mode]:.2f}" if mode in row["ratio_to_single_lora"] else "—"


def markdown_table(report: dict) -> str:
    ratios = tuple((f"× {FLOOR} {harness.MODE_COLUMNS[mode].split()[0]}", _ratio_cell(mode)) for mode in MODES)
    return harness.layer_table(report, Shape, after_modes=ratios, modes=MODES)


def goal_lines(report: dict) -> list[str]:
    """The goals' ratios, as a markdown list."""
    return [f"- {Shape(**goal['shape'])}: {goal['what']} = {goal['ratio']:.3f}"
            + ("" if goal["goal"] is None else f" (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
            for goal in report["goals"]]


def pick_lines(report: dict) -> list[str]:
    """What backend="auto" picked for each problem key, as a markdown list."""
    return [f"- auto picked {pick[-1]} for {pick[:-1]}" for pick in report["auto_picks"]]


def markdown_report(report: dict) -> str:
    context = (f"{report['dtype']}; rows of each batch spread uniformly at random over the adapters. "
               f"{harness.measurement_sentence(report, SOFTWARE)} {report['memory']}. Ratios are of medians measured "
               "in this run.")
    table = "\n".join([markdown_table(report), "", *goal_lines(report), *pick_lines(report)])
    return harness.markdown_document(report, "Mixed-batch multi-adapter LoRA benchmark", context, table)


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]):
    parser = harness.layer_parser("python -m benchmarks.bench_multi_lora_linear", __doc__, Shape, PROVIDERS,
                                  QUICK_SHAPE)
    parser.add_argument("--tag", help="appended to the result files' names (multi_lora_linear_<device>_<dtype>_<tag>)")
    return parser.parse_args(argv)


def run_benchmark(args) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device, shapes, providers, report = harness.start_layer_report(
        "multi_lora_linear", args, DEFAULT_SHAPES, QUICK_SHAPE, skip_reasons, PROVIDERS)
    for shape in shapes:
        print(f"{shape}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
        benchmark_shape(report, shape, providers, device)
    report["goals"] = goal_ratios(report)
    report["auto_picks"] = autotune.records()
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    notes = goal_lines(report) + pick_lines(report)
    return harness.publish_with_goals(report, args, markdown_report(report), markdown_table(report), notes)


if __name__ == "__main__":
    sys.exit(main())
