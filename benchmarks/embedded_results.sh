#!/usr/bin/env bash
# Regenerates results/embedded/: the four seed methods and four baselines, each a full MLRC
# study (search on the validation folds, retraining, test) on the embedded glyph data with the
# `embedded` profile's budget (4 trials x 4 folds x 480 iterations, 2 reproductions), then the
# report. Usage:
#   bash benchmarks/embedded_results.sh                 # CPU, one study at a time
#   JOBS=8 DEVICE=cuda WORKERS=2 bash benchmarks/embedded_results.sh   # what results/ used
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-1}; DEVICE=${DEVICE:-auto}; WORKERS=${WORKERS:-0}
mkdir -p results
# Any data set's cell gives the same embedded configuration; the runs are named for the glyphs
# (results/embedded/<loss>_glyphs).
STUDIES="proxy_anchor_glyphs proxy_nca_pp_glyphs proxy_synthesis_glyphs proxy_synthesis_pa_glyphs
         proxy_isa_glyphs norm_softmax_glyphs proxy_nca_glyphs multi_similarity_glyphs"
# Render the glyphs once, before parallel studies would each start rendering them.
python -c "from harness.config import load_study; from harness.data import prepare_data; \
prepare_data(load_study('quickstart'))"
start=$(date +%s)
printf '%s\n' $STUDIES | xargs -P "$JOBS" -I{} sh -c \
  "python -m harness.run --study {} --profile embedded --device $DEVICE \
     --set data.num_workers=$WORKERS > results/embedded_{}.log 2>&1 && echo done {} \
   || { echo FAILED {}; tail -5 results/embedded_{}.log; }"
echo "all studies: $(( $(date +%s) - start )) s wall"
