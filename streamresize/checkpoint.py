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
ITEM_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
              "I64": 8, "U64": 8}
CONVERT_HINT = ("convert the checkpoint to float32, bfloat16 or float16 first (e.g. load it with transformers and "
                "save_pretrained it with dtype=torch.bfloat16); a quantized checkpoint must be de-quantized first")


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

    def __init__(self, model_dir, check=True):
        """Reads config.json and every shard's header (no tensor data). Refuses, naming the file and
        tensor: unsupported dtypes, and shards shorter than their headers say (truncated). With `check`,
        a checkpoint of a family streamresize compresses is also checked against its config.json before
        any weight is read: no quantization_config, floating-point block weights, and every tensor's
        shape (`check_shapes`)."""
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
        if not isinstance(self.config, dict):
            raise StreamResizeError(f"{config_path}: not a JSON object")
        self.weight_map = self._weight_map()
        self.headers = {}
        self._data_start = {}
        for shard in sorted(set(self.weight_map.values())):
            path = os.path.join(self.model_dir, shard)
            self.headers[shard] = read_safetensors_header(path)
            self._data_start[shard] = 8 + header_length(path)
        for name, shard in self.weight_map.items():
            info = self.headers[shard].get(name)
            if info is None:
                raise StreamResizeError(f"{os.path.join(self.model_dir, shard)}: index lists '{name}' but the shard lacks it")
            if not isinstance(info, dict) or "dtype" not in info or "shape" not in info or "data_offsets" not in info:
                raise StreamResizeError(f"{os.path.join(self.model_dir, shard)}: header entry of '{name}' is not "
                                        "a safetensors tensor (dtype, shape, data_offsets)")
            if info["dtype"] not in SUPPORTED_DTYPES and info["dtype"] not in INTEGER_DTYPES:
                raise StreamResizeError(
                    f"{os.path.join(self.model_dir, shard)}: tensor '{name}' has dtype {info['dtype']}; "
                    f"supported: {', '.join(SUPPORTED_DTYPES)}; {CONVERT_HINT}")
        self._check_extents()
        if check:
            self.check_source()

    def _check_extents(self):
        """Every tensor's bytes lie inside its shard and match its shape: a truncated shard (an
        interrupted download or copy) is refused now, from the headers and the file sizes, not when
        its tensor is read after hours of work."""
        for shard, header in sorted(self.headers.items()):
            path = os.path.join(self.model_dir, shard)
            size = os.path.getsize(path)
            for name, info in sorted(header.items()):
                if name == "__metadata__" or not isinstance(info, dict) or "data_offsets" not in info:
                    continue
                try:
                    start, end = (int(v) for v in info["data_offsets"])
                    count = 1
                    for dim in info["shape"]:
                        count *= int(dim)
                except (TypeError, ValueError):
                    raise StreamResizeError(f"{path}: header entry of '{name}' has malformed shape or "
                                            "data_offsets") from None
                item = ITEM_SIZES.get(info.get("dtype"))
                if item is not None and end - start != count * item:
                    raise StreamResizeError(
                        f"{path}: tensor '{name}' has shape {list(info['shape'])} ({info['dtype']}, "
                        f"{count * item} bytes) but data_offsets [{start}, {end}] hold {end - start} bytes; "
                        "the shard's header is corrupt")
                if self._data_start[shard] + end > size:
                    raise StreamResizeError(
                        f"{path}: truncated: tensor '{name}' ends at byte {self._data_start[shard] + end} but the "
                        f"file has {size} bytes; download or copy the checkpoint again")

    def check_source(self):
        """For a checkpoint whose config.json names a family streamresize compresses (arch/): refuse a
        quantized checkpoint, integer block weights and any tensor shape config.json contradicts. Other
        checkpoints (streamresize outputs, unsupported families) are not checked here."""
        from .arch import specs

        architectures = self.config.get("architectures") or []
        spec = next((s for s in specs() if any(a in s.architectures for a in architectures)), None)
        if spec is None:
            return
        config_path = os.path.join(self.model_dir, "config.json")
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"]
            method = method.get("quant_method", "unknown") if isinstance(method, dict) else "unknown"
            raise StreamResizeError(
                f"{config_path}: a quantized checkpoint (quantization_config, quant_method {method}); "
                "streamresize reads float32, bfloat16 or float16 weights: de-quantize it first (e.g. load it "
                "with transformers, call model.dequantize() and save_pretrained it), then compress the result")
        self.check_shapes(self.config, spec)

    def check_shapes(self, config, spec):
        """Every tensor a block, the embedding, the final norm and the head are read from exists, is
        floating point and has the shape config.json implies (hidden_size, intermediate_size, heads x
        head_dim, kv heads x head_dim, vocab_size); no block beyond num_hidden_layers. Headers only."""
        config_path = os.path.join(self.model_dir, "config.json")
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamResizeError(f"{config_path}: {key} is {value!r}; expected a whole number above 0")
        for key in ("head_dim", "num_key_value_heads"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise StreamResizeError(f"{config_path}: {key} is {value!r}; expected a whole number above 0")
        hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        layers = config["num_hidden_layers"]
        dims = {"hidden": (hidden, f"hidden_size {hidden}"),
                "inter": (inter, f"intermediate_size {inter}"),
                "q": (heads * head_dim, f"num_attention_heads {heads} x head_dim {head_dim}"),
                "kv": (kv_heads * head_dim, f"num_key_value_heads {kv_heads} x head_dim {head_dim}"),
                "vocab": (vocab, f"vocab_size {vocab}"), "head_dim": (head_dim, f"head_dim {head_dim}")}
        # The roles of a Llama-layout block (every family in arch/ has it): q reads hidden into heads x
        # head_dim, k and v into kv heads x head_dim, o writes back; gate and up widen to the
        # intermediate size, down narrows back.
        q, *kv = spec.attn_readers
        block = {spec.attn_norm: ("hidden",), spec.mlp_norm: ("hidden",), q: ("q", "hidden"),
                 **{role: ("kv", "hidden") for role in kv}, spec.attn_writer: ("hidden", "q"),
                 **{role: ("inter", "hidden") for role in spec.mlp_readers}, spec.mlp_writer: ("hidden", "inter")}
        expected = {spec.embedding: ("vocab", "hidden"), spec.final_norm: ("hidden",)}
        if self.has(spec.head):
            expected[spec.head] = ("vocab", "hidden")
        for name, parts in spec.fused:  # a fused tensor: its parts' rows stacked (Phi-3's qkv_proj, gate_up_proj)
            dims[name] = (sum(dims[block[p][0]][0] for p in parts), " + ".join(dims[block[p][0]][1] for p in parts))
            for p in parts:
                del block[p]
            block[name] = (name, "hidden")
        for name in spec.extra_tensors:  # reader biases (q or kv rows), per-head norms (head_dim), kept norms
            block[name] = (spec.extra_dimension(name),)
        for i in range(layers):
            for role, shape in block.items():
                expected[spec.block_name(i, role) + ("" if role in spec.extra_tensors else ".weight")] = shape
        for name, shape in expected.items():
            if not self.has(name):
                raise StreamResizeError(
                    f"{self.model_dir}: the checkpoint lacks '{name}', which config.json (num_hidden_layers "
                    f"{layers}) implies")
            shard = self.weight_map[name]
            info = self.headers[shard][name]
            where = os.path.join(self.model_dir, shard)
            if info["dtype"] not in SUPPORTED_DTYPES:
                raise StreamResizeError(
                    f"{where}: tensor '{name}' has dtype {info['dtype']}, an integer weight (a quantized "
                    f"checkpoint?); supported: {', '.join(SUPPORTED_DTYPES)}; {CONVERT_HINT}")
            want = [dims[d][0] for d in shape]
            if list(info["shape"]) != want:
                meaning = ", ".join(dict.fromkeys(dims[d][1] for d in shape))
                raise StreamResizeError(
                    f"{where}: tensor '{name}' has shape {list(info['shape'])}, but config.json ({meaning}) "
                    f"implies {want}; the checkpoint and its config.json do not belong together")
        prefix, _, _ = spec.block.partition("{i}")
        for name in sorted(self.weight_map):
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                if index.isdigit() and int(index) >= layers:
                    raise StreamResizeError(
                        f"{os.path.join(self.model_dir, self.weight_map[name])}: the checkpoint holds '{name}', "
                        f"but config.json says num_hidden_layers {layers}")

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
    """Parameters as stored, from headers only; any checkpoint (also one streamresize would not compress)."""
    return CheckpointReader(model_dir, check=False).parameter_count()
