"""Gradient-reversal benchmark: lowrank's GRL against a naive one, and its backward against the
machine's copy bandwidth, measured in the same run.

    python -m benchmarks.bench_grad_reverse                       # default sizes for the device
    python -m benchmarks.bench_grad_reverse --quick               # one small size, few repeats: a smoke test
    python -m benchmarks.bench_grad_reverse --device cuda --dtype bf16 --sizes 67108864

Providers (x of `size` elements requiring grad, λ = 0.7):
  naive              forward x.clone(), backward -λ * grad (an autograd.Function): what a GRL
                     written without care costs
  lowrank_<backend>  lowrank.ops.grad_reverse with that backend (auto: the fastest, measured)

Per provider: forward ms, and backward ms through autograd (y.backward(g): the caller holds g, so
lowrank takes its out-of-place path). Per lowrank backend, the backward kernels alone: the
out-of-place op and the in-place op (λ = 1 there, so repeating it on one tensor never drifts into
denormals), each as achieved bandwidth (one read + one write of the gradient) and as a fraction of
`dst.copy_(src)` of the same size timed in the same run. The goal on CPU is ≥ 80 % of copy.
Every provider is checked against −λ·grad in float64 before it is timed.
Results: <out-dir>/grad_reverse_<device-slug>_<dtype>.json (all raw numbers) and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import lowrank
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    DTYPES,
    LOWRANK_BACKENDS,
    CudaEventTimer,
    WallTimer,
    backend_skip_reasons,
    console_summary,
    default_dtype_name,
    format_ms,
    markdown_document,
    measurement_sentence,
    positive_int,
    publish,
    report_header,
    resolve_device,
)
from lowrank.ops import grad_reverse

LAMBDA = 0.7
# Elements; on CUDA 16 MiB to 1 GiB of bf16 gradient.
DEFAULT_SIZES = {"cpu": [4096 * 1024, 16 << 20], "cuda": [8 << 20, 32 << 20, 128 << 20, 512 << 20]}
DEFAULT_REPEATS = {"cpu": 20, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 3, "cuda": 10}
QUICK_SIZE, QUICK_REPEATS, QUICK_WARMUP = 1 << 16, 3, 1
GOAL_FRACTION_OF_COPY = 0.8


class _NaiveGradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lambda_ * grad, None


def providers(device: torch.device) -> tuple[dict[str, Callable[[Tensor], Tensor]], dict[str, str]]:
    """({name: forward}, {name skipped: why}) for the providers that can run on `device`."""
    reasons = {name: why for name, why in backend_skip_reasons(device).items()}
    forwards = {"naive": lambda x: _NaiveGradReverse.apply(x, LAMBDA)}
    for backend in LOWRANK_BACKENDS:
        if f"lowrank_{backend}" not in reasons:
            forwards[f"lowrank_{backend}"] = lambda x, backend=backend: grad_reverse(x, LAMBDA, backend=backend)
    return forwards, reasons


def check(forward: Callable[[Tensor], Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Raise AssertionError unless forward is the identity and its backward is −λ·grad."""
    x = torch.randn(1000, device=device).to(dtype).requires_grad_()
    grad = torch.randn(1000, device=device).to(dtype)
    y = forward(x)
    y.backward(grad)
    torch.testing.assert_close(y.detach(), x.detach(), rtol=0, atol=0)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), -LAMBDA * grad.double(), rtol=tolerance, atol=tolerance)


def _timer(device: torch.device):
    return CudaEventTimer() if device.type == "cuda" else WallTimer()


