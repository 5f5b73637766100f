#!/usr/bin/env python
"""Memory and time of compressing large checkpoints: for each model, `streamresize plan`, then
`streamresize compress` in a fresh process; per block time, anonymous and file-backed peak RSS, GPU
peak, time waiting on disk; beside it, what holding the whole model in memory takes. Rewrites one
section of BENCHMARKS.md.

  python tools/bench_memory.py --section memory-cpu \\
      --model "1B-shaped::/work/big/llama-1b-shaped" --model "7B-shaped::/work/big/llama2-7b-shaped" \\
      -- --method prune --sparsity 0.25 --dataset random --num-calibration-samples 8 --max-seq-length 256

Everything after `--` is passed to both `plan` and `compress`. --in-memory-up-to N also loads each
model of at most N parameters whole with transformers (float32) in a fresh process and records its
peak anonymous RSS; larger ones get the computed size only.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench import write_section  # noqa: E402

LOAD_WHOLE = """
import sys, torch
from transformers import AutoModelForCausalLM
from streamresize.memory import status_mb
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
total = sum(float(p.double().sum()) for p in model.parameters())  # every weight resident, mapped or not
print(status_mb()["hwm"])
"""


def run(cmd, env=None):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def model_facts(path):
    sys.path.insert(0, ROOT)
    from streamresize.checkpoint import CheckpointReader
    from streamresize.placement import block_parameters

    reader = CheckpointReader(path)
    on_disk = sum(reader.nbytes(n) for n in reader.weight_map)
    return {"parameters": reader.parameter_count(), "bytes_on_disk": on_disk,
            "block_parameters": block_parameters(reader.config), "layers": reader.config["num_hidden_layers"],
            "hidden": reader.config["hidden_size"], "vocab": reader.config["vocab_size"]}


def evict(path):
    """Drop the checkpoint's pages from the page cache (this model's files only), so reads are cold."""
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(label, path, options, scratch, in_memory_up_to, cold):
    out = os.path.join(scratch, "out")
    sr = [sys.executable, "-m", "streamresize"]
    plan = json.loads(run(sr + ["plan", path, out, *options])[0].strip().splitlines()[-1])
    if cold:
        evict(path)
    stdout, wall = run(sr + ["compress", path, out, "--restart", *options])
    with open(os.path.join(out, "streamresize_run.json")) as f:
        log = json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    facts = model_facts(path)
    blocks = [s for s in log["steps"] if "block" in s]
    block_seconds = [s["step_seconds"] for s in blocks]
    waits = sum(s.get("read_wait_seconds", 0) + s.get("commit_wait_seconds", 0) for s in log["steps"])
    row = {"label": label, **facts, "wall_s": wall, "run_s": log["seconds"],
           "block_s_median": statistics.median(block_seconds), "block_s": block_seconds,
           "peak_anon_mb": log["peak_anon_mb"], "peak_file_mb": log["peak_file_mb"], "peak_rss_mb": log["peak_rss_mb"],
           "peak_gpu_mb": max((s.get("peak_gpu_mb") or 0 for s in log["steps"]), default=0) or None,
           "disk_wait_s": waits, "placement": log["placement"], "device": log["device"],
           "compute_dtype": log["compute_dtype"], "plan_seconds": plan["seconds"],
           "plan_device_bytes": plan["placement"]["device_bytes"]}
    row["whole_model_fp32_mb"] = facts["parameters"] * 4 / 2**20
    if in_memory_up_to and facts["parameters"] <= in_memory_up_to:
        row.update(whole_model(path))
    print(json.dumps(row), flush=True)
    return row


def whole_model(path):
    """Peak RSS of loading the model whole with transformers in float32 (a fresh process)."""
    stdout, _ = run([sys.executable, "-c", LOAD_WHOLE, path], env={"PYTHONPATH": ROOT})
    return {"whole_model_measured_mb": float(stdout.strip().splitlines()[-1])}


def table(rows):
    gpu = any(r["peak_gpu_mb"] for r in rows)
    head = ["model", "parameters", "layers", "largest step (parameters)", "on disk", "placement", "peak anonymous RSS",
            "peak file-backed RSS", "peak RSS", *(["peak GPU"] if gpu else []), "per block (median)", "total",
            "waiting on disk", "plan estimate", "whole model in RAM (fp32)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["placement"]
        whole = f"{r['whole_model_fp32_mb'] / 1024:.1f} GiB ({r['bytes_on_disk'] / 2**30:.1f} GiB as stored)"
        if "whole_model_measured_mb" in r:
            whole += f" (loaded with transformers: peak RSS {r['whole_model_measured_mb'] / 1024:.1f} GiB)"
        step = (f"block {r['block_parameters'] / 1e6:.0f} M" if r["block_parameters"] >= r["vocab"] * r["hidden"]
                else f"vocabulary {r['vocab'] * r['hidden'] / 1e6:.0f} M (block {r['block_parameters'] / 1e6:.0f} M)")
        cells = [r["label"], f"{r['parameters'] / 1e9:.2f} B", str(r["layers"]), step,
                 f"{r['bytes_on_disk'] / 2**30:.2f} GiB",
                 f"{r['device']}, {r['compute_dtype']}, micro-batch {p['batch_size']}, cache {p['cache']}, "
                 f"prefetch {p['prefetch']}",
                 f"**{r['peak_anon_mb'] / 1024:.2f} GiB**", f"{r['peak_file_mb'] / 1024:.2f} GiB",
                 f"{r['peak_rss_mb'] / 1024:.2f} GiB", *([f"{(r['peak_gpu_mb'] or 0) / 1024:.2f} GiB"] if gpu else []),
                 f"{r['block_s_median']:.1f} s", f"{r['run_s'] / 60:.1f} min",
                 f"{100 * r['disk_wait_s'] / r['run_s']:.1f} %", f"{r['plan_seconds'] / 60:.1f} min",
                 whole]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    argv = sys.argv[1:]
    options = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", required=True)
    p.add_argument("--title", default=None)
    p.add_argument("--model", action="append", default=[], help="'LABEL::MODEL_DIR' (none: only redraw the table from --json)")
    p.add_argument("--scratch", default=None, help="directory for the output and work dir (default: a temp dir)")
    p.add_argument("--in-memory-up-to", type=float, default=0, help="load whole models up to this many parameters")
    p.add_argument("--cold", action="store_true", help="evict each checkpoint from the page cache before compressing")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="raw results, merged by label: the table shows every row in it")
    p.add_argument("--whole-model-only", action="store_true",
                   help="only (re)measure loading the models whole, into the rows already in --json")
    args = p.parse_args(argv)

    rows = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = {r["label"]: r for r in json.load(f)}
    for spec in args.model:
        label, path = spec.split("::", 1)
        path = os.path.expanduser(path)
        if args.whole_model_only:
            rows[label].update(whole_model(path))
            continue
        with tempfile.TemporaryDirectory(prefix="streamresize-bench-", dir=args.scratch) as scratch:
            rows[label] = measure(label, path, options, scratch, args.in_memory_up_to, args.cold)
    rows = sorted(rows.values(), key=lambda r: r["parameters"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    import torch

    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    command = "python tools/bench_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cold = " Checkpoints evicted from the page cache before each run (cold reads)." if args.cold else ""
    lines = [f"### {args.title or args.section}", "", f"Machine: {machine}. Options: `{' '.join(options)}`.{cold}", "",
             *table(rows), "", f"Command: `{command}`"]
    write_section(args.out, args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
