"""Calibration and evaluation text: local files only, tokenized with the model's own tokenizer, or
random token ids (`--dataset random`) for checkpoints that come without a tokenizer."""

import json
import os

import numpy as np

from .errors import StreamResizeError


def read_text(path):
    """A dataset file's text; a clear error for a file that is not UTF-8 text (binary data, another
    encoding) or that holds no text at all."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StreamResizeError(f"{path}: cannot read the dataset file ({e.strerror})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StreamResizeError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a dataset file is "
            "UTF-8 .txt or .jsonl text, not binary data") from None
    if "\x00" in text:
        raise StreamResizeError(f"{path}: binary data (a NUL byte at offset {text.index(chr(0))}); a dataset "
                                "file is UTF-8 .txt or .jsonl text")
    if not text.strip():
        raise StreamResizeError(f"{path}: empty: the dataset file holds no text")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as a file opened in text mode reads


def read_documents(paths):
    """Documents from .txt (split at blank lines) and .jsonl (the `text` field of each record)."""
    documents = []
    for path in paths:
        if not os.path.isfile(path):
            raise StreamResizeError(f"{path}: dataset file not found")
        if not path.endswith((".jsonl", ".txt")):
            raise StreamResizeError(f"{path}: unsupported dataset format; use .txt or .jsonl")
        text = read_text(path)
        if path.endswith(".jsonl"):
            records = []
            for lineno, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise StreamResizeError(f"{path}:{lineno}: not valid JSON: {e}") from e
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise StreamResizeError(f"{path}:{lineno}: a jsonl record needs a string 'text' field")
                records.append(record["text"])
            if not any(r.strip() for r in records):
                raise StreamResizeError(f"{path}: empty: no record has any text")
            documents.extend(records)
        else:
            documents.extend(p.strip() for p in text.split("\n\n") if p.strip())
    if not documents:
        raise StreamResizeError(f"{', '.join(paths)}: no text found")
    return documents


# Files one of which every tokenizer transformers can load from a directory has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    from .loading import register_auto_classes

    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        raise StreamResizeError(
            f"{model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); text needs the model's own "
            "tokenizer: copy its tokenizer files into this directory, or pass --dataset random (random token "
            "ids, no tokenizer needed; for measuring runs only)")
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
    """`num_samples` windows of `seq_length` tokens at seeded random offsets; no padding ever. The text
    must hold at least num_samples x seq_length tokens: less would repeat the same text many times over."""
    needed = num_samples * seq_length
    if len(stream) < needed:
        fit = len(stream) // seq_length
        lower = (f"lower --num-calibration-samples to at most {fit} or --max-seq-length" if fit else
                 f"lower --max-seq-length to at most {len(stream)}" if len(stream) else "add text")
        raise StreamResizeError(
            f"{source}: only {len(stream)} tokens, but --num-calibration-samples {num_samples} x "
            f"--max-seq-length {seq_length} needs {needed}; {lower}, or give more calibration text")
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
        value = int(seed) if seed else None
    except ValueError as e:
        raise StreamResizeError(f"--dataset {paths[0]}: expected random or random:SEED (an integer)") from e
    if value is not None and value < 0:
        raise StreamResizeError(f"--dataset {paths[0]}: the seed must be at least 0")
    return value


def random_ids(model_dir, num_samples, seq_length, seed):
    """Uniform random token ids over the model's vocabulary: no tokenizer needed. They exercise every
    step of the engine (shapes, memory, time) but carry no language, so only for measuring runs."""
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        vocab = json.load(f).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise StreamResizeError(f"{config_path}: no vocab_size, needed for --dataset random")
    return np.random.default_rng(seed).integers(0, vocab, size=(num_samples, seq_length), dtype=np.int64)


def read_token_stream(path):
    """A token stream saved by `tools/slurm/tokenize_calibration.py` (np.save of `token_stream`): a 1-D
    integer array. Windows sampled from it are the ones the text it was made from gives."""
    try:
        stream = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StreamResizeError(f"{path}: not a .npy array of token ids ({e})") from None
    if stream.ndim != 1 or stream.dtype.kind not in "iu" or not len(stream):
        raise StreamResizeError(f"{path}: expected a non-empty 1-D integer array of token ids (a token stream), "
                                f"got {stream.dtype} {list(stream.shape)}")
    return stream.astype(np.int64)


def calibration_ids(model_dir, paths, num_samples, seq_length, seed):
    random_seed = random_spec(paths)
    if random_seed is not False:
        return random_ids(model_dir, num_samples, seq_length, seed if random_seed is None else random_seed)
    if len(paths) == 1 and paths[0].endswith(".npy"):  # tokenized once (on a cluster: by one job, shared)
        stream = read_token_stream(paths[0])
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f).get("vocab_size")
        if isinstance(vocab, int) and (stream.min() < 0 or stream.max() >= vocab):
            raise StreamResizeError(f"{paths[0]}: token ids from {stream.min()} to {stream.max()}, but the model's "
                                    f"vocabulary has {vocab}: tokenized with another model's tokenizer?")
    else:
        tokenizer = load_tokenizer(model_dir)
        stream = token_stream(tokenizer, read_documents(paths))
    return sample_windows(stream, num_samples, seq_length, seed, source=", ".join(paths))
