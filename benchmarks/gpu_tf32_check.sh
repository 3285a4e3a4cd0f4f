#!/usr/bin/env bash
# Did TF32 make the SoftTriple trials diverge on the GPU? In the H100 run of seed 0
# (results/bench/gpu_embedded_comparison_h100.md, TF32 on) SoftTriple trials 1 and 2 and Proxy
# Synthesis on SoftTriple trial 3 diverged; on the CPU (results/embedded/seed_0) they did not.
# This trains the fold each diverged in again on the GPU, with TF32 on and off, twice each
# (cuDNN is not deterministic), from the CPU study's config, parameters and fold seeds; then
# profiles one embedded training step on the GPU (where its time goes).
#
#   device run: bash benchmarks/gpu_tf32_check.sh   (carry .whl and .hc; see gpu_env.sh)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_tf32}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
S=results/embedded/seed_0
# Render the glyphs once, before the parallel processes read them.
python3 -c "from harness.config import load_study; from harness.data import prepare_data
prepare_data(load_study('soft_triple_glyphs', profile='embedded'))" || exit 1
folds=("soft_triple_glyphs 1 0" "soft_triple_glyphs 2 1" "proxy_synthesis_soft_triple_glyphs 3 0")
for rep in 1 2; do
  for tf32 in true false; do
    for f in "${folds[@]}"; do
      set -- $f
      OMP_NUM_THREADS=1 timeout 300 python3 benchmarks/retrain_trial.py "$S/$1" "$2" "$3" \
        --device cuda --set "train.tf32=$tf32" --json "$OUT/${1}_t$2_f$3_tf32_${tf32}_r$rep.json" \
        > "$OUT/${1}_t$2_f$3_tf32_${tf32}_r$rep.log" 2>&1 &
    done
  done
done
wait
cat "$OUT"/*.log | grep '^{' | tee "$OUT/rows.jsonl"
grep -L '^{' "$OUT"/*.log | while read -r f; do echo "== FAILED $f"; tail -5 "$f"; done
OMP_NUM_THREADS=1 timeout 200 python3 benchmarks/profile_step.py --device cuda --iters 400 \
  > "$OUT/profile_step_cuda.txt" 2>&1
tail -40 "$OUT/profile_step_cuda.txt"
