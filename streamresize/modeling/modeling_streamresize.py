"""Modeling code for checkpoints written by streamresize.

This file is copied verbatim into every output directory and named in its
``auto_map``, so stock ``transformers`` loads the result with
``trust_remote_code=True`` where streamresize is not installed. It must import
nothing but torch and transformers.

A narrowed model carries its residual stream in a per-point basis: point 0 is
the embedding output, points 2i+1 and 2i+2 are the residual after block i's
attention and after its MLP. ``config.residual_widths`` gives each point's
width. Where two consecutive points use different bases, a small shortcut
matrix maps the skip path between them. Norm scales are folded into the
linears that read them, so every norm here is weightless and keeps dividing by
the original width, which makes the folding exact.

A DISP-LLM output (``config.disp_widths`` set) keeps the full residual width
instead: each block reads its own subset of residual channels and adds its
output back into its own subset. The index sets are integer tensors stored in
the shards next to the weights; norms keep their weights, so with every index
set full a block computes exactly what the dense block computes.
"""

import dataclasses
import importlib
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

MODEL_TYPE = "streamresize"

# Architecture family -> (module, attention class, MLP class, rotary class, RMSNorm class).
FAMILY_MODULES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaAttention", "LlamaMLP", "LlamaRotaryEmbedding",
              "LlamaRMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralAttention", "MistralMLP",
                "MistralRotaryEmbedding", "MistralRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", "Qwen2MLP", "Qwen2RotaryEmbedding",
              "Qwen2RMSNorm"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention", "Qwen3MLP", "Qwen3RotaryEmbedding",
              "Qwen3RMSNorm"),
    "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3Attention", "Phi3MLP", "Phi3RotaryEmbedding",
             "Phi3RMSNorm"),
}
DISP_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")  # the paper's I1 .. I5


def _cache_keyword(func):
    """The name `func` takes the KV cache under: ``cache`` in transformers releases that deprecated
    ``past_key_values`` (a FutureWarning, removal announced for 5.40), ``past_key_values`` before.
    Both name the same object, so whichever is used the call computes the same thing."""
    return "cache" if "cache" in inspect.signature(func).parameters else "past_key_values"


MASK_CACHE_KEYWORD = _cache_keyword(create_causal_mask)
# Output classes renamed their field the same way; the old name is only a logged, deprecated alias.
OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
                      else "past_key_values")


def _one_cache(cache, past_key_values):
    """Our forwards take the cache as ``cache`` (what generate() passes in current transformers) and
    still accept ``past_key_values`` (what older transformers and existing callers pass)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
    return past_key_values


def family_classes(family):
    module_name, *names = FAMILY_MODULES[family]
    module = importlib.import_module(module_name)
    return [getattr(module, name) for name in names]


class StreamResizeConfig(LlamaConfig):
    """A Llama-family config plus the widths streamresize chose.

    ``hidden_size`` stays the original residual width: the norms divide by it
    and the attention head geometry derives from it.
    """

    model_type = MODEL_TYPE
    base_model_type: str = "llama"
    residual_widths: list | None = None
    intermediate_sizes: list | None = None
    shortcuts: list | None = None
    head_adapter: bool = False
    disp_widths: list | None = None  # per block, sizes of the index sets I1..I5 (DISP_GROUPS)
    sliding_window: int | None = None
    linear_biases: list | None = None  # block linears with a bias the family has but its config does not declare
    fused_linears: list | None = None  # [[fused name, [part names]], ...]: what the family's modules call fused
    streamresize: dict | None = None

    def has_bias(self, role):
        """Whether block linear `role` (e.g. "self_attn.q_proj") has a bias."""
        if role.startswith("self_attn.") and self.attention_bias or role.startswith("mlp.") and self.mlp_bias:
            return True
        return role in (self.linear_biases or ())

    def width(self, point):
        return self.residual_widths[point] if self.residual_widths else self.hidden_size

    def intermediate(self, layer):
        return self.intermediate_sizes[layer] if self.intermediate_sizes else self.intermediate_size

    def has_shortcut(self, layer, half):
        return bool(self.shortcuts[layer][half]) if self.shortcuts else False


class ResidualNorm(nn.Module):
    """Weightless RMSNorm that divides by the original width, not the narrowed one."""

    def __init__(self, original_width, eps):
        super().__init__()
        self.original_width = original_width
        self.eps = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.original_width + self.eps)
        return x.to(dtype)


def _linear(in_features, out_features, bias=False):
    return nn.Linear(in_features, out_features, bias=bias)


class _Stacked(nn.Module):
    """A fused linear of the family's module (Phi-3's qkv_proj, gate_up_proj) computed from its parts,
    which stay the block's own linears (q_proj, ...): their outputs concatenated in the fused order."""

    def __init__(self, parts):
        super().__init__()
        self._parts = tuple(parts)  # not registered: the parameters belong to the block's own linears

    def forward(self, x):
        return torch.cat([part(x) for part in self._parts], dim=-1)


