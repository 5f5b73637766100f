#!/usr/bin/env python
"""Cost of data parallelism: for each model, `streamresize compress` in one plain process and under
torchrun with 1 and 2 (or --ranks) processes (gloo on the CPU), and from rank 0's run log per block: the
step's time, the time spent in collectives (all-reduces of the statistics, the commit's two small ones,
including the wait for the slower rank), the bytes all-reduced against the block's weight bytes.

  nice -n 10 python tools/bench_distributed.py --out /tmp/bench-dist \\
      --model "tiny::/tmp/tiny::/tmp/calib.txt" \\
      --model "SmolLM2-135M::$HOME/.cache/streamresize/demo/smollm2-135m::$HOME/.cache/streamresize/demo/calib.txt" \\
      -- --method dotresize --mlp-sparsity 0.3 --num-calibration-samples 16 --max-seq-length 256

Prints a Markdown table and the JSON of every run; --section NAME writes the table into BENCHMARKS.md.
Every process runs with OMP_NUM_THREADS=1 (set --threads), so 1 and 2 processes use 1 and 2 cores.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_weight_bytes(model_dir):
    from streamresize.checkpoint import CheckpointReader

    reader = CheckpointReader(model_dir)
    sizes = {}
    for name in reader.weight_map:
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            sizes[i] = sizes.get(i, 0) + reader.nbytes(name)
    reader.close()
    return statistics.median(sizes.values())


def run(model, dataset, out, ranks, options, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    compress = ["-m", "streamresize", "compress", model, out, "--dataset", dataset, *options]
    if ranks == 0:
        command = [sys.executable, *compress]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_port", str(free_port()), *compress]
    for path in (out, out + ".streamresize-work"):
        shutil.rmtree(path, ignore_errors=True)
    start = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "streamresize_run.json")) as f:
        log = json.load(f)
    blocks = [s for s in log["steps"] if s.get("block") is not None]
    step = [s["step_seconds"] for s in blocks]
    coll = [s.get("collective_seconds", 0.0) for s in blocks]
    return {"ranks": ranks, "wall_seconds": wall, "run_seconds": log["seconds"],
            "block_seconds_median": statistics.median(step), "block_seconds_total": sum(step),
            "collective_seconds_median": statistics.median(coll), "collective_seconds_total": sum(coll),
            "collective_share_of_blocks": sum(coll) / sum(step),
            "collective_share_of_run": sum(s.get("collective_seconds", 0.0) for s in log["steps"]) / log["seconds"],
            "reduced_bytes_per_block": statistics.median(s.get("reduced_bytes", 0) for s in blocks),
            "collectives_per_block": statistics.median(s.get("collectives", 0) for s in blocks),
            "blocks": len(blocks)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="LABEL::MODEL_DIR::DATASET")
    p.add_argument("--ranks", nargs="+", type=int, default=[0, 1, 2], help="0: a plain process (no torchrun)")
    p.add_argument("--out", required=True, help="scratch folder for the outputs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--section", help="write the table into this BENCHMARKS.md section")
    p.add_argument("options", nargs="*", help="compress options (after --)")
    args = p.parse_args()
    rows, results = [], []
    for spec in args.model:
        label, model, dataset = spec.split("::")
        weights = block_weight_bytes(model)
        for ranks in args.ranks:
            r = run(model, dataset, os.path.join(args.out, f"{label}-{ranks}"), ranks, args.options, args.threads)
            r.update(model=label, block_weight_bytes=weights)
            results.append(r)
            print(json.dumps(r), flush=True)
            who = "1 process (no torchrun)" if ranks == 0 else f"torchrun x {ranks}"
            rows.append(f"| {label} | {who} | {r['wall_seconds']:.1f} | {r['run_seconds']:.2f} | "
                        f"{r['block_seconds_median'] * 1e3:.0f} | {r['collective_seconds_median'] * 1e3:.1f} | "
                        f"{100 * r['collective_share_of_blocks']:.1f} % | {r['collectives_per_block']:.0f} | "
                        f"{r['reduced_bytes_per_block'] / 2**20:.2f} | {weights / 2**20:.2f} | "
                        f"{r['reduced_bytes_per_block'] / weights:.2f} |")
    table = ("| model | processes | wall s (launch to exit) | run s (rank 0) | block ms (median) | collectives ms "
             "/ block (median) | collectives share of block time | all-reduces / block | MiB all-reduced / block "
             "| block weights MiB | reduced / weights |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    print(table)
    if args.section:
        from bench import write_section

        write_section(os.path.join(ROOT, "BENCHMARKS.md"), args.section, table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
