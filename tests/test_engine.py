"""The streaming engine with the `pca` method, end to end on a tiny random Llama (GQA, 3+ shards)."""

import json
import os

import pytest
import torch
from helpers import (CALIB, cli, compress_args, dense_logits, logits_without_streamresize, output_weights, read_config,
                     tree_digest)
from reference_pca import reference_pca

import streamresize
from streamresize.checkpoint import parameter_count
from streamresize.writer import RUN_LOG


def _ids(seed=0, shape=(2, 24), vocab=300):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _compress(model, out, texts, **options):
    return streamresize.compress(model, str(out), dataset=[texts["calib"]], **{**CALIB, **options})


@pytest.mark.parametrize("rotate", [False, True])
def test_sparsity_zero_reproduces_dense_logits_through_stock_transformers(tiny_model, texts, tmp_path, rotate):
    """rotate: full-width PCA rotations and skip matrices at every point instead of the identity."""
    out = tmp_path / "out"
    _compress(tiny_model, out, texts, sparsity=0.0, method_options={"rotate_full_width": rotate})
    assert any("shortcut" in name for name in output_weights(out)) == rotate
    ids = _ids()
    ours = logits_without_streamresize(out, ids, tmp_path)
    dense = dense_logits(tiny_model, ids)
    assert ours.shape == dense.shape
    assert (ours - dense).abs().max().item() < 1e-4


def test_bf16_input_stays_bf16_and_tracks_dense(tiny_model_bf16, texts, tmp_path):
    out = tmp_path / "out"
    _compress(tiny_model_bf16, out, texts, sparsity=0.0, method_options={"rotate_full_width": True})
    assert all(t.dtype == torch.bfloat16 for t in output_weights(out).values())
    assert read_config(out)["dtype"] == "bfloat16"
    ids = _ids()
    ours = logits_without_streamresize(out, ids, tmp_path)
    dense = dense_logits(tiny_model_bf16, ids)
    # bf16 storage of rotated weights: error at bf16 resolution, far below the logit scale.
    assert (ours - dense).abs().max().item() < 0.05 * dense.abs().max().item()


def test_streaming_matches_in_memory_reference(tiny_model, texts, pca_quarter):
    out = pca_quarter.out  # compress --sparsity 0.25
    ids = torch.from_numpy(_calibration_ids(tiny_model, texts))
    expected = reference_pca(tiny_model, ids, 0.25)
    got = output_weights(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        err = (got[name].double() - tensor).abs().max().item()
        assert err < 1e-4 * max(1.0, tensor.abs().max().item()), f"{name}: max abs error {err}"


def _calibration_ids(model, texts):
    from streamresize.calibration import calibration_ids

    return calibration_ids(model, [texts["calib"]], CALIB["num_calibration_samples"], CALIB["max_seq_length"], 0)


def test_sparsity_quarter_has_recorded_widths_fewer_parameters_and_loads(tiny_model, pca_quarter, tmp_path):
    out = pca_quarter.out  # compress --sparsity 0.25
    summary = json.loads(pca_quarter.result.stdout.strip().splitlines()[-1])
    config = read_config(out)
    assert config["residual_widths"] == [48] * (2 * config["num_hidden_layers"] + 1)
    assert [p["width"] for p in config["streamresize"]["points"]] == config["residual_widths"]
    weights = output_weights(out)
    assert weights["model.embed_tokens.weight"].shape[1] == 48
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape[1] == 48
    assert weights["model.layers.0.mlp.down_proj.weight"].shape[0] == 48
    assert parameter_count(out) < parameter_count(tiny_model)
    assert summary["parameters"] == parameter_count(out)
    logits = logits_without_streamresize(out, _ids(), tmp_path)
    assert torch.isfinite(logits).all()
    assert (logits - streamresize.load(str(out))(_ids()).logits.detach()).abs().max() < 1e-5


def test_input_directory_is_untouched(tiny_model, pca_quarter):
    # pca_quarter took the digest just before its run; every run of the session since has read it too
    assert tree_digest(tiny_model) == pca_quarter.input_digest


def test_work_dir_removed_and_output_complete(pca_quarter):
    out = pca_quarter.out  # compress --sparsity 0.25
    assert not os.path.exists(str(out) + ".streamresize-work")
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) <= set(os.listdir(out))
    assert (out / "modeling_streamresize.py").exists() and (out / "tokenizer.json").exists()
    assert read_config(out)["auto_map"]["AutoModelForCausalLM"] == "modeling_streamresize.StreamResizeForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["0:solving", "2:start", "1:propagating", "2:committing", "-1:committing"])
def test_resumed_run_is_byte_identical(tiny_model, texts, tmp_path, pca_quarter, crash_at):
    """Crash (os._exit, no clean-up) inside a block or between blocks, resume, compare every byte with
    the uninterrupted run. The crashed run is a separate process; the resumed one runs in this process."""
    reference = pca_quarter.out  # the same command, never interrupted
    out = tmp_path / "out"
    crashed = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25),
                  env={"STREAMRESIZE_CRASH_AT": crash_at}, check=False)
    assert crashed.returncode == 75, crashed.stderr
    assert not (out / "model.safetensors.index.json").exists(), "a partial output must not be marked complete"
    # The previous step commits in the background, so a power cut may land before or after that commit:
    # the manifest on disk says which, and the resumed run must start exactly there.
    manifest = os.path.join(str(out) + ".streamresize-work", "manifest.json")
    committed = json.load(open(manifest))["next_block"] if os.path.exists(manifest) else -1
    assert committed <= int(crash_at.split(":")[0]), "a block that crashed must not be recorded as done"
    resumed = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25))
    if committed >= 0:
        assert f"resuming at block {committed} of" in resumed.stderr
    else:
        assert "resuming at block" not in resumed.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})
    assert set(os.listdir(out)) == set(os.listdir(reference))


def test_changed_recipe_refuses_to_resume_until_restart(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    crashed = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25),
                  env={"STREAMRESIZE_CRASH_AT": "1:start"}, check=False)
    assert crashed.returncode == 75
    refused = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.5), check=False)
    assert refused.returncode == 2
    assert "different run" in refused.stderr and "--restart" in refused.stderr
    cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.5), "--restart")
    assert read_config(out)["residual_widths"][0] == 32


def test_recipe_file_with_command_line_override(tiny_model, texts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: pca\nsparsity: 0.5\nnum-calibration-samples: 8\nmax_seq_length: 32\n")
    out = tmp_path / "out"
    cli("compress", tiny_model, out, "--recipe", recipe, "--dataset", texts["calib"], "--sparsity", "0.25")
    config = read_config(out)
    assert config["streamresize"]["recipe"]["sparsity"] == 0.25
    assert config["streamresize"]["recipe"]["num_calibration_samples"] == 8


def test_eval_prints_json_with_perplexity(tiny_model, texts):
    result = cli("eval", tiny_model, "--dataset", texts["heldout"], "--max-seq-length", 32, "--num-samples", 4)
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["tokens"] == 4 * 31 and 1 < final["perplexity"] < 1e4


def test_mistral_family_round_trip(tokenizer, texts, tmp_path):
    from tiny import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "mistral"), tokenizer, architecture="mistral", layers=2, seed=5)
    out = tmp_path / "out"
    _compress(model, out, texts, sparsity=0.0, method_options={"rotate_full_width": True})
    ids = _ids()
    assert (logits_without_streamresize(out, ids, tmp_path) - dense_logits(model, ids)).abs().max() < 1e-4
