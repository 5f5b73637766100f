"""Compute precision: a block's own computation in bf16/fp16 on a GPU (what its tensor cores are
fast at), everything that is accumulated or solved in float64, the residual stream in float32.

The casts sit at the calibration layer's module boundaries (hooks on attention, MLP and linears),
so the engine's passes read the same in every dtype: they feed float32 hidden states in and get
float32 updates back, and the statistics they accumulate stay float64.
"""

import torch
from torch import nn

from .errors import StreamResizeError

NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_compute_dtype(name, device):
    """auto: bf16 on a GPU that supports it (else fp16), fp32 on the CPU."""
    if name in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        if not torch.cuda.is_available():  # planning for a GPU on a machine without one
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in NAMES:
        raise StreamResizeError(f"--compute-dtype {name}: choose auto, {', '.join(NAMES)}")
    return NAMES[name]


def resolve_statistics_products(name, device):
    """auto: float32 products on a GPU (consumer GPUs run float64 matmuls at about 1/64 of their float32
    rate), float64 on the CPU (where it costs about 2x, and is exact)."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cuda" else torch.float64
    if name not in ("float32", "float64"):
        raise StreamResizeError(f"--statistics-products {name}: choose auto, float32 or float64")
    return torch.float32 if name == "float32" else torch.float64


def exact_float32_matmuls():
    """No TF32: float32 products of hidden states with bases feed the float64 statistics."""
    torch.set_float32_matmul_precision("highest")


def _cast(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def compute_in(layer, dtype):
    """Make `layer` (weights already in `dtype`) take float32 inputs and return float32 outputs from
    its attention and MLP; direct calls of its linears get their inputs cast. No-op for float32."""
    if dtype == torch.float32:
        return layer

    def cast_inputs(module, args, kwargs):
        return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}

    def to_float32(module, args, output):
        return _cast(output, torch.float32)

    for module in (layer.self_attn, layer.mlp):
        module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
        module.register_forward_hook(to_float32)
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return layer
