"""Mistral: Llama's tensors, with its own attention class (sliding window) in transformers."""

from .base import ArchSpec

SPEC = ArchSpec("mistral", ("MistralForCausalLM",))
