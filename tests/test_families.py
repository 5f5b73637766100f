"""Model families beyond Llama's own tensors (issue 13): tiny random models of each family built here,
several shards, fp32 (bf16 for one). For each: sparsity 0 reproduces the dense logits in stock
transformers (a process where streamresize cannot be imported); MLP and head reductions are written
stock, with the recorded widths, fewer parameters and the bundled output's logits; what a family
carries besides Llama's tensors (Qwen2's q/k/v biases, Qwen3's q/k norms) is compared against an
in-memory reference that applies the same selection; each refusal's message is checked; the README's
support matrix is the adapters' rendering."""

import json
import os
import re

import pytest
import torch
from helpers import CALIB, dense_logits
from safetensors import safe_open
from test_formats import plain_logits
from tiny import make_tiny_llama

import streamresize
from streamresize import arch
from streamresize.arch.base import ArchSpec
from streamresize.errors import StreamResizeError
from streamresize.methods import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(7))
STOCK_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM",
               "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# Gemma 3 (text): a sliding-window layer (window 8, shorter than the 20- and 32-token inputs) beside a global
# one, each with its rotary base; attention scaled by query_pre_attn_scalar 24 (not head_dim 16); tied.
GEMMA3 = dict(architecture="gemma3", tie=True, sliding_window=8, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention"])
# Llama 3.2 1B/3B details: a tied head over a large vocabulary (more rows than one by_rows block) and
# rope of type llama3.
LLAMA3 = dict(vocab_size=5000, tie=True, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})


def tensors(model_dir):
    """Every tensor of a checkpoint directory, by name."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bundled_logits(model_dir, ids):
    """Logits of a bundled output through our modeling code, computed in float32 as plain_logits does."""
    with torch.no_grad():
        return streamresize.load(str(model_dir), dtype=torch.float32)(ids).logits


def config_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Tiny models by key, made on first use: qwen2, qwen3, llama3 (tied, large vocabulary, llama3 rope),
    qwen2-mha (a KV head per query head), qwen2-bf16, phi3 (fused tensors, a KV head per query head as in
    Phi-3 mini, partial rotary as in Phi-4-mini)."""
    made = {}
    specs = {"qwen2": dict(architecture="qwen2"), "qwen3": dict(architecture="qwen3"),
             "llama3": dict(architecture="llama", shards=12, **LLAMA3), "qwen2-mha": dict(architecture="qwen2", num_key_value_heads=4),
             "qwen2-bf16": dict(architecture="qwen2", dtype=torch.bfloat16, seed=5),
             "phi3": dict(architecture="phi3", num_key_value_heads=4, partial_rotary_factor=0.75),
             "gemma3": dict(**GEMMA3), "gemma3-bf16": dict(**GEMMA3, dtype=torch.bfloat16, seed=5),
             # Gemma 2: the same layout without q/k norms, with soft-capping of attention (eager) and final logits
             "gemma2": dict(GEMMA3, architecture="gemma2", attn_logit_softcapping=5.0, final_logit_softcapping=3.0)}

    def get(key):
        if key not in made:
            made[key] = make_tiny_llama(str(tmp_path_factory.mktemp(key)), tokenizer, layers=2, **specs[key])
        return made[key]

    return get


def compress(model, out, **options):
    return streamresize.compress(model, str(out), **{**dict(dataset=[options.pop("dataset")]), **CALIB, **options})


# ---- the function is kept ------------------------------------------------------------------------


@pytest.mark.parametrize("key,method", [(key, method) for key in ("qwen2", "qwen3", "llama3", "phi3")
                                        for method in ("pca", "prune", "dotresize")]
                         + [("gemma3", "prune"), ("gemma3", "dotresize"), ("gemma2", "prune")])
def test_sparsity_zero_reproduces_the_dense_logits_in_stock_transformers(models, texts, tmp_path, key, method):
    model = models(key)
    summary = compress(model, tmp_path / "out", method=method, sparsity=0.0, dataset=texts["calib"])
    assert summary["format"] == "stock"
    logits, cls = plain_logits(tmp_path / "out", IDS, tmp_path)
    assert cls == STOCK_CLASS[key]
    assert (logits - dense_logits(model, IDS)).abs().max().item() < 1e-4


