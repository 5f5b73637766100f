"""Bad input: a clear error naming the file, a non-zero exit, nothing written as complete."""

import json
import os
import shutil

from helpers import cli, compress_args


def _copy(model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


def test_missing_config(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    os.remove(model / "config.json")
    r = cli(*compress_args(model, tmp_path / "out", texts["calib"]), check=False)
    assert r.returncode == 2 and "config.json" in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_missing_shard(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[1]
    os.remove(model / shard)
    r = cli(*compress_args(model, tmp_path / "out", texts["calib"]), check=False)
    assert r.returncode == 2 and shard in r.stderr


def test_corrupt_shard(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
    (model / shard).write_bytes(b"\x01\x02")
    r = cli(*compress_args(model, tmp_path / "out", texts["calib"]), check=False)
    assert r.returncode == 2 and shard in r.stderr


def test_unsupported_architecture(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    config = json.load(open(model / "config.json"))
    config["architectures"] = ["GPT2LMHeadModel"]
    json.dump(config, open(model / "config.json", "w"))
    r = cli(*compress_args(model, tmp_path / "out", texts["calib"]), check=False)
    assert r.returncode == 2 and "GPT2LMHeadModel" in r.stderr and "config.json" in r.stderr


def test_missing_dataset_and_bad_jsonl(tiny_model, tmp_path):
    r = cli(*compress_args(tiny_model, tmp_path / "out", tmp_path / "nope.txt"), check=False)
    assert r.returncode == 2 and "nope.txt" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 3}\n')
    r = cli(*compress_args(tiny_model, tmp_path / "out2", bad), check=False)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


def test_jsonl_dataset_works(tiny_model, texts, tmp_path):
    docs = open(texts["calib"]).read().split("\n\n")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cli(*compress_args(tiny_model, tmp_path / "out", data, sparsity=0.25))
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_output_inside_model_dir_is_refused(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    r = cli(*compress_args(model, model / "out", texts["calib"]), check=False)
    assert r.returncode == 2 and "inside" in r.stderr
    assert not (model / "out").exists()


def test_finished_output_is_not_overwritten_without_restart(tiny_model, texts, tmp_path, pca_quarter):
    out = tmp_path / "out"
    shutil.copytree(pca_quarter.out, out)  # the finished output of `compress --sparsity 0.25`
    # The same run again is a no-op that succeeds (test_reliability.py); another run is refused.
    r = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.5), check=False)
    assert r.returncode == 2 and "already holds a finished checkpoint of a different run" in r.stderr
