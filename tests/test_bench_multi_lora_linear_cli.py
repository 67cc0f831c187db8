"""The mixed-batch multi-adapter LoRA benchmark (benchmarks/bench_multi_lora_linear.py): its quick
run times every provider it can run, each in its modes (PEFT's mixed batch at inference only),
reports the goals' ratios, and times only providers that agree with the reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank.ops import multi_lora_linear

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("bench_multi_lora_linear")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(completed process, report, out dir) of `python -m benchmarks.bench_multi_lora_linear --quick`."""
    out_dir = tmp_path_factory.mktemp("bench_multi_lora_linear")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_multi_lora_linear", "--quick", "--out-dir", str(out_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    reports = list(out_dir.glob("multi_lora_linear_*.json"))
    report = json.loads(reports[0].read_text()) if len(reports) == 1 else None
    return completed, report, out_dir


def test_quick_run_succeeds_and_writes_one_report(quick_run):
    completed, report, _ = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report is not None, "expected exactly one multi_lora_linear_<device>_<dtype>.json in the out dir"
    assert report["failed_checks"] == []


def test_report_times_every_runnable_provider_in_its_modes(quick_run, bench):
    _, report, _ = quick_run
    device = torch.device(report["device"]["type"])
    # The subprocess inherits this environment (TRITON_INTERPRET included), so it skips the same ones.
    assert report["skipped"] == bench.skip_reasons(device)
    runnable = set(bench.PROVIDERS) - set(report["skipped"])
    assert {"linear_frozen", "single_lora", "masked_loop", "lowrank_torch", "lowrank_auto"} <= runnable
    for adapters in bench.QUICK_ADAPTERS:
        rows = {row["provider"]: row for row in report["results"] if row["adapters"] == adapters}
        assert set(rows) == runnable
        for provider, row in rows.items():
            modes = bench.provider_modes(provider)
            assert tuple(row["median_ms"]) == modes and tuple(row["times_ms"]) == modes
            for mode in modes:
                assert len(row["times_ms"][mode]) == report["repeats"]
                assert all(ms > 0 for ms in row["times_ms"][mode]), (provider, mode)
            assert set(row["ratio_to_single_lora"]) == set(modes)
            assert (row["saved_bytes"] is None) == ("forward+backward" not in modes)
    assert any(key.startswith("('multi_lora_linear'") for key in report["auto_choices"])
    goals = {(goal["adapters"], goal["what"]) for goal in report["goals"]}
    for adapters in bench.QUICK_ADAPTERS:
        assert (adapters, "lowrank_auto / single_lora, forward+backward") in goals
        if "hf_peft_mixed" in runnable:
            assert (adapters, "hf_peft_mixed / lowrank_auto, inference") in goals


def test_markdown_table_is_written_and_printed_last(quick_run):
    completed, report, out_dir = quick_run
    markdown = (out_dir / f"multi_lora_linear_{report['device']['slug']}_{report['dtype']}.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| M | K | N | r | adapters | provider | infer ms | fwd+bwd ms |")
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]
    assert "lowrank_auto / single_lora, forward+backward" in markdown


@pytest.mark.parametrize("adapters", [1, 4])
def test_every_runnable_provider_matches_the_reference(bench, adapters):
    device = bench.resolve_device("auto")
    dtype = bench.DTYPES[bench.default_dtype_name(device)]
    problem = bench.make_problem(bench.QUICK_SHAPE, adapters, device, dtype)
    skipped = bench.skip_reasons(device)
    for provider in bench.PROVIDERS:
        if provider not in skipped:
            bench.check_against_reference(bench.build_layer(provider, problem), problem)


def _adapter_ignored(layer, problem):
    """The frozen layer's output: no adapter term."""
    return lambda x: torch.nn.functional.linear(x, problem.weight, problem.bias)


def _next_adapter(layer, problem):
    """Each row through the next adapter's factors."""
    shifted = (problem.adapter_index + 1) % problem.adapters
    return lambda x: multi_lora_linear(x, problem.weight, problem.bias, shifted, layer.lora_A, layer.lora_B,
                                       problem.scaling, backend="torch")


def _gradients_dropped(layer, problem):
    """The right output, but lora_A and lora_B get zero gradients."""

    def forward(x):
        base = torch.nn.functional.linear(x, problem.weight, problem.bias)
        adapter = layer.forward(x) - base
        return base + adapter.detach() + 0 * adapter

    return forward


@pytest.mark.parametrize("sabotage", [_adapter_ignored, _next_adapter, _gradients_dropped])
def test_reference_check_rejects_a_wrong_provider(bench, sabotage):
    problem = bench.make_problem(bench.QUICK_SHAPE, 4, torch.device("cpu"), torch.float32)
    layer = bench.build_layer("lowrank_torch", problem)
    wrong = bench.MixedLayer(sabotage(layer, problem), layer.held, layer.lora_A, layer.lora_B, index=layer.index)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.check_against_reference(wrong, problem)
