"""The loss's sensitivity to each writer's output (methods/sensitivity.py) and the OBS errors weighted by it."""

import os

import pytest
import torch

import streamresize
from streamresize.calibration import calibration_ids
from streamresize.methods import sensitivity, slicing
from streamresize.methods.obs import obs_order
from helpers import CALIB

LOSS_OPTIONS = {"mlp_support": "obs", "mlp_reader": "lstsq", "curve_scale": "loss", "selection_scale": "loss",
                "head_allocation": "global", "curve_samples": 5}


def _reference_fisher(model_dir, ids):
    """E_t[g²] at every o_proj and down_proj output, from one in-memory backward pass of transformers'
    own model: the summed next-token loss, as the streamed pass defines it."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    grads = {}

    def keep(name):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_hook(keep(("attention", i)))
        layer.mlp.down_proj.register_forward_hook(keep(("mlp", i)))
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
    loss.backward()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    layers = len(model.model.layers)
    return {kind: torch.stack([grads[(kind, i)].reshape(-1, grads[(kind, i)].shape[-1]).double().pow(2).sum(0)
                               for i in range(layers)]) / tokens for kind in ("attention", "mlp")}


@pytest.mark.parametrize("architecture,layers", [("llama", 5), ("gemma2", 3)])
def test_streamed_backward_matches_one_in_memory_backward_pass(tokenizer, texts, tmp_path, monkeypatch,
                                                               architecture, layers):
    """Five blocks make uneven checkpoint segments (every 3rd input kept), and the logits come in chunks of
    positions; Gemma 2 adds norms after each sublayer, (1 + w) gains and the soft-capped logits."""
    from tiny import make_tiny_llama

    extra = dict(sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=30.0) \
        if architecture == "gemma2" else {}
    model = make_tiny_llama(str(tmp_path / "model"), tokenizer, architecture=architecture, layers=layers, tie=True,
                            seed=3, **extra)
    measured = {}

    def recording(method, progress, sequences):
        measured.update(real(method, progress, sequences))
        return measured

    real = slicing.sensitivity
    monkeypatch.setattr(slicing, "sensitivity", recording)
    monkeypatch.setattr(sensitivity, "LOGITS_CHUNK", 7 * len(tokenizer))  # the logits in chunks of 7 positions
    most = []  # the pass's files at most, against what the planner counts (disk_bytes)
    real_file = sensitivity._Backward._file

    def counting(self, name, create=False):
        view = real_file(self, name, create)
        folder = os.path.dirname(self.run.work_path("x"))
        most.append(sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                        if f.startswith("sensitivity-")))
        return view

    monkeypatch.setattr(sensitivity._Backward, "_file", counting)
    streamresize.compress(model, str(tmp_path / "out"), dataset=[texts["calib"]], method="dotresize", sparsity=0.0,
                          mlp_sparsity=0.25, width_multiple=8, allocation="global",
                          method_options={**LOSS_OPTIONS, "head_allocation": "uniform"}, **CALIB)
    ids = torch.from_numpy(calibration_ids(model, [texts["calib"]], CALIB["num_calibration_samples"],
                                           CALIB["max_seq_length"], 0).astype("int64"))[:5]
    reference = _reference_fisher(model, ids)
    assert 0 < max(most) <= sensitivity.disk_bytes(layers, 5, CALIB["max_seq_length"], 64)
    for kind in ("attention", "mlp"):
        assert measured[kind].shape == reference[kind].shape
        assert torch.allclose(measured[kind].cpu(), reference[kind], rtol=1e-3, atol=1e-12 * reference[kind].max())


def test_a_channel_the_loss_ignores_costs_nothing_to_lose():
    """Column 0 writes only into output channel 0 and is the largest: by output error it is kept last; with
    channel 0 weighted zero it goes first, and the weighted error of removing it is zero."""
    torch.manual_seed(0)
    x = torch.randn(400, 6, dtype=torch.float64)
    gram = x.T @ x / 400
    w = 0.1 * torch.randn(4, 6, dtype=torch.float64)
    w[:, 0] = 0
    w[0, 0] = 10.0
    plain = obs_order(gram, w, remove=5, damp=0.0)
    assert 0 not in plain.removed  # the one column left
    scale = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    weighted = obs_order(gram, w, remove=5, damp=0.0, row_scale=scale)
    assert weighted.removed[0] == 0 and weighted.errors[0] == pytest.approx(0.0, abs=1e-12)
    # The same as weighting the rows by hand; the input weight is left as it was.
    assert weighted.removed == obs_order(gram, w * scale[:, None], remove=5, damp=0.0).removed
    assert w[0, 0] == 10.0


def test_loss_scaled_run_resumes_identically_and_leaves_no_files(tiny_model_tied, texts, tmp_path):
    """The Fisher is saved in the work dir: a run killed in block 2 resumes to the same bytes as an
    uninterrupted one, and a finished run removes the sensitivity files with the rest of its work dir."""
    import os

    from helpers import cli, compress_args, tree_digest

    def args(name):
        return compress_args(tiny_model_tied, tmp_path / name, texts["calib"], method="dotresize", sparsity=0.0,
                             target_size=0.8, mlp_ratio="fill", allocation="global", width_multiple=8,
                             work_dir=tmp_path / f"work-{name}", option=[f"{k}={v}" for k, v in LOSS_OPTIONS.items()])

    cli(*args("whole"))
    assert not os.path.exists(tmp_path / "work-whole")
    killed = cli(*args("killed"), env={"STREAMRESIZE_CRASH_AT": "2:solving"}, check=False)
    assert killed.returncode == 75
    assert os.path.exists(tmp_path / "work-killed" / "sensitivity.safetensors")
    assert not [f for f in os.listdir(tmp_path / "work-killed") if f.startswith("sensitivity-")]  # no block inputs left
    cli(*args("killed"))
    exclude = ("streamresize_run.json",)
    assert tree_digest(tmp_path / "killed", exclude) == tree_digest(tmp_path / "whole", exclude)
