"""DRAM bytes that one LoRA forward+backward moves, per provider, read from the GPU's hardware
counters by Nsight Compute (ncu). LoRAFusion reports 1.26 GiB for its fused kernels and 2.01 GiB
for torch LoRA at M=8192, K=N=4096, r=16 (H100); this puts ours beside them.

    python -m benchmarks.bench_lora_dram                               # default shape and providers
    python -m benchmarks.bench_lora_dram --shape 8192,4096,4096,16 --providers linear_frozen lowrank_auto

For each provider, ncu runs this module again (--profile-one) in a child process: the layer of
benchmarks.bench_lora_linear is built and checked against the float64 reference, warmed up (autotuning
and lowrank's backend pick happen there), then one forward+backward runs between
cudaProfilerStart/Stop, so ncu counts exactly its kernels (dram__bytes_read.sum +
dram__bytes_write.sum, each kernel replayed with caches flushed, as ncu does by default).
Results: <out-dir>/lora_dram_<device-slug>_<dtype>.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.bench_lora_linear import (
    HEADLINE_SHAPE,
    PROVIDERS,
    Shape,
    build_layer,
    check_against_reference,
    make_problem,
)
from benchmarks.harness import DEFAULT_OUT_DIR, DTYPES, make_inputs, report_header, write_reports

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
UNIT_BYTES = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
              "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30}
DEFAULT_PROVIDERS = ["linear_frozen", "eager_peft_style", "hf_peft", "unsloth_style", "lowrank_triton",
                     "lowrank_cuda", "lowrank_auto"]
WARMUP_STEPS = 3
# LoRAFusion's figures (EuroSys'26, H100, M=8192, K=N=4096, r=16, forward+backward).
PUBLISHED_GIB = {"LoRAFusion fused kernels": 1.26, "torch LoRA (LoRAFusion's measurement)": 2.01}


def dram_bytes(ncu_csv: str) -> tuple[int, int]:
    """(total DRAM bytes, kernels counted) of ncu's --csv output: read + write, over every kernel."""
    lines = ncu_csv.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV table in the output (did ncu profile any kernel?)")
    total, kernels = 0.0, set()
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row["Metric Name"] not in METRICS:
            continue
        unit = row["Metric Unit"].strip().lower()
        if unit not in UNIT_BYTES:
            raise ValueError(f"unexpected unit {row['Metric Unit']!r} for {row['Metric Name']}")
        total += float(row["Metric Value"].replace(",", "")) * UNIT_BYTES[unit]
        kernels.add(row["ID"])
    if not kernels:
        raise ValueError(f"ncu reported none of {METRICS}")
    return round(total), len(kernels)


def ncu_command(ncu: str, provider: str, shape: Shape, dtype: str) -> list[str]:
    return [ncu, "--profile-from-start", "off", "--metrics", ",".join(METRICS), "--csv", "--print-units", "base",
            sys.executable, "-m", "benchmarks.bench_lora_dram", "--profile-one", provider,
            "--shape", f"{shape.M},{shape.K},{shape.N},{shape.r}", "--dtype", dtype]


def profile_one(provider: str, shape: Shape, dtype: torch.dtype) -> None:
    """The child under ncu: warm up, then one forward+backward inside the profiled range."""
    problem = make_problem(shape, torch.device("cuda"), dtype)
    layer = build_layer(provider, problem)
    check_against_reference(layer, problem)
    x, grad_y = make_inputs(problem, 1)[0]
    for _ in range(WARMUP_STEPS):
        layer.clear_grads(x)
        layer.forward(x).backward(grad_y)
    layer.clear_grads(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    layer.forward(x).backward(grad_y)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def run(args: argparse.Namespace) -> dict:
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on PATH: it reads the DRAM counters")
    report = report_header("lora_dram", torch.device("cuda"), args.dtype, shape=dataclasses.asdict(args.shape),
                           metrics=list(METRICS), published_gib=PUBLISHED_GIB, results=[], failed=[])
    for provider in args.providers:
        done = subprocess.run(ncu_command(ncu, provider, args.shape, args.dtype), capture_output=True, text=True,
                              timeout=args.timeout)
        try:
            if done.returncode != 0:
                raise ValueError(f"exit status {done.returncode}: {done.stderr[-2000:]}")
            total, kernels = dram_bytes(done.stdout)
        except ValueError as exc:
            report["failed"].append({"provider": provider, "error": str(exc)})
            continue
        report["results"].append({"provider": provider, "dram_bytes": total, "dram_gib": total / 2**30,
                                  "kernels": kernels})
    return report


def markdown_report(report: dict) -> str:
    shape = Shape(**report["shape"])
    lines = [f"# DRAM bytes of one LoRA forward+backward: {report['device']['name']}", "",
             f"{shape}, {report['dtype']}, W frozen; ncu {' + '.join(METRICS)}, summed over the step's kernels.", "",
             "| provider | kernels | DRAM GiB |", "|---|---:|---:|"]
    lines += [f"| {row['provider']} | {row['kernels']} | {row['dram_gib']:.3f} |" for row in report["results"]]
    lines += [f"| {name} (published) | — | {gib:.2f} |" for name, gib in report["published_gib"].items()]
    lines += [""] + [
        f"- FAILED: {failure['provider']}: {failure['error'].splitlines()[0]}" for failure in report["failed"]
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lora_dram", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda",), default="cuda", help="ncu reads a CUDA device's counters")
    parser.add_argument("--shape", type=Shape.parse, default=HEADLINE_SHAPE, metavar="M,K,N,r")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=DEFAULT_PROVIDERS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per provider under ncu")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--profile-one", choices=PROVIDERS, help=argparse.SUPPRESS)  # the child under ncu
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora_dram needs a CUDA device: ncu reads its hardware counters")
    if args.profile_one:
        profile_one(args.profile_one, args.shape, DTYPES[args.dtype])
        return 0
    report = run(args)
    write_reports(args.out_dir, f"lora_dram_{report['device']['slug']}_{args.dtype}", report, markdown_report(report))
    print(markdown_report(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
