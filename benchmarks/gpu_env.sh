# Sourced by the scripts run on a lent GPU machine (`device run: bash benchmarks/gpu_*.sh`,
# carrying .whl and .hc): makes the GPU image able to run the harness and records what it ran
# on in $OUT/env.txt. Returns non-zero if it cannot.
#
# .whl: wheels for Python 3.12 that the GPU image lacks, made here with
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         pytorch-metric-learning==2.9.0 optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 \
#         Mako==1.4.3 SQLAlchemy==2.1.9 greenlet==3.5.6 submitit==1.5.4
# .hc:  glyph_trunk/, the glyph trunk's .pt/.json from this machine's HARNESS_CACHE (the glyphs
#       themselves are rendered there: with them the carried tree passes 64 MiB), so a GPU run
#       starts from the same trunk file (sha256 in env.txt and each provenance.json) as the CPU
#       runs. The GPU image's own torch runs it (2.11 in 2026-11, env.txt), not the 2.14.1 pinned
#       here: a difference between a GPU and a CPU run may be the version's (docs/embedded.md,
#       "SoftTriple and the clamp's subgradient").
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site
fi
if [ -d .hc ]; then
  mkdir -p /tmp/hc_gpu && cp -r .hc/. /tmp/hc_gpu/ || return 1
  export HARNESS_CACHE=/tmp/hc_gpu
fi
export PYTHONUNBUFFERED=1 HARNESS_NO_PROGRESS=1
{ nvidia-smi -L; nproc; python3 -c "import torch, torchvision, optuna, pytorch_metric_learning as p
import harness.run, losses
print('torch', torch.__version__, 'tv', torchvision.__version__, 'optuna', optuna.__version__,
      'pml', p.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"
sha256sum "${HARNESS_CACHE:-$HOME/.cache/harness}"/glyph_trunk/*.pt | tee -a "$OUT/env.txt"
python3 -c "import torch, harness.run; assert torch.cuda.is_available()" || return 1
