"""Zero-shot multiple choice scored as lm-evaluation-harness scores it, on local JSONL files.

Each record is `{"context": str, "choices": [str, ...], "label": int}`. A choice is scored by the
summed log-likelihood of " " + choice after the context (lm-eval's default target delimiter), with
the context and continuation tokenized as lm-eval's `_encode_pair` does. `acc` takes the most likely
choice; `acc_norm` divides each log-likelihood by the choice's length in characters first, as
lm-eval does, so that long choices are not penalized for having more tokens.
"""

import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from .errors import StreamResizeError

TASK_DIR = os.path.join(os.path.dirname(__file__), "tasks")
TARGET_DELIMITER = " "


def shipped_tasks():
    return sorted(f[:-len(".jsonl")] for f in os.listdir(TASK_DIR) if f.endswith(".jsonl"))


def task_path(name_or_path):
    """A task file path, or the name of a task shipped with streamresize."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(TASK_DIR, name_or_path + ".jsonl")
    if os.path.isfile(shipped):
        return shipped
    raise StreamResizeError(f"{name_or_path}: no such task file, and not a shipped task "
                            f"({', '.join(shipped_tasks())})")


def read_task(path):
    """Records of a task file, each checked; errors name the file and line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise StreamResizeError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("context"), str):
                raise StreamResizeError(f"{where}: a task record needs a string 'context'")
            choices = record.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise StreamResizeError(f"{where}: 'choices' must be a list of at least two non-empty strings")
            label = record.get("label")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise StreamResizeError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1})")
            items.append(record)
    if not items:
        raise StreamResizeError(f"{path}: no task records")
    return items


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context move to
    the continuation, the pair is tokenized whole, and the continuation is what follows the context's
    own tokens. An empty context is replaced by the BOS (or EOS) token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], encode(continuation)
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(model, requests, max_length, batch_size=8, device="cpu", desc="zero-shot"):
    """Summed log-probability of each (context ids, continuation ids) request. As in lm-eval, the pair
    is cut from the left to fit `max_length` and each choice runs in full: batches of similar-length
    requests, right-padded (a causal model's scored positions never see the padding). Sharing one
    context's KV cache across its choices was measured and was twice as slow on CPU (small matmuls)."""
    inputs = []
    for context, continuation in requests:
        if not continuation or len(continuation) > max_length:
            raise StreamResizeError(f"a choice of {len(continuation)} tokens does not fit --max-seq-length {max_length}")
        full = (context + continuation)[-(max_length + 1):]
        inputs.append((full[:-1], full[-len(continuation):]))
    scores = [0.0] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            batch = order[start:start + batch_size]
            ids = torch.zeros(len(batch), len(inputs[batch[0]][0]), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(inputs[i][0])] = torch.as_tensor(inputs[i][0])
            # The continuation's tokens are predicted at the last len(targets) positions of each row's own
            # input; the head runs only from the batch's first such position on (logits_to_keep). With a
            # 262k-token vocabulary (Gemma 3) the head over every position was most of the time.
            first = min(len(inputs[i][0]) - len(inputs[i][1]) for i in batch)
            logits = model(ids.to(device), logits_to_keep=ids.shape[1] - first).logits
            for row, i in enumerate(batch):
                source, targets = inputs[i]
                start = len(source) - len(targets) - first
                logprobs = logits[row, start:start + len(targets)].float().log_softmax(-1)
                targets = torch.as_tensor(targets, device=logprobs.device)
                scores[i] = float(logprobs.gather(-1, targets[:, None]).sum())
    return scores


def accuracy(items, scores):
    """acc and acc_norm (log-likelihood per character of the choice) with their standard errors."""
    correct, correct_norm, offset = [], [], 0
    for item in items:
        n = len(item["choices"])
        ll = np.asarray(scores[offset:offset + n])
        offset += n
        lengths = np.asarray([float(len(c)) for c in item["choices"]])
        correct.append(float(np.argmax(ll) == item["label"]))
        correct_norm.append(float(np.argmax(ll / lengths) == item["label"]))

    def stderr(values):
        return math.sqrt(np.var(values, ddof=1) / len(values)) if len(values) > 1 else float("nan")

    chance = float(np.mean([1 / len(item["choices"]) for item in items]))
    return {"acc": float(np.mean(correct)), "acc_stderr": stderr(correct),
            "acc_norm": float(np.mean(correct_norm)), "acc_norm_stderr": stderr(correct_norm),
            "items": len(items), "chance": chance}


def evaluate_task(model, tokenizer, path, max_length=2048, batch_size=8, device="cpu", limit=None):
    items = read_task(path)[:limit]
    requests = [encode_pair(tokenizer, item["context"], TARGET_DELIMITER + choice)
                for item in items for choice in item["choices"]]
    name = os.path.basename(path).rsplit(".", 1)[0]
    return accuracy(items, loglikelihoods(model, requests, max_length, batch_size, device, desc=name))
