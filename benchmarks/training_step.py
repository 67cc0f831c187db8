"""Shared mechanics of the end-to-end training-step benchmarks (bench_lora_llama_step,
bench_adapter_bert_step): one model per provider, a check that each provider computes the
baseline's loss and gradients, steps alternating between providers, tokens/s and peak memory."""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from benchmarks.bench_lora import _CudaEventTimer, _WallTimer

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
    timer_class = _CudaEventTimer if on_cuda else _WallTimer
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
