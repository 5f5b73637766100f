#!/usr/bin/env python
"""Write a random-weight Llama checkpoint with the exact tensor shapes of a real model, as sharded
bf16 safetensors, without ever holding the model (or even one whole tensor) in memory.

  python tools/make_synthetic.py --shape 7b --out /work/big/llama2-7b-shaped
  streamresize compress /work/big/llama2-7b-shaped OUT --dataset random --method prune ...

Shapes: 1b (TinyLlama-1.1B), 7b (Llama-2-7B), 13b (Llama-2-13B), tiny (for tests). No tokenizer is
written; calibrate with `--dataset random` (uniform random token ids). Weights are N(0, 0.02)
(Hugging Face's initializer range), norms are ones; each tensor has its own seed, so a tensor's
values do not depend on the shard size.
"""

import argparse
import json
import math
import os
import struct
import sys
import zlib

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}
STD = 0.02
CHUNK_ELEMENTS = 1 << 24  # rows are generated in chunks of about this many values (64 MB in float32)


def tensor_shapes(shape):
    """(name, shape) of every tensor, in the order Hugging Face writes a Llama checkpoint."""
    d, ff, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = d // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    tensors = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                    (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                    (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                    (p + "mlp.down_proj.weight", (d, ff))]
    return tensors + [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def shard_plan(tensors, max_bytes):
    """Consecutive tensors grouped into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current] if current else shards


def header_bytes(group):
    """The safetensors header: JSON with contiguous data offsets, padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        end = offset + 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tensor(f, name, shape, seed):
    """Stream one tensor's bf16 bytes, generated a chunk of rows at a time."""
    import torch

    if len(shape) == 1:
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    rows, cols = shape
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = torch.randn(min(step, rows - start), cols, generator=generator).mul_(STD).to(torch.bfloat16)
        f.write(chunk.view(torch.uint8).numpy().data)


def write_config(out, shape):
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--layers", type=int, help="keep only this many decoder blocks (quick runs)")
    p.add_argument("--shard-size", default="4GB", help="largest shard, e.g. 4GB or 500MB (default 4GB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if os.path.exists(os.path.join(args.out, "model.safetensors.index.json")):
        sys.exit(f"{args.out}: already holds a checkpoint")
    os.makedirs(args.out, exist_ok=True)
    from streamresize.placement import parse_size

    shards = shard_plan(tensor_shapes(shape), parse_size(args.shard_size, "--shard-size"))
    weight_map, total = {}, 0
    for n, group in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        with open(os.path.join(args.out, name + ".tmp"), "wb") as f:
            f.write(header_bytes(group))
            for tensor, tensor_shape in group:
                write_tensor(f, tensor, tensor_shape, args.seed)
                weight_map[tensor] = name
                total += 2 * math.prod(tensor_shape)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
        print(f"{name}: {len(group)} tensors", file=sys.stderr, flush=True)
    write_config(args.out, shape)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(json.dumps({"model": os.path.abspath(args.out), "bytes": total, "parameters": total // 2,
                      "shards": len(shards)}))


if __name__ == "__main__":
    main()
