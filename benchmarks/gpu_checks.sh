#!/usr/bin/env bash
# What was run on a lent GPU machine (see results/bench/README.md): the CUDA tests, the speed
# ratios, the loss and evaluation benchmarks, and real-path smoke runs. OUT = where logs go.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HARNESS_NO_PROGRESS=1 HARNESS_CACHE=/tmp/harness_cache
nvidia-smi -L | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, torchvision, optuna, pytorch_metric_learning as p; print('torch', torch.__version__, 'tv', torchvision.__version__, 'optuna', optuna.__version__, 'pml', p.__version__)" | tee -a "$OUT/nvidia_smi.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" 2>&1 | tail -15 > "$OUT/pytest_gpu.txt"; tail -3 "$OUT/pytest_gpu.txt"
timeout 300 python3 -m harness.bench --out "$OUT" 2>&1 | tail -12
timeout 240 python3 benchmarks/bench_losses.py --device cuda > "$OUT/bench_losses_cuda.txt" 2>&1; tail -25 "$OUT/bench_losses_cuda.txt"
timeout 300 python3 benchmarks/bench_eval.py --device cuda --no-pml > "$OUT/bench_eval_cuda.txt" 2>&1; tail -12 "$OUT/bench_eval_cuda.txt"
python3 benchmarks/make_fake_cub.py /tmp/fakecub --classes 40 --per-class 20
( time timeout 300 python3 -m harness.run --study proxy_anchor_cub --data-root /tmp/fakecub \
    --output /tmp/run_cub --trials 2 --reproductions 1 --set data.check_counts=false \
    --set model.pretrained=false --set train.max_epochs=2 --set train.iters_per_epoch=20 \
    --set train.val_every_epochs=1 ) > "$OUT/run_fake_cub_cuda.txt" 2>&1; tail -22 "$OUT/run_fake_cub_cuda.txt"
( time timeout 300 python3 -m harness.run --study quickstart --output /tmp/qs_cuda ) \
    > "$OUT/run_quickstart_cuda.txt" 2>&1; tail -22 "$OUT/run_quickstart_cuda.txt"