@pytest.mark.parametrize("key,heads", [("qwen2", 0.5), ("qwen3", 0.5), ("llama3", 0.5), ("qwen2-mha", 0.5),
                                       ("qwen2-bf16", 0.5), ("qwen3", 0.0), ("phi3", 0.5), ("gemma3", 0.5),
                                       ("gemma3-bf16", 0.5), ("gemma2", 0.5)])
def test_mlp_and_head_reduction_is_stock_with_the_recorded_widths_and_the_bundled_logits(models, texts, tmp_path,
                                                                                          key, heads):
    model = models(key)
    source = config_of(model)
    options = dict(method="prune", sparsity=0.0, mlp_sparsity=0.3, attention_sparsity=heads, dataset=texts["calib"])
    stock = compress(model, tmp_path / "stock", **options)
    bundled = compress(model, tmp_path / "bundled", save_format="bundled", **options)
    assert stock["format"] == "stock" and bundled["format"] == "bundled"
    config = config_of(tmp_path / "stock")
    assert config["architectures"] == source["architectures"] and config["model_type"] == source["model_type"]
    assert config["intermediate_size"] == 64 and "linear_biases" not in config  # 96 x 0.7 -> 64
    expected_heads = 2 if heads else 4
    assert config["num_attention_heads"] == expected_heads
    mha = source["num_key_value_heads"] == source["num_attention_heads"]  # whole heads go with their k and v
    assert config["num_key_value_heads"] == (2 if mha and heads else source["num_key_value_heads"])
    record = config["streamresize"]
    assert [m["width"] for m in record["mlp"]] == [64, 64]
    if heads:
        assert [a["heads"] for a in record["attention"]] == [2, 2]
    assert stock["parameters"] < stock["source_parameters"]
    for field in ("rope_parameters", "tie_word_embeddings", "vocab_size", "layer_types", "use_sliding_window",
                  "sliding_window", "max_window_layers", "partial_rotary_factor", "rope_scaling",
                  "query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation"):
        assert config.get(field) == source.get(field), field  # carried through unchanged
    logits, cls = plain_logits(tmp_path / "stock", IDS, tmp_path)
    assert cls == source["architectures"][0]
    tolerance = 1e-3 if key.endswith("bf16") else 1e-4
    assert (logits - bundled_logits(tmp_path / "bundled", IDS)).abs().max().item() < tolerance


def test_llama3_details_are_carried_through_unchanged(models, texts, tmp_path):
    """Tied embeddings over a 5000-token vocabulary and rope_type llama3: the output keeps them."""
    model = models("llama3")
    source = config_of(model)
    assert source["rope_parameters"]["rope_type"] == "llama3" and source["tie_word_embeddings"]
    compress(model, tmp_path / "out", method="dotresize", sparsity=0.0, mlp_sparsity=0.3, dataset=texts["calib"])
    config = config_of(tmp_path / "out")
    assert config["rope_parameters"] == source["rope_parameters"] and config["tie_word_embeddings"] is True
    out = tensors(tmp_path / "out")
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape == (5000, 64)


# ---- what a family carries besides Llama's tensors -------------------------------------------------


def _bias_reference(source, config, block, role):
    """The source's bias of `role` in `block` with the selection recorded in config.json applied: the q
    rows of the kept query heads; the k/v rows of the kept heads where every query head had its own KV
    head (then whole heads go); with grouped-query attention k/v keep every row."""
    bias = source[f"model.layers.{block}.self_attn.{role}.bias"]
    attention = config["streamresize"].get("attention")
    if not attention:
        return bias
    kept, of, head_dim = attention[block]["kept"], attention[block]["of"], config["head_dim"]
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    whole_heads = bias.numel() // head_dim == of
    return bias[rows] if role == "q_proj" or whole_heads else bias


