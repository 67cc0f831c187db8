"""backend="auto" against the best backend: is auto's pick within 3 % of the fastest, and is it stable?

    python -m benchmarks.bench_autotune                    # the shapes of `make bench` for the device
    python -m benchmarks.bench_autotune --quick            # one small shape, few repeats: a smoke test

For each shape (LoRA linear, forward+backward, W frozen): lowrank_auto and every concrete backend
that can run here are checked against the float64 reference and timed interleaved (the harness of
bench_lora_linear), and auto's time is divided by the best concrete backend's. Then auto's pick is
made again from scratch --picks times (lowrank.autotune.clear() before each), to show how often it
would change between runs. The exit status is 1 when a provider failed its check or, except under
--quick (too few repeats to judge), when auto is more than TOLERANCE slower than the best backend.
Results: <out-dir>/autotune_<device-slug>_<dtype>.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from typing import Optional

import torch

from benchmarks import bench_lora_linear as lora, harness
from lowrank import autotune
from lowrank.ops import lora_linear

TOLERANCE = 0.03
DEFAULT_PICKS = 8
DEFAULT_REPEATS = 40  # a 3 % question needs more repeats than the layer benchmarks' default


def concrete_providers(report: dict) -> list[str]:
    return [f"lowrank_{name}" for name in harness.LOWRANK_BACKENDS
            if name != "auto" and f"lowrank_{name}" not in report["skipped"]]


def fresh_picks(shape: lora.Shape, device: torch.device, dtype: torch.dtype, count: int) -> list[str]:
    """auto's pick for the shape, made from scratch `count` times."""
    problem = lora.make_problem(shape, device, dtype)
    x = harness.make_inputs(problem, 1)[0][0].detach()
    picks = []
    for _ in range(count):
        autotune.clear()
        with torch.no_grad():
            lora_linear(x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling,
                        backend="auto")
        picks += list(autotune.choices().values())
    autotune.clear()
    return picks


def run_benchmark(args: argparse.Namespace) -> dict:
    device, shapes, providers, report = harness.start_layer_report(
        "autotune", args, lora.DEFAULT_SHAPES, lora.QUICK_SHAPE, lora.skip_reasons,
        tuple(f"lowrank_{name}" for name in harness.LOWRANK_BACKENDS), tolerance=TOLERANCE,
        margin=autotune.MARGIN, autotune_repeats=autotune.REPEATS)
    report["shapes"] = []
    concrete = concrete_providers(report)
    for shape in shapes:
        print(f"{shape}: timing {', '.join(providers)}", file=sys.stderr, flush=True)
        autotune.clear()
        rows = harness.time_checked_providers(report, lora.make_problem(shape, device, harness.DTYPES[report["dtype"]]),
                                              providers, lora.build_layer, lora.check_against_reference,
                                              ("forward+backward",))
        medians = {row["provider"]: row["median_ms"]["forward+backward"] for row in rows}
        timed_concrete = [name for name in concrete if name in medians]
        if "lowrank_auto" not in medians or not timed_concrete:
            continue
        best = min(timed_concrete, key=medians.__getitem__)
        sizes = (autotune.bucket(shape.M), shape.K, shape.N, shape.r)  # the check ran a smaller M: another key
        timed_pick = next(backend for key, backend in autotune.choices().items() if key[3:7] == sizes)
        picks = fresh_picks(shape, device, harness.DTYPES[report["dtype"]], args.picks)
        report["shapes"].append({
            "shape": dataclasses.asdict(shape), "best": best, "auto_over_best": medians["lowrank_auto"] / medians[best],
            "auto_picked": timed_pick, "fresh_picks": dict(collections.Counter(picks)),
        })
    return report


def markdown_table(report: dict) -> str:
    columns = [(name, lambda row, name=name: str(row["shape"][name])) for name in ("M", "K", "N", "r")]
    columns += [("best backend", lambda row: row["best"]), ("auto picked", lambda row: row["auto_picked"]),
                ("auto / best", lambda row: f"{row['auto_over_best']:.3f}"),
                (f"within {TOLERANCE:.0%}", lambda row: "yes" if row["auto_over_best"] <= 1 + TOLERANCE else "NO"),
                ("fresh picks", lambda row: ", ".join(f"{k} ×{v}" for k, v in sorted(row["fresh_picks"].items())))]
    return harness.format_table(report["shapes"], columns)


def markdown_report(report: dict) -> str:
    context = (f"{report['dtype']}; LoRA linear forward+backward, W frozen. "
               f"{harness.measurement_sentence(report, ('torch',))} auto keeps its preferred backend unless "
               f"another is more than {report['margin']:.0%} faster over {report['autotune_repeats']} interleaved "
               "rounds; fresh picks: the pick made again from scratch, as separate runs would.")
    raw = harness.layer_table(report, lora.Shape)
    return harness.markdown_document(report, "backend=\"auto\" against the best backend", context,
                                     markdown_table(report) + "\n\nTimes:\n\n" + raw)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = harness.layer_parser("python -m benchmarks.bench_autotune", __doc__, lora.Shape,
                                  tuple(f"lowrank_{name}" for name in harness.LOWRANK_BACKENDS), lora.QUICK_SHAPE)
    parser.add_argument("--picks", type=harness.positive_int, default=None,
                        help=f"fresh picks per shape (default {DEFAULT_PICKS}; 2 with --quick)")
    args = parser.parse_args(argv)
    args.picks = args.picks or (2 if args.quick else DEFAULT_PICKS)
    args.repeats = args.repeats or (None if args.quick else DEFAULT_REPEATS)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    status = harness.publish(report, args.out_dir, harness.report_name(report), markdown_report(report),
                             harness.console_summary(report, markdown_table(report)))
    too_slow = [row for row in report["shapes"] if row["auto_over_best"] > 1 + TOLERANCE]
    return 1 if status or (too_slow and not args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
