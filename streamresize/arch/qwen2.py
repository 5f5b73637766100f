"""Qwen2 / Qwen2.5: Llama's layout plus q/k/v biases, which the config does not declare (transformers'
Qwen2Attention always has them). Sliding-window fields (`use_sliding_window: false`, `sliding_window`,
`max_window_layers`, `layer_types`) are carried through unchanged; a model that really uses sliding-window
layers is refused, since the output's modeling code applies one causal mask to every block."""

from ..errors import StreamResizeError
from .base import ArchSpec


class QwenSpec(ArchSpec):
    def check(self, config, tensor_names, where):
        super().check(config, tensor_names, where)
        if "sliding_attention" in (config.get("layer_types") or []):
            raise StreamResizeError(f"{where}: a {self.name} model with sliding-window layers (use_sliding_window "
                                    "true) is not supported yet; every block must use full attention")


SPEC = QwenSpec("qwen2", ("Qwen2ForCausalLM",),
                biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                formats=("stock", "bundled"),
                formats_why="DeciLM's blocks are Llama's, without the q/k/v biases")
