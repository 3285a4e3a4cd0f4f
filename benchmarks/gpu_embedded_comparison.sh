#!/usr/bin/env bash
# The full embedded comparison (every method, 10 trials, 10 reproductions, seed 0) on one lent
# GPU, against issue #12's goal of at most 10 minutes on one GPU. What was run, and how:
#
#   device run: bash benchmarks/gpu_embedded_comparison.sh   (carry .whl and .hc)
#
# .whl: wheels for Python 3.12 that the GPU image lacks, made here with
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         pytorch-metric-learning==2.9.0 optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 \
#         Mako==1.4.3 SQLAlchemy==2.1.9 greenlet==3.5.6 submitit==1.5.4
# .hc:  glyph_trunk/, the glyph trunk's .pt/.json from this machine's HARNESS_CACHE (the glyphs
#       themselves are rendered there: with them the carried tree passes 64 MiB), so the
#       GPU run starts from the same trunk file (sha256 in each provenance.json) as the CPU seed
#       folders, and differs from results/embedded/seed_0 in the device alone.
# LIMIT: seconds the comparison may run before it is stopped (default 540); stopped early, the
#       studies' own records (trials done, final folds done) still come back in the tarball.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_embedded}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if [ -d .hc ]; then
  mkdir -p /tmp/hc_gpu && cp -r .hc/. /tmp/hc_gpu/ || exit 1
  export HARNESS_CACHE=/tmp/hc_gpu
fi
export PYTHONUNBUFFERED=1 HARNESS_NO_PROGRESS=1
RUN=${RUN:-/tmp/gpu_seed0}
{ nvidia-smi -L; nproc; python3 -c "import torch, torchvision, optuna, pytorch_metric_learning as p
import harness.run, losses
print('torch', torch.__version__, 'tv', torchvision.__version__, 'optuna', optuna.__version__,
      'pml', p.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"
sha256sum "${HARNESS_CACHE:-$HOME/.cache}"/glyph_trunk/*.pt | tee -a "$OUT/env.txt"
python3 -c "import torch, harness.run; assert torch.cuda.is_available()" || exit 1
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
