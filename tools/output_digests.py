#!/usr/bin/env python
"""SHA-256 digests of every file `streamresize compress` writes, one run per recipe.

Why: a restructure of the engine must write byte-identical outputs. Record the digests with the
code before the change, record them again after it, and compare:

  # before (a frozen copy of the old commit, e.g. a git worktree at /work/baseline-src)
  python3 tools/output_digests.py --pythonpath /work/baseline-src --out-root /tmp/d/old -o old.json
  # after (the code being edited)
  python3 tools/output_digests.py --out-root /tmp/d/new -o new.json --compare old.json

streamresize_run.json (the run log: timings and memory) is left out; every other file counts.
Model and calibration text default to the demo fixture (tools/make_demo.py).
"""

import argparse
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEMO = os.environ.get("STREAMRESIZE_DEMO_DIR", os.path.expanduser("~/.cache/streamresize/demo"))
SKIP = {"streamresize_run.json"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def digests(out_dir):
    found = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), out_dir)
            if rel not in SKIP:
                found[rel] = sha256(os.path.join(root, name))
    return dict(sorted(found.items()))


def compare(mine, other):
    """Print every recipe and file that differs; return how many differ."""
    bad = 0
    for recipe in sorted(set(mine) | set(other)):
        if recipe not in mine or recipe not in other:
            print(f"{recipe}: only in {'this run' if recipe in mine else 'the other'}")
            bad += 1
            continue
        a, b = mine[recipe], other[recipe]
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                what = "only in the other" if name not in a else "only in this run" if name not in b else "differs"
                print(f"{recipe}: {name} {what}")
                bad += 1
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", help="recipe files (default: configs/*.yaml)")
    p.add_argument("--model", default=os.path.join(DEMO, "smollm2-135m"))
    p.add_argument("--dataset", default=os.path.join(DEMO, "calib.txt"))
    p.add_argument("--out-root", required=True, help="one output folder per recipe is written here")
    p.add_argument("--python", default=os.environ.get("DIGEST_PYTHON", "python3"),
                   help="command that runs Python, e.g. 'nice -n 5 python3' (env DIGEST_PYTHON)")
    p.add_argument("--pythonpath", help="import streamresize from this source tree (e.g. a worktree of the "
                   "old commit) instead of the installed one; prepended to PYTHONPATH")
    p.add_argument("--samples", type=int, default=32, help="--num-calibration-samples (default 32)")
    p.add_argument("--seq", type=int, default=512, help="--max-seq-length (default 512)")
    p.add_argument("-o", "--output", help="write the digests here as JSON (default: stdout)")
    p.add_argument("--compare", metavar="OTHER.json", help="report differing files; exit 1 if any")
    args = p.parse_args()

    recipes = [os.path.abspath(r) for r in args.recipes or sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))]
    out_root = os.path.abspath(args.out_root)
    os.makedirs(out_root, exist_ok=True)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(args.pythonpath), env.get("PYTHONPATH")]))
    python = shlex.split(args.python)
    # Run from out_root, not from a checkout: `python -m` puts the working directory first on sys.path,
    # which would shadow --pythonpath. Say which streamresize the runs import.
    where = subprocess.run(python + ["-c", "import streamresize; print(streamresize.__file__)"], env=env,
                           cwd=out_root, check=True, capture_output=True, text=True).stdout.strip()
    print(f"streamresize from {where}", file=sys.stderr)

    result = {}
    for recipe in recipes:
        name = os.path.splitext(os.path.basename(recipe))[0]
        out = os.path.join(out_root, name)
        cmd = python + ["-m", "streamresize.cli", "compress", os.path.abspath(args.model), out, "--recipe", recipe,
                        "--dataset", os.path.abspath(args.dataset), "--num-calibration-samples", str(args.samples),
                        "--max-seq-length", str(args.seq), "--restart"]
        print("$ " + shlex.join(cmd), file=sys.stderr)
        start = time.monotonic()
        subprocess.run(cmd, env=env, cwd=out_root, check=True)
        print(f"{name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
        result[name] = digests(out)

    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        bad = compare(result, {k: v for k, v in other.items() if k in result})
        print(f"{bad} difference(s) against {args.compare}" if bad else f"identical to {args.compare}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
