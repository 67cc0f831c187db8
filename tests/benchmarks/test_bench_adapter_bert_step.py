"""The end-to-end adapter step benchmark (benchmarks/bench_adapter_bert_step.py): its quick run
times the fused adapters against eager ones at the same places, in both placements, and a
provider that computes something else is not timed."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")


BENCHMARK = "bench_adapter_bert_step"  # the `bench` fixture of conftest.py


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_quick_run_times_fused_against_eager_adapters(bench, tmp_path, placement):
    assert bench.main(["--quick", "--device", "cpu", "--placement", placement, "--out-dir", str(tmp_path)]) == 0
    report_path, = tmp_path.glob(f"adapter_bert_step_*_{placement}.json")
    report = json.loads(report_path.read_text())
    assert report["failed_checks"] == []
    rows = {row["provider"]: row for row in report["results"]}
    assert {"eager", "lowrank_auto"} <= set(rows)
    assert all(len(row["times_ms"]) == report["repeats"] and row["tokens_per_s"] > 0 for row in rows.values())


def test_eager_provider_runs_the_unfused_formula_on_the_same_adapters(bench):
    from lowrank.tuners.bottleneck.model import bottleneck_adapters

    model = bench.base_model(torch.device("cpu"), torch.float32, quick=True)
    eager = bench.BUILDERS["eager"](copy.deepcopy(model), "houlsby")
    fused = bench.BUILDERS["lowrank_auto"](model, "houlsby")
    eager_adapters, fused_adapters = bottleneck_adapters(eager.model), bottleneck_adapters(fused.model)
    assert eager_adapters.keys() == fused_adapters.keys() and len(eager_adapters) == 2 * 2  # two per layer
    assert all(type(adapter) is bench.EagerAdapter for adapter in eager_adapters.values())
    assert not any(isinstance(adapter, bench.EagerAdapter) for adapter in fused_adapters.values())
    assert eager.trained.keys() == fused.trained.keys()


def test_a_provider_with_other_adapter_weights_fails_its_check(bench, monkeypatch):
    real = bench.BUILDERS["lowrank_auto"]

    def sabotaged(model, placement):
        run = real(model, placement)
        with torch.no_grad():
            next(iter(run.trained.values())).mul_(1.5)
        return run

    monkeypatch.setitem(bench.BUILDERS, "lowrank_auto", sabotaged)
    report = bench.run_benchmark(
        bench.parse_args(["--quick", "--device", "cpu", "--providers", "eager", "lowrank_auto"])
    )
    assert [failure["provider"] for failure in report["failed_checks"]] == ["lowrank_auto"]
    assert [row["provider"] for row in report["results"]] == ["eager"]
