"""The end-to-end LoRA step benchmark (benchmarks/bench_lora_llama_step.py): its quick run times
lowrank against HF PEFT on one model, and a provider that computes something else is not timed."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


BENCHMARK = "bench_lora_llama_step"  # the `bench` fixture of conftest.py


def test_quick_run_times_lowrank_against_peft(bench, tmp_path):
    assert bench.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    report_path, = tmp_path.glob("lora_llama_step_*.json")
    report = json.loads(report_path.read_text())
    assert report["failed_checks"] == []
    rows = {row["provider"]: row for row in report["results"]}
    assert {"hf_peft", "lowrank_auto"} <= set(rows)
    assert all(len(row["times_ms"]) == report["repeats"] and row["tokens_per_s"] > 0 for row in rows.values())
    assert rows["hf_peft"]["speedup_over_hf_peft"] == 1.0
    assert "| lowrank_auto |" in (tmp_path / f"{report_path.stem}.md").read_text()


def test_a_provider_with_other_adapter_values_fails_its_check(bench, monkeypatch):
    real = bench.BUILDERS["lowrank_auto"]

    def sabotaged(model, values):
        name = next(iter(values))
        lora_A, lora_B = values[name]
        return real(model, {**values, name: (lora_A, lora_B * 1.5)})

    monkeypatch.setitem(bench.BUILDERS, "lowrank_auto", sabotaged)
    args = bench.parse_args(["--quick", "--device", "cpu", "--providers", "hf_peft", "lowrank_auto"])
    report = bench.run_benchmark(args)
    assert [failure["provider"] for failure in report["failed_checks"]] == ["lowrank_auto"]
    assert [row["provider"] for row in report["results"]] == ["hf_peft"]
