"""Held-out perplexity on local text, in fixed windows: non-overlapping, or every `stride` tokens
with only the tokens no earlier window scored counted (more context per scored token)."""

import hashlib
import json
import logging
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from .calibration import load_tokenizer, read_documents, token_stream
from .checkpoint import parameter_count
from .writer import RUN_LOG
from .errors import StreamResizeError
from .loading import load_model
from .zeroshot import evaluate_task, task_path

log = logging.getLogger("streamresize")
EVAL_RESULT = "streamresize_eval.json"


def strided_windows(stream, seq_length, stride=None, num_samples=None):
    """(windows, first_target): windows of `seq_length` tokens starting every `stride` tokens (default:
    non-overlapping), and for each the first position whose token is scored; a later window scores
    only the last `stride` tokens, those the previous window did not reach."""
    stride = seq_length if stride is None else stride
    if not 1 <= stride <= seq_length:
        raise StreamResizeError(f"--stride {stride}: must be between 1 and --max-seq-length {seq_length}")
    count = (len(stream) - seq_length) // stride + 1 if len(stream) >= seq_length else 0
    if num_samples is not None:
        count = min(count, num_samples)
    if count <= 0:
        raise StreamResizeError(f"evaluation text has {len(stream)} tokens, fewer than one window of {seq_length}")
    windows = np.stack([stream[w * stride:w * stride + seq_length] for w in range(count)])
    first_target = np.full(count, max(1, seq_length - stride), dtype=np.int64)
    first_target[0] = 1
    return windows, first_target


