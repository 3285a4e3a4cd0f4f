#!/usr/bin/env bash
# On a lent GPU: (1) where a SoftTriple trial that diverges on the GPU (and not on the CPU)
# first gets a non-finite gradient, with autograd's anomaly detection (find_divergence.py);
# (2) how many embedded trainings one GPU carries, in steady state (bench_embedded_parallel.py
# --procs: each process warms up first); (3) where one training step's time goes
# (profile_step.py).
#
#   device run: bash benchmarks/gpu_sharing_check.sh   (carry .whl and .hc; see gpu_env.sh)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_sharing}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
python3 -c "from harness.config import load_study; from harness.data import prepare_data
prepare_data(load_study('soft_triple_glyphs', profile='embedded'))" || exit 1
OMP_NUM_THREADS=1 timeout 150 python3 benchmarks/find_divergence.py \
  results/embedded/seed_0/soft_triple_glyphs 1 0 --device cuda > "$OUT/find_divergence.txt" 2>&1
tail -25 "$OUT/find_divergence.txt"
OMP_NUM_THREADS=1 timeout 120 python3 benchmarks/profile_step.py --device cuda --iters 400 \
  > "$OUT/profile_step_cuda.txt" 2>&1
tail -4 "$OUT/profile_step_cuda.txt"
timeout 300 python3 benchmarks/bench_embedded_parallel.py --device cuda --procs 1,8,16 \
  --iters 600 --delay 35 > "$OUT/sharing.txt" 2>&1
cat "$OUT/sharing.txt"
