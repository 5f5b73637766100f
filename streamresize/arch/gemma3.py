"""Gemma 3 (text: `Gemma3ForCausalLM`, model_type `gemma3_text`). Against Llama's block:

- every RMSNorm multiplies by (1 + w), not w, and Gemma normalizes each sublayer's output too:
  h = x + post_attention_layernorm(attn(input_layernorm(x))), then
  y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))). A post-sublayer norm divides
  the update by its RMS over the whole residual width, so a rotated or narrowed residual (pca, a residual
  --sparsity, --basis shared) or DISP's per-block channel subsets change the function: refused. MLP
  neurons and attention heads sit inside a sublayer, before its norm: removing them keeps the block's
  structure, so those reductions work. The norms are not folded (`norms_folded=False`): they keep their
  weights and Gemma's own norm class, in the bundled output as in the stock one;
- the embedding output is multiplied by sqrt(hidden_size) (a non-persistent buffer in transformers, cast
  to the weights' dtype: in bf16 sqrt(640) is 25.25);
- GeGLU (gelu_pytorch_tanh), per-head q/k RMSNorm (head_dim wide, carried as they are), attention scaled
  by query_pre_attn_scalar, sliding-window layers interleaved with global ones (`layer_types`), a rotary
  base per layer type: the attention, rotary and masks are transformers' own Gemma 3 classes, whose
  config fields are carried through unchanged."""

from .base import ArchSpec

SPEC = ArchSpec("gemma3", ("Gemma3ForCausalLM",), model_type="gemma3_text",
                head_norms=("self_attn.q_norm", "self_attn.k_norm"),
                mlp_norm="pre_feedforward_layernorm",
                post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                norms_folded=False, embedding_scale=True,
                methods=("dotresize", "prune"),
                refused_why="its norms after attention and after the MLP rescale each sublayer's output by its RMS "
                "over the whole residual, so a rotated, narrowed or per-block subset of the residual changes the "
                "function; the residual stays whole",
                formats=("stock", "bundled"),
                formats_why="DeciLM's blocks are Llama's, without Gemma's post-sublayer and (1 + w) norms")
