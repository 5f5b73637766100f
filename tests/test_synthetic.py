"""tools/make_synthetic.py and `--dataset random`: real shapes without the real weights, a run
without a tokenizer, and a valid checkpoint out."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from helpers import cli, run_script
from safetensors.torch import load_file

import streamresize
from streamresize.calibration import calibration_ids
from streamresize.checkpoint import CheckpointReader, parameter_count
from streamresize.errors import StreamResizeError

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import make_synthetic  # noqa: E402

# Parameter counts of the real models these shapes copy (from their Hugging Face checkpoints).
REAL_PARAMETERS = {"1b": 1_100_048_384, "7b": 6_738_415_616, "13b": 13_015_864_320}


@pytest.mark.parametrize("shape", sorted(REAL_PARAMETERS))
def test_shapes_have_the_real_models_parameter_counts(shape):
    tensors = make_synthetic.tensor_shapes(make_synthetic.SHAPES[shape])
    assert sum(math.prod(s) for _, s in tensors) == REAL_PARAMETERS[shape]
    assert len({name for name, _ in tensors}) == len(tensors)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    result = run_script(os.path.join(TOOLS, "make_synthetic.py"), "--shape", "tiny", "--out", out,
                        "--shard-size", "100KB")
    return str(out), json.loads(result.stdout.strip().splitlines()[-1])


def test_synthetic_checkpoint_is_valid_sharded_bf16(synthetic):
    path, info = synthetic
    expected = dict(make_synthetic.tensor_shapes(make_synthetic.SHAPES["tiny"]))
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) == info["shards"] > 1
    seen = {}
    for shard in shards:
        seen.update(load_file(os.path.join(path, shard)))  # safetensors itself validates the layout
    assert {k: tuple(v.shape) for k, v in seen.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in seen.values())
    assert torch.equal(seen["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    std = seen["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert 0.018 < std < 0.022
    assert not torch.equal(seen["model.layers.0.mlp.up_proj.weight"], seen["model.layers.1.mlp.up_proj.weight"])
    assert parameter_count(path) == info["parameters"]
    assert not any(f.startswith("tokenizer") for f in os.listdir(path))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(path).num_hidden_layers == 2


def test_tensor_values_do_not_depend_on_the_shard_size(synthetic, tmp_path):
    path, _ = synthetic
    other = tmp_path / "one-shard"
    run_script(os.path.join(TOOLS, "make_synthetic.py"), "--shape", "tiny", "--out", other)
    a, b = CheckpointReader(path), CheckpointReader(str(other))
    assert len(set(b.weight_map.values())) == 1
    for name in a.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name


def test_random_calibration_ids(synthetic):
    path, _ = synthetic
    ids = calibration_ids(path, ["random"], 6, 20, seed=3)
    assert ids.shape == (6, 20) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 512
    assert np.array_equal(ids, calibration_ids(path, ["random:3"], 6, 20, seed=0))
    assert not np.array_equal(ids, calibration_ids(path, ["random"], 6, 20, seed=4))
    with pytest.raises(StreamResizeError, match="random:SEED"):
        calibration_ids(path, ["random:x"], 6, 20, seed=0)


def test_compress_without_a_tokenizer_writes_a_loadable_checkpoint(synthetic, tmp_path):
    path, _ = synthetic
    out = tmp_path / "out"
    cli("compress", path, out, "--dataset", "random", "--method", "prune", "--sparsity", "0.25",
        "--num-calibration-samples", 6, "--max-seq-length", 32, "--batch-size", 4)
    assert (out / "model.safetensors.index.json").exists()
    assert not any(f.startswith("tokenizer") for f in os.listdir(out))
    config = json.load(open(out / "config.json"))
    # prune keeps the same channels at every point here, so there are no skip matrices and the result is
    # written stock (hidden_size 48); a bundled output records the width of each point
    assert (config.get("residual_widths") or [config["hidden_size"]] * 5) == [48] * 5
    logits = streamresize.load(str(out))(torch.randint(0, 512, (2, 16))).logits
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()
