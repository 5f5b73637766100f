"""Validation before long work: every bad option, recipe value, calibration text and checkpoint is
refused with exit status 2 and one message naming the file or option and the problem (no traceback
unless --debug), before the directories are touched or any weight is read. Also: a full disk is
reported as such and resumes once space is freed, and output files are normal (0644) files."""

import errno
import json
import os
import shutil
import struct

import pytest
from helpers import cli, compress_args, tree_digest
from safetensors.torch import load_file, save_file

import streamresize
import streamresize.cli as streamresize_cli
from streamresize.errors import StreamResizeError
from streamresize.writer import RUN_LOG, ShardWriter

INDEX = "model.safetensors.index.json"


def _refused(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _copy(model, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(model, dst)
    return dst


def _nothing_started(tmp_path, out):
    """Refused before the run claimed anything: no output, no work dir."""
    assert not os.path.exists(out)
    assert not os.path.exists(str(out) + ".streamresize-work")


# ---- options and recipe values --------------------------------------------------------------------


@pytest.mark.parametrize("option,value,problem", [
    ("batch_size", 0, "must be at least 1"),
    ("batch_size", -4, "must be at least 1"),
    ("width_multiple", 0, "must be at least 1"),
    ("num_calibration_samples", 0, "must be at least 1"),
    ("max_seq_length", 0, "must be at least 1"),
    ("sparsity", 1.0, "below 1"),
    ("sparsity", -0.1, "at least 0"),
    ("mlp_sparsity", 1.5, "below 1"),
    ("target_size", 1.5, "at most 1"),
    ("target_size", 0, "above 0"),
    ("target_size", "nan", "finite"),
    ("target_size", "inf", "finite"),
])
def test_bad_option_values_are_refused_before_anything_starts(tiny_model, texts, tmp_path, option, value, problem):
    out = tmp_path / "out"
    r = cli(*compress_args(tiny_model, out, texts["calib"], method="disp", **{option: value}), check=False)
    _refused(r, "--" + option.replace("_", "-"), problem)
    _nothing_started(tmp_path, out)


@pytest.mark.parametrize("line,problem", [
    ("sparsity: abc", "sparsity: 'abc': expected a number"),
    ("batch_size: 2.5", "batch_size: 2.5: expected a whole number"),
    ("num_calibration_samples: [1, 2]", "expected a whole number"),
    ("max_seq_length: true", "expected a whole number"),
    ("mlp_ratio: lots", "expected a number or 'fill'"),
    ("dtype: float8", "dtype: 'float8': choose from auto, float32, bfloat16, float16"),
    ("compute_dtype: int4", "choose from"),
    ("method: magic", "choose from disp, dotresize, pca, prune"),
    ("device: gpu0", "expected auto, cpu, cuda or cuda:N"),
    ("head: sideways", "choose from auto, tied, untied"),
])
def test_bad_recipe_values_name_the_recipe_and_the_key(tiny_model, texts, tmp_path, line, problem):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"method: pca\n{line}\n")
    out = tmp_path / "out"
    r = cli("compress", tiny_model, out, "--dataset", texts["calib"], "--recipe", recipe, check=False)
    _refused(r, str(recipe), problem)
    _nothing_started(tmp_path, out)


def test_yaml_code_tags_are_errors_never_run(tiny_model, texts, tmp_path):
    marker = tmp_path / "marker"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"method: !!python/object/apply:os.system ['touch {marker}']\n")
    r = cli("compress", tiny_model, tmp_path / "out", "--dataset", texts["calib"], "--recipe", recipe, check=False)
    _refused(r, str(recipe), "not valid YAML")
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"]), "-o",
            f"epsilon=!!python/object/apply:os.system ['touch {marker}']", check=False)
    _refused(r, "--option epsilon=", "not a plain value")
    assert not marker.exists()


def test_a_command_line_value_is_named_as_the_option_not_the_recipe(tiny_model, texts, tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("method: pca\nbatch_size: 4\n")
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"], batch_size=0), "--recipe", recipe,
            check=False)
    _refused(r, "--batch-size 0: must be at least 1")
    assert str(recipe) not in r.stderr


def test_numbers_written_as_strings_in_yaml_are_read_as_numbers(tmp_path):
    from streamresize.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 2.5e-1\nbatch_size: 4.0\n")  # YAML 1.1 reads 2.5e-1 as a string
    loaded = load_recipe(str(recipe))
    assert loaded.sparsity == 0.25 and loaded.batch_size == 4 and isinstance(loaded.batch_size, int)


def test_the_python_api_validates_too(tiny_model, texts, tmp_path):
    with pytest.raises(StreamResizeError, match="--batch-size 0: must be at least 1"):
        streamresize.compress(str(tiny_model), str(tmp_path / "out"), dataset=[texts["calib"]], batch_size=0)
    with pytest.raises(StreamResizeError, match="--target-size nan"):
        streamresize.compress(str(tiny_model), str(tmp_path / "out"), dataset=[texts["calib"]], method="disp",
                              target_size=float("nan"))
    _nothing_started(tmp_path, tmp_path / "out")


