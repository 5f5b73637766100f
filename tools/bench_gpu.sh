#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one prepared run, for a session that is lent a GPU for minutes:
# each step has its own time limit under one overall deadline, and a step that fails does not stop
# the next. Everything it prints goes to $OUT/session.log; results come back as JSON beside it.
#
#   OUT=/tmp/gpu DEADLINE_S=540 bash tools/bench_gpu.sh          # on the GPU machine
#   OUT=/tmp/gpu SHAPE=tiny DEVICE=cpu bash tools/bench_gpu.sh   # a dry run of the script here
#
# POT, when missing there, is installed from wheels in .whl/ (the device machine has no POT and no registry).
set -u
OUT=${OUT:-/tmp/bench-gpu-out}
SHAPE=${SHAPE:-7b}
DEVICE=${DEVICE:-cuda}
SCRATCH=${SCRATCH:-/tmp}
DEADLINE_S=${DEADLINE_S:-540}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TQDM_MININTERVAL=10
START=$SECONDS

if ! python3 -c "import ot" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left before the deadline), report rc and seconds.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE_S - (SECONDS - START)))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "=== $name: skipped, ${left}s left"; return; fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@"
    echo "=== $name: rc=$? in $((SECONDS - t0))s"
}

SR="python3 -m streamresize"
TINY=$SCRATCH/tiny-synthetic
BIG=$SCRATCH/synthetic-$SHAPE
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"

step environment 60 bash -c 'nvidia-smi -L; nproc; free -g | head -2; df -h '"$SCRATCH"' | tail -1;
    python3 -c "import torch, transformers, safetensors, ot, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\", \"| transformers\",
    transformers.__version__, \"| pot\", ot.__version__, \"| numpy\", numpy.__version__)"'

# 1. The CUDA path against the CPU path on the tiny model: the same recipe in float32, float64 statistics;
#    the stock outputs' logits on the same tokens. Then bf16 compute and quality.yaml's backward pass on the GPU.
parity() {
    python3 tools/make_synthetic.py --shape tiny --out "$TINY" >/dev/null || return 1
    local common=(--dataset random --num-calibration-samples 16 --max-seq-length 128 --target-size 0.8 --restart)
    $SR compress "$TINY" "$SCRATCH/tiny-cpu" --recipe configs/portable.yaml "${common[@]}" --device cpu \
        --compute-dtype float32 --statistics-products float64 2>&1 | tail -n 2
    $SR compress "$TINY" "$SCRATCH/tiny-gpu" --recipe configs/portable.yaml "${common[@]}" --device "$DEVICE" \
        --compute-dtype float32 --statistics-products float64 2>&1 | tail -n 2
    $SR compress "$TINY" "$SCRATCH/tiny-gpu-bf16" --recipe configs/portable.yaml "${common[@]}" --device "$DEVICE" \
        --compute-dtype bfloat16 2>&1 | tail -n 2
    $SR compress "$TINY" "$SCRATCH/tiny-cpu-quality" --recipe configs/quality.yaml "${common[@]}" --device cpu \
        --compute-dtype float32 --statistics-products float64 2>&1 | tail -n 2
    $SR compress "$TINY" "$SCRATCH/tiny-gpu-quality" --recipe configs/quality.yaml "${common[@]}" --device "$DEVICE" \
        --compute-dtype float32 --statistics-products float64 2>&1 | tail -n 2
    python3 - "$SCRATCH" "$OUT/parity.json" <<'EOF'
import json, sys, torch
scratch, out = sys.argv[1], sys.argv[2]
ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
def logits(name):
    from streamresize import load
    model = load(f"{scratch}/{name}")
    with torch.no_grad():
        return model.float()(ids).logits, model.config.to_dict()
result = {}
for ref, other in [("tiny-cpu", "tiny-gpu"), ("tiny-cpu", "tiny-gpu-bf16"), ("tiny-cpu-quality", "tiny-gpu-quality")]:
    try:
        a, ca = logits(ref); b, cb = logits(other)
        widths = {k: (ca.get(k), cb.get(k)) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads")}
        rel = ((a - b).norm() / a.norm()).item()
        result[f"{ref} vs {other}"] = {"relative_logit_difference": rel, "widths": widths}
    except Exception as e:
        result[f"{ref} vs {other}"] = {"error": repr(e)[:500]}
print(json.dumps(result, indent=1))
json.dump(result, open(out, "w"), indent=1)
EOF
}
step cuda-parity 150 bash -c "$(declare -f parity); SR='$SR' TINY='$TINY' SCRATCH='$SCRATCH' DEVICE='$DEVICE' OUT='$OUT' parity"

# 2. OT solve and PCA eigh at width 4096 on the device (BENCHMARKS "ot-speed").
step ot-speed 60 python3 tools/bench_ot.py --width 4096 --keep 0.75 --repeats 3 --device "$DEVICE"

# 3. The 7B-shaped checkpoint, then the pending "memory-gpu" row (pca, bf16 compute, 12 GB budget).
step make-synthetic 180 python3 tools/make_synthetic.py --shape "$SHAPE" --out "$BIG"
step memory-gpu 270 python3 tools/bench_memory.py --section memory-gpu \
    --title "Issue 6: 7B-shaped on one GPU (pca 0.25, 128 x 2048 random calibration tokens, bf16 compute, 12 GB budget)" \
    --model "7B-shaped (Llama-2-7B)::$BIG" --scratch "$SCRATCH" --cold --json "$OUT/bench-gpu.json" --out "$OUT/BENCHMARKS.md" \
    -- --method pca --sparsity 0.25 --dataset random --num-calibration-samples 128 --max-seq-length 2048 \
       --device "$DEVICE" --compute-dtype bfloat16 --max-gpu-memory 12GB

# 4. Issue 12 item 6: portable.yaml (structured OBS) on the 7B shape inside a 24 GB card's budget, on the
#    64 x 2048 tokens BENCHMARKS measured it with (128 x 2048 did not fit the first lease's deadline).
step portable-7b 240 python3 tools/bench_memory.py --section memory-gpu-portable \
    --title "Issue 12: 7B-shaped on one GPU, portable.yaml at 80 % (64 x 2048 random calibration tokens, bf16 compute, 22 GB budget)" \
    --model "7B-shaped (Llama-2-7B)::$BIG" --scratch "$SCRATCH" --cold --json "$OUT/bench-gpu-portable.json" \
    --out "$OUT/BENCHMARKS.md" \
    -- --recipe configs/portable.yaml --target-size 0.8 --dataset random --num-calibration-samples 64 \
       --max-seq-length 2048 --device "$DEVICE" --compute-dtype bfloat16 --max-gpu-memory 22GB

echo "=== done at $((SECONDS - START))s"
