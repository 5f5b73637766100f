"""Load a checkpoint for evaluation: streamresize outputs in-process, anything else via transformers."""

import json
import os

import torch

from .errors import StreamResizeError
from .modeling.modeling_streamresize import MODEL_TYPE, StreamResizeForCausalLM


def load_model(model_dir, device="cpu", dtype=None):
    from transformers import AutoModelForCausalLM

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise StreamResizeError(f"{config_path}: missing; not a model directory")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if model_type == MODEL_TYPE:
        model = StreamResizeForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs)
    return model.to(torch.device(device)).eval()
