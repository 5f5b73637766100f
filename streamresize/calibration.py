"""Calibration and evaluation text: local files only, tokenized with the model's own tokenizer, or
random token ids (`--dataset random`) for checkpoints that come without a tokenizer."""

import json
import os

import numpy as np

from .errors import StreamResizeError


def read_documents(paths):
    """Documents from .txt (split at blank lines) and .jsonl (the `text` field of each record)."""
    documents = []
    for path in paths:
        if not os.path.isfile(path):
            raise StreamResizeError(f"{path}: dataset file not found")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise StreamResizeError(f"{path}:{lineno}: not valid JSON: {e}") from e
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise StreamResizeError(f"{path}:{lineno}: a jsonl record needs a string 'text' field")
                    documents.append(record["text"])
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            documents.extend(p.strip() for p in text.split("\n\n") if p.strip())
        else:
            raise StreamResizeError(f"{path}: unsupported dataset format; use .txt or .jsonl")
    if not documents:
        raise StreamResizeError(f"{', '.join(paths)}: no text found")
    return documents


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    from .loading import register_auto_classes

    register_auto_classes()
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise StreamResizeError(f"{model_dir}: cannot load the tokenizer ({e})") from e


def token_stream(tokenizer, documents):
    """All documents tokenized and joined by the end-of-sequence token, as one int64 array."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.extend(separator)
    return np.asarray(ids, dtype=np.int64)


def sample_windows(stream, num_samples, seq_length, seed, source="dataset"):
    """`num_samples` windows of `seq_length` tokens at seeded random offsets; no padding ever."""
    if len(stream) < seq_length:
        raise StreamResizeError(
            f"{source}: only {len(stream)} tokens, fewer than --max-seq-length {seq_length}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_length + 1, size=num_samples)
    return np.stack([stream[s:s + seq_length] for s in starts])


RANDOM = "random"


def random_spec(paths):
    """The seed of a `random` or `random:SEED` dataset (None: use the recipe's seed), or False."""
    if len(paths) != 1 or not (paths[0] == RANDOM or paths[0].startswith(RANDOM + ":")):
        return False
    _, _, seed = paths[0].partition(":")
    try:
        return int(seed) if seed else None
    except ValueError as e:
        raise StreamResizeError(f"--dataset {paths[0]}: expected random or random:SEED (an integer)") from e


def random_ids(model_dir, num_samples, seq_length, seed):
    """Uniform random token ids over the model's vocabulary: no tokenizer needed. They exercise every
    step of the engine (shapes, memory, time) but carry no language, so only for measuring runs."""
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        vocab = json.load(f).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise StreamResizeError(f"{config_path}: no vocab_size, needed for --dataset random")
    return np.random.default_rng(seed).integers(0, vocab, size=(num_samples, seq_length), dtype=np.int64)


def calibration_ids(model_dir, paths, num_samples, seq_length, seed):
    random_seed = random_spec(paths)
    if random_seed is not False:
        return random_ids(model_dir, num_samples, seq_length, seed if random_seed is None else random_seed)
    tokenizer = load_tokenizer(model_dir)
    stream = token_stream(tokenizer, read_documents(paths))
    return sample_windows(stream, num_samples, seq_length, seed, source=", ".join(paths))
