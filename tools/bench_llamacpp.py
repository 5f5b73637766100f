#!/usr/bin/env python
"""Convert checkpoints with llama.cpp's convert_hf_to_gguf.py and compare llama.cpp's perplexity with
transformers' on exactly the same tokens and windows; prints a table.

  python tools/bench_llamacpp.py --llama-cpp LLAMA_CPP_DIR --text heldout.txt --ctx 512 --chunks 40 \\
      --work /tmp/gguf dense=MODEL_DIR stock=OUTPUT_DIR

LLAMA_CPP_DIR is a llama.cpp source tree (e.g. vendor/llama.cpp of the llama-cpp-python sdist:
`pip download llama-cpp-python --no-deps --no-binary :all:`) with `llama-perplexity` built
(`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-perplexity
llama-tokenize -j2`); llama-tokenize is optional (without it the transformers side uses the HF
tokenizer's ids and the table says the tokens were not compared).

What is computed, the way llama-perplexity computes it (tools/perplexity/perplexity.cpp, perplexity()):
the whole text is tokenized once (BOS first when the GGUF says add_bos_token); chunk i is tokens
[i*ctx, (i+1)*ctx), its first token replaced by BOS when add_bos_token; in every chunk only the second
half is scored: the logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1 (ctx/2 - 1
tokens per chunk); ppl = exp(mean NLL). The transformers side runs the same chunks in float32 on the
ids llama-tokenize gives for the same file (and reports whether the HF tokenizer gives the same ids).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np


def run(cmd, log_path, env=None):
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    return time.time() - start


def convert(llama_cpp, model_dir, gguf, outtype, log_path, reuse):
    if reuse and os.path.isfile(gguf):
        return None
    cmd = [sys.executable, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), model_dir, "--outfile", gguf,
           "--outtype", outtype]
    return run(cmd, log_path)


def gguf_add_bos(llama_cpp, gguf):
    """(add_bos_token, bos id) from the GGUF's metadata, read with llama.cpp's own gguf-py."""
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    return bool(value("tokenizer.ggml.add_bos_token", False)), value("tokenizer.ggml.bos_token_id")


def llama_tokens(binary, gguf, text_path, log_path):
    """The ids llama.cpp gives the file (with BOS when the model adds one), or None without the tool."""
    if not os.path.isfile(binary):
        return None
    out = subprocess.run([binary, "-m", gguf, "-f", text_path, "--ids", "--log-disable"], capture_output=True,
                         text=True)
    with open(log_path, "w") as f:
        f.write(out.stderr)
    if out.returncode:
        raise SystemExit(f"{binary} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("[")][-1]
    return np.array(json.loads(line), dtype=np.int64)


def llama_perplexity(binary, gguf, text_path, ctx, chunks, threads, log_path):
    cmd = [binary, "-m", gguf, "-f", text_path, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
           "-t", str(threads)]
    seconds = run(cmd, log_path)
    with open(log_path) as f:
        log = f.read()
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if not final:
        raise SystemExit(f"{log_path}: no 'Final estimate' line")
    used = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(final.group(1)), "ppl_err": float(final.group(2)),
            "chunks": int(used.group(1)) if used else None, "seconds": seconds, "command": " ".join(cmd)}


def transformers_perplexity(model_dir, tokens, ctx, chunks, add_bos, bos_id, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    with open(os.path.join(model_dir, "config.json")) as f:
        bundled = json.load(f).get("model_type") == "streamresize"
    if bundled:  # our own modeling code, registered in-process (no trust_remote_code)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
        from streamresize.loading import load_model

        model = load_model(model_dir, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_chunk = min(chunks, len(tokens) // ctx)
    first = ctx // 2
    nll, count = 0.0, 0
    start = time.time()
    with torch.no_grad():
        for i in range(n_chunk):
            ids = torch.as_tensor(tokens[i * ctx:(i + 1) * ctx].copy())[None]
            if add_bos:
                ids[0, 0] = bos_id
            logits = model(ids).logits[0].double()
            logp = torch.log_softmax(logits[first:ctx - 1], dim=-1)
            nll -= float(logp.gather(1, ids[0, first + 1:ctx, None]).sum())
            count += ctx - first - 1
    return {"ppl": math.exp(nll / count), "chunks": n_chunk, "tokens_scored": count,
            "seconds": time.time() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="LABEL=DIR", help="checkpoints to convert and evaluate")
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree with build/bin/llama-perplexity")
    p.add_argument("--text", required=True, help="evaluation text (the whole file is tokenized once)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-perplexity -c, default 512)")
    p.add_argument("--chunks", type=int, default=40, help="chunks evaluated (llama-perplexity --chunks, default 40)")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"], help="GGUF weight type (default f32)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--work", required=True, help="directory for the GGUF files and logs")
    p.add_argument("--reuse", action="store_true", help="reuse GGUF files already in --work")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    os.makedirs(args.work, exist_ok=True)
    binaries = os.path.join(args.llama_cpp, "build", "bin")
    perplexity_bin, tokenize_bin = (os.path.join(binaries, n) for n in ("llama-perplexity", "llama-tokenize"))
    if not os.path.isfile(perplexity_bin):
        raise SystemExit(f"{perplexity_bin}: not built (cmake --build build --target llama-perplexity)")
    from transformers import AutoTokenizer

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    rows = []
    for spec in args.models:
        label, _, model_dir = spec.partition("=")
        if not model_dir:
            raise SystemExit(f"{spec}: expected LABEL=DIR")
        gguf = os.path.join(args.work, f"{label}-{args.outtype}.gguf")
        convert_s = convert(args.llama_cpp, model_dir, gguf, args.outtype,
                            os.path.join(args.work, f"{label}-convert.log"), args.reuse)
        add_bos, bos_id = gguf_add_bos(args.llama_cpp, gguf)
        hf_ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
        hf_ids = np.array(([bos_id] if add_bos else []) + hf_ids, dtype=np.int64)
        ll_ids = llama_tokens(tokenize_bin, gguf, args.text, os.path.join(args.work, f"{label}-tokenize.log"))
        used = min(args.chunks, len(hf_ids) // args.ctx) * args.ctx
        if ll_ids is None:
            tokens, same = hf_ids, "not compared"
        else:
            tokens = ll_ids
            same = "yes" if np.array_equal(ll_ids[:used], hf_ids[:used]) else (
                f"no: first difference at {int(np.argmax(ll_ids[:used] != hf_ids[:used]))}")
        ll = llama_perplexity(perplexity_bin, gguf, args.text, args.ctx, args.chunks, args.threads,
                              os.path.join(args.work, f"{label}-perplexity.log"))
        tf = transformers_perplexity(model_dir, tokens, args.ctx, args.chunks, add_bos, bos_id, args.threads)
        rows.append({"label": label, "model": os.path.abspath(model_dir), "gguf": gguf, "outtype": args.outtype,
                     "gguf_mb": os.path.getsize(gguf) / 2**20, "convert_seconds": convert_s, "add_bos": add_bos,
                     "tokens_same": same, "text_tokens": int(len(tokens)), "llama_cpp": ll, "transformers": tf})
        print(f"{label}: transformers {tf['ppl']:.4f}, llama.cpp {ll['ppl']:.4f}", file=sys.stderr)

    print(f"\n{args.ctx}-token chunks, second half of each scored, {args.chunks} chunks at most, "
          f"GGUF {args.outtype}, {args.threads} threads\n")
    print("| model | GGUF MB | chunks | tokens scored | same tokens (HF vs llama.cpp) | transformers ppl "
          "| llama.cpp ppl (± its stderr) | relative difference |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        tf, ll = r["transformers"], r["llama_cpp"]
        print(f"| {r['label']} | {r['gguf_mb']:.0f} | {tf['chunks']} | {tf['tokens_scored']:,} | {r['tokens_same']} "
              f"| {tf['ppl']:.4f} | {ll['ppl']:.4f} ± {ll['ppl_err']:.4f} | {(ll['ppl'] - tf['ppl']) / tf['ppl']:+.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
