"""What streamresize knows of each model family: tensor names by role, in one small table each.

Methods and the engine ask for roles (readers and writers of the residual,
norms, embedding, head) and never name a model family.
"""

from dataclasses import dataclass

from .errors import StreamResizeError


@dataclass(frozen=True)
class Family:
    name: str  # key into the output modeling code's FAMILY_MODULES
    architectures: tuple
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    block: str = "model.layers.{i}."
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_readers: tuple = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_writer: str = "self_attn.o_proj"
    mlp_readers: tuple = ("mlp.gate_proj", "mlp.up_proj")
    mlp_writer: str = "mlp.down_proj"

    def block_name(self, layer, role):
        return self.block.format(i=layer) + role


LLAMA = Family("llama", ("LlamaForCausalLM",))
MISTRAL = Family("mistral", ("MistralForCausalLM",))
FAMILIES = (LLAMA, MISTRAL)


def family_for(config, where="config.json"):
    architectures = config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures):
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise StreamResizeError(f"{where}: architectures {architectures or '(none)'} not supported; supported: {supported}")


def check_supported(config, where="config.json"):
    """Refuse features the block code does not carry (biases, non-RMS norms) with a clear message."""
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise StreamResizeError(f"{where}: linear biases are not supported yet")
    if config.get("pretraining_tp", 1) not in (None, 1):
        raise StreamResizeError(f"{where}: pretraining_tp > 1 is not supported")
