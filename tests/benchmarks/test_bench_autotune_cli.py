"""The auto-against-best benchmark (benchmarks/bench_autotune.py): its quick run times auto and every
concrete backend at one shape, and reports auto's ratio to the best and its fresh picks."""

import torch

from lowrank import autotune

BENCHMARK = "bench_autotune"  # the `bench` and `quick_run` fixtures of conftest.py


def test_quick_run_reports_auto_against_the_best_backend(quick_run, bench):
    completed, report, out_dir = quick_run
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert report["failed_checks"] == [] and report["tolerance"] == bench.TOLERANCE == 0.03
    timed = {row["provider"] for row in report["results"]}
    assert "lowrank_auto" in timed and "lowrank_torch" in timed
    (row,) = report["shapes"]
    candidates = set(autotune.candidates(torch.device(report["device"]["type"])))
    assert row["best"] in {f"lowrank_{name}" for name in candidates} and row["auto_picked"] in candidates
    assert row["auto_over_best"] > 0
    assert sum(row["fresh_picks"].values()) == 2 and set(row["fresh_picks"]) <= candidates
    markdown = (out_dir / f"autotune_{report['device']['slug']}_{report['dtype']}.md").read_text()
    assert "| auto / best | within 3% | fresh picks |" in markdown
