#!/usr/bin/env python
"""Benchmark runner: compress the demo model with several configurations, evaluate each, and rewrite
one section of BENCHMARKS.md with the table, the machine and the exact command.

  python tools/bench.py --section pca --repeats 3 \
      --config "pca 0.20::--method pca --sparsity 0.2" --config "pca 0.25::--method pca --sparsity 0.25"

  # a grid, methods x sizes: each --config once per --ratios value, with --target-size appended
  python tools/bench.py --section grid --ratios 0.9 0.8 \
      --config "pca::--recipe configs/pca.yaml --mlp-ratio 0" --config "dotresize::--recipe configs/dotresize-mlp.yaml"

Each configuration is compressed --repeats times in a fresh process (wall time: median; peak RSS: max,
measured by the kernel for that process alone), then evaluated once (perplexity and zero-shot
accuracy are deterministic): held-out perplexity, and accuracy on the zero-shot task built from the
held-out text (--tasks; --no-zeroshot skips it). Wall times are reported as ratios to --baseline,
a configuration measured in the same run. --json is rewritten after every row (a stopped run keeps
what it measured), with each compression's log in the folder beside it (JSON-NAME-logs/).
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
    """Run cmd; return (stdout, stderr, wall seconds). Peak RSS comes from the child's own summary line."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr, wall


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def output_shape(out):
    """The widths and heads a run chose (the output is deleted with the temp dir; --json keeps these)."""
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    keys = ("residual_widths", "intermediate_sizes", "attention_heads", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "block_configs")
    return {k: config[k] for k in keys if config.get(k) is not None}


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    try:
        text += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{text}, torch {torch.__version__}, {platform.system()}"


def expand(configs, ratios):
    """(label, options) per configuration; with ratios, each once per ratio with --target-size added."""
    pairs = [spec.split("::", 1) for spec in configs]
    if not ratios:
        return pairs
    return [(f"{label} {r:.0%}", f"{options} --target-size {r}") for label, options in pairs for r in ratios]


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
    p.add_argument("--ratios", nargs="+", type=float, help="grid: run each --config at these --target-size values")
    p.add_argument("--baseline", help="label of the configuration that time ratios refer to (default: the first)")
    p.add_argument("--tasks", default="wiki-next-sentence", help="zero-shot task (file or shipped name)")
    p.add_argument("--no-zeroshot", action="store_true", help="skip zero-shot accuracy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=100)
    p.add_argument("--demo-dir", default=None)
    p.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "gemma3-270m"),
                   help="which model tools/make_demo.py builds (gemma3-270m: in ~/.cache/streamresize/gemma3-270m)")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="also save raw results here")
    args = p.parse_args()

    demo = json.loads(subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo.py"), "--model", args.model]
                                     + (["--out", args.demo_dir] if args.demo_dir else []),
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    configs = expand(args.config, args.ratios)
    baseline = args.baseline or configs[0][0]
    if baseline not in [label for label, _ in configs]:
        raise SystemExit(f"--baseline {baseline}: not one of the configurations ({', '.join(l for l, _ in configs)})")
    sr = [sys.executable, "-m", "streamresize"]
    evaluate = ["--dataset", demo["heldout"], "--max-seq-length", str(args.seq), "--num-samples", str(args.eval_windows)]
    if not args.no_zeroshot:
        evaluate += ["--tasks", args.tasks]
    task = os.path.basename(args.tasks).rsplit(".", 1)[0]

    def measured(result):
        zeroshot = (result.get("zeroshot") or {}).get(task, {})
        return {"perplexity": result["perplexity"], "parameters": result["parameters"],
                "acc": zeroshot.get("acc"), "acc_norm": zeroshot.get("acc_norm")}

    def save_json(rows, complete):
        """--json after every row, so a stopped run keeps what it measured; each compress log beside it."""
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"dense": dense, "rows": rows, "machine": machine(), "complete": complete}, f, indent=2)

    def save_log(label, log):
        if args.json:
            logs = os.path.splitext(args.json)[0] + "-logs"
            os.makedirs(logs, exist_ok=True)
            with open(os.path.join(logs, re.sub(r"\W+", "_", label) + ".log"), "w") as f:
                f.write(log)

    dense = last_json(run_measured(sr + ["eval", demo["model"], *evaluate])[0])
    rows = [{"label": "dense", **measured(dense)}]
    print(f"dense: ppl {dense['perplexity']:.2f}, {dense['parameters']} parameters", flush=True)
    with tempfile.TemporaryDirectory(prefix="streamresize-bench-") as tmp:
        for label, options in configs:
            out = os.path.join(tmp, re.sub(r"\W+", "_", label))
            cmd = sr + ["compress", demo["model"], out, "--dataset", demo["calibration"],
                        "--num-calibration-samples", str(args.samples), "--max-seq-length", str(args.seq),
                        "--restart", *shlex.split(options)]
            walls, rss = [], []
            for _ in range(args.repeats):
                stdout, log, wall = run_measured(cmd)
                save_log(label, log)
                walls.append(wall)
                rss.append(last_json(stdout)["peak_rss_mb"])
            result = last_json(run_measured(sr + ["eval", out, *evaluate])[0])
            row = {"label": label, "options": options, **measured(result), "wall_s": statistics.median(walls),
                   "walls": walls, "peak_rss_mb": max(rss), "shape": output_shape(out)}
            rows.append(row)
            save_json(rows, complete=False)
            print(f"{label}: ppl {row['perplexity']:.2f}, params {row['parameters'] / dense['parameters']:.1%}, "
                  f"acc {row['acc']}, wall {row['wall_s']:.0f}s (median of {args.repeats}), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    save_json(rows, complete=True)

    base = next(r for r in rows if r["label"] == baseline)
    zeroshot = not args.no_zeroshot
    lines = [f"### {args.title or args.section}", "",
             f"Machine: {machine()}. Calibration {args.samples} x {args.seq} tokens; held-out perplexity on "
             f"{args.eval_windows} windows x {args.seq} tokens of held-out Wikipedia text (disjoint articles)"
             + (f"; zero-shot accuracy (`acc` / `acc_norm`, lm-eval's scoring) on `{task}`" if zeroshot else "")
             + f". Wall time: median of {args.repeats} runs, each a fresh process; time ratio against "
             f"\"{baseline}\" in this run.", "",
             "| configuration | perplexity |" + (" acc | acc_norm |" if zeroshot else "")
             + " parameters | of original | wall (s) | time ratio | peak RSS (MB) |",
             "|---|---:|" + ("---:|---:|" if zeroshot else "") + "---:|---:|---:|---:|---:|"]
    for r in rows:
        accuracy = f" {r['acc']:.3f} | {r['acc_norm']:.3f} |" if zeroshot else ""
        if r["label"] == "dense":
            lines.append(f"| dense | {r['perplexity']:.2f} |{accuracy} {r['parameters']:,} | 100.0% | | | |")
            continue
        lines.append(f"| {r['label']} | {r['perplexity']:.2f} |{accuracy} {r['parameters']:,} | "
                     f"{r['parameters'] / dense['parameters']:.1%} | {r['wall_s']:.0f} | "
                     f"{r['wall_s'] / base['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    command = "python tools/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines += ["", f"Command: `{command}`"]
    write_section(args.out, args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
