"""The adapter benchmark (benchmarks/bench_adapter.py): its quick run reports every runnable
provider in every mode, and it times only providers that agree with the reference."""

import pytest
import torch

BENCHMARK = "bench_adapter"  # the `bench` and `quick_run` fixtures of conftest.py
QUICK_OPTIONS = ["--activation", "gelu"]


def test_quick_run_reports_every_runnable_provider_in_every_mode(quick_run, bench):
    completed, report, out_dir = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report is not None, "expected exactly one adapter_<device>_<dtype>_gelu.json in the out dir"
    assert report["failed_checks"] == [] and report["activation"] == "gelu"
    device = torch.device(report["device"]["type"])
    assert report["skipped"] == bench.skip_reasons(device)
    timed = [row["provider"] for row in report["results"]]
    assert sorted(timed) == sorted(set(bench.PROVIDERS) - set(report["skipped"]))
    assert {"eager_sequential", "lowrank_torch"} <= set(timed)
    for row in report["results"]:
        for mode in bench.MODES:
            assert len(row["times_ms"][mode]) == report["repeats"]
            assert all(ms > 0 for ms in row["times_ms"][mode]), (row["provider"], mode)
            assert row["speedup_vs_eager"][mode] > 0
    eager = next(row for row in report["results"] if row["provider"] == "eager_sequential")
    assert eager["speedup_vs_eager"] == {mode: 1.0 for mode in bench.MODES}
    markdown = next(out_dir.glob("adapter_*_gelu.md")).read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| M | D | Bn | provider | infer ms | fwd ms | bwd ms | fwd+bwd ms |")
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_every_runnable_provider_matches_the_reference(bench, harness, activation):
    device = harness.resolve_device("auto")
    dtype = harness.DTYPES[harness.default_dtype_name(device)]
    problem = bench.make_problem(bench.QUICK_SHAPE, activation, device, dtype)
    skipped = bench.skip_reasons(device)
    for provider in bench.PROVIDERS:
        if provider not in skipped:
            bench.check_against_reference(bench.build_layer(provider, problem), problem)


def _residual_dropped(layer):
    return lambda h: layer.forward(h) - h


def _up_bias_gradient_dropped(layer):
    def forward(h):
        b_up = layer.trained[3]
        return layer.forward(h) - b_up + b_up.detach()

    return forward


@pytest.mark.parametrize("sabotage", [_residual_dropped, _up_bias_gradient_dropped])
def test_reference_check_rejects_a_wrong_provider(bench, sabotage):
    problem = bench.make_problem(bench.QUICK_SHAPE, "silu", torch.device("cpu"), torch.float32)
    layer = bench.build_layer("lowrank_torch", problem)
    wrong = bench.Layer(sabotage(layer), layer.held, layer.trained)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.check_against_reference(wrong, problem)