@pytest.mark.parametrize("key,options", [
    ("qwen2", dict(method="prune", sparsity=0.0, mlp_sparsity=0.3, attention_sparsity=0.5)),
    ("qwen2-mha", dict(method="prune", sparsity=0.0, mlp_sparsity=0.3, attention_sparsity=0.5)),
    ("qwen2", dict(method="pca", sparsity=0.25, attention_sparsity=0.5)),
    ("qwen2-mha", dict(method="dotresize", sparsity=0.25, mlp_sparsity=0.25, attention_sparsity=0.25)),
    ("qwen2", dict(method="disp", sparsity=0.25)),
])
def test_no_qwen2_bias_is_lost_or_left_unmoved(models, texts, tmp_path, key, options):
    """Every q/k/v bias of the output equals the source's, with the rows of the heads config.json records
    as kept (a residual rotation or channel selection leaves a reader's bias as it is)."""
    model = models(key)
    compress(model, tmp_path / "out", save_format="bundled", dataset=texts["calib"], **options)
    config, source, out = config_of(tmp_path / "out"), tensors(model), tensors(tmp_path / "out")
    assert config["linear_biases"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    biases = sorted(n for n in out if n.endswith(".bias"))
    assert biases == sorted(n for n in source if n.endswith(".bias")) and len(biases) == 6
    for block in range(2):
        for role in ("q_proj", "k_proj", "v_proj"):
            got = out[f"model.layers.{block}.self_attn.{role}.bias"]
            assert torch.equal(got, _bias_reference(source, config, block, role)), (block, role)
    if options.get("attention_sparsity"):  # the selection moved the rows: a bias left whole would fail above
        assert out["model.layers.0.self_attn.q_proj.bias"].numel() < source["model.layers.0.self_attn.q_proj.bias"].numel()
    assert torch.isfinite(bundled_logits(tmp_path / "out", IDS)).all()


@pytest.mark.parametrize("method", ["pca", "disp"])
def test_qwen3_head_norms_are_carried_unchanged(models, texts, tmp_path, method):
    model = models("qwen3")
    options = dict(method=method, sparsity=0.25, **({"attention_sparsity": 0.5} if method == "pca" else {}))
    compress(model, tmp_path / "out", dataset=texts["calib"], **options)
    source, out = tensors(model), tensors(tmp_path / "out")
    norms = sorted(n for n in source if "q_norm" in n or "k_norm" in n)
    assert len(norms) == 4
    for name in norms:
        assert torch.equal(out[name], source[name]), name
    assert torch.isfinite(bundled_logits(tmp_path / "out", IDS)).all()


@pytest.mark.parametrize("save_format", ["stock", "bundled"])
def test_phi3_keeps_its_fused_tensors(models, texts, tmp_path, save_format):
    """Phi-3's qkv_proj and gate_up_proj are split for the methods and merged back on write: the stock output
    holds the fused tensors (the kept heads' q, k, v rows and the kept neurons' gate, up rows) and none of
    the parts; the bundled one holds the parts, whose concatenation is the stock tensor."""
    model = models("phi3")
    options = dict(method="prune", sparsity=0.0, mlp_sparsity=0.3, attention_sparsity=0.5, dataset=texts["calib"])
    compress(model, tmp_path / "stock", save_format="stock", **options)
    compress(model, tmp_path / "bundled", save_format="bundled", **options)
    stock, bundled, source = tensors(tmp_path / "stock"), tensors(tmp_path / "bundled"), tensors(model)
    config = config_of(tmp_path / "stock")
    parts = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight")
    assert not [name for name in stock if name.endswith(parts)]
    for i in range(2):
        p = f"model.layers.{i}."
        assert stock[p + "self_attn.qkv_proj.weight"].shape == (3 * 2 * 16, 64)  # 2 heads of 16, q + k + v
        assert stock[p + "mlp.gate_up_proj.weight"].shape == (2 * 64, 64)
        assert torch.equal(stock[p + "self_attn.qkv_proj.weight"], torch.cat(
            [bundled[p + f"self_attn.{r}.weight"] for r in ("q_proj", "k_proj", "v_proj")]))
        assert torch.equal(stock[p + "mlp.gate_up_proj.weight"],
                           torch.cat([bundled[p + "mlp.gate_proj.weight"], bundled[p + "mlp.up_proj.weight"]]))
        # q rows of the kept heads, read out of the source's fused tensor (norm gains folded in)
        kept = config["streamresize"]["attention"][i]["kept"]
        rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
        gain = source[p + "input_layernorm.weight"]
        expected_q = (source[p + "self_attn.qkv_proj.weight"][:64][rows].double() * gain.double()).float()
        assert torch.allclose(stock[p + "self_attn.qkv_proj.weight"][:32], expected_q, atol=1e-6)


# ---- Gemma 3: norms kept, residual whole ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["gemma3", "gemma2"])
def test_gemma_norms_are_kept_and_the_bundled_code_computes_the_dense_model(models, texts, tmp_path, key):
    """At sparsity 0 the bundled output (our KeptNormDecoderLayer, scaled embedding, a rotary per layer type,
    sliding masks, Gemma 2's soft-capping) reproduces the dense logits; every norm is the source's, nothing
    folded into a reader."""
    model = models(key)
    compress(model, tmp_path / "out", method="prune", sparsity=0.0, save_format="bundled", dataset=texts["calib"])
    assert (bundled_logits(tmp_path / "out", IDS) - dense_logits(model, IDS)).abs().max().item() < 1e-4
    source, out = tensors(model), tensors(tmp_path / "out")
    assert set(out) == set(source)  # tied: no head, no adapter
    for name in source:
        assert torch.equal(out[name], source[name]), name


def test_gemma3_global_mlp_allocation_with_obs_is_bundled_with_the_recorded_widths(models, texts, tmp_path):
    model = models("gemma3")
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.3, attention_sparsity=0.5, allocation="global",
                   method_options={"mlp_support": "obs"}, dataset=texts["calib"])
    summary = compress(model, tmp_path / "out", **options)
    config = config_of(tmp_path / "out")
    widths = config["intermediate_sizes"]
    assert summary["format"] == "bundled" and len(set(widths)) > 1 and sum(widths) == 2 * 64
    assert [m["width"] for m in config["streamresize"]["mlp"]] == widths
    assert summary["parameters"] < summary["source_parameters"]
    out = tensors(tmp_path / "out")
    for i, width in enumerate(widths):
        assert out[f"model.layers.{i}.mlp.down_proj.weight"].shape == (64, width)
        assert out[f"model.layers.{i}.self_attn.q_proj.weight"].shape == (2 * 16, 64)
    assert torch.isfinite(bundled_logits(tmp_path / "out", IDS)).all()


