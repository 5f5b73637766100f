"""Structured OBS selection and global allocation of MLP widths through the pipeline (issue 12)."""

import json
import pathlib

import pytest
import torch

import streamresize
from streamresize.errors import StreamResizeError
from helpers import CALIB, cli, compress_args, dense_logits, output_weights, read_config, tree_digest


def _compress(model, out, texts, **options):
    return streamresize.compress(model, str(out), dataset=[texts["calib"]], **{**CALIB, **options})


def _block_heads(out, layers):
    """[query heads, KV heads] of every block of an output (per-block, or one pair for all)."""
    config = read_config(out)
    return config.get("attention_heads") or [[config["num_attention_heads"], config["num_key_value_heads"]]] * layers


def _block_errors(out):
    record = read_config(out)["streamresize"]
    return [m["local_error"] for m in record["mlp"]], [m["support"] for m in record["mlp"]]


def test_obs_selection_leaves_less_output_error_than_the_norm_score(tiny_model, texts, tmp_path):
    common = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, width_multiple=8)
    _compress(tiny_model, tmp_path / "norm", texts, method_options={"mlp_reader": "lstsq"}, **common)
    _compress(tiny_model, tmp_path / "obs", texts, method_options={"mlp_reader": "lstsq", "mlp_support": "obs"},
              **common)
    norm, kinds_norm = _block_errors(tmp_path / "norm")
    obs, kinds_obs = _block_errors(tmp_path / "obs")
    assert set(kinds_norm) == {"norm"} and set(kinds_obs) == {"obs"}
    # Block 0 sees the same inputs in both runs: OBS's choice, refitted, must leave less error.
    assert obs[0] < norm[0]
    assert sum(obs) < sum(norm)


def test_removing_nothing_with_obs_reproduces_the_dense_logits(tiny_model, texts, tmp_path):
    _compress(tiny_model, tmp_path / "out", texts, method="dotresize", sparsity=0.0, mlp_sparsity=0.0,
              allocation="global", method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = streamresize.load(str(tmp_path / "out"))(ids).logits
    assert (logits - dense_logits(tiny_model, ids)).abs().max().item() < 1e-4


def test_global_allocation_keeps_the_uniform_total_in_multiples_and_resumes_identically(tiny_model, texts,
                                                                                           tmp_path):
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, allocation="global", width_multiple=8,
                   method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
    result = _compress(tiny_model, tmp_path / "global", texts, **options)
    uniform = _compress(tiny_model, tmp_path / "uniform", texts, **{**options, "allocation": "uniform"})
    sizes = read_config(tmp_path / "global")["intermediate_sizes"]
    assert read_config(tmp_path / "uniform")["intermediate_size"] == 48 and uniform["format"] == "stock"
    assert sum(sizes) == 4 * 48 and all(s % 8 == 0 and 8 <= s <= 96 for s in sizes)
    assert len(set(sizes)) > 1  # the curves differ between layers of a random model
    # Same MLP budget; the stock uniform output also stores the norm weights the bundled one folds away.
    assert uniform["parameters"] - result["parameters"] == 2 * 4 * 64 + 64
    assert result["format"] == "bundled"  # per-layer widths that are not multiples of 256
    # A run killed after block 1 reuses the saved curves and writes the same bytes.
    args = compress_args(tiny_model, tmp_path / "killed", texts["calib"], method="dotresize", sparsity=0.0,
                         mlp_sparsity=0.5, allocation="global", width_multiple=8,
                         option=["mlp_support=obs", "mlp_reader=lstsq"])
    killed = cli(*args, env={"STREAMRESIZE_CRASH_AT": "2:start"}, check=False)
    assert killed.returncode == 75
    cli(*args)
    exclude = ("streamresize_run.json",)
    assert tree_digest(tmp_path / "killed", exclude) == tree_digest(tmp_path / "global", exclude)


def test_global_allocation_of_a_learned_kind_is_refused_for_slicing_methods(tiny_model, texts, tmp_path):
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"], method="prune", mlp_sparsity=0.3,
                           allocation="learned"), check=False)
    assert r.returncode == 2 and "--allocation learned" in r.stderr and "--method disp" in r.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("method", ["prune", "dotresize"])
