"""Adapter-bottleneck benchmark: lowrank's fused op against the eager nn.Sequential adapter.

    python -m benchmarks.bench_adapter                        # default shapes for the device
    python -m benchmarks.bench_adapter --quick                # one small shape, few repeats: a smoke test
    python -m benchmarks.bench_adapter --shapes 4096,1024,64 --activation gelu --repeats 40
    python -m benchmarks.bench_adapter --no-onednn            # the cpu backend's GEMMs through MKL only

Every provider computes out = h + (act(h·W_dᵀ + b_d)·W_uᵀ + b_u) with h and all four adapter
tensors requiring grad (h stands for the activations of the layers below):
  eager_sequential   h + nn.Sequential(nn.Linear(D, Bn), act, nn.Linear(Bn, D))(h), as adapter
                     libraries write it: the baseline of the "× eager" columns (its time / yours)
  eager_compiled     the same module through torch.compile(fullgraph=True) (CUDA runs; on CPU
                     only when named in --providers, inductor's C++ builds being slow)
  lowrank_<backend>  lowrank.ops.adapter with that backend (auto: the fastest, measured per shape)

Timing, interleaving, input rotation and memory accounting are those of benchmarks.harness,
shared with the LoRA benchmark. Each provider is checked against lowrank.ops.adapter_reference before
it is timed, and one that disagrees is reported instead of timed (exit status 1).
The cpu backend runs fp32 GEMMs through oneDNN, which on some CPUs (AMD Zen) is much faster
than the MKL sgemm behind nn.Linear; --no-onednn turns oneDNN off (torch.backends.mkldnn) to
show what the fusion alone gains.
Results: <out-dir>/adapter_<device-slug>_<dtype>_<activation>[_no-onednn].json (all raw numbers) and .md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.harness import MODES, Layer, LayerProblem, LayerShape
from lowrank.ops import adapter, adapter_reference

BASELINE = "eager_sequential"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
SOFTWARE = ("torch", "cuda", "triton")  # the versions the markdown names


@dataclass(frozen=True)
class Shape(LayerShape):
    """h [M, D] through a D -> Bn -> D adapter."""

    D: int
    Bn: int

    in_features = property(lambda shape: shape.D)
    out_features = property(lambda shape: shape.D)


DEFAULT_SHAPES = {
    "cpu": [Shape(4096, 1024, 64), Shape(4096, 768, 48), Shape(1024, 1024, 64)],
    # The goal's shape first (16384 tokens, dim 4096, bottleneck 64), then the rest of the grid.
    "cuda": [Shape(16384, 4096, 64)] + [Shape(M, D, Bn) for M in (4096, 16384, 65536) for D in (768, 4096)
                                        for Bn in (16, 64, 256) if (M, D, Bn) != (16384, 4096, 64)],
}
QUICK_SHAPE = Shape(256, 128, 16)


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem(LayerProblem):
    """The one adapter every provider implements; each provider copies these values."""

    activation: str
    w_down: Tensor  # [Bn, D]
    b_down: Tensor  # [Bn]
    w_up: Tensor  # [D, Bn]; nonzero, unlike the identity init, so no provider can skip the adapter
    b_up: Tensor  # [D]

    def trained(self) -> dict[str, Tensor]:
        """The adapter's tensors by name, in the order of every provider's Layer.trained."""
        return {"w_down": self.w_down, "b_down": self.b_down, "w_up": self.w_up, "b_up": self.b_up}


def make_problem(shape: Shape, activation: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    randn = harness.seeded_randn(device, dtype, seed)
    D, Bn = shape.D, shape.Bn
    # Scaled so the residual and the adapter term are both O(1): the check sees errors in either.
    return Problem(shape, device, dtype, activation, randn(Bn, D, std=D**-0.5), randn(Bn, std=0.1),
                   randn(D, Bn, std=Bn**-0.5), randn(D, std=0.1))


class EagerAdapter(nn.Module):
    """The bottleneck adapter in plain modules, residual added outside, as adapter libraries write it."""

    def __init__(self, problem: Problem):
        super().__init__()
        Bn, D = problem.w_down.shape
        options = dict(device=problem.device, dtype=problem.dtype)
        self.adapter = nn.Sequential(nn.Linear(D, Bn, **options), ACTIVATIONS[problem.activation](),
                                     nn.Linear(Bn, D, **options))
        with torch.no_grad():
            for tensor, value in zip(self.trained(), problem.trained().values(), strict=True):
                tensor.copy_(value)

    def trained(self) -> tuple[Tensor, ...]:
        down, _, up = self.adapter
        return down.weight, down.bias, up.weight, up.bias

    def forward(self, h: Tensor) -> Tensor:
        return h + self.adapter(h)


def build_eager_sequential(problem: Problem) -> Layer:
    module = EagerAdapter(problem)
    return Layer(module, module.trained(), module.trained())


def build_eager_compiled(problem: Problem) -> Layer:
    """The eager adapter through torch.compile (inductor): what fusion buys without our kernels."""
    module = EagerAdapter(problem)
    return Layer(torch.compile(module, fullgraph=True), module.trained(), module.trained())


def _lowrank_builder(backend: str) -> Callable[[Problem], Layer]:
    def build(problem: Problem) -> Layer:
        trained = tuple(value.clone().requires_grad_() for value in problem.trained().values())

        def forward(h: Tensor) -> Tensor:
            return adapter(h, *trained, problem.activation, 1.0, True, backend=backend)

        return Layer(forward, trained, trained)

    return build


BUILDERS: dict[str, Callable[[Problem], Layer]] = {
    BASELINE: build_eager_sequential,
    "eager_compiled": build_eager_compiled,
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in harness.LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: Problem) -> Layer:
    return BUILDERS[provider](problem)


def skip_reasons(device: torch.device, named: tuple[str, ...] = ()) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why (the LoRA benchmark's rules);
    `named`: the providers the user asked for by name."""
    reasons = {provider: reason for provider, reason in harness.backend_skip_reasons(device).items()
               if provider in BUILDERS}
    if device.type != "cuda" and "eager_compiled" not in named:
        # Inductor compiles C++ for the CPU for tens of seconds per shape; ask with --providers.
        reasons["eager_compiled"] = "CPU runs time torch.compile only when named in --providers"
    return reasons