def _install_fused(layer, config):
    for fused, parts in config.fused_linears or ():
        parent, _, name = fused.rpartition(".")
        setattr(layer.get_submodule(parent), name, _Stacked(layer.get_submodule(p) for p in parts))


def attention_inputs(config, rotary_emb, inputs_embeds, attention_mask=None, position_ids=None, cache=None):
    """Mask and rotary embeddings exactly as the source architecture makes them."""
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
    mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{MASK_CACHE_KEYWORD: cache},
    )
    return {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": rotary_emb(inputs_embeds, position_ids=position_ids),
    }


class StreamResizeDecoderLayer(nn.Module):
    """One decoder block whose residual input, post-attention and output widths may all differ."""

    def __init__(self, config, layer_idx):
        super().__init__()
        attention_cls, mlp_cls, *_ = family_classes(config.base_model_type)
        k_in, k_attn, k_mlp = (config.width(2 * layer_idx + p) for p in range(3))
        d_ff = config.intermediate(layer_idx)
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.has_bias

        self.self_attn = attention_cls(config, layer_idx)
        self.self_attn.q_proj = _linear(k_in, heads * head_dim, bias("self_attn.q_proj"))
        self.self_attn.k_proj = _linear(k_in, kv_heads * head_dim, bias("self_attn.k_proj"))
        self.self_attn.v_proj = _linear(k_in, kv_heads * head_dim, bias("self_attn.v_proj"))
        self.self_attn.o_proj = _linear(heads * head_dim, k_attn, bias("self_attn.o_proj"))

        self.mlp = mlp_cls(config)
        self.mlp.gate_proj = _linear(k_attn, d_ff, bias("mlp.gate_proj"))
        self.mlp.up_proj = _linear(k_attn, d_ff, bias("mlp.up_proj"))
        self.mlp.down_proj = _linear(d_ff, k_mlp, bias("mlp.down_proj"))
        _install_fused(self, config)

        self.input_layernorm = ResidualNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ResidualNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_shortcut = _linear(k_in, k_attn) if config.has_shortcut(layer_idx, 0) else None
        self.mlp_shortcut = _linear(k_attn, k_mlp) if config.has_shortcut(layer_idx, 1) else None

    @staticmethod
    def _skip(hidden_states, shortcut):
        return hidden_states if shortcut is None else shortcut(hidden_states)

    def attention_residual(self, hidden_states, **attention_kwargs):
        update, _ = self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)
        return self._skip(hidden_states, self.attn_shortcut) + update

    def mlp_residual(self, hidden_states):
        update = self.mlp(self.post_attention_layernorm(hidden_states))
        return self._skip(hidden_states, self.mlp_shortcut) + update

    def forward(self, hidden_states, **attention_kwargs):
        return self.mlp_residual(self.attention_residual(hidden_states, **attention_kwargs))


