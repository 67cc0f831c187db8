#!/usr/bin/env bash
# One device call on an H100/H200: build the CUDA extension, run the GPU tests, benchmark, and
# print a short table last.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [lora|adapter|all]     (default: all)
#     lora      LoRA tests; LoRA benchmark in bf16 and fp16
#     adapter   adapter and gradient-reversal tests; their benchmarks in bf16
# $OUT receives two files (the device tool brings back at most 8): logs.txt, and results.tgz
# holding the benchmarks' JSON, markdown and PNG files for benchmarks/results/.
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
wants lora && tests+=(tests/test_gpu.py tests/test_lora_linear.py tests/test_triton_lora.py)
wants adapter && tests+=(tests/test_adapter_op.py tests/test_grad_reverse.py)
step "GPU tests: ${tests[*]}"
timeout 300 python -m pytest "${tests[@]}" -q -p no:cacheprovider >>"$LOG" 2>&1
tests_rc=$?
grep -E "passed|failed|error" "$LOG" | tail -3

bench() {
  step "benchmark: $*"
  python -m "$@" --device cuda --out-dir "$RESULTS" >>"$LOG" 2>&1 || echo "FAILED: $* (see logs.txt)" | tee -a "$LOG"
}
if wants lora; then
  bench benchmarks.bench_lora --dtype bf16 --plot
  bench benchmarks.bench_lora --dtype fp16 --plot
fi
if wants adapter; then
  bench benchmarks.bench_adapter --dtype bf16
  bench benchmarks.bench_grl --dtype bf16
fi
tar -czf "$OUT/results.tgz" -C "$RESULTS" .

step "summary"
python - "$RESULTS" <<'PY' | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.md")):
    lines = path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    print(f"\n{path.name}")
    print("\n".join(table))
for path in sorted(pathlib.Path(sys.argv[1]).glob("lora_*.json")):
    report = json.loads(path.read_text())
    def times(mode):
        return {(r["shape"]["M"], r["shape"]["K"], r["shape"]["r"], r["provider"]): r["median_ms"][mode]
                for r in report["results"]}
    fwd_bwd, infer = times("forward+backward"), times("inference")
    print(f"\nLoRA headline, {report['device']['name']} {report['dtype']} (ratios measured in this run)")
    print(f"{'M':>5} {'K=N':>5} {'r':>3}  auto/linear fwd+bwd  peft/auto fwd+bwd  auto/linear inference")
    nan = float("nan")
    for (M, K, r, provider), ms in sorted(fwd_bwd.items()):
        if provider == "linear_frozen":
            auto = fwd_bwd.get((M, K, r, "lowrank_auto"), nan)
            print(f"{M:5d} {K:5d} {r:3d}  {auto / ms:20.3f}  {fwd_bwd.get((M, K, r, 'hf_peft'), nan) / auto:17.3f}"
                  f"  {infer.get((M, K, r, 'lowrank_auto'), nan) / infer[(M, K, r, provider)]:20.3f}")
PY
exit $tests_rc
