"""The DoRA benchmark (benchmarks/bench_dora_linear.py): its quick run reports every runnable
provider in every mode with the goal ratios, and it times only providers that agree with the
reference."""

import pytest
import torch
import torch.nn.functional as F

from lowrank.ops import dora_linear

BENCHMARK = "bench_dora_linear"  # the `bench`, `quick_run` and `quick_report` fixtures of conftest.py


def test_quick_run_reports_every_runnable_provider_and_the_goal_ratios(quick_run, quick_report, bench):
    completed, report, out_dir = quick_run
    timed = [row["provider"] for row in report["results"]]
    assert sorted(timed) == sorted(set(bench.PROVIDERS) - set(report["skipped"]))
    assert {"hf_peft", "eager_dora", "lowrank_lora", "lowrank_torch", "lowrank_auto"} <= set(timed)
    for row in report["results"]:
        for mode in bench.harness.MODES:
            assert len(row["times_ms"][mode]) == report["repeats"]
            assert all(ms > 0 for ms in row["times_ms"][mode]), (row["provider"], mode)
        assert row["ratio_to_lora"] > 0 and row["saved_bytes"] >= 0
    [goal] = report["goals"]
    ms = {row["provider"]: row["median_ms"]["forward+backward"] for row in report["results"]}
    assert goal["dora_over_lora"] == pytest.approx(ms["lowrank_auto"] / ms["lowrank_lora"])
    assert goal["peft_over_dora"] == pytest.approx(ms["hf_peft"] / ms["lowrank_auto"])

    markdown = (out_dir / f"dora_linear_{report['device']['slug']}_{report['dtype']}.md").read_text()
    assert "lowrank_auto / lowrank_lora = " in markdown and "QUICK MODE" in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| M | K | N | r | p | provider | infer ms | fwd ms | bwd ms | fwd+bwd ms |")
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_every_runnable_provider_matches_the_reference(bench, harness, agrees_with_reference, dropout_p):
    """With dropout, each is checked with it off, and the switch is real."""
    device = harness.resolve_device("auto")
    problem = bench.make_problem(bench.Shape(48, 40, 36, 4), device, harness.DTYPES[harness.default_dtype_name(device)],
                                 dropout_p=dropout_p)
    skipped = bench.skip_reasons(device)
    agrees_with_reference(problem, [provider for provider in bench.PROVIDERS if provider not in skipped])


def test_reference_check_rejects_a_wrong_provider(bench):
    problem = bench.make_problem(bench.QUICK_SHAPE, torch.device("cpu"), torch.float32)
    layer = bench.build_layer("eager_dora", problem)
    weight, bias, s = problem.weight, problem.bias, problem.scaling
    A, B, m = layer.trained
    wrong_layers = {
        "scale ignored (LoRA's output)": lambda x: F.linear(x, weight, bias) + s * (x @ A.t()) @ B.t(),
        "magnitude without gradient": lambda x: dora_linear(x, weight, bias, A, B, m.detach(), s),
    }
    for what, forward in wrong_layers.items():
        wrong = bench.Layer(forward, layer.held, layer.trained)
        with pytest.raises(AssertionError, match="differs from the reference|was not computed"):
            bench.check_against_reference(wrong, problem)
