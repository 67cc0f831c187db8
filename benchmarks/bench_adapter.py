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
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import lowrank
from benchmarks.harness import (
    DTYPES,
    MAX_INPUT_SETS,
    MODE_COLUMNS,
    MODES,
    ROTATION_BYTES,
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
from lowrank.ops import adapter, adapter_reference

BASELINE = "eager_sequential"
LOWRANK_BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
CHECK_ROWS = 64
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Shape:
    """h [M, D] through a D -> Bn -> D adapter."""

    M: int
    D: int
    Bn: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            M, D, Bn = (int(value) for value in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is M,D,Bn (three integers), got {text!r}") from None
        return cls(M, D, Bn)

    def __str__(self) -> str:
        return f"M={self.M} D={self.D} Bn={self.Bn}"


DEFAULT_SHAPES = {
    "cpu": [Shape(4096, 1024, 64), Shape(4096, 768, 48), Shape(1024, 1024, 64)],
    # The goal's shape first (16384 tokens, dim 4096, bottleneck 64), then the rest of the grid.
    "cuda": [Shape(16384, 4096, 64)] + [Shape(M, D, Bn) for M in (4096, 16384, 65536) for D in (768, 4096)
                                        for Bn in (16, 64, 256) if (M, D, Bn) != (16384, 4096, 64)],
}
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
QUICK_SHAPE = Shape(256, 128, 16)
QUICK_REPEATS = 3
QUICK_WARMUP = 1


# ---------------------------------------------------------------- the problem and its providers


@dataclass
class Problem:
    """The one adapter every provider implements; each provider copies these values."""

    shape: Shape
    activation: str
    w_down: Tensor  # [Bn, D]
    b_down: Tensor  # [Bn]
    w_up: Tensor  # [D, Bn]; nonzero, unlike the identity init, so no provider can skip the adapter
    b_up: Tensor  # [D]

    @property
    def device(self) -> torch.device:
        return self.w_down.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w_down.dtype


def make_problem(shape: Shape, activation: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=generator, device=device) * std).to(dtype)

    D, Bn = shape.D, shape.Bn
    # Scaled so the residual and the adapter term are both O(1): the check sees errors in either.
    return Problem(shape, activation, randn(Bn, D, std=D**-0.5), randn(Bn, std=0.1),
                   randn(D, Bn, std=Bn**-0.5), randn(D, std=0.1))


def make_inputs(problem: Problem, count: int, rows: Optional[int] = None, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """`count` pairs (h requiring grad, gradient of out) of `rows` rows (default M)."""
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    rows = problem.shape.M if rows is None else rows
    inputs = []
    for _ in range(count):
        h = torch.randn(rows, problem.shape.D, generator=generator, device=problem.device).to(problem.dtype)
        grad_out = torch.randn(rows, problem.shape.D, generator=generator, device=problem.device).to(problem.dtype)
        inputs.append((h.requires_grad_(), grad_out))
    return inputs


def input_set_count(shape: Shape, dtype: torch.dtype) -> int:
    set_bytes = 2 * shape.M * shape.D * dtype.itemsize
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)))


@dataclass
class Layer:
    """One provider's implementation of a Problem: out = forward(h). The harness's timing and
    memory helpers take it in place of harness.Layer: they use forward, held and clear_grads."""

    forward: Callable[[Tensor], Tensor]
    trained: tuple[Tensor, ...]  # (w_down, b_down, w_up, b_up)

    @property
    def held(self) -> tuple[Tensor, ...]:
        return self.trained

    def clear_grads(self, h: Tensor) -> None:
        """Drop gradients so each repeat allocates them afresh, as after zero_grad(set_to_none=True)."""
        for tensor in (h, *self.trained):
            tensor.grad = None


