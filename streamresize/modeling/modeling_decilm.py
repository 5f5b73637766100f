"""DeciLM / nemotron-nas modeling for the checkpoints streamresize writes (``--save-format decilm``).

This file is copied verbatim, with ``configuration_decilm.py``, into every such output and named in its
``auto_map``, so stock transformers loads the result with ``trust_remote_code=True`` where streamresize
is not installed (transformers has no DeciLM class of its own). It imports nothing but torch and
transformers.

A DeciLM model is a Llama whose decoder layers each carry their own attention and MLP shape
(``config.block_configs``): the key/value head count (``n_heads_in_group``), the MLP width (``ffn_mult``,
see configuration_decilm.py) and whether either sub-layer is a no-op, in which case it and its norm are
absent and the residual passes through. The layers are transformers' own Llama building blocks, each
built from a copy of the config that carries that layer's shape.
"""

import copy
import dataclasses
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_decilm import DeciLMConfig


def _cache_keyword(func):
    """The name `func` takes the KV cache under: ``cache`` in transformers releases that deprecated
    ``past_key_values`` (removal announced for 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(func).parameters else "past_key_values"


MASK_CACHE_KEYWORD = _cache_keyword(create_causal_mask)
ATTENTION_CACHE_KEYWORD = _cache_keyword(LlamaAttention.forward)
OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
                      else "past_key_values")


def _one_cache(cache, past_key_values):
    """Forwards take the cache as ``cache`` (what generate() passes in current transformers) and still
    accept ``past_key_values`` (older transformers and existing callers)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
    return past_key_values


def _layer_config(config, **shape):
    """A copy of `config` with one layer's shape (read by the Llama blocks' constructors only)."""
    layer_config = copy.copy(config)
    for name, value in shape.items():
        setattr(layer_config, name, value)
    return layer_config


class DeciLMDecoderLayer(nn.Module):
    """A Llama decoder layer with this layer's KV heads and MLP width; a no-op sub-layer is left out."""

    def __init__(self, config, layer_idx, cache_idx):
        super().__init__()
        block = config.block_configs[layer_idx]
        for part in ("attention", "ffn"):
            if block[part].get("replace_with_linear"):
                raise ValueError(f"layer {layer_idx}: {part}.replace_with_linear is not supported")
        kv_heads, width = config.kv_heads(layer_idx), config.ffn_width(layer_idx)
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if kv_heads is not None:
            # The KV cache has one slot per attention layer: `cache_idx` counts only those.
            self.self_attn = LlamaAttention(_layer_config(config, num_key_value_heads=kv_heads), cache_idx)
            self.self_attn.config = config  # read again in forward (attention implementation): the model's own
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if width:
            self.mlp = LlamaMLP(_layer_config(config, intermediate_size=width))
            self.mlp.config = config
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, **attention_kwargs):
        if self.self_attn is not None:
            update, _ = self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)
            hidden_states = hidden_states + update
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, cache_idx = [], 0
        for i in range(config.num_hidden_layers):
            layers.append(DeciLMDecoderLayer(config, i, cache_idx))
            cache_idx += layers[-1].self_attn is not None
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        cache = _one_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{MASK_CACHE_KEYWORD: cache})
        attention_kwargs = {"attention_mask": mask, "position_ids": position_ids,
                            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids=position_ids),
                            ATTENTION_CACHE_KEYWORD: cache}
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, **attention_kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{OUTPUT_CACHE_FIELD: cache})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # Tied only when config.tie_word_embeddings is set.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)})