def perplexity(model, windows, first_target=None, batch_size=8, device="cpu"):
    """exp(mean next-token negative log-likelihood) over the scored tokens; returns (ppl, tokens)."""
    if first_target is None:
        first_target = np.ones(len(windows), dtype=np.int64)
    total_nll, total_tokens = 0.0, 0
    positions = torch.arange(windows.shape[1], device=device)
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", leave=False):
            ids = torch.as_tensor(windows[start:start + batch_size], device=device)
            first = torch.as_tensor(first_target[start:start + batch_size], device=device)
            logits = model(ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            scored = positions[None, 1:] >= first[:, None]
            total_nll += float(nll[scored].sum())
            total_tokens += int(scored.sum())
    return math.exp(total_nll / total_tokens), total_tokens


def evaluate_perplexity(model, tokenizer, datasets, max_seq_length=2048, stride=None, num_samples=None,
                        batch_size=8, device="cpu"):
    windows, first_target = strided_windows(token_stream(tokenizer, read_documents(datasets)), max_seq_length,
                                            stride, num_samples)
    ppl, tokens = perplexity(model, windows, first_target, batch_size, device)
    return {"perplexity": ppl, "tokens": tokens, "windows": len(windows), "max_seq_length": max_seq_length,
            "stride": stride or max_seq_length, "dataset": list(datasets)}


def recorded(model_dir):
    """What the model directory says about itself: method and source, for streamresize outputs."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise StreamResizeError(f"{config_path}: missing; not a model directory")
    with open(config_path, "rb") as f:
        raw = f.read()
    info = json.loads(raw).get("streamresize") or {}
    run_path = os.path.join(model_dir, RUN_LOG)
    run = {}
    if os.path.isfile(run_path):
        with open(run_path) as f:
            run = json.load(f)
    return {"method": info.get("method", "dense"), "source_parameters": info.get("source_parameters"),
            "source": run.get("source"), "config_sha256": hashlib.sha256(raw).hexdigest()}


def default_output(model_dir):
    """streamresize_eval.json inside a streamresize output, where `report` looks; None for other models
    (their directories are left untouched)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        is_output = "streamresize" in json.load(f)
    return os.path.join(model_dir, EVAL_RESULT) if is_output else None


def evaluate(model_dir, datasets=None, max_seq_length=2048, num_samples=None, batch_size=8, device="cpu", *,
             stride=None, tasks=(), limit=None, lm_eval_tasks=(), lm_eval_include=None, speed=None, baseline=None):
    """Load the model once and measure what was asked: perplexity on `datasets`, accuracy on zero-shot
    `tasks`, lm-eval `lm_eval_tasks`, and with `speed` (keyword options of speed.compare_speed) its
    speed against `baseline` or the source model the output recorded."""
    if not (datasets or tasks or lm_eval_tasks or speed is not None):
        raise StreamResizeError("nothing to evaluate: pass --dataset, --tasks, --lm-eval or --speed")
    paths = [task_path(t) for t in tasks]
    about = recorded(model_dir)
    source_dir = _speed_source(baseline, about["source"]) if speed is not None else None
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    result = {"model": os.path.abspath(model_dir), "parameters": parameter_count(model_dir),
              **{k: v for k, v in about.items() if v is not None}}
    if datasets:
        result.update(evaluate_perplexity(model, tokenizer, datasets, max_seq_length, stride, num_samples, batch_size,
                                          device))
    if paths:
        result["zeroshot"] = {os.path.basename(p).rsplit(".", 1)[0]: evaluate_task(
            model, tokenizer, p, max_seq_length, batch_size, device, limit) for p in paths}
    if lm_eval_tasks:
        from .harness import run_lm_eval

        result["lm_eval"] = run_lm_eval(model, tokenizer, lm_eval_tasks, lm_eval_include, limit, batch_size)
    if speed is not None:
        from .speed import compare_speed

        models = {"model": model}
        if source_dir is not None:
            models["source"] = load_model(source_dir, device=device)
        result["speed"] = compare_speed(models, model.config.vocab_size, reference=list(models)[-1], device=device,
                                        **speed)
        if source_dir is not None:
            result["speed"]["source"] = os.path.abspath(source_dir)
    return result


def _speed_source(baseline, recorded_source):
    """The model to compare speed against: --baseline, else the source the output recorded, else none."""
    if baseline is None and recorded_source is None:
        log.warning("no source model recorded and no --baseline: measuring this model alone")
        return None
    source_dir = baseline or recorded_source
    if not os.path.isfile(os.path.join(source_dir, "config.json")):
        what = "--baseline" if baseline else "the source model recorded in streamresize_run.json"
        raise StreamResizeError(f"{source_dir}: {what} is not a model directory (no config.json)"
                                + ("" if baseline else "; pass --baseline DIR"))
    return source_dir


def save_result(result, path):
    """Write the eval JSON; results of an earlier eval of the same checkpoint (same config.json) that
    this run did not measure again are kept, so `eval --dataset` then `eval --speed` build one file."""
    merged = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                earlier = json.load(f)
        except ValueError:
            earlier = {}
        if earlier.get("config_sha256") == result.get("config_sha256"):
            merged = earlier
    merged.update(result)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return merged


def format_table(result):
    """The terminal summary of an eval result."""
    lines = [f"model        {result['model']}"]
    params = f"parameters   {result['parameters']:,}"
    if result.get("source_parameters"):
        params += f" ({result['parameters'] / result['source_parameters']:.1%} of {result['source_parameters']:,})"
    lines.append(params)
    if "perplexity" in result:
        lines.append(f"perplexity   {result['perplexity']:.3f}  ({result['windows']} windows x "
                     f"{result['max_seq_length']} tokens, stride {result['stride']}, {result['tokens']:,} tokens scored)")
    for task, r in (result.get("zeroshot") or {}).items():
        lines.append(f"zero-shot    {task}: acc {r['acc']:.3f} ± {r['acc_stderr']:.3f}, acc_norm {r['acc_norm']:.3f} "
                     f"± {r['acc_norm_stderr']:.3f}  ({r['items']} items, chance {r['chance']:.3f})")
    for task, metrics in (result.get("lm_eval") or {}).items():
        lines.append(f"lm-eval      {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    speed = result.get("speed")
    if speed:
        lines.append(f"speed        {speed['device']}, batch {speed['batch_size']}, prompt {speed['prompt_length']}, "
                     f"{speed['new_tokens']} new tokens, median of {speed['repeats']}, {speed['threads']} threads")
        lines.append(f"  {'':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MB':>9} {'weights MB':>11}")
        for label, s in speed["models"].items():
            line = (f"  {label:8} {s['prefill_tokens_per_s']:14.1f} {_number(s['decode_tokens_per_s'], 1):>13} "
                    f"{_number(s['peak_memory_mb'], 0):>9} {s['weights_mb']:11.0f}")
            if label != speed["reference"]:
                line += "  vs " + speed["reference"] + ": " + ", ".join(
                    f"{name} x{s[key]:.2f}" for name, key in (("prefill", "prefill_ratio"), ("decode", "decode_ratio"),
                                                             ("memory", "memory_ratio")) if key in s)
            lines.append(line)
    return "\n".join(lines)


def _number(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"
