"""Gemma 2 (`Gemma2ForCausalLM`): Gemma 3's block (arch/gemma3.py: (1 + w) norms before and after each
sublayer, not folded; the residual stays whole; embedding x sqrt(hidden_size); GeGLU; sliding-window
layers interleaved with global ones; query_pre_attn_scalar) without the q/k norms and with one rotary
base, plus soft-capping: attention logits (attn_logit_softcapping, which sdpa cannot apply, so blocks are
computed with eager attention, as transformers' Gemma 2 requires) and final logits
(final_logit_softcapping, applied by the bundled model as by the stock one)."""

from .base import ArchSpec
from .gemma3 import SPEC as GEMMA3

SPEC = ArchSpec("gemma2", ("Gemma2ForCausalLM",), mlp_norm=GEMMA3.mlp_norm, post_norms=GEMMA3.post_norms,
                norms_folded=False, embedding_scale=True, attention_implementation="eager",
                methods=GEMMA3.methods, refused_why=GEMMA3.refused_why, formats=GEMMA3.formats,
                formats_why=GEMMA3.formats_why)
