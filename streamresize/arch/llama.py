"""Llama (and the many checkpoints that reuse its layout: SmolLM2, Llama 2/3, TinyLlama)."""

from .base import ArchSpec

SPEC = ArchSpec("llama", ("LlamaForCausalLM",))
