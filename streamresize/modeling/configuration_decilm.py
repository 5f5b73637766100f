"""Configuration of the DeciLM / nemotron-nas checkpoints streamresize writes (``--save-format decilm``).

This file is copied verbatim into every such output and named in its ``auto_map``: transformers has no
DeciLM class, and engines with their own DeciLM modeling (vLLM) still build the config through it. It
must import nothing but transformers.

Per decoder layer, ``block_configs`` holds ``{"attention": {"n_heads_in_group": H/KV, "no_op": ...},
"ffn": {"ffn_mult": m, "no_op": ...}}``. The MLP width of a layer is ``int(2 * m * hidden_size / 3)``
rounded up to a multiple of 256, the rule vLLM and llama.cpp's converter apply to the same field.
"""

from transformers import LlamaConfig

FFN_MULTIPLE = 256


def ffn_mult_to_intermediate_size(ffn_mult, hidden_size):
    """DeciLM's MLP width for `ffn_mult` (vLLM's nemotron_nas.py and llama.cpp's DeciModel compute the same)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % FFN_MULTIPLE == 0 else size + FFN_MULTIPLE - size % FFN_MULTIPLE


class BlockFields(dict):
    """One entry of ``block_configs`` (or its ``attention`` / ``ffn`` part): a plain dict, so config.json
    holds plain JSON, whose keys also read as attributes, as DeciLM code outside transformers expects
    (vLLM reads ``config.block_configs[i].ffn.no_op`` and ``hasattr(ffn, "ffn_mult")``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _fields(value):
    if isinstance(value, dict):
        return BlockFields({key: _fields(item) for key, item in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    """A Llama config plus ``block_configs``, one per decoder layer. ``num_key_value_heads`` and
    ``intermediate_size`` are global defaults only; the blocks decide (``n_heads_in_group``, ``ffn_mult``)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        # An explicit __init__: transformers 5 then keeps it (remote-code configs) and older releases
        # have always called it, so block_configs get attribute access in both.
        self.block_configs = [_fields(block) for block in block_configs or []]
        super().__init__(**kwargs)
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for "
                             f"{self.num_hidden_layers} layers")

    def kv_heads(self, layer):
        """Key/value heads of `layer`'s attention (None when it is a no-op)."""
        attention = self.block_configs[layer]["attention"] if self.block_configs else {}
        if attention.get("no_op"):
            return None
        group = attention.get("n_heads_in_group")
        return self.num_key_value_heads if group is None else self.num_attention_heads // group

    def ffn_width(self, layer):
        """MLP width of `layer` (0 when it is a no-op): from ``ffn_mult`` by DeciLM's rule, or from
        ``intermediate_size`` in NVIDIA's newer schema."""
        ffn = self.block_configs[layer]["ffn"] if self.block_configs else {}
        if ffn.get("no_op"):
            return 0
        if ffn.get("ffn_mult") is not None:
            return ffn_mult_to_intermediate_size(ffn["ffn_mult"], self.hidden_size)
        return ffn.get("intermediate_size") or self.intermediate_size
