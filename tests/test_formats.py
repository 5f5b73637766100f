"""Output formats: a result that fits the source architecture is written as that architecture and loads
with plain transformers (no remote code, streamresize not importable), matching the bundled format."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from helpers import BLOCK_STREAMRESIZE, CALIB, run_script
from tiny import make_tiny_llama

import streamresize
from streamresize import cli
from streamresize.errors import StreamResizeError

PLAIN_LOAD = BLOCK_STREAMRESIZE + textwrap.dedent('''
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    model_dir, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers.models."), type(model)
    with torch.no_grad():
        np.save(out_path, model(torch.from_numpy(np.load(ids_path))).logits.numpy())
    print(type(model).__name__)
''')


def plain_logits(model_dir, ids, tmp_path):
    """Logits from stock transformers with no remote code, in a process without streamresize."""
    ids_path, out_path, script = tmp_path / "ids.npy", tmp_path / "logits.npy", tmp_path / "plain_load.py"
    np.save(ids_path, ids.numpy())
    script.write_text(PLAIN_LOAD)
    r = run_script(script, model_dir, ids_path, out_path)  # a fork of a process that never imported streamresize
    return torch.from_numpy(np.load(out_path)), r.stdout.strip().splitlines()[-1]


def bundled_logits(model_dir, ids):
    with torch.no_grad():
        return streamresize.load(str(model_dir))(ids).logits


@pytest.fixture(scope="module", params=["llama", "mistral"])
def family_models(request, tmp_path_factory, tokenizer):
    """(untied, tied) tiny models of one family."""
    root = tmp_path_factory.mktemp(f"formats-{request.param}")
    return request.param, (make_tiny_llama(str(root / "untied"), tokenizer, architecture=request.param, layers=2),
                           make_tiny_llama(str(root / "tied"), tokenizer, architecture=request.param, layers=2,
                                           tie=True, seed=4))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["prune", "dotresize"])
def test_mlp_narrowing_is_written_stock_and_matches_bundled(family_models, texts, tmp_path, method, tied):
    family, models = family_models
    model = models[tied]
    options = dict(method=method, sparsity=0.0, mlp_sparsity=0.3, dataset=[texts["calib"]], **CALIB)
    stock = streamresize.compress(model, str(tmp_path / "stock"), **options)
    bundled = streamresize.compress(model, str(tmp_path / "bundled"), save_format="bundled", **options)
    assert stock["format"] == "stock" and bundled["format"] == "bundled"
    config = json.load(open(tmp_path / "stock" / "config.json"))
    assert config["model_type"] == family and config["intermediate_size"] == 64  # 96 * 0.7 -> 64
    assert config["tie_word_embeddings"] == tied and "auto_map" not in config
    assert not (tmp_path / "stock" / "modeling_streamresize.py").exists()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    logits, cls = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert cls == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[family]
    assert (logits - bundled_logits(tmp_path / "bundled", ids)).abs().max().item() < 1e-4
    # Stock stores the norm weights the bundled one folds away; where the bundled tied head reads through
    # its adapter, that is the 64-vector of the final norm's gain (the residual is whole), which stock
    # stores as the final norm.
    norms = 2 * 2 * 64 + 64
    assert stock["parameters"] - bundled["parameters"] == norms - (64 if tied else 0)
    card = open(tmp_path / "stock" / "README.md").read()
    assert "vllm serve" in card and "format: **stock**" in card


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["pca", "dotresize"])
def test_one_shared_basis_is_written_stock_with_rescaled_norms(tiny_model, tiny_model_tied, texts, tmp_path,
                                                               method, tied):
    """A residual narrowed 64 -> 48 by one shared basis: stock with hidden_size 48, norm weights
    sqrt(64/48) and eps x 64/48, the same logits as bundled; a tied head whose adapter is not
    diagonal is untied."""
    model = tiny_model_tied if tied else tiny_model
    options = dict(method=method, sparsity=0.25, basis="shared", head="tied" if tied else "untied",
                   dataset=[texts["calib"]], **CALIB)
    stock = streamresize.compress(model, str(tmp_path / "stock"), save_format="stock", **options)
    streamresize.compress(model, str(tmp_path / "bundled"), save_format="bundled", **options)
    config = json.load(open(tmp_path / "stock" / "config.json"))
    source = json.load(open(os.path.join(model, "config.json")))
    assert stock["format"] == "stock" and config["model_type"] == "llama" and config["hidden_size"] == 48
    assert config["head_dim"] == 16 and config["rms_norm_eps"] == pytest.approx(source["rms_norm_eps"] * 64 / 48)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    logits, cls = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert cls == "LlamaForCausalLM"
    assert (logits - bundled_logits(tmp_path / "bundled", ids)).abs().max().item() < 1e-4


def test_auto_keeps_bundled_where_stock_cannot_hold_the_result(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    summary = streamresize.compress(tiny_model, str(out), method="pca", sparsity=0.25, dataset=[texts["calib"]],
                                    **CALIB)
    assert summary["format"] == "bundled"
    assert json.load(open(out / "config.json"))["model_type"] == "streamresize"
    assert "skip-path matrices" in open(out / "README.md").read()


def test_stock_refused_when_it_cannot_hold_the_result_and_nothing_marked_complete(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StreamResizeError, match=f"{out}: cannot be written as a stock checkpoint: per-point bases"):
        streamresize.compress(tiny_model, str(out), method="pca", sparsity=0.25, save_format="stock",
                              dataset=[texts["calib"]], **CALIB)
    assert not (out / "model.safetensors.index.json").exists()


def test_export_round_trip_and_a_refused_export_leaves_nothing(tiny_model, texts, tmp_path):
    bundled = tmp_path / "bundled"
    streamresize.compress(tiny_model, str(bundled), method="dotresize", sparsity=0.0, mlp_sparsity=0.25,
                          save_format="bundled", dataset=[texts["calib"]], **CALIB)
    before = {name: open(bundled / name, "rb").read() for name in os.listdir(bundled)}
    assert cli.main(["export", str(bundled), str(tmp_path / "stock")]) == 0
    assert {name: open(bundled / name, "rb").read() for name in os.listdir(bundled)} == before  # only read
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    logits, _ = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert (logits - bundled_logits(bundled, ids)).abs().max().item() < 1e-4
    for fmt in ("auto", "bundled", "stock"):  # already stock: nothing to convert, and no mislabelled copy
        assert cli.main(["export", str(tmp_path / "stock"), str(tmp_path / "again"), "--format", fmt]) == 2
        assert not (tmp_path / "again").exists()
    pca = tmp_path / "pca"
    streamresize.compress(tiny_model, str(pca), method="pca", sparsity=0.25, dataset=[texts["calib"]], **CALIB)
    assert cli.main(["export", str(pca), str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()


def test_a_width_the_heads_do_not_divide_is_written_as_mistral(tiny_model, texts, tmp_path):
    """k = 46 with 4 heads: LlamaConfig would refuse it, so the stock class is Mistral with no window."""
    options = dict(method="pca", sparsity=0.28, width_multiple=2, basis="shared", head="untied",
                   dataset=[texts["calib"]], **CALIB)
    streamresize.compress(tiny_model, str(tmp_path / "stock"), save_format="stock", **options)
    streamresize.compress(tiny_model, str(tmp_path / "bundled"), save_format="bundled", **options)
    config = json.load(open(tmp_path / "stock" / "config.json"))
    assert config["hidden_size"] == 46 and config["model_type"] == "mistral" and config["sliding_window"] is None
    assert "MistralForCausalLM" in open(tmp_path / "stock" / "README.md").read()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    logits, cls = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert cls == "MistralForCausalLM"
    assert (logits - bundled_logits(tmp_path / "bundled", ids)).abs().max().item() < 1e-4