def check_against_reference(layer: Layer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference."""

    def reference(h: Tensor, *trained: Tensor) -> Tensor:
        return adapter_reference(h, *trained, problem.activation, 1.0, True)

    harness.check_against_reference(layer, problem, reference, problem.trained(), x_name="h")


def benchmark_shape(report: dict, shape: Shape, providers: list[str], device: torch.device) -> None:
    """Check and time `providers` at one shape, into the report."""
    problem = make_problem(shape, report["activation"], device, harness.DTYPES[report["dtype"]])
    rows = harness.time_checked_providers(report, problem, providers, build_layer, check_against_reference)
    baseline = next((row for row in rows if row["provider"] == BASELINE), None)
    for row in rows:
        row["speedup_vs_eager"] = (
            {mode: baseline["median_ms"][mode] / row["median_ms"][mode] for mode in MODES} if baseline else None
        )


# ---------------------------------------------------------------- reports


def _speedup_cell(mode: str) -> Callable[[dict], str]:
    return lambda row: "—" if row["speedup_vs_eager"] is None else f"{row['speedup_vs_eager'][mode]:.2f}"


def markdown_table(report: dict) -> str:
    speedups = tuple((f"{column[:-3]} × eager", _speedup_cell(mode)) for mode, column in harness.MODE_COLUMNS.items())
    return harness.layer_table(report, Shape, after_modes=speedups)


def markdown_report(report: dict) -> str:
    context = (
        f"{report['dtype']}, activation {report['activation']}, residual on, scaling 1, "
        f"oneDNN {'on' if report['onednn'] else 'off'}; {harness.measurement_sentence(report, SOFTWARE)} "
        f"× eager = eager_sequential's median time / the provider's. {report['memory']}."
    )
    return harness.markdown_document(report, "Adapter bottleneck benchmark", context, markdown_table(report))


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = harness.layer_parser("python -m benchmarks.bench_adapter", __doc__, Shape, PROVIDERS, QUICK_SHAPE)
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu")
    parser.add_argument("--no-onednn", action="store_true", help="disable oneDNN (torch.backends.mkldnn) for the run")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    torch.backends.mkldnn.enabled = not args.no_onednn
    device, shapes, providers, report = harness.start_layer_report(
        "adapter", args, DEFAULT_SHAPES, QUICK_SHAPE, skip_reasons, PROVIDERS, activation=args.activation,
        onednn=torch.backends.mkldnn.enabled)
    for shape in shapes:
        print(f"{shape}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
        benchmark_shape(report, shape, providers, device)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    name = harness.report_name(report, report["activation"], None if report["onednn"] else "no-onednn")
    summary = harness.console_summary(report, markdown_table(report))
    return harness.publish(report, args.out_dir, name, markdown_report(report), summary)


if __name__ == "__main__":
    sys.exit(main())
