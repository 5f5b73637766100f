#!/usr/bin/env python
"""Benchmark runner: compress the demo model with several configurations, evaluate each, and rewrite
one section of BENCHMARKS.md with the table and the exact command.

  python tools/bench.py --section pca --repeats 3 \
      --config "pca 0.20::--method pca --sparsity 0.2" --config "pca 0.25::--method pca --sparsity 0.25"

Each configuration is compressed --repeats times in a fresh process (wall time: median; peak RSS: max,
measured by the kernel for that process alone), then evaluated once (perplexity is deterministic).
"""

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(cmd):
    """Run cmd; return (stdout, wall seconds). Peak RSS comes from the child's own summary line."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, wall


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {platform.system()}"


def write_section(path, section, body):
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", required=True)
    p.add_argument("--title", default=None)
    p.add_argument("--config", action="append", required=True, help="'LABEL::compress options'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=100)
    p.add_argument("--demo-dir", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="also save raw results here")
    args = p.parse_args()

    demo = json.loads(subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo.py")]
                                     + (["--out", args.demo_dir] if args.demo_dir else []),
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    sr = [sys.executable, "-m", "streamresize"]
    evaluate = ["--dataset", demo["heldout"], "--max-seq-length", str(args.seq), "--num-samples", str(args.eval_windows)]
    dense = last_json(run_measured(sr + ["eval", demo["model"], *evaluate])[0])
    rows = [{"label": "dense", "perplexity": dense["perplexity"], "parameters": dense["parameters"]}]
    print(f"dense: ppl {dense['perplexity']:.2f}, {dense['parameters']} parameters", flush=True)
    with tempfile.TemporaryDirectory(prefix="streamresize-bench-") as tmp:
        for spec in args.config:
            label, options = spec.split("::", 1)
            out = os.path.join(tmp, re.sub(r"\W+", "_", label))
            cmd = sr + ["compress", demo["model"], out, "--dataset", demo["calibration"],
                        "--num-calibration-samples", str(args.samples), "--max-seq-length", str(args.seq),
                        "--restart", *shlex.split(options)]
            walls, rss = [], []
            for _ in range(args.repeats):
                stdout, wall = run_measured(cmd)
                walls.append(wall)
                rss.append(last_json(stdout)["peak_rss_mb"])
            result = last_json(run_measured(sr + ["eval", out, *evaluate])[0])
            row = {"label": label, "options": options, "perplexity": result["perplexity"],
                   "parameters": result["parameters"], "wall_s": statistics.median(walls), "walls": walls,
                   "peak_rss_mb": max(rss)}
            rows.append(row)
            print(f"{label}: ppl {row['perplexity']:.2f}, params {row['parameters'] / dense['parameters']:.1%}, "
                  f"wall {row['wall_s']:.0f}s (median of {args.repeats}), peak RSS {row['peak_rss_mb']:.0f} MB",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "rows": rows}, f, indent=2)

    base = next((r for r in rows if r["label"] != "dense"), None)
    lines = [f"### {args.title or args.section}", "",
             f"Machine: {machine()}. Calibration {args.samples} x {args.seq} tokens; held-out perplexity on "
             f"{args.eval_windows} windows x {args.seq} tokens of held-out Wikipedia text (disjoint articles). "
             f"Wall time: median of {args.repeats} runs, each a fresh process; time ratio against the first "
             "configuration in this run.", "",
             "| configuration | perplexity | parameters | of original | wall (s) | time ratio | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["label"] == "dense":
            lines.append(f"| dense | {r['perplexity']:.2f} | {r['parameters']:,} | 100.0% | | | |")
            continue
        lines.append(f"| {r['label']} | {r['perplexity']:.2f} | {r['parameters']:,} | "
                     f"{r['parameters'] / dense['parameters']:.1%} | {r['wall_s']:.0f} | "
                     f"{r['wall_s'] / base['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    command = "python tools/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines += ["", f"Command: `{command}`"]
    write_section(args.out, args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