def test_debug_shows_the_traceback(tiny_model, texts, tmp_path):
    args = compress_args(tiny_model, tmp_path / "out", texts["calib"], batch_size=0)
    r = cli(*args, "--debug", check=False)
    assert r.returncode == 1 and "Traceback" in r.stderr and "StreamResizeError" in r.stderr
    r = cli("--debug", *args, check=False)  # before the command too
    assert r.returncode == 1 and "Traceback" in r.stderr


# ---- calibration text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,problem", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"  \n\n \n", "empty"),
    ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n', "empty"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("weights.txt", b"\x00\x00\x80\x3f" * 64, "not UTF-8 text (byte 0x80 at offset 2)"),
    ("ids.txt", b"\x00\x00\x00\x01 the river", "binary data (a NUL byte at offset 0)"),
    ("model.txt", b"\x89PNG\r\n\x1a\n" + bytes(64), "not UTF-8 text (byte 0x89 at offset 0)"),
])
def test_unusable_calibration_text_is_named(tiny_model, texts, tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"])
    args.insert(args.index(texts["calib"]) + 1, path)  # a good file, then the bad one
    r = cli(*args, check=False)
    _refused(r, str(path), problem)
    assert not (out / INDEX).exists()


def test_calibration_text_too_short_for_n_x_l_is_refused_with_the_numbers(tiny_model, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The river city was founded by the king. The team won the first game.\n")
    r = cli(*compress_args(tiny_model, tmp_path / "out", path, num_calibration_samples=12, max_seq_length=16),
            check=False)
    _refused(r, str(path), "only ", "tokens, but --num-calibration-samples 12 x --max-seq-length 16 needs 192",
             "lower --num-calibration-samples to at most")


def test_crlf_text_reads_as_before(tmp_path):
    from streamresize.calibration import read_documents

    unix, dos = tmp_path / "unix.txt", tmp_path / "dos.txt"
    unix.write_bytes(b"one two.\n\nthree four.\n")
    dos.write_bytes(b"one two.\r\n\r\nthree four.\r\n")
    assert read_documents([str(dos)]) == read_documents([str(unix)]) == ["one two.", "three four."]


def test_no_tokenizer_is_a_clear_error_and_random_needs_none(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(model / name)
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, str(model), "no tokenizer", "--dataset random")
    assert not (out / INDEX).exists()
    cli(*compress_args(model, tmp_path / "out-random", "random", sparsity=0.25))
    assert (tmp_path / "out-random" / INDEX).exists()


# ---- the checkpoint -----------------------------------------------------------------------------------


def _rewrite_tensor(model, name, tensor):
    index = json.load(open(model / INDEX))["weight_map"]
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})
    return index[name]


def _edit_config(model, **changes):
    config = json.load(open(model / "config.json"))
    config.update(changes)
    json.dump(config, open(model / "config.json", "w"))


def test_quantized_checkpoint_is_refused_with_what_to_do(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    _edit_config(model, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, "config.json", "quantized checkpoint", "bitsandbytes", "de-quantize it first")
    _nothing_started(tmp_path, out)


@pytest.mark.parametrize("dtype,stored", [("int8", "I8"), ("float64", "F64")])
def test_unsupported_weight_dtype_says_what_to_do(tiny_model, texts, tmp_path, dtype, stored):
    import torch

    model = _copy(tiny_model, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _rewrite_tensor(model, name, torch.ones(96, 64, dtype=getattr(torch, dtype)))
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, shard, name, stored, "convert the checkpoint to float32, bfloat16 or float16 first")
    _nothing_started(tmp_path, out)


def test_tensor_shape_contradicting_config_is_named_before_any_weight_is_read(tiny_model, texts, tmp_path):
    import torch

    model = _copy(tiny_model, tmp_path)
    name = "model.layers.2.self_attn.k_proj.weight"
    shard = _rewrite_tensor(model, name, torch.zeros(64, 64))  # 4 kv heads' worth; config says 2
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, shard, name, "has shape [64, 64]", "num_key_value_heads 2 x head_dim 16", "implies [32, 64]")
    _nothing_started(tmp_path, out)


@pytest.mark.parametrize("changes,needles", [
    ({"intermediate_size": 128}, ["model.layers.0.mlp.gate_proj.weight", "intermediate_size 128", "[128, 64]"]),
    ({"hidden_size": 80, "head_dim": 16}, ["model.embed_tokens.weight", "hidden_size 80"]),
    ({"vocab_size": 1000}, ["model.embed_tokens.weight", "vocab_size 1000"]),
    ({"num_hidden_layers": 5}, ["lacks 'model.layers.4.", "num_hidden_layers 5"]),
    ({"num_hidden_layers": 3}, ["holds 'model.layers.3.", "num_hidden_layers 3"]),
    ({"hidden_size": "64"}, ["hidden_size is '64'"]),
])
def test_config_contradicting_the_tensors_is_refused(tiny_model, texts, tmp_path, changes, needles):
    model = _copy(tiny_model, tmp_path)
    _edit_config(model, **changes)
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, *needles)
    _nothing_started(tmp_path, out)


