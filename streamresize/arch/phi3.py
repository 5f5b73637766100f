"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's computation with fused tensors, `qkv_proj` (q, k and v rows
stacked) and `gate_up_proj` (gate rows, then up rows). Methods see the parts (split on read, by the
head counts and widths of config.json); the output merges them back, so it keeps Phi-3's own layout.
Partial rotary (`partial_rotary_factor`) and `rope_scaling` (longrope) are Phi-3's attention's own
and carried through unchanged."""

from .base import ArchSpec

SPEC = ArchSpec("phi3", ("Phi3ForCausalLM",),
                fused=(("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                       ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))),
                mlp_activation="activation_fn",
                formats=("stock", "bundled"), formats_why="DeciLM's blocks are Llama's, with separate q/k/v and "
                "gate/up tensors")