@pytest.mark.parametrize("options,refused", [
    (dict(method="pca", sparsity=0.0), "does not support --method pca"),
    (dict(method="disp", sparsity=0.2), "does not support --method disp"),
    (dict(method="prune", sparsity=0.25), "does not support --method prune with --sparsity 0.25"),
    (dict(method="dotresize", sparsity=0.25, mlp_sparsity=0.2), "does not support --method dotresize with --sparsity 0.25"),
    (dict(method="prune", sparsity=0.0, basis="shared", mlp_sparsity=0.2), "does not support --method prune with --basis shared"),
    (dict(method="dotresize", sparsity=0.0, target_size=0.8), "does not support --method dotresize with --target-size with --mlp-ratio 1.0"),
])
def test_gemma3_residual_width_methods_are_refused_naming_family_method_and_what_works(models, texts, tmp_path,
                                                                                       options, refused):
    with pytest.raises(StreamResizeError) as error:
        compress(models("gemma3"), tmp_path / "out", dataset=texts["calib"], **options)
    message = str(error.value)
    assert f"the gemma3 family {refused}" in message, message
    assert "norms after attention and after the MLP" in message
    assert "--sparsity 0 with --mlp-sparsity" in message and "--attention-sparsity" in message
    assert not (tmp_path / "out").exists()


def test_gemma3_target_size_fills_the_mlp(models, texts, tmp_path):
    """--target-size with --mlp-ratio fill narrows the MLP only; the budget counts no head adapter."""
    model = models("gemma3")
    summary = compress(model, tmp_path / "out", method="dotresize", sparsity=0.0, target_size=0.9, mlp_ratio="fill",
                       dataset=texts["calib"])
    assert summary["format"] == "stock" and summary["parameters"] <= 0.9 * summary["source_parameters"]
    assert config_of(tmp_path / "out")["intermediate_size"] < 96


@pytest.mark.parametrize("key", ["qwen2", "qwen3", "llama3", "phi3", "gemma3", "gemma2", "qwen2-mha"])
def test_the_budget_formula_counts_every_stored_parameter_of_the_dense_model(models, key):
    """Block-linear weights, embedding and head, and the family's vectors (norms, biases, q/k norms): the
    formula --target-size spends equals the source's stored count at full width."""
    from streamresize.budget import output_parameters
    from streamresize.checkpoint import parameter_count

    model = models(key)
    config = config_of(model)
    formula = output_parameters(config, config["hidden_size"], config["intermediate_size"], False,
                                config.get("tie_word_embeddings", False), adapter=False,
                                family=arch.spec_for(config))
    assert formula == parameter_count(model)


