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

import copy
import dataclasses
import importlib
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
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
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2Attention", "Gemma2MLP", "Gemma2RotaryEmbedding",
               "Gemma2RMSNorm"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3Attention", "Gemma3MLP", "Gemma3RotaryEmbedding",
               "Gemma3RMSNorm"),
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
    attention_heads: list | None = None  # per block [query heads, KV heads], where they differ per block
    shortcuts: list | None = None
    head_adapter: bool | str = False  # True: a k x k matrix; "diagonal": a k-vector (the final norm's gain)
    disp_widths: list | None = None  # per block, sizes of the index sets I1..I5 (DISP_GROUPS)
    sliding_window: int | None = None
    # Declared (not left to **kwargs) so it is known when the rope parameters are standardized: a family with
    # a rotary per layer type (Gemma 3) keeps its nested rope_parameters as they are.
    layer_types: list | None = None
    linear_biases: list | None = None  # block linears with a bias the family has but its config does not declare
    fused_linears: list | None = None  # [[fused name, [part names]], ...]: what the family's modules call fused
    # A family whose norms keep their weights (Gemma): the block's norm names, [before attention, after
    # attention, before the MLP, after the MLP] (null: none), computed by the family's own norm class;
    # the residual is never narrowed. None: norms are folded into the readers (ResidualNorm).
    block_norms: list | None = None
    embedding_scale: float | None = None  # the embedding output is multiplied by this (Gemma: sqrt(hidden))
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

    def heads(self, layer):
        """(query heads, KV heads) of block `layer`."""
        if self.attention_heads:
            return tuple(self.attention_heads[layer])
        return self.num_attention_heads, self.num_key_value_heads

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


class DiagonalAdapter(nn.Module):
    """A tied head's adapter where the residual is kept whole: only the final norm's gain, one per channel."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, hidden_states):
        return hidden_states * self.weight


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


def eager_if_softcapped(config):
    """The config attention is computed, and its masks made, with: a copy set to eager attention where the
    family soft-caps attention logits (Gemma 2), which sdpa cannot do, as the family's own model requires."""
    if getattr(config, "attn_logit_softcapping", None) is None or config._attn_implementation == "eager":
        return config
    eager = copy.copy(config)
    eager._attn_implementation = "eager"
    return eager


def layer_type(config, layer_idx):
    """Block `layer_idx`'s attention type (config.layer_types: "full_attention", "sliding_attention"), or
    None for families without per-layer types."""
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types else None


def attention_inputs(config, rotary_emb, inputs_embeds, attention_mask=None, position_ids=None, cache=None,
                     layer_type=None):
    """Mask and rotary embeddings exactly as the source architecture makes them, for blocks of
    `layer_type` (a sliding-window mask for "sliding_attention"; a rotary that takes a layer type, as
    Gemma 3's does with a base per type, gets it)."""
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
    make_mask = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
    mask = make_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{MASK_CACHE_KEYWORD: cache},
    )
    rotary_kwargs = {"layer_type": layer_type} if "layer_type" in inspect.signature(rotary_emb.forward).parameters else {}
    return {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": rotary_emb(inputs_embeds, position_ids=position_ids, **rotary_kwargs),
    }


class StreamResizeDecoderLayer(nn.Module):
    """One decoder block whose residual input, post-attention and output widths may all differ."""

    def __init__(self, config, layer_idx):
        super().__init__()
        attention_cls, mlp_cls, *_ = family_classes(config.base_model_type)
        k_in, k_attn, k_mlp = (config.width(2 * layer_idx + p) for p in range(3))
        d_ff = config.intermediate(layer_idx)
        (heads, kv_heads), head_dim = config.heads(layer_idx), config.head_dim
        bias = config.has_bias

        self.self_attn = attention_cls(config, layer_idx)
        self.self_attn.num_key_value_groups = heads // kv_heads  # this block's own head counts
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

    # What every block class offers the engine: the attention's input, the update it adds to the
    # residual, the MLP's input and what becomes of the MLP's output before it is added.
    def attention_input(self, hidden_states):
        return self.input_layernorm(hidden_states)

    def attention_update(self, hidden_states, **attention_kwargs):
        return self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)[0]

    def mlp_input(self, hidden_states):
        return self.post_attention_layernorm(hidden_states)

    def mlp_output(self, update):
        return update

    def attention_residual(self, hidden_states, **attention_kwargs):
        update = self.attention_update(hidden_states, **attention_kwargs)
        return self._skip(hidden_states, self.attn_shortcut) + update

    def mlp_residual(self, hidden_states):
        update = self.mlp(self.post_attention_layernorm(hidden_states))
        return self._skip(hidden_states, self.mlp_shortcut) + update

    def forward(self, hidden_states, **attention_kwargs):
        return self.mlp_residual(self.attention_residual(hidden_states, **attention_kwargs))