def test_removing_heads_per_kv_group_loads_and_matches_the_blocks_it_recorded(tiny_model, texts, tmp_path, method):
    """4 query heads over 2 KV heads: removing half keeps one query head per KV group."""
    result = _compress(tiny_model, tmp_path / "out", texts, method=method, sparsity=0.0, mlp_sparsity=0.25,
                       attention_sparsity=0.5, save_format="bundled")
    config = read_config(tmp_path / "out")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    for i, block in enumerate(config["streamresize"]["attention"]):
        kept = block["kept"]
        assert len(kept) == 2 and {h // 2 for h in kept} == {0, 1}  # one from each KV group
        assert block["local_error"] <= block["prune_error"] + 1e-12  # the refit never hurts
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model-block-00000.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (32, 64)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
        assert f.get_tensor("model.layers.0.self_attn.o_proj.weight").shape == (64, 32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = streamresize.load(str(tmp_path / "out"))(ids).logits
    assert torch.isfinite(logits).all()
    full = _compress(tiny_model, tmp_path / "mlp-only", texts, method=method, sparsity=0.0, mlp_sparsity=0.25,
                     save_format="bundled")
    assert full["parameters"] - result["parameters"] == 4 * 2 * (2 * 16 * 64)  # q rows and o columns of 2 heads


@pytest.mark.parametrize("tied", [False, True])
def test_uniform_head_and_neuron_removal_saves_stock_and_matches_bundled(tiny_model, tiny_model_tied, texts,
                                                                         tmp_path, tied):
    from test_formats import bundled_logits, plain_logits
    model = tiny_model_tied if tied else tiny_model
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.25, attention_sparsity=0.5,
                   method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
    assert _compress(model, tmp_path / "stock", texts, save_format="stock", **options)["format"] == "stock"
    _compress(model, tmp_path / "bundled", texts, save_format="bundled", **options)
    config = read_config(tmp_path / "stock")
    assert config["model_type"] == "llama" and config["num_attention_heads"] == 2 and config["head_dim"] == 16
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    logits, cls = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert cls == "LlamaForCausalLM"
    assert (logits - bundled_logits(tmp_path / "bundled", ids)).abs().max().item() < 1e-4


def test_target_size_with_global_allocation_spends_the_budget_to_one_multiple(tiny_model_tied, texts, tmp_path):
    from streamresize.checkpoint import parameter_count
    source = parameter_count(tiny_model_tied)
    result = _compress(tiny_model_tied, tmp_path / "out", texts, method="dotresize", sparsity=0.0, target_size=0.8,
                       mlp_ratio="fill", allocation="global", save_format="bundled",
                       method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
    sizes = read_config(tmp_path / "out")["intermediate_sizes"]
    assert all(s % 8 == 0 for s in sizes)
    assert result["parameters"] <= 0.8 * source < result["parameters"] + 3 * 64 * 8  # one more multiple would not fit


def test_the_joint_allocator_takes_the_cheapest_error_per_parameter_until_the_budget_is_met():
    from streamresize.methods.allocation import allocate
    neurons = [0, 1, 2, 3, 4]     # error after 0..4 steps of 10 parameters: 0.1 per parameter
    heads = [0, 5, 30]            # steps of 100 parameters: 0.05, then 0.25 per parameter
    assert allocate([neurons, heads], [10, 100], remove=100) == [0, 1]
    assert allocate([neurons, heads], [10, 100], remove=130) == [3, 1]   # then the neurons, not the dear round
    assert allocate([neurons, heads], [10, 100], remove=125) == [3, 1]   # at least the budget, one step over at most
    assert allocate([neurons, heads], [10, 100], remove=40, max_steps=[4, 0]) == [4, 0]  # heads held whole
    with pytest.raises(StreamResizeError, match="cannot remove"):
        allocate([neurons, heads], [10, 100], remove=1000)


def _without_heads(weights, prefix, kept_rows):
    """q rows and o columns of the kept query heads only (k, v untouched: grouped-query attention)."""
    weights[prefix + "self_attn.q_proj.weight"] = weights[prefix + "self_attn.q_proj.weight"][kept_rows]
    weights[prefix + "self_attn.o_proj.weight"] = weights[prefix + "self_attn.o_proj.weight"][:, kept_rows]


def test_per_block_head_counts_load_as_the_model_with_those_heads_silenced(tiny_model, texts, tmp_path):
    """The bundled modeling's per-block head counts (`attention_heads`): an output whose blocks 1..3 keep
    query heads 0 and 2 of 4 (one per KV group) computes what the dense model computes with heads 1 and 3
    of those blocks silenced (their o_proj columns zero)."""
    import glob
    import os

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _compress(tiny_model, out, texts, method="prune", sparsity=0.0, mlp_sparsity=0.0, save_format="bundled")
    config = read_config(out)
    kept = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # heads 0 and 2, head_dim 16
    for shard in glob.glob(os.path.join(out, "model-block-*.safetensors")):
        weights = load_file(shard)
        for name in list(weights):
            if name.endswith("self_attn.q_proj.weight") and not name.startswith("model.layers.0."):
                _without_heads(weights, name[:-len("self_attn.q_proj.weight")], kept)
        save_file(weights, shard, metadata={"format": "pt"})
    config["attention_heads"] = [[4, 2]] + [[2, 2]] * (config["num_hidden_layers"] - 1)
    with open(out / "config.json", "w") as f:
        json.dump(config, f)

    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in reference.model.layers[1:]:
            for head in (1, 3):
                layer.self_attn.o_proj.weight[:, head * 16:(head + 1) * 16] = 0
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(4))
        expected = reference(ids).logits
        got = streamresize.load(str(out))(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_global_head_allocation_meets_the_budget_and_records_per_block_heads(tiny_model_tied, texts, tmp_path):
    from streamresize.checkpoint import parameter_count
    from streamresize.methods import slicing

    source = parameter_count(tiny_model_tied)
    options = dict(method="dotresize", sparsity=0.0, target_size=0.75, mlp_ratio="fill", allocation="global",
                   method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_allocation": "global"})
    result = _compress(tiny_model_tied, tmp_path / "out", texts, **options)
    config = read_config(tmp_path / "out")
    record = config["streamresize"]
    heads = [h[0] for h in config["attention_heads"]] if "attention_heads" in config else \
        [config["num_attention_heads"]] * config["num_hidden_layers"]
    removed = [4 - h for h in heads]
    assert set(heads) <= {2, 4} and sum(removed) > 0  # heads went somewhere: the tiny model's are cheap per parameter
    assert [a["heads"] for a in record["attention"]] == [h for h in heads if h < 4]
    head_round = 2 * 16 * (64 + 64)  # two query heads (one per KV group): q rows and o columns
    assert result["parameters"] <= 0.75 * source < result["parameters"] + max(head_round, 3 * 64 * 8)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.isfinite(streamresize.load(str(tmp_path / "out"))(ids).logits).all()
    with pytest.raises(StreamResizeError, match="head counts differ per block"):
        _compress(tiny_model_tied, tmp_path / "stock", texts, save_format="stock", **options)
    with pytest.raises(StreamResizeError, match="needs --allocation global"):
        _compress(tiny_model_tied, tmp_path / "uniform", texts, **{**options, "allocation": "uniform"})
    assert slicing.HEAD_ALLOCATION.default == "uniform"


def test_global_head_allocation_without_grouped_query_attention_removes_whole_heads(tokenizer, texts, tmp_path):
    """One query head per KV head: a round removes one whole head (its q, k, v rows and o columns), and the
    output's per-block KV head counts follow; the bundled output loads and its shapes match its config."""
    from tiny import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "mha"), tokenizer, num_key_value_heads=4, layers=3, seed=7)
    _compress(model, tmp_path / "out", texts, method="dotresize", sparsity=0.0, target_size=0.75, mlp_ratio="fill",
              allocation="global", method_options={"mlp_support": "obs", "mlp_reader": "lstsq",
                                                   "head_allocation": "global"})
    heads = _block_heads(tmp_path / "out", 3)
    assert all(q == kv for q, kv in heads) and min(q for q, _ in heads) < 4
    weights = output_weights(tmp_path / "out")
    for i, (q, kv) in enumerate(heads):
        assert weights[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] == kv * 16
        assert weights[f"model.layers.{i}.self_attn.o_proj.weight"].shape[1] == q * 16
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.isfinite(streamresize.load(str(tmp_path / "out"))(ids).logits).all()


@pytest.mark.parametrize("scale", ["residual", "loss"])
def test_error_curves_see_through_the_norm_after_each_sublayer(tokenizer, texts, tmp_path, caplog, scale):
    """Gemma's norms after attention and after the MLP undo any scale of o_proj and down_proj: a model
    with block 1's writers x 10 computes the same function, so its error curves must be the same (without
    the norm's gain in the token weights, block 1's curves would be 100x the other model's; under the loss
    scale the gradient at the writer's output carries that gain)."""
    import glob
    import logging
    import os
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from tiny import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "gemma"), tokenizer, architecture="gemma3", tie=True, layers=3, seed=8,
                            sliding_window=8, query_pre_attn_scalar=24)
    scaled = str(tmp_path / "scaled")
    shutil.copytree(model, scaled)
    for shard in glob.glob(os.path.join(scaled, "*.safetensors")):
        weights = load_file(shard)
        for name in weights:
            if name.startswith("model.layers.1.") and name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
                weights[name] = weights[name] * 10
        save_file(weights, shard, metadata={"format": "pt"})
    curves = {}
    for name, path in (("source", model), ("scaled", scaled)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="streamresize"):
            _compress(path, tmp_path / f"out-{name}", texts, method="dotresize", sparsity=0.0, mlp_sparsity=0.5,
                      allocation="global", width_multiple=8,
                      method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_allocation": "global",
                                      "curve_scale": scale})
        curves[name] = [line for line in caplog.messages if line.startswith("error curves, block")]
        assert len(curves[name]) == 3 and all("after each round of heads" in line for line in curves[name])
    numbers = {k: [[float(x) for x in re.findall(r"\d+\.?\d*(?:e[-+]\d+)?", line)[1:]] for line in v]
               for k, v in curves.items()}
    for source, scaled_ in zip(numbers["source"], numbers["scaled"]):
        assert source == pytest.approx(scaled_, rel=0.02), (curves["source"], curves["scaled"])


