"""`-o mlp_target=dense`: down_proj refitted to the dense model's block output, from a second cached
stream that is committed and resumed with the compressed one (issue 12, item 5)."""

import pytest
import torch

import streamresize
from helpers import CALIB, cli, compress_args, dense_logits, tree_digest
from streamresize.calibration import calibration_ids
from streamresize.methods.obs import obs_order, refit
from streamresize.methods.slicing import before_post_norm, dense_target_weight

OPTIONS = ["mlp_support=obs", "mlp_reader=lstsq"]


def _least_squares(a, t):
    """W (out x n) minimizing ‖a Wᵀ − t‖, directly from the data."""
    return torch.linalg.lstsq(a, t).solution.T


@pytest.mark.parametrize("mix", [1.0, 0.5, 0.0])
def test_the_refit_against_the_effective_weight_is_the_least_squares_fit_to_the_target(mix):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 12, dtype=torch.float64)
    down = torch.randn(5, 12, generator=g, dtype=torch.float64)
    wanted = torch.randn(400, 5, generator=g, dtype=torch.float64) + a @ down.T  # y_dense − h
    gram, cross = a.T @ a, wanted.T @ a
    effective = dense_target_weight(gram, cross, down, mix)
    target = mix * wanted + (1 - mix) * a @ down.T
    for keep in ([0, 3, 4, 7, 9, 11], list(range(12)), [5]):
        fitted = refit(gram, effective, keep)
        assert (fitted - _least_squares(a[:, keep], target)).abs().max() < 1e-4
    # OBS on the effective weight ranks removals by the error against the target itself: its first
    # choice is the single column whose removal leaves the least-squares fit to the target closest.
    first = obs_order(gram, effective, remove=1, damp=0.0).removed[0]
    errors = [(a[:, [c for c in range(12) if c != j]] @ _least_squares(a[:, [c for c in range(12) if c != j]],
                                                                         target).T - target).pow(2).sum()
              for j in range(12)]
    assert first == int(torch.stack(errors).argmin())


def test_the_target_before_a_post_sublayer_norm_is_the_writers_own_output_where_nothing_drifted():
    """Gemma adds norm(m) of the MLP's output m, norm(m) = m / rms(m) · g. Aiming down_proj at y_dense − h
    itself (a vector after the norm) fitted the wrong space, and the mix with the prefix target lost its
    proportion: perplexity 1494 against 60 without the dense target, Gemma 3 270M at 90 %. Where the
    compressed stream has not drifted (y_dense − h = norm(m)) the preimage is m itself, scale included."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(3, 7, 16, generator=g, dtype=torch.float64) * torch.logspace(-1, 2, 7, dtype=torch.float64)[:, None]
    gain = 1.0 + 0.5 * torch.randn(16, generator=g, dtype=torch.float64)
    normed = m / m.pow(2).mean(-1, keepdim=True).sqrt() * gain
    assert torch.allclose(before_post_norm(normed, m, gain), m, rtol=1e-10, atol=1e-12)
    # a drift in the target moves the preimage's direction, never its per-token scale
    drifted = before_post_norm(normed + 0.1 * torch.randn(normed.shape, generator=g, dtype=torch.float64), m, gain)
    assert torch.allclose(drifted.pow(2).mean(-1), m.pow(2).mean(-1), rtol=1e-10)
    assert not torch.allclose(drifted, m, rtol=1e-3)
    # a gain the norm nearly mutes is held at a floor instead of blowing the channel up
    muted = gain.clone()
    muted[3] = 1e-12
    assert before_post_norm(normed, m, muted).isfinite().all()


def _calibration_logits(model_dir, out, texts):
    ids = torch.from_numpy(calibration_ids(model_dir, [texts["calib"]], CALIB["num_calibration_samples"],
                                           CALIB["max_seq_length"], 0).astype("int64"))
    with torch.no_grad():
        return streamresize.load(str(out))(ids).logits, dense_logits(model_dir, ids)


def test_the_dense_target_brings_the_calibration_logits_closer_to_the_dense_model(tiny_model, texts, tmp_path):
    common = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, width_multiple=8)
    errors = {}
    for target in ("prefix", "dense"):
        out = tmp_path / target
        streamresize.compress(tiny_model, str(out), dataset=[texts["calib"]], **CALIB, **common,
                              method_options={"mlp_support": "obs", "mlp_reader": "lstsq", "mlp_target": target})
        logits, dense = _calibration_logits(tiny_model, out, texts)
        errors[target] = float((logits - dense).norm() / dense.norm())
    # Each block is fitted to where the dense model is, not to where the prefix drifted: on the sequences
    # it was fitted on, the end of the model is nearer the dense one.
    assert errors["dense"] < 0.9 * errors["prefix"], errors


def test_removing_nothing_with_the_dense_target_reproduces_the_dense_logits(tiny_model, texts, tmp_path):
    streamresize.compress(tiny_model, str(tmp_path / "out"), dataset=[texts["calib"]], **CALIB, method="dotresize",
                          sparsity=0.0, mlp_sparsity=0.0, method_options={"mlp_target": "dense", "mlp_reader": "lstsq"})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = streamresize.load(str(tmp_path / "out"))(ids).logits
    assert (logits - dense_logits(tiny_model, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("location", ["disk", "device"])
def test_a_killed_run_with_the_dense_stream_resumes_to_the_same_bytes(tiny_model, texts, tmp_path, location):
    """The dense stream is part of the resume state: a run killed after block 1 (its dense_b written,
    the in-memory copy lost) must rebuild block 2's target from the file, not from zeros."""
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, allocation="global", width_multiple=8,
                   cache_location=location, option=OPTIONS + ["mlp_target=dense"])
    cli(*compress_args(tiny_model, tmp_path / "whole", texts["calib"], **options))
    args = compress_args(tiny_model, tmp_path / "killed", texts["calib"], **options)
    killed = cli(*args, env={"STREAMRESIZE_CRASH_AT": "2:start"}, check=False)
    assert killed.returncode == 75
    cli(*args)
    exclude = ("streamresize_run.json",)
    assert tree_digest(tmp_path / "killed", exclude) == tree_digest(tmp_path / "whole", exclude)


@pytest.mark.parametrize("extra, needs", [
    (dict(sparsity=0.25), "mlp_target=dense needs the residual kept whole"),
    (dict(option=["mlp_reader=ot", "mlp_target=dense"]), "mlp_target=dense needs the MLP refitted by least squares"),
    (dict(method="prune", option=["mlp_target=dense"]), "unknown method option(s) mlp_target for prune"),
])
def test_the_dense_target_is_refused_where_the_streams_cannot_be_compared(tiny_model, texts, tmp_path, extra, needs):
    options = {**dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, option=OPTIONS + ["mlp_target=dense"]),
               **extra}
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"], **options), check=False)
    assert r.returncode == 2 and needs in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
