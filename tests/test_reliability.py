"""Nothing of the user's lost, nothing run that should not run: work dirs, locks, non-finite weights,
input code, reruns on finished outputs, outputs replaced only when the new one is complete."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import CALIB, cli, compress_args, tree_digest
from safetensors.torch import load_file, save_file

import streamresize
from streamresize.errors import StreamResizeError
from streamresize.workspace import DirectoryLock
from streamresize.writer import RUN_LOG, ShardWriter

INDEX = "model.safetensors.index.json"


def _compress(model, out, texts, **options):
    return streamresize.compress(str(model), str(out), dataset=[texts["calib"]],
                                 **{**CALIB, "method": "prune", "sparsity": 0.25, **options})


def _copy(model, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(model, dst)
    return dst


@pytest.fixture(scope="module")
def reference(tiny_model, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "reference"
    _compress(tiny_model, out, texts)
    return out


# ---- the work dir loses only files the run created -----------------------------------------------


@pytest.mark.parametrize("restart", [False, True])
def test_work_dir_holding_the_model_is_refused_and_the_model_kept(tiny_model, texts, tmp_path, restart):
    parent = tmp_path / "models"
    model = _copy(tiny_model, parent)
    before = tree_digest(parent)
    with pytest.raises(StreamResizeError, match="work dir must not be the model directory"):
        _compress(model, tmp_path / "out", texts, work_dir=str(parent), restart=restart)
    assert tree_digest(parent) == before


def test_work_dir_holding_the_output_is_refused(tiny_model, texts, tmp_path):
    with pytest.raises(StreamResizeError, match="work dir must not be the output"):
        _compress(tiny_model, tmp_path / "data" / "out", texts, work_dir=str(tmp_path / "data"))


@pytest.mark.parametrize("restart", [False, True])
def test_a_user_folder_as_work_dir_is_refused_and_kept(tiny_model, texts, tmp_path, restart):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "manifest.json").write_text("{}")  # even a name the run would use is not the run's
    with pytest.raises(StreamResizeError, match="did not create"):
        _compress(tiny_model, tmp_path / "out", texts, work_dir=str(folder), restart=restart)
    assert sorted(os.listdir(folder)) == ["manifest.json", "thesis.tex"]
    assert (folder / "manifest.json").read_text() == "{}"


def test_clean_up_removes_only_the_runs_files(tiny_model, texts, tmp_path, reference):
    work = tmp_path / "work"
    work.mkdir()  # an empty folder is adopted
    out = tmp_path / "out"
    env = {"STREAMRESIZE_CRASH_AT": "1:solving"}
    r = cli(*compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25, work_dir=work),
            env=env, check=False)
    assert r.returncode == 75
    (work / "notes.txt").write_text("mine")  # the user drops a file into the work dir meanwhile
    _compress(tiny_model, out, texts, work_dir=str(work))
    assert os.listdir(work) == ["notes.txt"]
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})


def test_default_work_dir_is_removed_after_success(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    _compress(tiny_model, out, texts)
    assert not os.path.exists(str(out) + ".streamresize-work")


# ---- one run per directory ---------------------------------------------------------------------


def test_a_locked_output_is_refused_naming_the_process(tiny_model, texts, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    lock = DirectoryLock(str(out), "output directory").acquire()
    try:
        with caplog.at_level("INFO", logger="streamresize"):
            with pytest.raises(StreamResizeError, match=f"in use by process {os.getpid()}"):
                _compress(tiny_model, out, texts)
    finally:
        lock.release()
    assert os.listdir(out) == []
    assert not any(r.getMessage().startswith("compressing") for r in caplog.records)  # it never started
    with caplog.at_level("INFO", logger="streamresize"):
        _compress(tiny_model, out, texts)
    assert any(r.getMessage().startswith("compressing") for r in caplog.records)


def test_a_locked_work_dir_is_refused(tiny_model, texts, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    lock = DirectoryLock(str(work), "work dir").acquire()
    try:
        with pytest.raises(StreamResizeError, match="work dir is in use"):
            _compress(tiny_model, tmp_path / "out", texts, work_dir=str(work))
    finally:
        lock.release()


def test_a_killed_holder_leaves_no_stale_lock(tiny_model, texts, tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StreamResizeError, match=f"process {holder.pid}"):
        _compress(tiny_model, out, texts)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    _compress(tiny_model, out, texts)
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})


def test_two_runs_on_one_output_never_mix(tiny_model, texts, tmp_path, reference):
    """The same command twice at once, activation cache on disk: one refuses, the other's output is
    exactly the uninterrupted reference."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "streamresize", *map(str, compress_args(
        tiny_model, out, texts["calib"], method="prune", sparsity=0.25, cache_location="disk"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    while not os.path.isdir(str(out) + ".streamresize-work") and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    first_err = first.communicate()[1]
    codes = sorted([first.returncode, second.returncode])
    assert codes[0] == 0, first_err + second.stderr
    if codes[1] != 0:  # the usual case: the second started while the first held the locks
        assert "in use by process" in first_err + second.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})


# ---- non-finite weights ----------------------------------------------------------------------------


def _poison(model, tensor_name, value=float("nan")):
    index = json.load(open(model / INDEX))["weight_map"]
    shard = model / index[tensor_name]
    tensors = load_file(shard)
    tensors[tensor_name].view(-1)[3] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return index[tensor_name]


@pytest.mark.parametrize("method,value", [("disp", float("nan")), ("dotresize", float("inf")),
                                          ("pca", float("nan"))])
