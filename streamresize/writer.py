"""Write the output checkpoint shard by shard; the index is written last and marks completion."""

import glob
import hashlib
import json
import os
import shutil

from safetensors.torch import save_file

from .checkpoint import INDEX_NAME

MODELING_FILE = "modeling_streamresize.py"
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
                      "chat_template*", "generation_config.json", "added_tokens.json")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Temp file, fsync, rename: a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
        tmp = f"{path}.tmp"
        save_file({k: (v.to(self.dtype) if v.is_floating_point() else v).contiguous().cpu()
                   for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.out_dir)
        return file_sha256(path)

    def shard_ok(self, name, sha256):
        path = os.path.join(self.out_dir, name)
        return os.path.isfile(path) and file_sha256(path) == sha256

    def finish(self, model_dir, config, weight_map, total_size):
        """Config, modeling code and tokenizer first; the index last, as the completion marker."""
        atomic_write_json(os.path.join(self.out_dir, "config.json"), config)
        modeling = os.path.join(os.path.dirname(__file__), "modeling", MODELING_FILE)
        with open(modeling, "rb") as f:
            atomic_write_bytes(os.path.join(self.out_dir, MODELING_FILE), f.read())
        for pattern in TOKENIZER_PATTERNS:
            for src in glob.glob(os.path.join(model_dir, pattern)):
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(self.out_dir, os.path.basename(src)))
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(os.path.join(self.out_dir, INDEX_NAME), index)

    def clear_completion_marker(self):
        """A run that starts writing again must not leave an old index claiming completion."""
        path = os.path.join(self.out_dir, INDEX_NAME)
        if os.path.exists(path):
            os.remove(path)
