import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import make_text, make_tiny_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return {"calib": make_text(str(d / "calib.txt"), 200, seed=1), "heldout": make_text(str(d / "heldout.txt"), 80, seed=2)}


@pytest.fixture(scope="session")
def tokenizer(texts):
    return make_tokenizer(texts["calib"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-fp32")), tokenizer)


@pytest.fixture(scope="session")
def tiny_model_bf16(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-bf16")), tokenizer, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-tied")), tokenizer, tie=True, seed=3)
