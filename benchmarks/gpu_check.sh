#!/usr/bin/env bash
# One device call on an H100/H200: build the CUDA extension, run the GPU tests, benchmark, and
# print a short table last.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [lora|adapter|all]     (default: all)
#     lora      LoRA, multi-adapter LoRA and DoRA tests; LoRA benchmark in bf16 (every shape,
#               dropout rate and decode shape within a time budget, headline first) and fp16 (the
#               headline shape); the mixed-batch multi-adapter benchmark (bf16, 1/4/16 adapters);
#               the DoRA benchmark in bf16; the Llama-style end-to-end step; DRAM bytes per step from ncu
#     adapter   adapter and gradient-reversal tests; the adapter benchmark in bf16 per activation,
#               GRL bandwidth, the DANN step (LeNet and ViT-B encoders), the BERT-base adapter step
# $OUT receives two files (the device tool brings back at most 8): logs.txt, and results.tgz
# holding the benchmarks' JSON, markdown and PNG files for benchmarks/results/kernels/.
# Uses the python on PATH and its torch (no network there: nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:-all}
case "$SUITE" in lora | adapter | all) ;; *) echo "usage: $0 [lora|adapter|all]" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/gpu_out}
RESULTS=$(mktemp -d)
LOG="$OUT/logs.txt"
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} LOWRANK_CUDA=${LOWRANK_CUDA:-1}
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
wants() { [ "$SUITE" = all ] || [ "$SUITE" = "$1" ]; }

step "build (LOWRANK_CUDA=$LOWRANK_CUDA, MAX_JOBS=$MAX_JOBS)"
if ! python -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
  tail -40 "$LOG"
  exit 1
fi
python -c "import lowrank; [print(f'{n:7s} {s.available!s:5s} {s.reason}') for n, s in lowrank.backends().items()]" | tee -a "$LOG"

tests=()
wants lora && tests+=(tests/test_gpu.py tests/ops/test_lora_linear.py tests/ops/test_lora_linear_triton.py
  tests/ops/test_multi_lora_linear.py tests/ops/test_dora_linear.py tests/ops/test_dora_linear_triton.py)
wants adapter && tests+=(tests/ops/test_adapter.py tests/ops/test_grad_reverse.py)
step "GPU tests: ${tests[*]}"
timeout 420 python -m pytest "${tests[@]}" -q -p no:cacheprovider >>"$LOG" 2>&1
tests_rc=$?
grep -E "passed|failed|error" "$LOG" | tail -3

bench() {
  step "benchmark: $*"
  python -m "$@" --device cuda --out-dir "$RESULTS" >>"$LOG" 2>&1 || echo "FAILED: $* (see logs.txt)" | tee -a "$LOG"
}
if wants lora; then
  # The torch.compile baselines run at the first (headline) shape only: inductor compiles per shape.
  bench benchmarks.bench_lora_linear --dtype bf16 --max-minutes 2.5 --plot
  bench benchmarks.bench_lora_linear --dtype fp16 --shapes 8192,4096,4096,16
  bench benchmarks.bench_multi_lora_linear --dtype bf16  # M=8192 K=N=4096 r=16, 1/4/16 adapters
  bench benchmarks.bench_dora_linear --dtype bf16
  bench benchmarks.bench_lora_llama_step
  bench benchmarks.bench_lora_dram
fi
if wants adapter; then
  for activation in relu gelu silu; do
    bench benchmarks.bench_adapter --dtype bf16 --activation $activation
  done
  bench benchmarks.bench_grad_reverse --dtype bf16
  bench benchmarks.bench_dann_step
  bench benchmarks.bench_dann_step --encoder vit-b --batch 256 --repeats 10
  bench benchmarks.bench_adapter_bert_step --placement houlsby
  bench benchmarks.bench_adapter_bert_step --placement pfeiffer
fi
tar -czf "$OUT/results.tgz" -C "$RESULTS" .

step "summary"
python - "$RESULTS" <<'PY' | tee -a "$LOG"
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
lora = [json.loads(path.read_text()) for path in sorted(results.glob("lora_linear_*.json"))]
for path in sorted(results.glob("*.md")):
    if not path.name.startswith(("lora_", "dora_")):  # the LoRA and DoRA reports get the compact summary below
        print(f"\n{path.name}")
        print("\n".join(line for line in path.read_text().splitlines() if line.startswith("|")))
nan = float("nan")
for report in lora:
    def median(row_filter, mode):
        return {(r["shape"]["M"], r["shape"]["K"], r["shape"]["r"], r["dropout_p"], r["provider"]): r["median_ms"][mode]
                for r in report["results"] if row_filter(r)}
    train = median(lambda r: r["ratio_mode"] == "forward+backward", "forward+backward")
    decode = median(lambda r: r["ratio_mode"] == "inference", "inference")
    print(f"\nLoRA headline, {report['device']['name']} {report['dtype']} (ratios measured in this run)")
    print(f"{'M':>5} {'K=N':>5} {'r':>3} {'p':>4}  auto/linear  peft/auto  auto/best(unsloth,compiled)")
    for (M, K, r, p, provider), ms in sorted(train.items()):
        if provider != "linear_frozen":
            continue
        auto = train.get((M, K, r, p, "lowrank_auto"), nan)
        rivals = [v for (m, k, rr, pp, name), v in train.items() if (m, k, rr, pp) == (M, K, r, p)
                  and (name.startswith("unsloth") or name.endswith("_compiled"))]
        best = min(rivals) if rivals else nan
        print(f"{M:5d} {K:5d} {r:3d} {p:4g}  {auto / ms:11.3f}  {train.get((M, K, r, p, 'hf_peft'), nan) / auto:9.3f}"
              f"  {auto / best:27.3f}")
    for (M, K, r, p, provider), ms in sorted(decode.items()):
        if provider == "linear_frozen":
            print(f"decode M={M} K=N={K} r={r}: auto/linear inference {decode.get((M, K, r, p, 'lowrank_auto'), nan) / ms:.3f}")
for path in sorted(results.glob("dora_linear_*.json")):
    report = json.loads(path.read_text())
    print(f"\nDoRA, {report['device']['name']} {report['dtype']} (ratios measured in this run)")
    for goal in report["goals"]:
        shape, ratios = goal["shape"], [goal["dora_over_lora"], goal["peft_over_dora"]]
        print(f"M={shape['M']} K={shape['K']} N={shape['N']} r={shape['r']} p={goal['dropout_p']:g}: "
              + "  ".join(f"{name} {nan if value is None else value:.3f}"
                          for name, value in zip(("auto/lora", "peft/auto"), ratios)))
for name in ("lora_llama_step_*.md", "lora_dram_*.md"):
    for path in sorted(results.glob(name)):
        print(f"\n{path.name}")
        print("\n".join(line for line in path.read_text().splitlines() if line.startswith("|")))
PY
exit $tests_rc