class EagerAdapter(nn.Module):
    """The bottleneck adapter in plain modules, residual added outside, as adapter libraries write it."""

    def __init__(self, problem: Problem):
        super().__init__()
        Bn, D = problem.w_down.shape
        options = dict(device=problem.device, dtype=problem.dtype)
        self.adapter = nn.Sequential(nn.Linear(D, Bn, **options), ACTIVATIONS[problem.activation](),
                                     nn.Linear(Bn, D, **options))
        with torch.no_grad():
            for tensor, value in zip(self.trained(), (problem.w_down, problem.b_down, problem.w_up, problem.b_up)):
                tensor.copy_(value)

    def trained(self) -> tuple[Tensor, ...]:
        down, _, up = self.adapter
        return down.weight, down.bias, up.weight, up.bias

    def forward(self, h: Tensor) -> Tensor:
        return h + self.adapter(h)


def build_eager_sequential(problem: Problem) -> Layer:
    module = EagerAdapter(problem)
    return Layer(module, module.trained())


def build_eager_compiled(problem: Problem) -> Layer:
    """The eager adapter through torch.compile (inductor): what fusion buys without our kernels."""
    module = EagerAdapter(problem)
    return Layer(torch.compile(module, fullgraph=True), module.trained())


def _lowrank_builder(backend: str) -> Callable[[Problem], Layer]:
    def build(problem: Problem) -> Layer:
        trained = tuple(
            t.clone().requires_grad_() for t in (problem.w_down, problem.b_down, problem.w_up, problem.b_up)
        )

        def forward(h: Tensor) -> Tensor:
            return adapter(h, *trained, problem.activation, 1.0, True, backend=backend)

        return Layer(forward, trained)

    return build


BUILDERS: dict[str, Callable[[Problem], Layer]] = {
    BASELINE: build_eager_sequential,
    "eager_compiled": build_eager_compiled,
    **{f"lowrank_{backend}": _lowrank_builder(backend) for backend in LOWRANK_BACKENDS},
}
PROVIDERS = tuple(BUILDERS)


def build_layer(provider: str, problem: Problem) -> Layer:
    return BUILDERS[provider](problem)


def skip_reasons(device: torch.device, named: tuple[str, ...] = ()) -> dict[str, str]:
    """The providers that cannot be timed on `device`, each with why (the LoRA benchmark's rules);
    `named`: the providers the user asked for by name."""
    reasons = {provider: reason for provider, reason in backend_skip_reasons(device).items() if provider in BUILDERS}
    if device.type != "cuda" and "eager_compiled" not in named:
        # Inductor compiles C++ for the CPU for tens of seconds per shape; ask with --providers.
        reasons["eager_compiled"] = "CPU runs time torch.compile only when named in --providers"
    return reasons


