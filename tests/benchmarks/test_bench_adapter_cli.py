"""The adapter benchmark (benchmarks/bench_adapter.py): its quick run reports every runnable
provider in every mode, and it times only providers that agree with the reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_adapter(benchmark_module):
    return benchmark_module("bench_adapter")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(completed process, report, out dir) of `python -m benchmarks.bench_adapter --quick --activation gelu`."""
    out_dir = tmp_path_factory.mktemp("bench_adapter")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_adapter",
            "--quick",
            "--activation",
            "gelu",
            "--out-dir",
            str(out_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = list(out_dir.glob("adapter_*_gelu.json"))
    report = json.loads(reports[0].read_text()) if len(reports) == 1 else None
    return completed, report, out_dir


def test_quick_run_reports_every_runnable_provider_in_every_mode(quick_run, bench_adapter):
    completed, report, out_dir = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report is not None, "expected exactly one adapter_<device>_<dtype>_gelu.json in the out dir"
    assert report["failed_checks"] == [] and report["activation"] == "gelu"
    device = torch.device(report["device"]["type"])
    assert report["skipped"] == bench_adapter.skip_reasons(device)
    timed = [row["provider"] for row in report["results"]]
    assert sorted(timed) == sorted(set(bench_adapter.PROVIDERS) - set(report["skipped"]))
    assert {"eager_sequential", "lowrank_torch"} <= set(timed)
    for row in report["results"]:
        for mode in bench_adapter.MODES:
            assert len(row["times_ms"][mode]) == report["repeats"]
            assert all(ms > 0 for ms in row["times_ms"][mode]), (row["provider"], mode)
            assert row["speedup_vs_eager"][mode] > 0
    eager = next(row for row in report["results"] if row["provider"] == "eager_sequential")
    assert eager["speedup_vs_eager"] == {mode: 1.0 for mode in bench_adapter.MODES}
    markdown = next(out_dir.glob("adapter_*_gelu.md")).read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| M | D | Bn | provider | infer ms | fwd ms | bwd ms | fwd+bwd ms |")
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_every_runnable_provider_matches_the_reference(bench_adapter, activation):
    device = bench_adapter.resolve_device("auto")
    dtype = bench_adapter.DTYPES[bench_adapter.default_dtype_name(device)]
    problem = bench_adapter.make_problem(bench_adapter.QUICK_SHAPE, activation, device, dtype)
    skipped = bench_adapter.skip_reasons(device)
    for provider in bench_adapter.PROVIDERS:
        if provider not in skipped:
            bench_adapter.check_against_reference(bench_adapter.build_layer(provider, problem), problem)


def _residual_dropped(layer):
    return lambda h: layer.forward(h) - h


def _up_bias_gradient_dropped(layer):
    def forward(h):
        b_up = layer.trained[3]
        return layer.forward(h) - b_up + b_up.detach()

    return forward


@pytest.mark.parametrize("sabotage", [_residual_dropped, _up_bias_gradient_dropped])
def test_reference_check_rejects_a_wrong_provider(bench_adapter, sabotage):
    problem = bench_adapter.make_problem(bench_adapter.QUICK_SHAPE, "silu", torch.device("cpu"), torch.float32)
    layer = bench_adapter.build_layer("lowrank_torch", problem)
    wrong = bench_adapter.Layer(sabotage(layer), layer.trained)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench_adapter.check_against_reference(wrong, problem)
