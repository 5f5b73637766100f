"""Load checkpoints in-process: streamresize outputs use this package's own modeling code, registered
with the transformers Auto classes, so neither loading nor the tokenizer asks for trust_remote_code."""

import functools
import os

import torch

from .errors import StreamResizeError


@functools.cache
def register_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling.modeling_streamresize import MODEL_TYPE, StreamResizeConfig, StreamResizeForCausalLM

    from .modeling.configuration_decilm import DeciLMConfig
    from .modeling.modeling_decilm import DeciLMForCausalLM

    AutoConfig.register(MODEL_TYPE, StreamResizeConfig, exist_ok=True)
    AutoModelForCausalLM.register(StreamResizeConfig, StreamResizeForCausalLM, exist_ok=True)
    # A decilm output's shipped code is ours too: use this package's copy, no remote code.
    AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM, exist_ok=True)


def load_model(model_dir, device="cpu", dtype=None):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise StreamResizeError(f"{os.path.join(model_dir, 'config.json')}: missing; not a model directory")
    register_auto_classes()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False, **kwargs)
    return model.to(torch.device(device)).eval()