def test_truncated_shard_is_noticed_at_start_up(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[-1]  # the last blocks' shard
    size = os.path.getsize(model / shard)
    with open(model / shard, "r+b") as f:
        f.truncate(size - 100)
    out = tmp_path / "out"
    r = cli(*compress_args(model, out, texts["calib"]), check=False)
    _refused(r, shard, "truncated", f"the file has {size - 100} bytes")
    _nothing_started(tmp_path, out)


def test_header_whose_offsets_contradict_the_shape_is_refused(tiny_model, texts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
    data = (model / shard).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(n for n in sorted(header) if n != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    (model / shard).write_bytes(data[:8] + raw.ljust(length) + data[8 + length:])  # same size, other shape
    r = cli(*compress_args(model, tmp_path / "out", texts["calib"]), check=False)
    _refused(r, shard, name, "the shard's header is corrupt")


# ---- directories and the disk ---------------------------------------------------------------------------


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root: permission bits do not stop root's writes, so a read-only directory "
                           "cannot be made here (test_unwritable_directories_are_refused_up_front covers the check)")
@pytest.mark.parametrize("which", ["output", "work"])
def test_read_only_output_or_work_dir_is_a_clear_error(tiny_model, texts, tmp_path, which):
    out, work = tmp_path / "out", tmp_path / "work"
    target = out if which == "output" else work
    target.mkdir()
    target.chmod(0o555)
    try:
        r = cli(*compress_args(tiny_model, out, texts["calib"], work_dir=work), check=False)
    finally:
        target.chmod(0o755)
    _refused(r, str(target), "not writable")


def test_unwritable_directories_are_refused_up_front(tmp_path, monkeypatch):
    """The check itself, independent of who runs the tests (root writes anywhere)."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(work))
    with pytest.raises(StreamResizeError, match="work dir is not writable"):
        streamresize_cli.check_writable(str(out), str(work))
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path))
    with pytest.raises(StreamResizeError, match="output directory is not writable"):
        streamresize_cli.check_writable(str(out), str(work))  # out does not exist: its parent decides


def test_permission_and_read_only_errors_during_a_run_are_one_line():
    for code in (errno.EACCES, errno.EROFS):
        message = streamresize_cli._os_error_message(OSError(code, os.strerror(code), "/data/out/config.json"))
        assert message.startswith("/data/out/config.json: ") and "choose another directory" in message


def test_disk_full_during_the_run_is_reported_and_resumes_once_space_is_freed(
        tiny_model, texts, tmp_path, monkeypatch, pca_quarter):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)  # the pca_quarter command
    write_shard = ShardWriter.write_shard

    def full_disk(self, name, tensors):
        if name == "model-block-00002.safetensors":
            path = os.path.join(self.out_dir, name + ".tmp")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return write_shard(self, name, tensors)

    monkeypatch.setattr(ShardWriter, "write_shard", full_disk)
    r = cli(*args, check=False)
    _refused(r, "no space left on", "model-block-00002.safetensors.tmp",
             "free space and rerun the same command to resume")
    assert not (out / INDEX).exists()
    monkeypatch.setattr(ShardWriter, "write_shard", write_shard)  # space freed
    r = cli(*args)
    assert "resuming at block 2" in r.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(pca_quarter.out, exclude={RUN_LOG})


def test_disk_full_inside_a_library_is_recognised():
    """safetensors (Rust) reports a full disk in its own error type, by message."""
    error = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                         "\"No space left on device\" })")
    assert streamresize_cli._os_error_message(error).startswith("no space left on device")
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/")
    assert "no space left on" in streamresize_cli._os_error_message(wrapped)
    assert streamresize_cli._os_error_message(ValueError("other")) is None


# ---- output files are normal files ---------------------------------------------------------------------


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_files_are_0644_like_any_other_file(pca_quarter):
    expected = 0o666 & ~_umask()
    modes = {name: oct(os.stat(pca_quarter.out / name).st_mode & 0o777) for name in os.listdir(pca_quarter.out)}
    assert set(modes.values()) == {oct(expected)}, modes


def test_output_file_modes_follow_the_umask(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    saved = os.umask(0o027)
    try:
        cli(*compress_args(tiny_model, out, texts["calib"], method="prune", sparsity=0.25))
    finally:
        os.umask(saved)
    modes = {name: oct(os.stat(out / name).st_mode & 0o777) for name in os.listdir(out)}
    assert set(modes.values()) == {oct(0o640)}, modes
