#!/usr/bin/env bash
# One device call on an H100/H200: build the CUDA extension, run the GPU tests, benchmark the
# LoRA op in bf16 and fp16, and print a short table last. Everything lands in $OUT (at most
# 8 files: the device tool brings back no more): logs.txt, lora_<gpu>_<dtype>.{json,md,png}.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Uses the python on PATH and its torch (no network there: nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
export MAX_JOBS=${MAX_JOBS:-16} LOWRANK_CUDA=${LOWRANK_CUDA:-1}
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }

step "build (LOWRANK_CUDA=$LOWRANK_CUDA, MAX_JOBS=$MAX_JOBS)"
if ! python -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
  tail -40 "$LOG"
  exit 1
fi
python -c "import lowrank; [print(f'{n:7s} {s.available!s:5s} {s.reason}') for n, s in lowrank.backends().items()]" | tee -a "$LOG"

step "GPU tests"
timeout 300 python -m pytest tests/test_gpu.py tests/test_lora_linear.py tests/test_triton_lora.py \
  -q -p no:cacheprovider >>"$LOG" 2>&1
tests_rc=$?
grep -E "passed|failed|error" "$LOG" | tail -3

for dtype in bf16 fp16; do
  step "benchmark $dtype"
  python -m benchmarks.bench_lora --device cuda --dtype "$dtype" --out-dir "$OUT" --plot >>"$LOG" 2>&1 ||
    echo "benchmark $dtype failed: see logs.txt" | tee -a "$LOG"
done

step "summary"
python - "$OUT" <<'PY' | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("lora_*.json")):
    report = json.loads(path.read_text())
    fwd_bwd = {(r["shape"]["M"], r["shape"]["K"], r["shape"]["r"], r["provider"]): r["median_ms"]["forward+backward"]
               for r in report["results"]}
    infer = {(r["shape"]["M"], r["shape"]["K"], r["shape"]["r"], r["provider"]): r["median_ms"]["inference"]
             for r in report["results"]}
    print(f"\n{report['device']['name']} {report['dtype']}: fwd+bwd ms, and ratios to frozen nn.Linear")
    print(f"{'M':>5} {'K=N':>5} {'r':>3} {'linear':>8} {'peft':>8} {'triton':>8} {'cuda':>8} {'auto':>8}"
          "  auto/linear  peft/auto  infer auto/linear")
    for (M, K, r, provider), ms in sorted(fwd_bwd.items()):
        if provider != "linear_frozen":
            continue
        get = lambda p: fwd_bwd.get((M, K, r, p), float("nan"))
        auto = get("lowrank_auto")
        print(f"{M:5d} {K:5d} {r:3d} {ms:8.3f} {get('hf_peft'):8.3f} {get('lowrank_triton'):8.3f}"
              f" {get('lowrank_cuda'):8.3f} {auto:8.3f}  {auto / ms:11.3f}  {get('hf_peft') / auto:9.3f}"
              f"  {infer.get((M, K, r, 'lowrank_auto'), float('nan')) / infer[(M, K, r, provider)]:17.3f}")
PY
exit $tests_rc
