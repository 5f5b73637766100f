"""Tokenize calibration text once, for every job and every rank that uses it:

    python tools/slurm/tokenize_calibration.py MODEL_DIR calib.txt [more.jsonl ...] --out calib-ids.npy

writes the token stream (the documents tokenized with MODEL_DIR's own tokenizer, joined by its
end-of-sequence token) as a 1-D int64 .npy. `streamresize compress ... --dataset calib-ids.npy` samples
its windows exactly as from the text itself (the same ids, hence the same output), without loading a
tokenizer: no Hub access, no tokenizer code, nothing that differs between nodes. Run it on a login
node or in the first job of a sweep, on shared storage.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streamresize.calibration import load_tokenizer, read_documents, token_stream  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("texts", nargs="+", help=".txt (documents split at blank lines) or .jsonl (a text field) files")
    p.add_argument("--out", required=True, help="the .npy file to write")
    args = p.parse_args()
    stream = token_stream(load_tokenizer(args.model_dir), read_documents(args.texts))
    tmp = args.out + ".tmp.npy"
    np.save(tmp, stream)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(stream)} tokens")


if __name__ == "__main__":
    main()
