"""The shipped modeling file uses no deprecated transformers API, and generate() really uses its KV cache.

transformers deprecates in two ways: `warnings.warn(..., FutureWarning)` from `deprecate_kwarg` (e.g.
`past_key_values=` renamed to `cache=` for create_causal_mask and the attention modules), and
`logger.warning_once(...)` (e.g. output classes built or read with `past_key_values`). Both are captured
with the call stack at the moment they are emitted, and attributed to the innermost caller outside
torch, transformers and the standard library: a deprecation whose caller is the modeling file fails the
test; any other one (transformers internals) is re-emitted as a UserWarning so it shows in pytest's
warnings summary instead of being hidden.
"""

import dataclasses
import logging
import os
import sys
import sysconfig
import traceback
import warnings

import pytest
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

import streamresize
from streamresize.modeling import modeling_streamresize
from streamresize.modeling.modeling_streamresize import StreamResizeConfig, StreamResizeForCausalLM

MODELING_FILE = os.path.basename(modeling_streamresize.__file__)
LIBRARY_DIRS = tuple(os.path.realpath(p) + os.sep for p in {
    os.path.dirname(torch.__file__), os.path.dirname(transformers.__file__),
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Where outputs keep the KV cache in this transformers version (the old name is a deprecated alias).
OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                      else "past_key_values")


def _is_ours(filename):
    return os.path.basename(filename) == MODELING_FILE  # also a copy loaded through trust_remote_code


def _caller(stack):
    """The innermost frame outside the libraries (and this file's hooks): whose call led to the message."""
    for frame in reversed(stack):
        path = os.path.realpath(frame.filename)
        if frame.filename.startswith("<") or path.startswith(LIBRARY_DIRS):
            continue
        if path == os.path.realpath(__file__) and frame.name in ("showwarning", "emit"):
            continue
        return frame
    return None


class _Capture(logging.Handler):
    """Warnings and transformers log records, each with the frame that caused it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.warnings, self.records = [], []

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        self.warnings.append((category, str(message), filename, lineno, _caller(traceback.extract_stack())))

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage(), record.pathname, record.lineno,
                             _caller(traceback.extract_stack())))

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self.showwarning
        for once in (getattr(logging.Logger, "warning_once", None), getattr(logging.Logger, "info_once", None)):
            if hasattr(once, "cache_clear"):  # messages already logged once in this process would be skipped
                once.cache_clear()
        self._logger = hf_logging.get_logger("transformers")
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._warnings.__exit__(*exc)

    def check(self):
        """Fail on deprecations caused by the modeling file; surface everything else from libraries."""
        ours, theirs = [], []
        for category, message, filename, lineno, caller in self.warnings:
            where = f"{category.__name__} at {filename}:{lineno}" + (
                f" (called from {caller.filename}:{caller.lineno})" if caller else "")
            if issubclass(category, DEPRECATIONS) and (_is_ours(filename) or (caller and _is_ours(caller.filename))):
                ours.append(f"{where}: {message}")
            else:
                theirs.append(f"{where}: {message}")
        for level, message, pathname, lineno, caller in self.records:
            where = f"transformers log {level} at {pathname}:{lineno}" + (
                f" (called from {caller.filename}:{caller.lineno})" if caller else "")
            if "deprecat" in message.lower() and caller and _is_ours(caller.filename):
                ours.append(f"{where}: {message}")
            elif level in ("WARNING", "ERROR", "CRITICAL") or "deprecat" in message.lower():
                theirs.append(f"{where}: {message}")
        for line in dict.fromkeys(theirs):
            warnings.warn(f"from library internals, not the modeling file: {line}", UserWarning, stacklevel=2)
        assert not ours, "deprecated transformers API used by the modeling file:\n" + "\n".join(ours)


def _config(kind):
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "narrowed":
        return StreamResizeConfig(**common, residual_widths=[24, 20, 16, 20, 20], intermediate_sizes=[40, 36],
                                  shortcuts=[[True, True], [True, False]])
    if kind == "head-adapter":
        return StreamResizeConfig(**common, residual_widths=[24, 20, 16, 20, 12], intermediate_sizes=[40, 36],
                                  shortcuts=[[True, True], [True, True]], head_adapter=True, tie_word_embeddings=True)
    return StreamResizeConfig(**common, disp_widths=[[32, 20, 28, 40, 32], [16, 32, 24, 30, 20]])


def _model(config):
    torch.manual_seed(0)
    model = StreamResizeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so that greedy tokens depend on context
            p.normal_(0, 0.4)
    return model


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return ids


@pytest.mark.parametrize("kind", ["narrowed", "head-adapter", "disp"])
def test_forward_and_generate_use_no_deprecated_api(kind):
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    with _Capture() as capture:
        model = _model(_config(kind))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            # the cache under its current name, as generate() passes it
            step = model(ids[:, :1], cache=getattr(out, OUTPUT_CACHE_FIELD), use_cache=True)
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    capture.check()
    assert out.logits.shape == (2, 6, 61) and torch.isfinite(step.logits).all()
    # generate() passes the cache as `cache=`: it must reach the layers, so cached decoding is exact.
    assert torch.equal(generated, _greedy_without_cache(model, ids, 5))


def test_cache_under_either_name_gives_the_same_logits():
    """`past_key_values=` (older transformers' generate(), existing callers) still works and is the same cache."""
    model = _model(_config("narrowed"))
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        old_cache = getattr(model(ids[:, :4], use_cache=True), OUTPUT_CACHE_FIELD)
        new_cache = getattr(model(ids[:, :4], use_cache=True), OUTPUT_CACHE_FIELD)
        old = model(ids[:, 4:], past_key_values=old_cache, use_cache=True).logits
        new = model(ids[:, 4:], cache=new_cache, use_cache=True).logits
    assert torch.equal(old, new)
    assert torch.allclose(new, full[:, 4:], atol=1e-5)


def test_saved_and_loaded_model_uses_no_deprecated_api(tmp_path):
    """The same through save_pretrained and streamresize.load (the registered Auto classes)."""
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(3))
    model = _model(_config("narrowed"))
    model.save_pretrained(tmp_path)
    with _Capture() as capture:
        loaded = streamresize.load(str(tmp_path))
        with torch.no_grad():
            logits = loaded(ids).logits
            loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    capture.check()
    with torch.no_grad():
        assert torch.equal(logits, model(ids).logits)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
