#!/usr/bin/env bash
# The full embedded comparison (every method, 10 trials, 10 reproductions, seed 0) on one lent
# GPU, against issue #12's goal of at most 10 minutes on one GPU. What was run, and how:
#
#   device run: bash benchmarks/gpu_embedded_comparison.sh   (carry .whl and .hc)
#
# (gpu_env.sh says what .whl and .hc are.)
# LIMIT: seconds the comparison may run before it is stopped (default 540); stopped early, the
#       studies' own records (trials done, final folds done) still come back in the tarball.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_embedded}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
RUN=${RUN:-/tmp/gpu_seed0}
nvidia-smi dmon -s um -d 10 > "$OUT/dmon.txt" 2>&1 &
start=$(date +%s)
timeout "${LIMIT:-540}" python3 benchmarks/embedded_comparison.py run --seed 0 --jobs 20 \
  --device cuda --out "$RUN" > "$OUT/comparison_stdout.txt" 2>&1
rc=$?
end=$(date +%s)
pkill -f harness.run; sleep 2
echo "comparison rc=$rc wall=$((end - start)) s" | tee -a "$OUT/env.txt"
# Progress per study: trial folds begun (history.json) and final folds finished (result.json);
# study.db in the tarball says which trials completed.
for d in "$RUN"/*_glyphs; do
  echo "$(basename "$d") trial_folds=$(find "$d/trials" -name 'history.json' 2>/dev/null | wc -l)" \
       "final_folds=$(find "$d/final" -name 'result.json' 2>/dev/null | wc -l)"
done | tee "$OUT/progress.txt"
tail -n 30 "$OUT/comparison_stdout.txt"
tar czf "$OUT/gpu_seed0.tgz" --exclude='*.pt' --exclude='*.npz' -C "$(dirname "$RUN")" \
  "$(basename "$RUN")"
ls -la "$OUT"