@pytest.mark.parametrize("key", ["qwen2", "gemma3"])
def test_target_size_is_not_passed_by_norms_and_biases(tokenizer, texts, tmp_path, key):
    """A target just above what the narrowed blocks alone need: before the family's norms and biases were
    counted, 0.6 kept 60.004 % (qwen2) and 60.011 % (gemma3) of the parameters on 768-wide MLPs."""
    model = make_tiny_llama(str(tmp_path / "wide"), tokenizer, seed=5, architecture=key, intermediate_size=768)
    for target in (0.6, 0.75):
        summary = compress(model, tmp_path / f"out{target}", recipe=os.path.join(ROOT, "configs", "portable.yaml"),
                           target_size=target, dataset=texts["calib"])
        assert summary["parameters"] <= target * summary["source_parameters"]
        assert summary["parameters"] >= (target - 0.01) * summary["source_parameters"]


@pytest.mark.parametrize("key,scale,other", [("gemma3", "residual", "loss"), ("llama", "loss", "residual")])
def test_curve_scale_auto_is_residual_after_post_norms_and_loss_before(models, tokenizer, texts, tmp_path, key,
                                                                       scale, other):
    """quality.yaml's curve_scale auto: the same output as naming the scale the family takes, and not the
    other scale's (which on these models allocates differently)."""
    model = models(key) if key == "gemma3" else make_tiny_llama(str(tmp_path / "m"), tokenizer, seed=5)
    digests = {}
    for value in ("auto", scale, other):
        compress(model, tmp_path / value, method="dotresize", sparsity=0.0, target_size=0.8, mlp_ratio="fill",
                 allocation="global", width_multiple=8, dataset=texts["calib"],
                 method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "reader": "lstsq",
                                 "head_allocation": "global", "curve_scale": value})
        digests[value] = {name: t.numpy().tobytes() for name, t in tensors(tmp_path / value).items()}
    assert digests["auto"] == digests[scale]
    assert digests["auto"] != digests[other]


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,why", [("qwen2", "without the q/k/v biases"),
                                     ("gemma3", "without Gemma's post-sublayer and \\(1 \\+ w\\) norms")])
def test_decilm_is_refused_for_a_family_whose_blocks_it_cannot_hold(models, texts, tmp_path, key, why):
    with pytest.raises(StreamResizeError, match=f"a {key} model cannot be written in this format \\(DeciLM's blocks "
                                                f"are Llama's, {why}\\); use auto or stock or bundled"):
        compress(models(key), tmp_path / "out", method="prune", sparsity=0.0, mlp_sparsity=0.3,
                 save_format="decilm", dataset=texts["calib"])
    assert not (tmp_path / "out").exists()


def test_sliding_window_layers_are_refused(models, texts, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(models("qwen2"), model)
    config = config_of(model)
    config.update(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StreamResizeError, match="a qwen2 model with sliding-window layers"):
        compress(str(model), tmp_path / "out", method="prune", dataset=texts["calib"])


def test_a_missing_bias_is_refused_by_name(models, texts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(models("qwen2"), model)
    index = json.load(open(model / "model.safetensors.index.json"))
    name = "model.layers.1.self_attn.k_proj.bias"
    shard = index["weight_map"].pop(name)
    kept = {k: v for k, v in load_file(model / shard).items() if k != name}
    save_file(kept, model / shard, metadata={"format": "pt"})
    json.dump(index, open(model / "model.safetensors.index.json", "w"))
    with pytest.raises(StreamResizeError, match=f"the checkpoint lacks '{re.escape(name)}', which config.json"):
        compress(str(model), tmp_path / "out", method="prune", dataset=texts["calib"])


def test_a_method_a_family_does_not_take_is_refused_naming_family_method_and_the_supported_ones():
    spec = ArchSpec("toy", ("ToyForCausalLM",), methods=("prune", "disp"), refused_why="no residual rotations")
    assert spec.method_problem("prune") is None
    assert spec.method_problem("pca") == ("the toy family does not support --method pca: no residual rotations; "
                                          "supported: prune, disp")


# ---- the support matrix ----------------------------------------------------------------------------


def test_the_readme_support_matrix_is_the_adapters_rendering():
    table = arch.support_matrix(sorted(registry.METHODS))
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert table in readme, "README.md's support matrix differs from streamresize.arch.support_matrix(); " \
                            "paste the rendering:\n" + table
    assert set(arch.FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3"}
