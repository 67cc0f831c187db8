"""The DANN training-step benchmark (benchmarks/bench_dann_step.py): its quick run times the eager
GRL and every runnable lowrank backend in the same run, and it refuses a GRL whose gradient is wrong."""

import importlib
import importlib.util
import json

import pytest
import torch

BENCHMARK = "bench_dann_step"  # the `bench` fixture of conftest.py


def test_quick_run_times_eager_and_lowrank_steps(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("dann_step_*.json")
    report = json.loads(report_path.read_text())
    providers = [row["provider"] for row in report["results"]]
    assert providers[0] == "naive" and "lowrank_auto" in providers and "lowrank_cpu" in providers
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 3 for row in report["results"])
    assert report["results"][0]["ratio_to_eager"] == 1.0
    assert "| 8 | 64 | lowrank_auto |" in capsys.readouterr().out


def test_a_grl_that_does_not_reverse_is_refused(bench):
    forwards = {"naive": bench.providers(torch.device("cpu"))[0]["naive"], "identity": lambda x: x}
    with pytest.raises(AssertionError, match="identity: gradients differ from the eager GRL's"):
        bench.benchmark_config(4, 32, forwards, torch.device("cpu"), repeats=1, warmup=0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_quick_run_with_a_vit_encoder(bench, tmp_path):
    assert bench.main(["--quick", "--device", "cpu", "--encoder", "vit-b", "--out-dir", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("dann_step_*_vit-b.json")
    report = json.loads(report_path.read_text())
    assert report["encoder"]["name"] == "vit-b" and report["encoder"]["hidden_size"] == bench.VIT_QUICK["hidden_size"]
    assert {row["feature_dim"] for row in report["results"]} == {bench.VIT_QUICK["hidden_size"]}
    assert "lowrank_auto" in [row["provider"] for row in report["results"]]
