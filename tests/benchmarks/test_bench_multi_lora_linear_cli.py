"""The mixed-batch multi-adapter LoRA benchmark (benchmarks/bench_multi_lora_linear.py): its quick
run times every provider it can run, each in its modes (PEFT's mixed batch at inference only),
reports the goals' ratios and auto's picks, and times only providers that agree with the reference."""

import pytest
import torch

from lowrank.ops import multi_lora_linear

BENCHMARK = "bench_multi_lora_linear"  # the `bench` and `quick_run` fixtures of conftest.py


def test_report_times_every_runnable_provider_in_its_modes(quick_report, bench):
    report = quick_report
    runnable = set(bench.PROVIDERS) - set(report["skipped"])
    assert {"linear_frozen", "single_lora", "masked_loop", "lowrank_torch", "lowrank_auto"} <= runnable
    rows = {row["provider"]: row for row in report["results"]}
    assert set(rows) == runnable and len(report["results"]) == len(runnable)
    for provider, row in rows.items():
        assert row["shape"] == {"M": 256, "K": 128, "N": 128, "r": 8, "adapters": 4}
        modes = bench.provider_modes(provider)
        assert tuple(row["median_ms"]) == modes and tuple(row["times_ms"]) == modes
        for mode in modes:
            assert len(row["times_ms"][mode]) == report["repeats"]
            assert all(ms > 0 for ms in row["times_ms"][mode]), (provider, mode)
        assert set(row["ratio_to_single_lora"]) == set(modes)
        assert (row["saved_bytes"] is None) == ("forward+backward" not in modes)
    assert any(pick[0] == "multi_lora_linear" for pick in report["auto_picks"])
    goals = {goal["what"] for goal in report["goals"]}
    assert "lowrank_auto / single_lora, forward+backward" in goals
    if "hf_peft_mixed" in runnable:
        assert rows["hf_peft_mixed"]["median_ms"].keys() == {"inference"}
        assert "hf_peft_mixed / lowrank_auto, inference" in goals


def test_markdown_table_is_written_and_printed_last(quick_run, quick_report):
    completed, report, out_dir = quick_run
    markdown = (out_dir / f"multi_lora_linear_{report['device']['slug']}_{report['dtype']}.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = "| M | K | N | r | adapters | provider | infer ms | fwd+bwd ms | × single_lora infer |"
    assert table_rows[0].startswith(header)
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]
    assert "lowrank_auto / single_lora, forward+backward" in markdown


@pytest.mark.parametrize("adapters", [1, 4])
def test_every_runnable_provider_matches_the_reference(bench, harness, adapters):
    device = harness.resolve_device("auto")
    dtype = harness.DTYPES[harness.default_dtype_name(device)]
    problem = bench.make_problem(bench.Shape(96, 40, 36, 4, adapters), device, dtype)
    skipped = bench.skip_reasons(device)
    for provider in bench.PROVIDERS:
        if provider not in skipped:
            bench.check_against_reference(bench.build_layer(provider, problem), problem)


def _adapter_ignored(layer, problem):
    """The frozen layer's output: no adapter term."""
    return lambda x: torch.nn.functional.linear(x, problem.weight, problem.bias)


def _next_adapter(layer, problem):
    """Each row through the next adapter's factors."""
    shifted = (problem.adapter_index + 1) % problem.shape.adapters
    lora_A, lora_B = layer.trained
    return lambda x: multi_lora_linear(x, problem.weight, problem.bias, shifted[: x.shape[0]], lora_A, lora_B,
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
    problem = bench.make_problem(bench.QUICK_SHAPE, torch.device("cpu"), torch.float32)
    layer = bench.build_layer("lowrank_torch", problem)
    wrong = bench.MixedLayer(sabotage(layer, problem), layer.held, layer.trained, index=layer.index)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.check_against_reference(wrong, problem)


def test_cpu_clock_and_threads_reach_the_report(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        args = bench.parse_args(["--device", "cpu", "--shapes", "32,16,16,4,2", "--providers", "lowrank_torch",
                                 "--repeats", "2", "--warmup", "0", "--threads", "1", "--cpu-clock",
                                 "--out-dir", str(tmp_path)])
        report = bench.run_benchmark(args)
    finally:
        torch.set_num_threads(threads)
    assert report["cpu_clock"] and report["timing"].startswith("time.process_time (CPU time)")
    assert report["device"]["torch_threads"] == 1
    assert [row["provider"] for row in report["results"]] == ["lowrank_torch"]