class DispDecoderLayer(nn.Module):
    """A DISP-LLM block: full-width residual in and out; attention reads channels I1 and writes
    channels I2, the MLP reads I3, keeps neurons I4 and writes I5 (``index_add``)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        attention_cls, mlp_cls, _, norm_cls = family_classes(config.base_model_type)
        n_attn_in, n_attn_out, n_mlp_in, n_hidden, n_mlp_out = config.disp_widths[layer_idx]
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.has_bias

        self.self_attn = attention_cls(config, layer_idx)
        self.self_attn.q_proj = _linear(n_attn_in, heads * head_dim, bias("self_attn.q_proj"))
        self.self_attn.k_proj = _linear(n_attn_in, kv_heads * head_dim, bias("self_attn.k_proj"))
        self.self_attn.v_proj = _linear(n_attn_in, kv_heads * head_dim, bias("self_attn.v_proj"))
        self.self_attn.o_proj = _linear(heads * head_dim, n_attn_out, bias("self_attn.o_proj"))
        self.mlp = mlp_cls(config)
        self.mlp.gate_proj = _linear(n_mlp_in, n_hidden, bias("mlp.gate_proj"))
        self.mlp.up_proj = _linear(n_mlp_in, n_hidden, bias("mlp.up_proj"))
        self.mlp.down_proj = _linear(n_hidden, n_mlp_out, bias("mlp.down_proj"))
        _install_fused(self, config)
        self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        for name, size in (("attn_in", n_attn_in), ("attn_out", n_attn_out), ("mlp_in", n_mlp_in),
                           ("mlp_out", n_mlp_out)):
            self.register_buffer(f"{name}_index", torch.arange(size, dtype=torch.long))

    def attention_residual(self, hidden_states, **attention_kwargs):
        inputs = self.input_layernorm(hidden_states).index_select(-1, self.attn_in_index)
        update, _ = self.self_attn(inputs, **attention_kwargs)
        return hidden_states.index_add(-1, self.attn_out_index, update.to(hidden_states.dtype))

    def mlp_residual(self, hidden_states):
        inputs = self.post_attention_layernorm(hidden_states).index_select(-1, self.mlp_in_index)
        update = self.mlp(inputs)
        return hidden_states.index_add(-1, self.mlp_out_index, update.to(hidden_states.dtype))

    def forward(self, hidden_states, **attention_kwargs):
        return self.mlp_residual(self.attention_residual(hidden_states, **attention_kwargs))


class StreamResizePreTrainedModel(PreTrainedModel):
    config_class = StreamResizeConfig
    config: StreamResizeConfig
    base_model_prefix = "model"
    _no_split_modules = ["StreamResizeDecoderLayer", "DispDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class StreamResizeModel(StreamResizePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        attention_cls, _, rotary_cls, norm_cls = family_classes(config.base_model_type)
        self.attention_cache_keyword = _cache_keyword(attention_cls.forward)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width(0))
        layer_cls = DispDecoderLayer if config.disp_widths else StreamResizeDecoderLayer
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        if config.disp_widths:  # the final norm is untouched and keeps its weight
            self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = ResidualNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        cache = _one_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        attention_kwargs = attention_inputs(self.config, self.rotary_emb, inputs_embeds, attention_mask,
                                            position_ids, cache)
        attention_kwargs[self.attention_cache_keyword] = cache
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, **attention_kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{OUTPUT_CACHE_FIELD: cache})


class StreamResizeForCausalLM(StreamResizePreTrainedModel, GenerationMixin):
    # Tied only when config.tie_word_embeddings is set (outputs with a head adapter).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = StreamResizeModel(config)
        # With a head adapter the head shares the embedding matrix and reads the
        # last point through a small k_last x k_0 matrix (tied embeddings stay tied).
        self.head_adapter = _linear(config.width(-1), config.width(0)) if config.head_adapter else None
        head_width = config.width(0) if config.head_adapter else config.width(-1)
        self.lm_head = _linear(head_width, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        if self.head_adapter is not None:
            hidden_states = self.head_adapter(hidden_states)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)})