def test_non_finite_input_weight_is_named_and_nothing_marked_complete(tiny_model, texts, tmp_path, method, value):
    model = _copy(tiny_model, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _poison(model, name, value)
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"], method=method, sparsity=0.25), check=False)
    assert r.returncode == 2, r.stderr
    assert shard in r.stderr and name in r.stderr and "non-finite" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / INDEX).exists()


def test_the_writer_refuses_non_finite_tensors(tmp_path):
    writer = ShardWriter(str(tmp_path), torch.float32)
    with pytest.raises(StreamResizeError, match="non-finite"):
        writer.write_shard("model-block-00000.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    assert os.listdir(tmp_path) == []


# ---- the input's code never runs -----------------------------------------------------------------

MARKER_CODE = """
import os
open(os.environ.get("STREAMRESIZE_TEST_MARKER", "/tmp/streamresize-marker"), "w").write("ran")
"""


def _with_custom_code(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    (model / "evil_modeling.py").write_text(MARKER_CODE)
    (model / "tokenization_evil.py").write_text(MARKER_CODE)
    (model / "tokenizer.py").write_text(MARKER_CODE)
    config = json.load(open(model / "config.json"))
    config["auto_map"] = {"AutoConfig": "evil_modeling.Config", "AutoModelForCausalLM": "evil_modeling.Model"}
    json.dump(config, open(model / "config.json", "w"))
    tok = json.load(open(model / "tokenizer_config.json"))
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Tokenizer", None]}
    json.dump(tok, open(model / "tokenizer_config.json", "w"))
    return model


def test_input_code_never_runs_and_is_not_carried_over(tiny_model, texts, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("STREAMRESIZE_TEST_MARKER", str(marker))
    model = _with_custom_code(tiny_model, tmp_path)
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"], method="disp", sparsity=0.2, allocation="learned",
                           option=["learn_steps=2", "learn_seq=16"]),
            env={"STREAMRESIZE_TEST_MARKER": str(marker)}, check=False)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert sorted(f for f in os.listdir(out) if f.endswith(".py")) == ["modeling_streamresize.py"]
    assert "auto_map" not in json.load(open(out / "tokenizer_config.json"))
    streamresize.load(str(out))  # loads, and still runs nothing of the input's
    assert not marker.exists()


# ---- reruns, finished outputs and other people's files --------------------------------------------


def test_rerun_on_a_finished_output_is_a_no_op_that_succeeds(tiny_model, texts, tmp_path, reference):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25)
    cli(*args)
    before = tree_digest(out)
    r = cli(*args, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["already_complete"] is True
    assert tree_digest(out) == before


def test_a_kill_during_clean_up_never_unmarks_the_finished_output(tiny_model, texts, tmp_path, reference):
    """Clean-up interrupted: the work dir still holds the manifest and cache of the finished run."""
    out, work = tmp_path / "out", tmp_path / "work"
    r = cli(*compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25, work_dir=work),
            env={"STREAMRESIZE_CRASH_AT": "1:solving"}, check=False)
    assert r.returncode == 75
    saved = tmp_path / "saved"
    shutil.copytree(work, saved)
    _compress(tiny_model, out, texts, work_dir=str(work))
    shutil.copytree(saved, work)  # as if the kill came before clean-up got far
    before = tree_digest(out)
    summary = _compress(tiny_model, out, texts, work_dir=str(work))
    assert summary["already_complete"] and tree_digest(out) == before
    assert not work.exists()


def test_different_run_on_a_finished_output_is_refused(tiny_model, texts, tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(StreamResizeError, match="finished checkpoint of a different run"):
        _compress(tiny_model, out, texts, sparsity=0.5)
    assert tree_digest(out) == tree_digest(reference)


def test_foreign_output_dir_refused_then_replaced_only_when_complete(tiny_model, texts, tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    with pytest.raises(StreamResizeError, match="did not write"):
        _compress(tiny_model, out, texts)
    assert os.listdir(out) == ["config.json"]
    args = compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25)
    r = cli(*args, "--overwrite", env={"STREAMRESIZE_CRASH_AT": "2:solving"}, check=False)
    assert r.returncode == 75
    assert os.listdir(out) == ["config.json"]  # the old content stays until the new one is complete
    cli(*args, "--overwrite")
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})
    assert not os.path.exists(str(out) + ".streamresize-new")
    assert not os.path.exists(str(out) + ".streamresize-old")


def test_restart_replaces_a_finished_output_only_when_complete(tiny_model, texts, tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    args = compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.5)
    r = cli(*args, "--restart", env={"STREAMRESIZE_CRASH_AT": "1:solving"}, check=False)
    assert r.returncode == 75
    assert tree_digest(out) == tree_digest(reference)
    cli(*args, "--restart")
    assert json.load(open(out / "config.json"))["streamresize"]["recipe"]["sparsity"] == 0.5


def test_stale_temp_files_never_stay_in_an_output(tiny_model, texts, tmp_path, reference):
    out, work = tmp_path / "out", tmp_path / "work"
    r = cli(*compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25, work_dir=work),
            env={"STREAMRESIZE_CRASH_AT": "2:solving"}, check=False)
    assert r.returncode == 75
    (out / "model-block-00002.safetensors.tmp").write_bytes(b"half a shard")  # a kill inside save_file
    _compress(tiny_model, out, texts, work_dir=str(work))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})
