"""Write the output checkpoint shard by shard; the index is written last and marks completion.

Nothing of the input's code is carried over: tokenizer files are copied as data (no `*.py`, and
`auto_map` is dropped from `tokenizer_config.json`), so loading an output never runs code that came
with the input checkpoint.
"""

import fnmatch
import glob
import hashlib
import json
import os
import shutil

import torch

from safetensors.torch import save_file

from .checkpoint import INDEX_NAME

from .errors import StreamResizeError
from .runtime import fault_point

MODELING_FILE = "modeling_streamresize.py"
RUN_LOG = "streamresize_run.json"  # timings and memory; the one output file that differs between runs
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
                      "chat_template*", "generation_config.json", "added_tokens.json")
# What a run writes into its output: anything else found there belongs to someone else.
OUTPUT_FILES = ("model-embed.safetensors", "model-block-*.safetensors", "model-head.safetensors", "*.tmp")
STAGING_SUFFIX = ".streamresize-new"  # a replacement output is written here and swapped in when complete
REPLACED_SUFFIX = ".streamresize-old"


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp, path):
    """The last part of every atomic write: the complete, synced temp file renamed over `path`, then
    the directory synced. Test points: STEP:tmp:NAME (temp file complete, not renamed) and
    STEP:renamed:NAME (renamed, directory not synced)."""
    name = os.path.basename(path)
    fault_point("tmp:" + name)
    os.replace(tmp, path)
    fault_point("renamed:" + name)
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write_bytes(path, data):
    """Temp file, fsync, rename: a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _umask():
    """The process's umask, read without changing it (os.umask sets it, a race with the commit thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022  # kernels before 4.7 do not show it: the common default


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tensors(path, tensors):
    """safetensors file written like every other resume file: temp file, fsync, rename."""
    save_file(tensors, f"{path}.tmp")
    fsync_file(f"{path}.tmp")
    _replace(f"{path}.tmp", path)


def count_non_finite(tensor):
    """NaN and Inf entries of a floating tensor (0 for integer ones, such as DISP index sets)."""
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def check_finite(path, tensors):
    """Refuse to write NaN or Inf: a shard of non-finite weights must never become part of an output."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = count_non_finite(tensor)
            if bad:
                raise StreamResizeError(
                    f"{path}: tensor '{name}' came out with {bad} non-finite value(s) (NaN or Inf); nothing was "
                    "written. Check the input weights and calibration text, or try another method option")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    def __init__(self, out_dir, dtype):
        self.out_dir = out_dir
        self.dtype = dtype
        os.makedirs(out_dir, exist_ok=True)

    def write_shard(self, name, tensors):
        """Save tensors atomically, floating ones cast to the output dtype (index sets stay integers);
        returns the shard's sha256."""
        path = os.path.join(self.out_dir, name)
        check_finite(path, tensors)
        tmp = f"{path}.tmp"
        save_file({k: (v.to(self.dtype) if v.is_floating_point() else v).contiguous().cpu()
                   for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; a shard is a normal file, as config.json
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
        return file_sha256(path)

    def shard_ok(self, name, sha256):
        path = os.path.join(self.out_dir, name)
        return os.path.isfile(path) and file_sha256(path) == sha256

    def finish(self, model_dir, config, weight_map, total_size, before_index=None):
        """Config, modeling code, tokenizer (and `before_index()`) first; the index last, as the
        completion marker."""
        atomic_write_json(os.path.join(self.out_dir, "config.json"), config)
        modeling = os.path.join(os.path.dirname(__file__), "modeling", MODELING_FILE)
        with open(modeling, "rb") as f:
            atomic_write_bytes(os.path.join(self.out_dir, MODELING_FILE), f.read())
        copy_tokenizer_files(model_dir, self.out_dir)
        if before_index is not None:
            before_index()
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(os.path.join(self.out_dir, INDEX_NAME), index)

    def remove_temp_files(self):
        """Temp files of writes a kill interrupted: never part of an output."""
        for path in glob.glob(os.path.join(self.out_dir, "*.tmp")):
            os.remove(path)

    def clear_completion_marker(self):
        """A run that starts writing again must not leave an old index claiming completion."""
        path = os.path.join(self.out_dir, INDEX_NAME)
        if os.path.exists(path):
            os.remove(path)


def copy_tokenizer_files(model_dir, out_dir):
    """The tokenizer as data: code files are skipped and `auto_map` entries dropped, so the output
    never imports the input's custom tokenizer code."""
    for pattern in TOKENIZER_PATTERNS:
        for src in sorted(glob.glob(os.path.join(model_dir, pattern))):
            name = os.path.basename(src)
            if not os.path.isfile(src) or name.endswith((".py", ".pyc")):
                continue
            dst = os.path.join(out_dir, name)
            if name == "tokenizer_config.json":
                try:
                    with open(src) as f:
                        config = json.load(f)
                except ValueError as e:
                    raise StreamResizeError(f"{src}: not valid JSON ({e})") from e
                if isinstance(config, dict) and "auto_map" in config:
                    config.pop("auto_map")
                    atomic_write_json(dst, config)
                    continue
            shutil.copyfile(src, dst)
            fault_point("copied:" + name)


class OutputDir:
    """The states an output directory can be found in before a run writes to it."""

    def __init__(self, path):
        self.path = path
        self.staging_path = path.rstrip(os.sep) + STAGING_SUFFIX
        self.replaced_path = path.rstrip(os.sep) + REPLACED_SUFFIX

    def finished_signature(self):
        """The run signature of a finished streamresize output here, else None."""
        if not os.path.exists(os.path.join(self.path, INDEX_NAME)):
            return None
        try:
            with open(os.path.join(self.path, RUN_LOG)) as f:
                return json.load(f).get("signature", {})
        except (OSError, ValueError):
            return {}

    def foreign_files(self):
        """Entries a run of ours would not have written in the course of an unfinished run."""
        if not os.path.isdir(self.path):
            return []
        return sorted(name for name in os.listdir(self.path)
                      if not any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_FILES))

    def swap_in(self, staging):
        """Replace this (old) output by the complete one in `staging`: rename, rename, then delete."""
        os.rename(self.path, self.replaced_path)
        fault_point("swap:old-aside")  # test point: no output at all for a moment
        os.rename(staging, self.path)
        fault_point("swap:new-in-place")  # test point: the old output not yet deleted
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        shutil.rmtree(self.replaced_path)

    def finish_interrupted_swap(self):
        """A kill between the two renames of `swap_in` leaves no output, the new one complete in
        staging and the old one set aside: finish the swap."""
        if not os.path.exists(self.path) and os.path.exists(os.path.join(self.staging_path, INDEX_NAME)):
            os.rename(self.staging_path, self.path)
        if os.path.exists(os.path.join(self.path, INDEX_NAME)) and os.path.isdir(self.replaced_path):
            shutil.rmtree(self.replaced_path)
