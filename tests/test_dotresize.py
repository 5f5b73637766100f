"""DOTResize: the OT plan, the QR construction, merging versus pruning, MLP neurons, tied heads."""

import glob
import os

import pytest
import torch
from helpers import CALIB, cli, compress_args, dense_logits, logits_without_streamresize, read_config
from safetensors.torch import load_file

import streamresize
from streamresize.checkpoint import parameter_count
from streamresize.methods import dotresize, prune
from streamresize.methods.neurons import narrow_mlp, output_error
from streamresize.statistics import PointStatistics, relative_error
from streamresize.transport import (cost_matrix, marginals, orthonormal_factor, solve_plan, top_support,
                                    transport_map)


def _stats(x):
    s = PointStatistics(x.shape[1], "cpu")
    s.add(x)
    return s


def _correlated(seed, n=2000, d=24, kept=12, noise=0.2):
    """Signals where every dropped neuron is a scaled, noisy copy of a kept one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, kept, generator=g, dtype=torch.float64) @ torch.randn(kept, kept, generator=g,
                                                                                  dtype=torch.float64)
    base = base * torch.linspace(3, 1, kept, dtype=torch.float64)  # kept neurons are the larger ones
    parents = torch.randint(0, kept, (d - kept,), generator=g)
    copies = 0.7 * base[:, parents] + noise * torch.randn(n, d - kept, generator=g, dtype=torch.float64)
    return torch.cat([base, copies], 1)[:, torch.randperm(d, generator=g)]


@pytest.mark.parametrize("case", ["random", "duplicates", "zero_variance"])
@pytest.mark.parametrize("marginal", ["uniform", "energy"])
def test_sinkhorn_plan_meets_both_marginals(case, marginal):
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if case == "duplicates":
        x[:, 8:] = x[:, :8]
    if case == "zero_variance":
        x[:, 3] = 0.0
        x[:, 11] = 2.5  # constant, nonzero
    stats = _stats(x)
    support = top_support(stats.gram.diagonal(), 10)
    cost = cost_matrix(stats.gram, stats.sum, stats.count, support)
    a, b = marginals(stats.gram, support, marginal)
    plan, info = solve_plan(a, b, cost, epsilon=0.05, tol=1e-10, max_iter=5000)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert torch.allclose(plan.sum(1), a, atol=1e-7) and torch.allclose(plan.sum(0), b, atol=1e-7)
    assert info["marginal_error"] < 1e-7
    t = transport_map(plan, a)
    assert torch.allclose(t.sum(1), torch.ones_like(a), atol=1e-5)


@pytest.mark.parametrize("solver,epsilon", [("sinkhorn_log", 1e-3), ("emd", None)])
def test_full_support_small_epsilon_gives_a_permutation(solver, epsilon):
    x = torch.randn(1000, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * torch.linspace(0.5, 3, 24, dtype=torch.float64)
    stats = _stats(x)
    d = x.shape[1]
    support = top_support(stats.gram.diagonal(), d)
    cost = cost_matrix(stats.gram, stats.sum, stats.count, support)
    a, b = marginals(stats.gram, support)
    plan, _ = solve_plan(a, b, cost, epsilon=epsilon, solver=solver, max_iter=5000)
    t = transport_map(plan, a)
    assert torch.allclose(t, torch.eye(d, dtype=t.dtype)[:, support], atol=1e-3)


def test_qr_construction_identities():
    x = _correlated(2)
    stats = _stats(x)
    frame_support = top_support(stats.gram.diagonal(), 12)
    cost = cost_matrix(stats.gram, stats.sum, stats.count, frame_support)
    a, b = marginals(stats.gram, frame_support)
    plan, _ = solve_plan(a, b, cost, epsilon=0.1)
    t = transport_map(plan, a)
    q, r = orthonormal_factor(t)
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(7, 24, generator=g, dtype=torch.float64)  # a writer, rows in residual space: h = y W_out
    w_in = torch.randn(24, 5, generator=g, dtype=torch.float64)  # a reader: y = h W_in
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=q.dtype), atol=1e-10)
    assert (torch.diagonal(r) > 0).all()
    assert torch.allclose(w_out @ t @ torch.linalg.inv(r), w_out @ q, atol=1e-8)
    assert torch.allclose(r @ torch.linalg.pinv(t) @ w_in, q.T @ w_in, atol=1e-8)


def test_compressed_block_equals_dense_block_on_projected_inputs(tiny_model):
    """One basis Q (from DOTResize) at the input and both points of block 0: the narrowed block on X Q
    equals the dense block, with the residual projected onto span(Q) at every point, mapped into Q."""
    from transformers import AutoModelForCausalLM

    from streamresize.modeling.modeling_streamresize import (StreamResizeConfig, StreamResizeDecoderLayer,
                                                             attention_inputs)
    from streamresize.transforms import fold_norm, rotate_reader, rotate_writer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    dense, d = model.model.layers[0], model.config.hidden_size
    x = torch.randn(3, 20, d, generator=torch.Generator().manual_seed(4))
    q, _ = dotresize.solve(_stats(x.reshape(-1, d).double()), 48, {"epsilon": 0.1})
    config = StreamResizeConfig(**{**model.config.to_dict(), "residual_widths": [48] * 9,
                                   "intermediate_sizes": None, "shortcuts": None})
    config._attn_implementation = "sdpa"
    layer = StreamResizeDecoderLayer(config, 0).eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).weight.copy_(
                rotate_reader(fold_norm(getattr(dense.self_attn, name).weight, dense.input_layernorm.weight), q))
        for name in ("gate_proj", "up_proj"):
            getattr(layer.mlp, name).weight.copy_(
                rotate_reader(fold_norm(getattr(dense.mlp, name).weight, dense.post_attention_layernorm.weight), q))
        layer.self_attn.o_proj.weight.copy_(rotate_writer(dense.self_attn.o_proj.weight, q))
        layer.mlp.down_proj.weight.copy_(rotate_writer(dense.mlp.down_proj.weight, q))
        qf = q.float()
        project = qf @ qf.T
        kwargs = attention_inputs(config, model.model.rotary_emb, x)
        h = x @ project
        h = (h + dense.self_attn(dense.input_layernorm(h), **kwargs)[0]) @ project
        h = (h + dense.mlp(dense.post_attention_layernorm(h))) @ project
        narrowed = layer(x @ qf, **kwargs)
    assert (narrowed - h @ qf).abs().max().item() < 1e-4


@pytest.mark.parametrize("seed", range(5))
def test_merging_is_no_worse_than_pruning_the_same_support(seed):
    stats = _stats(_correlated(seed))
    for support in ("norm", "variance"):
        q_merge, info = dotresize.solve(stats, 12, {"support": support, "epsilon": 0.05})
        q_prune, _ = prune.solve(stats, 12, {"support": support})
        merge_error, prune_error = relative_error(stats.gram, q_merge), relative_error(stats.gram, q_prune)
        assert merge_error <= prune_error + 1e-12
        assert info["prune_error"] == pytest.approx(prune_error)


def test_mlp_full_width_is_exact_and_merging_beats_dropping():
    u = _correlated(7, d=32, kept=16).abs()  # intermediate activations
    stats = _stats(u)
    g = torch.Generator().manual_seed(8)
    down = torch.randn(6, 32, generator=g, dtype=torch.float64)
    readers = {"gate": torch.randn(32, 5, generator=g, dtype=torch.float64)}
    for method, opts in (("prune", {}), ("dotresize", {"solver": "emd"}), ("dotresize", {"mlp_reader": "lstsq"})):
        kept, merged, info = narrow_mlp(stats, 32, method, opts, readers, down)
        assert info["local_error"] < 1e-3, (method, opts)
    _, _, dropped = narrow_mlp(stats, 16, "prune", {}, readers, down)
    _, _, merged_ot = narrow_mlp(stats, 16, "dotresize", {"epsilon": 0.05}, readers, down)
    kept, merged, lstsq = narrow_mlp(stats, 16, "dotresize", {"mlp_reader": "lstsq"}, readers, down)
    assert kept["gate"].shape == (16, 5) and merged.shape == (6, 16)
    assert lstsq["local_error"] <= merged_ot["local_error"] + 1e-12
    assert lstsq["local_error"] < dropped["local_error"]
    assert output_error(stats.gram, down, torch.arange(32), down) == 0.0


def _compress(model, out, texts, **options):
    return streamresize.compress(model, str(out), dataset=[texts["calib"]], **{**CALIB, **options})


def test_full_support_reproduces_dense_logits_through_stock_transformers(tiny_model_tied, texts, tmp_path):
    out = tmp_path / "out"
    _compress(tiny_model_tied, out, texts, method="dotresize", sparsity=0.0,
              method_options={"epsilon": 1e-3, "rotate_full_width": True})
    config = read_config(out)
    assert config["tie_word_embeddings"] and config["head_adapter"]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = logits_without_streamresize(out, ids, tmp_path)
    assert (ours - dense_logits(tiny_model_tied, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["dotresize", "prune"])
def test_mlp_sparsity_zero_reproduces_and_point_three_has_recorded_widths(tiny_model, texts, tmp_path, method):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    zero = tmp_path / "zero"
    cli(*compress_args(tiny_model, zero, texts["calib"], method=method, sparsity=0.0, mlp_sparsity=0.0,
                       option=(["epsilon=0.001"] if method == "dotresize" else []) + ["rotate_full_width=true"]))
    assert (logits_without_streamresize(zero, ids, tmp_path) - dense_logits(tiny_model, ids)).abs().max() < 1e-4
    out = tmp_path / "out"
    cli(*compress_args(tiny_model, out, texts["calib"], method=method, sparsity=0.25, mlp_sparsity=0.3))
    config = read_config(out)
    assert config["intermediate_sizes"] == [64] * config["num_hidden_layers"]  # 96 * 0.7 = 67.2 -> 64
    weights = {}
    for shard in glob.glob(os.path.join(out, "*.safetensors")):
        weights.update(load_file(shard))
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (64, 48)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (48, 64)
    assert torch.isfinite(logits_without_streamresize(out, ids, tmp_path)).all()


def test_tied_head_stays_tied_and_saves_parameters(tiny_model_tied, texts, tmp_path):
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    _compress(tiny_model_tied, tied, texts, method="dotresize", sparsity=0.25)
    _compress(tiny_model_tied, untied, texts, method="dotresize", sparsity=0.25, head="untied")
    assert "lm_head.weight" not in load_file(str(tied / "model-head.safetensors"))
    vocab = read_config(tied)["vocab_size"]
    assert parameter_count(untied) - parameter_count(tied) == vocab * 48 - 48 * 48
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(logits_without_streamresize(tied, ids, tmp_path)).all()


def test_unknown_method_option_is_refused(tiny_model, texts, tmp_path):
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"], method="dotresize", option="epsilom=1"),
            check=False)
    assert r.returncode == 2 and "epsilom" in r.stderr


@pytest.mark.parametrize("method", ["prune", "dotresize"])
def test_least_squares_readers_reproduce_at_full_width(tiny_model_tied, texts, tmp_path, method):
    out = tmp_path / "out"
    _compress(tiny_model_tied, out, texts, method=method, sparsity=0.0,
              method_options={"reader": "lstsq", "rotate_full_width": True,
                              **({"epsilon": 1e-3} if method == "dotresize" else {})})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    assert (streamresize.load(str(out))(ids).logits - dense_logits(tiny_model_tied, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_pca_error_is_the_lower_bound_every_method_is_logged_against(seed):
    from streamresize.methods.pca import principal_basis
    from streamresize.statistics import pca_error

    stats = _stats(_correlated(seed))
    bound = pca_error(stats.gram, 12)
    assert bound == pytest.approx(relative_error(stats.gram, principal_basis(stats.gram, 12)))
    for solve in (prune.solve, dotresize.solve):
        assert relative_error(stats.gram, solve(stats, 12, {})[0]) >= bound - 1e-12


def test_points_kept_whole_hold_no_basis_and_no_residual_statistics(tiny_model, texts, tmp_path, monkeypatch):
    """An MLP-only run keeps every residual point whole: no d x d basis is made and no residual moments
    are accumulated (at 7B each is 134 MB of float64 and a d² product per token). Its output equals the
    same run with every point's basis materialized (prune at full width selects every channel, in order)."""
    from streamresize.methods import slicing

    widths = []
    real_moments = slicing.Moments

    def counting_moments(width, *args, **kwargs):
        widths.append(width)
        return real_moments(width, *args, **kwargs)

    monkeypatch.setattr(slicing, "Moments", counting_moments)
    whole, materialized = tmp_path / "whole", tmp_path / "materialized"
    cli(*compress_args(tiny_model, whole, texts["calib"], method="prune", sparsity=0.0, mlp_sparsity=0.3))
    assert widths and set(widths) == {96}, widths  # the MLP neurons' moments only, never the residual's (64)
    widths.clear()
    cli(*compress_args(tiny_model, materialized, texts["calib"], method="prune", sparsity=0.0, mlp_sparsity=0.3,
                       option=["rotate_full_width=true"]))
    assert 64 in widths  # the reference did go through the point solves
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    ours, reference = (logits_without_streamresize(d, ids, tmp_path) for d in (whole, materialized))
    assert (ours - reference).abs().max().item() < 1e-4