@pytest.mark.parametrize("cheap", ["heads", "neurons"])
def test_auto_head_count_takes_the_cheaper_split_and_saves_stock(tiny_model_tied, texts, tmp_path, monkeypatch,
                                                                 cheap):
    """head_allocation=auto: one head count for every block, chosen with the MLP width by the summed
    curves. Made-up curves decide it both ways: heads that cost nothing are removed (MLP kept wider),
    heads that cost much are kept (MLP narrower); either way the budget is met and the output is stock."""
    from streamresize.checkpoint import parameter_count
    from streamresize.methods import slicing
    from test_formats import plain_logits

    def made_up(self, progress, multiple):
        steps = (96 - multiple) // multiple + 1
        head = [0.0, 0.0] if cheap == "heads" else [0.0, 1e6]
        return {"curves": [[float(s) for s in range(steps)]] * 4, "head_curves": [head] * 4}

    monkeypatch.setattr(slicing.SlicingMethod, "_measure_curves", made_up)
    source = parameter_count(tiny_model_tied)
    result = _compress(tiny_model_tied, tmp_path / "out", texts, method="dotresize", sparsity=0.0, target_size=0.8,
                       mlp_ratio="fill", width_multiple=8,
                       method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_allocation": "auto"})
    config = read_config(tmp_path / "out")
    assert result["format"] == "stock" and config["model_type"] == "llama"
    heads = config["num_attention_heads"]
    assert heads == (2 if cheap == "heads" else 4) and config["num_key_value_heads"] == 2
    neuron = 3 * 64  # a gate row, an up row and a down column, in 4 blocks: one multiple is 8 of them
    # The budget counts the tied head's 64 x 64 adapter, which a stock output holds as the final norm's gain.
    assert result["parameters"] <= 0.8 * source < result["parameters"] + 4 * 8 * neuron + 64 * 64
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    logits, cls = plain_logits(tmp_path / "out", ids, tmp_path)
    assert cls == "LlamaForCausalLM" and torch.isfinite(logits).all()


def test_auto_head_count_is_refused_where_it_cannot_apply(tiny_model_tied, texts, tmp_path):
    common = dict(method="dotresize", sparsity=0.0, mlp_ratio="fill",
                  method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_allocation": "auto"})
    with pytest.raises(StreamResizeError, match="needs --allocation uniform, --target-size"):
        _compress(tiny_model_tied, tmp_path / "a", texts, target_size=0.8, allocation="global", **common)
    with pytest.raises(StreamResizeError, match="needs --allocation uniform, --target-size"):
        _compress(tiny_model_tied, tmp_path / "b", texts, mlp_sparsity=0.25, **common)


def test_whole_kv_groups_removed_save_stock_and_per_block_under_global(tiny_model_tied, texts, tmp_path):
    """head_unit=kv_group: a uniform removal keeps 1 of 2 KV groups with its 2 query heads and saves as a stock
    GQA checkpoint that stock transformers computes as the bundled save does; under global allocation each
    block keeps whole groups ([q, kv] with q = 2 kv) and the k/v weights follow."""
    from test_formats import bundled_logits, plain_logits

    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.25, attention_sparsity=0.5,
                   method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_unit": "kv_group"})
    assert _compress(tiny_model_tied, tmp_path / "stock", texts, save_format="stock", **options)["format"] == "stock"
    _compress(tiny_model_tied, tmp_path / "bundled", texts, save_format="bundled", **options)
    config = read_config(tmp_path / "stock")
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(7))
    logits, cls = plain_logits(tmp_path / "stock", ids, tmp_path)
    assert cls == "LlamaForCausalLM"
    assert (logits - bundled_logits(tmp_path / "bundled", ids)).abs().max().item() < 1e-4

    _compress(tiny_model_tied, tmp_path / "global", texts, method="dotresize", sparsity=0.0, target_size=0.75,
              mlp_ratio="fill", allocation="global",
              method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "head_allocation": "global",
                              "head_unit": "kv_group"})
    heads = _block_heads(tmp_path / "global", 4)
    assert all(q == 2 * kv and kv in (1, 2) for q, kv in heads) and min(kv for _, kv in heads) == 1
    weights = output_weights(tmp_path / "global")
    for i, (q, kv) in enumerate(heads):
        assert weights[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0] == kv * 16
        assert weights[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] == q * 16


CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_runs_and_its_output_loads(tiny_model_tied, texts, tmp_path, recipe):
    """The recipes in configs/ as a user runs them (`--recipe configs/NAME`), on the tiny model."""
    cli(*compress_args(tiny_model_tied, tmp_path / "out", texts["calib"], recipe=str(CONFIGS / recipe)))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.isfinite(streamresize.load(str(tmp_path / "out"))(ids).logits).all()


def test_a_refit_with_fewer_tokens_than_kept_inputs_says_its_error_means_nothing(tiny_model, texts, tmp_path,
                                                                                 caplog):
    common = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, attention_sparsity=0.5, width_multiple=8,
                  method_options={"mlp_reader": "lstsq", "mlp_support": "obs"})
    with caplog.at_level("INFO", logger="streamresize"):
        _compress(tiny_model, tmp_path / "few", texts, **{**common, "num_calibration_samples": 2,
                                                          "max_seq_length": 16})
    few = [r.getMessage() for r in caplog.records if "MLP 48 of 96" in r.getMessage()]
    assert len(few) == 4 and all("exact by construction: 32 calibration tokens for 48 kept" in m for m in few)
    heads = [r.getMessage() for r in caplog.records if "attention heads 2 of 4" in r.getMessage()]
    assert len(heads) == 4 and all("32 calibration tokens for 32 kept o_proj inputs" in m for m in heads)
    caplog.clear()
    with caplog.at_level("INFO", logger="streamresize"):
        _compress(tiny_model, tmp_path / "enough", texts, **common)
    enough = [r.getMessage() for r in caplog.records if "MLP 48 of 96" in r.getMessage()]
    assert len(enough) == 4 and not any("exact by construction" in m for m in enough)
    assert not any("exact by construction" in r.getMessage() for r in caplog.records)
