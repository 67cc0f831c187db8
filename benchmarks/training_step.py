"""Shared mechanics of the end-to-end training-step benchmarks (bench_lora_llama_step,
bench_adapter_bert_step): one model per provider, a check that each provider computes the
baseline's loss and gradients, steps alternating between providers, tokens/s and peak memory."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    DTYPES,
    CudaEventTimer,
    WallTimer,
    default_dtype_name,
    positive_int,
    report_header,
    resolve_device,
)

CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class TrainingRun:
    """One provider's model, the tensors it trains (by name, the same names for every provider)
    and its AdamW; step(batch) is one training step, loss(batch) the scalar it minimises."""

    def __init__(self, model: nn.Module, trained: dict[str, torch.Tensor],
                 loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        self.model, self.trained, self.loss_fn = model, trained, loss_fn
        self.optimizer = torch.optim.AdamW(list(trained.values()), lr=1e-4)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def step(self, batch: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.optimizer.step()


def check_against_baseline(run: TrainingRun, baseline: TrainingRun, batch: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise AssertionError unless run's loss and the gradients of its trained tensors match the
    baseline's (run before any optimizer step, from the same weights)."""
    tolerance = CHECK_TOLERANCE[dtype]
    results = []
    for candidate in (run, baseline):
        candidate.optimizer.zero_grad(set_to_none=True)
        loss = candidate.loss(batch)
        loss.backward()
        results.append((loss.detach(), {name: tensor.grad for name, tensor in candidate.trained.items()}))
    (loss, grads), (expected_loss, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=0, msg=lambda m: f"loss differs: {m}")
    if grads.keys() != expected_grads.keys():
        raise AssertionError(f"trained tensors differ: {sorted(grads.keys() ^ expected_grads.keys())[:5]}")
    for name, actual in grads.items():
        expected = expected_grads[name]
        if actual is None:
            raise AssertionError(f"{name}: no gradient")
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m: f"{name} gradient differs: {m}")


def time_alternating(runs: dict[str, TrainingRun], batch: torch.Tensor, device: torch.device, warmup: int,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """(ms of each timed step, peak bytes one step allocates above what was allocated before it
    (CUDA only)) per provider; providers alternate every step, so drift hits all alike."""
    on_cuda = device.type == "cuda"
    timer_class = CudaEventTimer if on_cuda else WallTimer
    timers = {name: [] for name in runs}
    peaks = {}
    for step in range(warmup + repeats):
        for name, run in runs.items():
            measure_peak = on_cuda and step == warmup
            if measure_peak:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            timer = timer_class()
            with timer:
                run.step(batch)
            if step >= warmup:
                timers[name].append(timer)
            if measure_peak:
                torch.cuda.synchronize(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - before
    if on_cuda:
        torch.cuda.synchronize(device)
    return {name: [timer.elapsed_ms() for timer in values] for name, values in timers.items()}, peaks


def compare_providers(build: Callable[[str], TrainingRun], providers: list[str], baseline: str, batch: torch.Tensor,
                      dtype: torch.dtype, device: torch.device, warmup: int, repeats: int,
                      tokens: int) -> tuple[list[dict], list[dict]]:
    """Build every provider's run (build(provider), each on its own copy of the model), check each
    against the baseline's, time the ones that agree: (result rows, failed checks)."""
    runs = {provider: build(provider) for provider in providers}
    failures = []
    for provider in [p for p in providers if p != baseline]:
        try:
            check_against_baseline(runs[provider], runs[baseline], batch, dtype)
        except AssertionError as exc:
            failures.append({"provider": provider, "error": str(exc)})
            del runs[provider]
    times, peaks = time_alternating(runs, batch, device, warmup, repeats)
    return result_rows(times, peaks, tokens, baseline), failures


def result_rows(times: dict[str, list[float]], peaks: dict[str, int], tokens: int, baseline: str) -> list[dict]:
    """One row per provider: median ms, tokens/s, speed-up over the baseline, peak step bytes."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    return [{"provider": name, "times_ms": times[name], "median_ms": median, "tokens_per_s": tokens / median * 1e3,
             f"speedup_over_{baseline}": medians[baseline] / median, "peak_step_bytes": peaks.get(name)}
            for name, median in medians.items()]


def markdown_rows(rows: list[dict], baseline: str) -> list[str]:
    lines = [f"| provider | ms/step | tokens/s | × {baseline} speed | peak step MiB |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        peak = "—" if row["peak_step_bytes"] is None else f"{row['peak_step_bytes'] / 2**20:.0f}"
        lines.append(f"| {row['provider']} | {row['median_ms']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row[f'speedup_over_{baseline}']:.2f} | {peak} |")
    return lines


def step_parser(prog: str, description: str, providers: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every step benchmark takes; each adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch", type=positive_int)
    parser.add_argument("--seq", type=positive_int)
    parser.add_argument("--repeats", type=positive_int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--providers", nargs="+", choices=providers, default=list(providers))
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--quick", action="store_true", help="a tiny model, few steps: a smoke test")
    return parser


def start_report(benchmark: str, args: argparse.Namespace, defaults: dict[str, dict], quick: dict,
                 skip_reasons: Callable[[torch.device], dict[str, str]], baseline: str, **described) -> tuple:
    """(device, dtype, settings, the providers to run, the report so far) of a step benchmark:
    settings are the device's defaults (or `quick`'s) overridden by the options given; the
    report fails at once if the baseline cannot run, as nothing could be checked then."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or default_dtype_name(device)]
    settings = {key: value if getattr(args, key, None) is None else getattr(args, key)
                for key, value in (quick if args.quick else defaults[device.type]).items()}
    skipped = {provider: reason for provider, reason in skip_reasons(device).items() if provider in args.providers}
    providers = [provider for provider in args.providers if provider not in skipped]
    report = report_header(benchmark, device, str(dtype).removeprefix("torch."), quick=args.quick, **settings,
                           **described, skipped=skipped, failed_checks=[], results=[])
    if baseline not in providers:
        report["failed_checks"].append(
            {"provider": baseline, "error": "the baseline cannot run: nothing to check against"}
        )
    return device, dtype, settings, providers, report
