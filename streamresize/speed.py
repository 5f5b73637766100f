"""Inference speed and memory of a model beside its source model: same process, same device, same
prompt, runs interleaved so that a busy machine slows both alike; medians of several runs.

Prefill: one forward over a prompt of `prompt_length` tokens (batch `batch_size`), building the KV
cache. Decode: `new_tokens` greedy steps, one token per sequence each, reading that cache. Peak
memory: the model's weights plus the most memory the run held above what was in use before it
(on CUDA the allocator's peak; on CPU the process's peak resident set, reset before each run).
"""

import ctypes
import gc
import statistics
import time

import torch
from tqdm import tqdm


RATIOS = {"prefill_ratio": "prefill_tokens_per_s", "decode_ratio": "decode_tokens_per_s",
          "memory_ratio": "peak_memory_mb"}


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


class PeakMemory:
    """Peak memory (MB) held during a `with` block above the level at its start; None where the
    platform cannot tell (CPU outside Linux)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the start level is honest
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set, to the current resident set
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            self.peak_mb = _status_mb("VmHWM") - self.start
        return False


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def weights_mb(model):
    tensors = list(model.parameters()) + list(model.buffers())
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # tied tensors once
    return sum(unique.values()) / 2**20


def _cache_keyword(model):
    """`cache` where transformers renamed `past_key_values` (deprecated, to be removed), else the old name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    """The KV cache of a model output under its current field name, without touching the deprecated alias."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output["cache"] if "cache" in fields and output.get("cache") is not None else output.past_key_values


def measure_once(model, prompt, new_tokens, device):
    """(prefill seconds, decode seconds, peak working memory MB) of one greedy generation."""
    with torch.no_grad(), PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
        cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        del out
        keyword = _cache_keyword(model)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, **{keyword: cache}, use_cache=True)
            cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - start
        del cache, out
    return prefill, decode, memory.peak_mb


def compare_speed(models, vocab_size, reference=None, batch_size=1, prompt_length=128, new_tokens=32, repeats=5,
                  device="cpu", seed=0):
    """Speed of each model of `models` ({label: model}) on one random prompt, measured interleaved after
    one warm-up run each, with ratios to the `reference` label (default: the first)."""
    reference = reference or next(iter(models))
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_length),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    for model in models.values():
        measure_once(model, prompt, min(new_tokens, 2), device)
    runs = {label: [] for label in models}
    for _ in tqdm(range(repeats), desc="speed", unit="round", leave=False):
        for label, model in models.items():
            runs[label].append(measure_once(model, prompt, new_tokens, device))
    results = {}
    for label, model in models.items():
        prefill = statistics.median(r[0] for r in runs[label])
        decode = statistics.median(r[1] for r in runs[label])
        working = [r[2] for r in runs[label] if r[2] is not None]
        weights = weights_mb(model)
        results[label] = {
            "runs_s": [[round(r[0], 6), round(r[1], 6)] for r in runs[label]],  # (prefill, decode): the spread
            "prefill_tokens_per_s": batch_size * prompt_length / prefill,
            "decode_tokens_per_s": batch_size * new_tokens / decode if new_tokens else None,
            "weights_mb": weights,
            "peak_memory_mb": weights + max(working) if working else None,
        }
    for speed in results.values():
        for ratio, key in RATIOS.items():
            if speed[key] is not None and results[reference][key]:
                speed[ratio] = speed[key] / results[reference][key]
    return {"device": str(device), "threads": torch.get_num_threads(), "reference": reference,
            "batch_size": batch_size, "prompt_length": prompt_length, "new_tokens": new_tokens, "repeats": repeats,
            "models": results}
