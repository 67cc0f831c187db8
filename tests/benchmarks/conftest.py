"""Fixtures of the benchmark tests, for the benchmark a test module names in BENCHMARK (e.g.
"bench_adapter"): `bench`, that module of benchmarks/; `quick_run`, one run of its command line
with --quick and the module's QUICK_OPTIONS, if any; and `quick_report`, that run's report once
it has done what every quick run must."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(request, benchmark_module):
    return benchmark_module(request.module.BENCHMARK)


@pytest.fixture(scope="module")
def harness(benchmark_module):
    return benchmark_module("harness")


@pytest.fixture(scope="module")
def quick_run(request, tmp_path_factory):
    """(completed process, report, out dir) of `python -m benchmarks.<BENCHMARK> --quick
    <QUICK_OPTIONS> --out-dir <a fresh folder>`; the report is the one JSON file the run wrote,
    None if it wrote none or several."""
    name, options = request.module.BENCHMARK, getattr(request.module, "QUICK_OPTIONS", [])
    out_dir = tmp_path_factory.mktemp(name)
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *options, "--out-dir", str(out_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = list(out_dir.glob("*.json"))
    report = json.loads(reports[0].read_text()) if len(reports) == 1 else None
    return completed, report, out_dir


@pytest.fixture(scope="module")
def quick_report(quick_run, bench):
    """quick_run's report, after checking what every benchmark's quick run must do: exit with 0,
    write one report, fail no check, and skip exactly the providers bench.skip_reasons names (the
    subprocess inherits this environment, TRITON_INTERPRET included, so it skips the same ones)."""
    completed, report, _ = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report is not None, "expected exactly one <benchmark>_<device>_<dtype>[_<variant>].json in the out dir"
    assert report["failed_checks"] == []
    assert report["skipped"] == bench.skip_reasons(torch.device(report["device"]["type"]))
    return report


@pytest.fixture(scope="module")
def agrees_with_reference(bench, harness):
    """agrees_with_reference(problem, providers): each provider of the benchmark passes its check
    against the reference on `problem` (run with its dropout off), and its dropout switch is real:
    switching it off changes the output exactly when the problem has dropout."""

    def check(problem, providers):
        for provider in providers:
            layer = bench.build_layer(provider, problem)
            bench.check_against_reference(layer, problem)
            x, _ = harness.make_inputs(problem, 1, seed=5)[0]
            with torch.no_grad():
                with_dropout = layer.forward(x)
                layer.set_dropout(False)
                without = layer.forward(x)
            assert torch.equal(with_dropout, without) == (problem.dropout_p == 0), provider

    return check
