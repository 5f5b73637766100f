"""The structure holds: the pipeline imports no method, no module imports one that imports it back,
methods own their options, and every registered method works on every registered family."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import CALIB, dense_logits
from tiny import make_tiny_llama

import streamresize
from streamresize import arch, cli
from streamresize.errors import StreamResizeError
from streamresize.methods import registry

PACKAGE = os.path.dirname(streamresize.__file__)


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports():
    """{module: set of streamresize modules it imports}, function-level imports included."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py") or root.endswith("modeling"):
                continue
            path = os.path.join(root, name)
            module = _module_name(path)
            package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
            targets = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                    targets.add(target)
                    for alias in node.names:  # `from . import x` imports the module x
                        targets.add(f"{target}.{alias.name}")
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streamresize"):
                    targets.add(node.module)
            graph[module] = targets
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert "streamresize.pipeline" in graph and len(graph) > 20

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == []


def test_the_pipeline_imports_no_method_and_names_no_family():
    code = ("import sys, streamresize.pipeline; "
            "print([m for m in sys.modules if m.startswith('streamresize.methods.') "
            "and m not in ('streamresize.methods.registry',)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    source = open(os.path.join(PACKAGE, "pipeline.py")).read()
    for name in [*registry.METHODS, *arch.FAMILIES]:
        assert f'"{name}"' not in source and f"'{name}'" not in source


# ---- options belong to their method --------------------------------------------------------------


def _plan(tiny_model, tmp_path, *args):
    return cli.main(["plan", str(tiny_model), str(tmp_path / "out"), "--dataset", "random", "--device", "cpu",
                     *map(str, args)])


def test_an_option_of_another_method_is_refused_with_the_known_ones(tiny_model, tmp_path, caplog):
    assert _plan(tiny_model, tmp_path, "--method", "pca", "-o", "epsilon=0.1") == 2
    assert "unknown method option(s) epsilon for pca; known: curve_samples, curve_scale, head_allocation, head_unit, mlp_support, obs_batch, reader, rotate_full_width, selection_scale" in caplog.text


@pytest.mark.parametrize("option,message", [("epsilon=abc", "expected a number"), ("epsilon=0", "above 0"),
                                            ("solver=magic", "choose from"), ("normalize=maybe", "true or false"),
                                            ("max_iter=2.5", "whole number")])
def test_bad_option_values_are_named(tiny_model, tmp_path, caplog, option, message):
    assert _plan(tiny_model, tmp_path, "--method", "dotresize", "-o", option) == 2
    assert f"method option {option.split('=')[0]}=" in caplog.text and message in caplog.text


def test_transport_options_apply_to_pca_only_when_its_mlp_neurons_are_merged(tiny_model, tmp_path):
    assert _plan(tiny_model, tmp_path, "--method", "pca", "--mlp-method", "dotresize", "--mlp-sparsity", "0.25",
                 "-o", "epsilon=0.1") == 0


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_plan_works_for_every_method(tiny_model, tmp_path, capsys, method):
    extra = ["-o", "refit=false"] if method == "disp" else []
    assert _plan(tiny_model, tmp_path, "--method", method, "--sparsity", "0.25", *extra) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cache_files = 4 if method == "disp" else 3
    assert plan["cache_bytes"] == cache_files * 128 * 2048 * 64 * 4  # N x L x d float32 per file


# ---- every method on every family ----------------------------------------------------------------


@pytest.fixture(scope="module", params=arch.FAMILIES)
def family_model(request, tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp(f"tiny-{request.param}")), tokenizer,
                           architecture=request.param, layers=2, shards=2)


def _load_logits(out, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_method_on_every_family(family_model, texts, tmp_path, method):
    """Sparsity 0 reproduces the dense logits through transformers' Auto classes; sparsity 0.25
    writes a smaller model that loads and gives finite logits. A method the family refuses is refused
    with the adapter's message; where the residual stays whole (norms not folded) the MLP is narrowed."""
    spec = arch.spec_for(json.load(open(os.path.join(family_model, "config.json"))))
    if spec.method_problem(method):
        with pytest.raises(StreamResizeError, match=re.escape(spec.method_problem(method))):
            streamresize.compress(family_model, str(tmp_path / "full"), method=method, dataset=[texts["calib"]], **CALIB)
        return
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    dense = dense_logits(family_model, ids)
    full = streamresize.compress(family_model, str(tmp_path / "full"), method=method, sparsity=0.0,
                                 dataset=[texts["calib"]], **CALIB)
    assert (_load_logits(tmp_path / "full", ids) - dense).abs().max().item() < 1e-4
    smaller = dict(sparsity=0.25) if spec.norms_folded else dict(sparsity=0.0, mlp_sparsity=0.25)
    small = streamresize.compress(family_model, str(tmp_path / "small"), method=method, **smaller,
                                  dataset=[texts["calib"]], **CALIB)
    assert small["parameters"] < full["parameters"]
    assert torch.isfinite(_load_logits(tmp_path / "small", ids)).all()


def test_a_block_tensor_outside_the_known_roles_is_refused(tiny_model, texts, tmp_path):
    """A Qwen2-style q_proj bias in a Llama checkpoint: refused by name, never silently dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    index = json.load(open(model / "model.safetensors.index.json"))
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(model / shard)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, model / shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard
    json.dump(index, open(model / "model.safetensors.index.json", "w"))
    with pytest.raises(StreamResizeError, match="q_proj.bias"):
        streamresize.compress(str(model), str(tmp_path / "out"), method="prune", dataset=[texts["calib"]], **CALIB)


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_the_plan_bounds_the_measured_peak(tiny_model, texts, tmp_path, method):
    """The planner's peak for this process (CPU: anonymous memory) is an upper bound of what the run
    used, for every method; in a fresh process, so the test session's own memory does not count."""
    out = tmp_path / "out"
    args = ["compress", str(tiny_model), str(out), "--method", method, "--sparsity", "0.25", "--mlp-sparsity",
            "0.25" if method != "disp" else "0", "--dataset", texts["calib"], "--num-calibration-samples", "16",
            "--max-seq-length", "64", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "streamresize", *args], check=True, capture_output=True)
    run_log = json.load(open(out / "streamresize_run.json"))
    planned = run_log["placement"]["device_bytes"]
    assert 0 < run_log["peak_anon_mb"] * 2**20 <= planned


def test_methods_lists_every_method_with_its_sparsity_and_options(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in registry.METHODS:
        cls = registry.method_class(name)
        assert f"{name}: " in out and cls.SPARSITY in out
        for key in cls.OPTIONS:
            assert f"-o {key}: " in out
