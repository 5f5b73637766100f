"""Held-out perplexity on local text, in fixed non-overlapping windows."""

import math

import torch

from .calibration import consecutive_windows, load_tokenizer, read_documents, token_stream
from .checkpoint import parameter_count


def perplexity(model, windows, batch_size=8, device="cpu"):
    """exp(mean next-token negative log-likelihood) over all windows; returns (ppl, tokens)."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[start:start + batch_size], device=device)
            logits = model(ids).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens), total_tokens


def evaluate(model_dir, datasets, max_seq_length=2048, num_samples=None, batch_size=8, device="cpu"):
    from .loading import load_model

    tokenizer = load_tokenizer(model_dir)
    windows = consecutive_windows(token_stream(tokenizer, read_documents(datasets)), max_seq_length, num_samples)
    model = load_model(model_dir, device=device)
    ppl, tokens = perplexity(model, windows, batch_size, device)
    return {"model": model_dir, "perplexity": ppl, "tokens": tokens, "windows": len(windows),
            "max_seq_length": max_seq_length, "parameters": parameter_count(model_dir)}