class KeptNormDecoderLayer(nn.Module):
    """A block of a family whose norms keep their weights (Gemma: (1 + w) norms before and after each
    sublayer): the family's own attention, MLP and norm classes under the family's tensor names, the
    residual full width; MLP neurons and attention heads may be fewer than the source's.

        h = x + post_attn(attn(pre_attn(x)));  y = h + post_mlp(mlp(pre_mlp(h)))
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        attention_cls, mlp_cls, _, norm_cls = family_classes(config.base_model_type)
        if config.residual_widths and set(config.residual_widths) != {config.hidden_size}:
            raise ValueError("a block whose norms keep their weights needs the whole residual width")
        d, d_ff = config.hidden_size, config.intermediate(layer_idx)
        (heads, kv_heads), head_dim = config.heads(layer_idx), config.head_dim
        bias = config.has_bias
        self.self_attn = attention_cls(eager_if_softcapped(config), layer_idx)
        self.self_attn.num_key_value_groups = heads // kv_heads  # this block's own head counts
        self.self_attn.q_proj = _linear(d, heads * head_dim, bias("self_attn.q_proj"))
        self.self_attn.k_proj = _linear(d, kv_heads * head_dim, bias("self_attn.k_proj"))
        self.self_attn.v_proj = _linear(d, kv_heads * head_dim, bias("self_attn.v_proj"))
        self.self_attn.o_proj = _linear(heads * head_dim, d, bias("self_attn.o_proj"))
        self.mlp = mlp_cls(config)
        self.mlp.gate_proj = _linear(d, d_ff, bias("mlp.gate_proj"))
        self.mlp.up_proj = _linear(d, d_ff, bias("mlp.up_proj"))
        self.mlp.down_proj = _linear(d_ff, d, bias("mlp.down_proj"))
        _install_fused(self, config)
        self._norms = list(config.block_norms)
        for name in self._norms:
            if name:
                setattr(self, name, norm_cls(d, eps=config.rms_norm_eps))

    def _norm(self, index, hidden_states):
        name = self._norms[index]
        return hidden_states if name is None else getattr(self, name)(hidden_states)

    def attention_input(self, hidden_states):
        return self._norm(0, hidden_states)

    def attention_update(self, hidden_states, **attention_kwargs):
        return self._norm(1, self.self_attn(self._norm(0, hidden_states), **attention_kwargs)[0])

    def mlp_input(self, hidden_states):
        return self._norm(2, hidden_states)

    def mlp_output(self, update):
        return self._norm(3, update)

    def attention_residual(self, hidden_states, **attention_kwargs):
        return hidden_states + self.attention_update(hidden_states, **attention_kwargs)

    def mlp_residual(self, hidden_states):
        return hidden_states + self.mlp_output(self.mlp(self.mlp_input(hidden_states)))

    def forward(self, hidden_states, **attention_kwargs):
        return self.mlp_residual(self.attention_residual(hidden_states, **attention_kwargs))


def decoder_layer_class(config):
    """The block class of an output with this config."""
    if config.disp_widths:
        return DispDecoderLayer
    return KeptNormDecoderLayer if config.block_norms else StreamResizeDecoderLayer


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
    _no_split_modules = ["StreamResizeDecoderLayer", "DispDecoderLayer", "KeptNormDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        """transformers' own, plus a rotary with a base per layer type (Gemma 3: `{type}_inv_freq` buffers,
        which the generic init does not know; non-persistent, so they are computed here, as the family's
        own init does)."""
        super()._init_weights(module)
        kinds = getattr(module, "rope_type", None)
        if "RotaryEmbedding" in type(module).__name__ and isinstance(kinds, dict):
            from transformers import initialization as init
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            for kind, rope_type in kinds.items():
                fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
                inv_freq, _ = fn(module.config, layer_type=kind)
                init.copy_(getattr(module, f"{kind}_inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{kind}_original_inv_freq"), inv_freq)


class StreamResizeModel(StreamResizePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        attention_cls, _, rotary_cls, norm_cls = family_classes(config.base_model_type)
        self.attention_cache_keyword = _cache_keyword(attention_cls.forward)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width(0))
        layer_cls = decoder_layer_class(config)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        if config.disp_widths or config.block_norms:  # the final norm is untouched and keeps its weight
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
            if self.config.embedding_scale is not None:  # as the family's scaled embedding: in the weights' dtype
                inputs_embeds = inputs_embeds * torch.tensor(self.config.embedding_scale).to(inputs_embeds.dtype)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        types = [layer_type(self.config, i) for i in range(len(self.layers))]
        by_type = {}
        mask_config = eager_if_softcapped(self.config)
        for kind in dict.fromkeys(types):  # one mask and rotary per attention type, as the family makes them
            by_type[kind] = attention_inputs(mask_config, self.rotary_emb, inputs_embeds, attention_mask,
                                             position_ids, cache, layer_type=kind)
            by_type[kind][self.attention_cache_keyword] = cache
        hidden_states = inputs_embeds
        for layer, kind in zip(self.layers, types):
            hidden_states = layer(hidden_states, **by_type[kind])
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{OUTPUT_CACHE_FIELD: cache})


class StreamResizeForCausalLM(StreamResizePreTrainedModel, GenerationMixin):
    # Tied only when config.tie_word_embeddings is set (outputs with a head adapter).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = StreamResizeModel(config)
        # With a head adapter the head shares the embedding matrix and reads the
        # last point through a small k_last x k_0 matrix (tied embeddings stay tied).
        self.head_adapter = (DiagonalAdapter(config.width(0)) if config.head_adapter == "diagonal"
                             else _linear(config.width(-1), config.width(0)) if config.head_adapter else None)
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
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma's soft-capping of the logits
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)})