def time_interleaved(steps: dict[str, Callable[[object], None]], device: torch.device, repeats: int, warmup: int):
    """Milliseconds per repeat of each step(timer), steps rotated so drift hits all alike."""
    names = list(steps)
    timers: dict[str, list] = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        first = repeat % len(names)
        for name in names[first:] + names[:first]:
            timer = _timer(device)
            steps[name](timer)
            if repeat >= warmup:
                timers[name].append(timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {name: [timer.elapsed_ms() for timer in timer_list] for name, timer_list in timers.items()}


def _forward_step(forward, x):
    def step(timer):
        with timer:
            y = forward(x)
        del y

    return step


def _backward_step(forward, x, grad):
    def step(timer):
        x.grad = None
        y = forward(x)
        with timer:
            y.backward(grad)

    return step


def _call_step(fn):
    def step(timer):
        with timer:
            fn()

    return step


def benchmark_size(size: int, forwards: dict, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int):
    x = torch.randn(size, device=device).to(dtype).requires_grad_()
    grad = torch.randn(size, device=device).to(dtype)
    lambda_ = torch.tensor(LAMBDA, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    scratch, copy_dst = grad.clone(), torch.empty_like(grad)

    steps = {"copy": _call_step(lambda: copy_dst.copy_(grad))}
    for name, forward in forwards.items():
        steps[f"{name}:forward"] = _forward_step(forward, x)
        steps[f"{name}:backward"] = _backward_step(forward, x, grad)
        backend = name.removeprefix("lowrank_")
        if name == "naive":
            steps[f"{name}:kernel"] = _call_step(lambda: -LAMBDA * grad)
        else:
            steps[f"{name}:kernel"] = _call_step(
                lambda b=backend: torch.ops.lowrank.grad_reverse_backward(grad, lambda_, b))
            steps[f"{name}:kernel_inplace"] = _call_step(
                lambda b=backend: torch.ops.lowrank.grad_reverse_backward_(scratch, one, b))
    times = time_interleaved(steps, device, repeats, warmup)
    median = {name: statistics.median(values) for name, values in times.items()}

    moved = 2 * size * grad.element_size()  # one read and one write
    gbps = lambda ms: moved / (ms * 1e-3) / 1e9  # noqa: E731
    copy_gbps = gbps(median["copy"])
    rows = []
    for name in forwards:
        row = {
            "size": size,
            "provider": name,
            "median_ms": {mode: median[f"{name}:{mode}"] for mode in ("forward", "backward", "kernel")},
            "times_ms": {mode: times[f"{name}:{mode}"] for mode in ("forward", "backward", "kernel")},
            "kernel_gbps": gbps(median[f"{name}:kernel"]),
        }
        row["kernel_fraction_of_copy"] = row["kernel_gbps"] / copy_gbps
        if f"{name}:kernel_inplace" in median:
            row["median_ms"]["kernel_inplace"] = median[f"{name}:kernel_inplace"]
            row["times_ms"]["kernel_inplace"] = times[f"{name}:kernel_inplace"]
            row["kernel_inplace_gbps"] = gbps(median[f"{name}:kernel_inplace"])
            row["kernel_inplace_fraction_of_copy"] = row["kernel_inplace_gbps"] / copy_gbps
        rows.append(row)
    copy = {"size": size, "median_ms": median["copy"], "times_ms": times["copy"], "gbps": copy_gbps}
    return rows, copy


def markdown_table(report: dict) -> str:
    header = ["size", "provider", "fwd ms", "bwd ms", "bwd kernel ms", "GB/s", "% copy",
              "in-place ms", "in-place GB/s", "in-place % copy"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|" + "---:|" * (len(header) - 2)]
    for row in report["results"]:
        ms = row["median_ms"]
        cells = [str(row["size"]), row["provider"], format_ms(ms["forward"]), format_ms(ms["backward"]),
                 format_ms(ms["kernel"]), f"{row['kernel_gbps']:.1f}", f"{100 * row['kernel_fraction_of_copy']:.0f}"]
        if "kernel_inplace" in ms:
            cells += [format_ms(ms["kernel_inplace"]), f"{row['kernel_inplace_gbps']:.1f}",
                      f"{100 * row['kernel_inplace_fraction_of_copy']:.0f}"]
        else:
            cells += ["—"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    for copy in report["copy"]:
        lines.append(f"| {copy['size']} | copy_ (dst.copy_(src)) | | | {format_ms(copy['median_ms'])} | "
                     f"{copy['gbps']:.1f} | 100 | | | |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    context = (f"{report['dtype']}; {measurement_sentence(report, ('torch',))} GB/s counts one read and one "
               f"write of the gradient; % copy is against dst.copy_(src) of the same size in the same run "
               f"(goal: ≥ {GOAL_FRACTION_OF_COPY:.0%}).")
    return markdown_document(report, "Gradient reversal benchmark", context, markdown_table(report))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_grad_reverse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument(
        "--sizes", nargs="+", type=positive_int, metavar="NUMEL", help="elements of x (default: per device)"
    )
    parser.add_argument("--repeats", type=positive_int, help="timed repeats (default 20 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed repeats before them (default 3 on CPU, 10 on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: benchmarks/results/kernels")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_SIZE} elements, {QUICK_REPEATS} repeats: a smoke test"
    )
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    dtype = DTYPES[dtype_name]
    sizes = args.sizes or ([QUICK_SIZE] if args.quick else DEFAULT_SIZES[device.type])
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    forwards, skipped = providers(device)
    failures = []
    for name in list(forwards):
        try:
            check(forwards[name], device, dtype)
        except Exception as exc:  # a broken provider is reported; the others are still measured
            failures.append({"provider": name, "error": f"{type(exc).__name__}: {exc}"})
            del forwards[name]
    report = {
        **report_header("grad_reverse", device, dtype_name, quick=args.quick, repeats=repeats, warmup=warmup),
        "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter") + ", steps interleaved round-robin",
        "lambda": LAMBDA,
        "lowrank_backends": {name: status._asdict() for name, status in lowrank.backends().items()},
        "skipped": skipped,
        "failed_checks": failures,
        "results": [],
        "copy": [],
    }
    for size in sizes:
        print(f"size {size}: timing copy_, {', '.join(forwards)}", file=sys.stderr, flush=True)
        rows, copy = benchmark_size(size, forwards, device, dtype, repeats, warmup)
        report["results"] += rows
        report["copy"].append(copy)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    return publish(report, args.out_dir, f"grad_reverse_{report['device']['slug']}_{report['dtype']}",
                   markdown_report(report), console_summary(report, markdown_table(report)))


if __name__ == "__main__":
    sys.exit(main())