def check_against_reference(layer: Layer, problem: Problem) -> None:
    """Raise AssertionError unless the layer's output and gradients match a float64 reference."""
    h, grad_out = make_inputs(problem, 1, rows=min(CHECK_ROWS, problem.shape.M), seed=2)[0]
    layer.clear_grads(h)
    out = layer.forward(h)
    out.backward(grad_out)

    h64 = h.detach().double().requires_grad_()
    trained64 = [t.double().requires_grad_() for t in (problem.w_down, problem.b_down, problem.w_up, problem.b_up)]
    out64 = adapter_reference(h64, *trained64, problem.activation, 1.0, True)
    out64.backward(grad_out.double())
    names = ("grad of h", "grad of w_down", "grad of b_down", "grad of w_up", "grad of b_up")
    comparisons = [("output", out, out64)]
    comparisons += [
        (name, ours.grad, ref.grad) for name, ours, ref in zip(names, (h, *layer.trained), (h64, *trained64))
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


def benchmark_shape(shape: Shape, activation: str, providers: list[str], device: torch.device, dtype: torch.dtype,
                    repeats: int, warmup: int) -> tuple[list[dict], list[dict]]:
    """(one result row per provider, the providers that failed their check) for one shape."""
    problem = make_problem(shape, activation, device, dtype)
    inputs = make_inputs(problem, input_set_count(shape, dtype))
    rows, failures = time_checked_providers(
        shape, problem, providers, build_layer, check_against_reference, inputs, repeats, warmup
    )
    baseline = next((row for row in rows if row["provider"] == BASELINE), None)
    for row in rows:
        row["speedup_vs_eager"] = (
            {mode: baseline["median_ms"][mode] / row["median_ms"][mode] for mode in MODES} if baseline else None
        )
    return rows, failures


# ---------------------------------------------------------------- reports


def markdown_table(report: dict) -> str:
    with_peak = report["device"]["type"] == "cuda"
    header = [
        "M",
        "D",
        "Bn",
        "provider",
        *MODE_COLUMNS.values(),
        *(f"{column[:-3]} × eager" for column in MODE_COLUMNS.values()),
    ]
    header += ["saved MiB"] + (["peak MiB"] if with_peak else [])
    alignments = ["---" if name == "provider" else "---:" for name in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    for row in report["results"]:
        shape, speedup = row["shape"], row["speedup_vs_eager"]
        cells = [str(shape[dim]) for dim in ("M", "D", "Bn")] + [row["provider"]]
        cells += [format_ms(row["median_ms"][mode]) for mode in MODES]
        cells += ["—" if speedup is None else f"{speedup[mode]:.2f}" for mode in MODES]
        cells += [format_mib(row["saved_bytes"])] + ([format_mib(row["peak_bytes"])] if with_peak else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_notes(report: dict) -> list[str]:
    notes = [f"- skipped {provider}: {reason}" for provider, reason in report["skipped"].items()]
    for failure in report["failed_checks"]:
        first_line = failure["error"].splitlines()[0]
        notes.append(f"- FAILED CHECK, not timed: {failure['provider']} at {Shape(**failure['shape'])}: {first_line}")
    return notes


def markdown_report(report: dict) -> str:
    versions = report["versions"]
    software = ", ".join(f"{name} {versions[name]}" for name in ("torch", "cuda", "triton") if versions[name])
    context = (
        f"{report['dtype']}, activation {report['activation']}, residual on, scaling 1, "
        f"oneDNN {'on' if report['onednn'] else 'off'}; {software}. "
        f"{report['timing']}. Median of {report['repeats']} repeats after {report['warmup']} warm-up. "
        f"× eager = eager_sequential's median time / the provider's. {report['memory']}."
    )
    if report["quick"]:
        context += " QUICK MODE: a smoke test, not a measurement."
    title = f"# Adapter bottleneck benchmark: {report['device']['name']}"
    return "\n".join([title, "", context, "", markdown_table(report), "", *report_notes(report), ""])


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_adapter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu")
    parser.add_argument("--shapes", nargs="+", type=Shape.parse, metavar="M,D,Bn", help="default: a set per device")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: every provider that can run here")
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per mode (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE}, {QUICK_REPEATS} repeats: a smoke test")
    parser.add_argument("--no-onednn", action="store_true", help="disable oneDNN (torch.backends.mkldnn) for the run")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Check and time every requested provider on every shape; the report with all raw numbers."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    shapes = args.shapes or ([QUICK_SHAPE] if args.quick else DEFAULT_SHAPES[device.type])
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    torch.backends.mkldnn.enabled = not args.no_onednn
    requested = args.providers or PROVIDERS
    skipped = {provider: reason for provider, reason in skip_reasons(device, tuple(args.providers or ())).items()
               if provider in requested}
    providers = [provider for provider in requested if provider not in skipped]

    report = {
        "benchmark": "adapter",
        "device": describe_device(device),
        "versions": describe_versions(),
        "dtype": dtype_name,
        "activation": args.activation,
        "onednn": torch.backends.mkldnn.enabled,
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
        print(f"{shape}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
        rows, failures = benchmark_shape(shape, args.activation, providers, device, DTYPES[dtype_name], repeats, warmup)
        report["results"] += rows
        report["failed_checks"] += failures
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    name = f"adapter_{report['device']['slug']}_{report['dtype']}_{report['activation']}"
    write_reports(args.out_dir, name + ("" if report["onednn"] else "_no-onednn"), report, markdown_report(report))
    print("\n".join(["", *report_notes(report), "", markdown_table(report)]))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
