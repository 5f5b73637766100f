"""Qwen3: Llama's layout plus a per-head RMSNorm on queries and keys inside attention (`q_norm`,
`k_norm`, head_dim wide, shared by every head). They act on each head's own coordinates after the
projection, so a change of the residual width or the removal of whole heads leaves them as they are."""

from .qwen2 import QwenSpec

SPEC = QwenSpec("qwen3", ("Qwen3ForCausalLM",), head_norms=("self_attn.q_norm", "self_attn.k_norm"),
                formats=("stock", "bundled"), formats_why="DeciLM's blocks are Llama's, without q/k norms")
