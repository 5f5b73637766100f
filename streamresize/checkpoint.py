"""Read a Hugging Face checkpoint directory one tensor at a time, never the whole model.

Tensors are read with plain file reads into fresh buffers (pinned ones when they go on to a GPU), not
through a memory map: a 13 GB checkpoint then never shows up in this process's resident memory.
"""

import hashlib
import json
import os
import struct

import torch

from .errors import StreamResizeError

INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SUPPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors_header(path):
    """The JSON header of a safetensors file, read without touching the tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise StreamResizeError(f"{path}: truncated safetensors file (no header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise StreamResizeError(f"{path}: not a safetensors file (header length {length})")
            header = f.read(length)
        return json.loads(header)
    except (OSError, ValueError) as e:
        raise StreamResizeError(f"{path}: cannot read safetensors header: {e}") from e


def header_length(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


class CheckpointReader:
    """Tensors by name from `model.safetensors` or sharded `model-*-of-*.safetensors` + index."""

    def __init__(self, model_dir):
        self.model_dir = os.path.abspath(model_dir)
        config_path = os.path.join(self.model_dir, "config.json")
        if not os.path.isdir(self.model_dir):
            raise StreamResizeError(f"{self.model_dir}: not a directory")
        if not os.path.isfile(config_path):
            raise StreamResizeError(f"{config_path}: missing; a model directory needs config.json")
        try:
            with open(config_path) as f:
                self.config = json.load(f)
        except ValueError as e:
            raise StreamResizeError(f"{config_path}: not valid JSON: {e}") from e
        self.weight_map = self._weight_map()
        self.headers = {}
        for shard in sorted(set(self.weight_map.values())):
            self.headers[shard] = read_safetensors_header(os.path.join(self.model_dir, shard))
        for name, shard in self.weight_map.items():
            info = self.headers[shard].get(name)
            if info is None:
                raise StreamResizeError(f"{os.path.join(self.model_dir, shard)}: index lists '{name}' but the shard lacks it")
            if info["dtype"] not in SUPPORTED_DTYPES and info["dtype"] not in INTEGER_DTYPES:
                raise StreamResizeError(
                    f"{os.path.join(self.model_dir, shard)}: tensor '{name}' has dtype {info['dtype']}; "
                    f"supported: {', '.join(SUPPORTED_DTYPES)}")
        self._data_start = {}

    def _weight_map(self):
        index_path = os.path.join(self.model_dir, INDEX_NAME)
        single_path = os.path.join(self.model_dir, SINGLE_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise StreamResizeError(f"{index_path}: not a safetensors index ({e})") from e
            for shard in set(weight_map.values()):
                if not os.path.isfile(os.path.join(self.model_dir, shard)):
                    raise StreamResizeError(f"{os.path.join(self.model_dir, shard)}: listed in {INDEX_NAME} but missing")
            return dict(weight_map)
        if os.path.isfile(single_path):
            header = read_safetensors_header(single_path)
            return {name: SINGLE_NAME for name in header if name != "__metadata__"}
        raise StreamResizeError(
            f"{self.model_dir}: no {SINGLE_NAME} or {INDEX_NAME}; streamresize reads safetensors checkpoints")

    def has(self, name):
        return name in self.weight_map

    def shape(self, name):
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    @property
    def dtype(self):
        """The checkpoint's storage dtype (of its first tensor)."""
        first = next(iter(sorted(self.weight_map)))
        return SUPPORTED_DTYPES[self.headers[self.weight_map[first]][first]["dtype"]]

    def nbytes(self, name):
        start, end = self.headers[self.weight_map[name]][name]["data_offsets"]
        return end - start

    def location(self, name):
        """(shard path, byte offset, byte length) of a tensor's data."""
        if name not in self.weight_map:
            raise StreamResizeError(f"{self.model_dir}: tensor '{name}' not found in the checkpoint")
        shard = self.weight_map[name]
        path = os.path.join(self.model_dir, shard)
        if shard not in self._data_start:
            self._data_start[shard] = 8 + header_length(path)
        start, end = self.headers[shard][name]["data_offsets"]
        return path, self._data_start[shard] + start, end - start

    def read(self, name, pin=False):
        """The tensor as stored (dtype and shape), read straight from the shard file."""
        path, start, length = self.location(name)
        buffer = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buffer.numpy()))
        if got != length:
            raise StreamResizeError(f"{path}: truncated: tensor '{name}' needs {length} bytes, found {got}")
        info = self.headers[self.weight_map[name]][name]
        return buffer.view(SUPPORTED_DTYPES[info["dtype"]]).reshape(info["shape"])

    def get(self, name, dtype=None, device="cpu"):
        tensor = self.read(name)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def signature(self):
        """Hash of config.json and every shard header: identifies the input without reading weights."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for shard in sorted(self.headers):
            h.update(shard.encode())
            h.update(json.dumps(self.headers[shard], sort_keys=True).encode())
        return h.hexdigest()

    def parameter_count(self):
        """Total parameters as stored (a tied tensor is stored, and so counted, once). Integer tensors
        (DISP index sets) are indices, not parameters, and are not counted."""
        total = 0
        for name, shard in self.weight_map.items():
            if self.headers[shard][name]["dtype"] in INTEGER_DTYPES:
                continue
            n = 1
            for s in self.headers[shard][name]["shape"]:
                n *= s
            total += n
        return total

    def close(self):
        self._data_start.clear()


def parameter_count(model_dir):
    return CheckpointReader(model_dir).parameter_count()
