"""The LoRA benchmark (benchmarks/bench_lora_linear.py): its quick run reports every provider and mode,
and it times only providers that agree with the reference (a benchmark of a wrong one is worthless)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

BENCHMARK = "bench_lora_linear"  # the `bench` and `quick_run` fixtures of conftest.py


def test_report_times_every_runnable_provider_in_every_mode(quick_report, bench):
    report = quick_report
    timed = [row["provider"] for row in report["results"]]
    assert sorted(timed) == sorted(set(bench.PROVIDERS) - set(report["skipped"]))
    assert {"linear_frozen", "eager_peft_style", "lowrank_torch"} <= set(timed)  # they run anywhere
    for row in report["results"]:
        assert set(row["times_ms"]) == set(bench.MODES)
        for mode in bench.MODES:
            assert len(row["times_ms"][mode]) == report["repeats"]
            assert all(ms > 0 for ms in row["times_ms"][mode]), (row["provider"], mode)
            assert row["median_ms"][mode] > 0
        assert row["ratio_to_linear_frozen"] > 0
        assert row["saved_bytes"] >= 0
    assert report["device"]["name"] and report["versions"]["torch"] == torch.__version__


def test_markdown_table_is_written_and_printed_last(quick_run, quick_report):
    completed, report, out_dir = quick_run
    markdown = (out_dir / f"lora_linear_{report['device']['slug']}_{report['dtype']}.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows[0].startswith("| M | K | N | r | p | provider | infer ms | fwd ms | bwd ms | fwd+bwd ms |")
    assert len(table_rows) == 1 + len(report["results"])
    assert completed.stdout.rstrip().splitlines()[-1] == table_rows[-1]


def test_every_runnable_provider_matches_the_reference(bench, harness):
    device = harness.resolve_device("auto")
    dtype = harness.DTYPES[harness.default_dtype_name(device)]
    problem = bench.make_problem(bench.QUICK_SHAPE, device, dtype)
    skipped = bench.skip_reasons(device)
    mismatches = {}
    for provider in bench.PROVIDERS:
        if provider in skipped:
            continue
        try:
            bench.check_against_reference(bench.build_layer(provider, problem), problem)
        except AssertionError as exc:
            mismatches[provider] = str(exc)
    assert not mismatches, mismatches


def _adapter_ignored(layer, problem):
    """Output without the adapter term."""
    return lambda x: F.linear(x, problem.weight, problem.bias)


def _adapter_gradients_dropped(layer, problem):
    """Right output, but lora_A and lora_B get zero gradients."""

    def forward(x):
        adapter = layer.forward(x) - F.linear(x, problem.weight, problem.bias)
        return F.linear(x, problem.weight, problem.bias) + adapter.detach() + 0 * adapter

    return forward


@pytest.mark.parametrize("sabotage", [_adapter_ignored, _adapter_gradients_dropped])
def test_reference_check_rejects_a_wrong_provider(bench, sabotage):
    problem = bench.make_problem(bench.QUICK_SHAPE, torch.device("cpu"), torch.float32)
    layer = bench.build_layer("lowrank_torch", problem)
    wrong = bench.Layer(sabotage(layer, problem), layer.held, layer.trained)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.check_against_reference(wrong, problem)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_is_never_timed(bench, harness, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = harness.resolve_device("auto")
    assert bench.skip_reasons(device)["lowrank_triton"].startswith("TRITON_INTERPRET=1")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_every_provider_matches_the_reference_with_and_without_dropout(bench, agrees_with_reference, dropout_p):
    """Named providers too: the compiled baselines (slow on CPU, so off by default there) and
    Unsloth's recipe, whose backward is written by hand. With dropout each is checked with it off."""
    problem = bench.make_problem(bench.Shape(48, 40, 36, 4), torch.device("cpu"), torch.float32,
                                 dropout_p=dropout_p)
    providers = ["unsloth_style", "eager_peft_style_compiled", "lowrank_torch", "eager_peft_style"]
    agrees_with_reference(problem, [provider for provider in providers
                                    if not (dropout_p and provider in bench.DROPOUT_FREE_PROVIDERS)])


def test_decode_shapes_time_inference_only_and_the_budget_is_reported(bench, tmp_path):
    args = bench.parse_args([
        "--device", "cpu", "--shapes", "64,32,32,4", "--decode-shapes", "1,32,32,4", "16,32,32,4",
        "--dropout", "0", "0.1", "--providers", "linear_frozen", "unsloth_style", "lowrank_torch",
        "--repeats", "2", "--warmup", "0", "--out-dir", str(tmp_path),
    ])
    report = bench.run_benchmark(args)
    decode = [row for row in report["results"] if row["shape"]["M"] in (1, 16)]
    assert {row["provider"] for row in decode} == {"linear_frozen", "unsloth_style", "lowrank_torch"}
    assert all(set(row["median_ms"]) == {"inference"} and row["ratio_mode"] == "inference" for row in decode)
    with_dropout = [row["provider"] for row in report["results"] if row["dropout_p"] == 0.1]
    assert sorted(with_dropout) == ["linear_frozen", "lowrank_torch"]
    assert "unsloth_style at p=0.1" in report["skipped"]

    args.max_minutes = 0.0
    budgeted = bench.run_benchmark(args)
    assert budgeted["not_run"] == [  # the first shape always runs
        "M=64 K=32 N=32 r=4 p=0.1", "M=1 K=32 N=32 r=4 p=0 (inference only)", "M=16 K=32 N=32 r=4 p=0 (inference only)"]
    assert {row["shape"]["M"] for row in budgeted["results"]} == {64}
    assert "not run, over the --max-minutes budget" in bench.markdown_report(budgeted)


def test_dropout_rate_out_of_range_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--dropout", "1.0"])
