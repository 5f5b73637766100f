"""`streamresize eval --lm-eval`: the hand-off to EleutherAI lm-evaluation-harness on an offline local-data
multiple-choice task (tools/make_lm_eval_task.py), for a stock output and the same result saved bundled.

Runs only where lm_eval is installed (`pip install lm-eval`, or the project's `lm-eval` extra); the
missing-package error is tested in test_eval.py."""

import json
import os
import sys

import pytest
from helpers import CALIB, cli

import streamresize

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval); "
                                      "the --lm-eval hand-off is not tested here")

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools")
TASK = "streamresize_tiny_next_sentence"


@pytest.fixture(scope="module")
def task_dir(texts, tmp_path_factory):
    """NAME.yaml + NAME.jsonl built from the tiny held-out text as the real task is built from Wikipedia."""
    sys.path.insert(0, TOOLS)
    from make_lm_eval_task import write_task

    d = tmp_path_factory.mktemp("lm-eval-task")
    yaml_path = write_task(str(d), heldout=texts["heldout"], name=TASK, items=12, seed=0)
    text = open(yaml_path).read()
    assert "dataset_path: json" in text and os.path.abspath(str(d / (TASK + ".jsonl"))) in text
    return d


@pytest.fixture(scope="module")
def stock_and_bundled(tiny_model, texts, tmp_path_factory):
    """One MLP-narrowing result, written stock (LlamaForCausalLM) and bundled (model_type streamresize)."""
    root = tmp_path_factory.mktemp("lm-eval-outputs")
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.25, dataset=[texts["calib"]], **CALIB)
    outputs = {}
    for fmt in ("stock", "bundled"):
        streamresize.compress(tiny_model, str(root / fmt), save_format=fmt, **options)
        with open(root / fmt / "config.json") as f:
            model_type = json.load(f)["model_type"]
        assert (model_type == "streamresize") == (fmt == "bundled"), (fmt, model_type)
        outputs[fmt] = root / fmt
    return outputs


def _lm_eval(model_dir, task_dir, tmp_path):
    """The result JSON of `streamresize eval MODEL --lm-eval TASK --tasks TASK.jsonl` (both evaluators)."""
    output = tmp_path / f"{os.path.basename(model_dir)}.json"
    r = cli("eval", model_dir, "--lm-eval", TASK, "--lm-eval-include", task_dir,
            "--tasks", task_dir / (TASK + ".jsonl"), "--max-seq-length", 128, "--batch-size", 4, "--output", output)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(output.read_text())["lm_eval"] == result["lm_eval"]
    assert "lm-eval" in r.stdout
    return result


def test_lm_eval_local_task_on_stock_and_bundled_outputs(task_dir, stock_and_bundled, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = {fmt: _lm_eval(out, task_dir, tmp_path) for fmt, out in stock_and_bundled.items()}
    for fmt, result in results.items():
        metrics = result["lm_eval"][TASK]
        for name in ("acc", "acc_norm"):
            assert isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 1.0, (fmt, name, metrics)
        # streamresize's own scorer (streamresize/zeroshot.py) says it scores as lm-eval does: same items,
        # same answers
        own = result["zeroshot"][TASK]
        assert own["items"] == 12
        assert (own["acc"], own["acc_norm"]) == pytest.approx((metrics["acc"], metrics["acc_norm"])), fmt
    stock, bundled = (results[f]["lm_eval"][TASK] for f in ("stock", "bundled"))
    assert (stock["acc"], stock["acc_norm"]) == (bundled["acc"], bundled["acc_norm"])


def test_lm_eval_unknown_task_is_a_clear_error(tiny_model, task_dir):
    r = cli("eval", tiny_model, "--lm-eval", "no_such_task_here", "--lm-eval-include", task_dir, check=False)
    assert r.returncode == 2 and "unknown task" in r.stderr and "no_such_task_here" in r.stderr
