"""The gradient-reversal benchmark (benchmarks/bench.py): its quick run times every provider
it can run, in every mode, against copy bandwidth measured in the same run, and it refuses to
time a GRL whose backward is wrong."""

import pytest
import torch

BENCHMARK = "bench_grad_reverse"  # the `bench` and `quick_run` fixtures of conftest.py


def test_quick_run_reports_every_runnable_provider(quick_run, bench):
    completed, report, out_dir = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report is not None and report["failed_checks"] == []
    forwards, skipped = bench.providers(torch.device(report["device"]["type"]))
    assert report["skipped"] == skipped
    assert [row["provider"] for row in report["results"]] == list(forwards)
    assert {"naive", "lowrank_torch"} <= set(forwards)
    (copy,) = report["copy"]
    assert copy["gbps"] > 0 and len(copy["times_ms"]) == report["repeats"]
    for row in report["results"]:
        modes = {"forward", "backward", "kernel"} | ({"kernel_inplace"} if row["provider"] != "naive" else set())
        assert set(row["median_ms"]) == modes
        assert all(len(row["times_ms"][mode]) == report["repeats"] for mode in modes)
        assert row["kernel_gbps"] > 0 and row["kernel_fraction_of_copy"] > 0
    markdown = (out_dir / f"grad_reverse_{report['device']['slug']}_{report['dtype']}.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| size | provider | fwd ms | bwd ms | bwd kernel ms | GB/s | % copy |")
    assert len(table) == 1 + len(report["results"]) + len(report["copy"])


def test_check_rejects_a_wrong_grl(bench):
    bench.check(lambda x: bench.grad_reverse(x, bench.LAMBDA), torch.device("cpu"), torch.float32)
    with pytest.raises(AssertionError):
        bench.check(lambda x: bench.grad_reverse(x, 1.0), torch.device("cpu"), torch.float32)
    with pytest.raises(AssertionError):
        bench.check(lambda x: x * 1, torch.device("cpu"), torch.float32)
