"""Reading ahead, where the activation cache lives, committing in the background, compute dtype:
none of them may change a byte of the output, break resuming, or leave a thread behind."""

import json
import os
import threading

import pytest
import torch
from helpers import CALIB, cli, compress_args, tree_digest

import streamresize
from streamresize.cache import ActivationCache
from streamresize.checkpoint import CheckpointReader
from streamresize.methods.slicing import PcaMethod
from streamresize.pipeline import Run
from streamresize.writer import RUN_LOG
from streamresize.errors import StreamResizeError
from streamresize.placement import MemoryOptions
from streamresize.prefetch import Prefetcher
from streamresize.recipe import load_recipe
from streamresize.transforms import by_rows, fold_norm, rotate_reader, rotate_writer, selected_columns


def _our_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("streamresize")]


@pytest.mark.parametrize("keep", [True, False])
def test_prefetched_tensors_equal_direct_reads(tiny_model_bf16, keep):
    reader = CheckpointReader(tiny_model_bf16)
    names = sorted(reader.weight_map)
    groups = [names[:5], names[5:17], names[17:]]
    prefetcher = Prefetcher(tiny_model_bf16, lambda g: groups[g] if g < len(groups) else [], keep=keep, pin=False)
    try:
        for g in range(len(groups)):
            prefetcher.schedule(g + 1)  # reads ahead of what is asked for, as the engine does
            for name in groups[g]:
                for dtype in (torch.float32, torch.bfloat16):
                    expected = reader.get(name, dtype)
                    got = prefetcher.get(name, dtype, "cpu")
                    assert got.dtype == dtype and got.shape == expected.shape
                    assert torch.equal(got, expected), name
    finally:
        prefetcher.close()
    assert not _our_threads()


def test_truncated_shard_is_reported_from_the_background_read(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    reader = CheckpointReader(str(model))
    name = max(reader.weight_map, key=reader.nbytes)
    path, start, length = reader.location(name)
    # Opened before the truncation (a truncation at start-up is refused from the headers alone: see
    # test_validation.py); the background read must still notice one that happens later.
    prefetcher = Prefetcher(str(model), lambda g: [name] if g == 0 else [], keep=True, pin=False)
    with open(path, "r+b") as f:
        f.truncate(start + length // 2)
    prefetcher.schedule(0)
    with pytest.raises(StreamResizeError, match="truncated"):
        prefetcher.get(name, torch.float32, "cpu")
    prefetcher.close()


VARIANTS = {
    "no prefetch": ["--no-prefetch"],
    "cache on disk": ["--cache-location", "disk"],
    "cache on disk, no prefetch": ["--cache-location", "disk", "--no-prefetch"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefetch_and_cache_location_do_not_change_a_byte(tiny_model, texts, tmp_path, pca_quarter, variant):
    reference, out = pca_quarter.out, tmp_path / "out"  # reference: the same command with the default options
    cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25), *VARIANTS[variant])
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})
    placement = json.load(open(out / RUN_LOG))["placement"]
    assert placement["cache"] == ("disk" if "disk" in variant else "device")
    assert (placement["prefetch"] == "off") == ("no prefetch" in variant)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("device", "disk"), ("disk", "device")])
def test_resume_across_cache_locations_is_byte_identical(tiny_model, texts, tmp_path, pca_quarter, first, then):
    """The cache file on disk is the resume state whatever the location; a run that crashed with its
    cache in memory resumes with it on disk (a smaller budget), and the other way round. The crashed run
    is a separate process."""
    reference, out = pca_quarter.out, tmp_path / "out"  # reference: the same command, never interrupted
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    crashed = cli(*args, "--cache-location", first, env={"STREAMRESIZE_CRASH_AT": "2:solving"}, check=False)
    assert crashed.returncode == 75, crashed.stderr
    resumed = cli(*args, "--cache-location", then)
    assert "resuming at block" in resumed.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(reference, exclude={RUN_LOG})


def _compressor(model, out, texts, **options):
    recipe = load_recipe(None, {**CALIB, "dataset": [texts["calib"]], **options})
    return Run(model, str(out), recipe)


def test_an_error_mid_run_leaves_no_thread_running(tiny_model, texts, tmp_path, monkeypatch):
    original = PcaMethod.block

    def failing(self, i, progress):
        if i == 2:
            raise StreamResizeError("boom")
        return original(self, i, progress)

    monkeypatch.setattr(PcaMethod, "block", failing)
    with pytest.raises(StreamResizeError, match="boom"):
        _compressor(tiny_model, tmp_path / "out", texts, sparsity=0.25).run()
    assert not _our_threads()
    # the steps before the error were committed: a valid state to resume from
    manifest = json.load(open(str(tmp_path / "out") + ".streamresize-work/manifest.json"))
    assert manifest["next_block"] == 2 and [s["step"] for s in manifest["log"]] == ["embedding", "block 0", "block 1"]


@pytest.mark.parametrize("device,option", [("cpu", "--max-cpu-memory"), ("cuda", "--max-gpu-memory")])
def test_out_of_memory_names_the_option_to_change(tiny_model, texts, tmp_path, monkeypatch, device, option):
    def oom(self, i, progress):
        self.run.device = torch.device(device)  # the message is chosen by the run's device
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PcaMethod, "block", oom)
    with pytest.raises(StreamResizeError) as error:
        _compressor(tiny_model, tmp_path / "out", texts, sparsity=0.25).run()
    message = str(error.value)
    assert option in message and "at block 0" in message and "resumes" in message and "2.00 GiB" in message
    assert not _our_threads()


def test_run_log_splits_anonymous_and_file_memory(pca_quarter):
    out, result = pca_quarter.out, pca_quarter.result  # compress --sparsity 0.25
    log = json.load(open(out / RUN_LOG))
    assert 0 < log["peak_anon_mb"] <= log["peak_rss_mb"] and log["peak_file_mb"] > 0
    for step in log["steps"]:
        assert 0 < step["peak_anon_mb"] <= log["peak_anon_mb"]
        assert step["step_seconds"] > 0 and step["read_wait_seconds"] >= 0 and step["commit_wait_seconds"] >= 0
    assert "anonymous" in result.stderr and "waited" in result.stderr


def test_bf16_compute_tracks_float32_compute(tiny_model, texts, tmp_path):
    """The GPU's compute dtype, run on the CPU: the hooks cast at the module boundaries, the
    statistics stay float64, and the result stays close to the float32 run."""
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    _compress = streamresize.compress
    _compress(tiny_model, str(f32), dataset=[texts["calib"]], sparsity=0.0, **CALIB,
              method_options={"rotate_full_width": True})
    _compress(tiny_model, str(bf16), dataset=[texts["calib"]], sparsity=0.0, compute_dtype="bfloat16", **CALIB,
              method_options={"rotate_full_width": True})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a = streamresize.load(str(f32))(ids).logits.detach()
    b = streamresize.load(str(bf16))(ids).logits.detach()
    shard = "model-block-00003.safetensors"
    assert (f32 / shard).read_bytes() != (bf16 / shard).read_bytes()  # it did compute in bf16
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert json.load(open(bf16 / RUN_LOG))["compute_dtype"] == "bfloat16"


def test_in_memory_cache_round_trips_through_its_file(tmp_path):
    cache = ActivationCache(str(tmp_path), 5, 7, 6, location="device", micro_batch=2)
    view = cache.view("hidden_a", 6)
    data = torch.randn(5, 7, 6)
    for rows in cache.batches(8):
        assert rows[1] - rows[0] <= 2
        cache.write(view, rows, data[rows[0]:rows[1]])
    cache.project_in_place("hidden_a", torch.eye(6, 4, dtype=torch.float64), 3, "cpu")
    cache.persist_later("hidden_a", 4)()
    other = ActivationCache(str(tmp_path), 5, 7, 6, location="device")
    other.restore("hidden_a")
    narrow = other.view("hidden_a", 4)
    assert torch.equal(other.read(narrow, (0, 5), "cpu"), data[..., :4])
    disk = ActivationCache(str(tmp_path), 5, 7, 6, location="disk")
    assert torch.equal(disk.read(disk.view("hidden_a", 4), (0, 5), "cpu"), data[..., :4])


def test_selection_bases_are_applied_by_indexing_with_the_same_numbers():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 16, generator=g)
    keep = torch.randperm(16, generator=g)[:10]
    selection = torch.eye(16, dtype=torch.float64)[:, keep]
    assert torch.equal(selected_columns(selection), keep)
    assert torch.equal(rotate_reader(weight, selection), weight.double() @ selection)
    assert torch.equal(rotate_writer(weight.T, selection), selection.T @ weight.T.double())
    dense = torch.linalg.qr(torch.randn(16, 10, dtype=torch.float64, generator=g))[0]
    assert selected_columns(dense) is None
    assert selected_columns(2 * selection) is None


def test_by_rows_equals_the_whole_transform():
    g = torch.Generator().manual_seed(1)
    weight, scale = torch.randn(1000, 24, generator=g), torch.randn(24, generator=g)
    basis = torch.linalg.qr(torch.randn(24, 16, dtype=torch.float64, generator=g))[0]
    whole = rotate_reader(fold_norm(weight, scale), basis)
    parts = by_rows(lambda rows: rotate_reader(fold_norm(rows, scale), basis), weight, rows=64)
    assert parts.shape == whole.shape and torch.allclose(parts, whole, rtol=0, atol=1e-12)
    # In the output's dtype, each block is cast once: bit for bit the whole float64 result cast, and
    # no float64 matrix of the full size is returned (a 7B embedding's would be 1 GB).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cast = by_rows(lambda rows: rotate_reader(fold_norm(rows, scale), basis), weight, rows=64, dtype=dtype)
        assert cast.dtype == dtype and torch.equal(cast, whole.to(dtype))


def test_memory_options_from_the_command_line(tiny_model, texts, tmp_path):
    out = tmp_path / "out"
    cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25), "--max-cpu-memory", "3GiB",
        "--cache-location", "disk")
    assert json.load(open(out / RUN_LOG))["placement"]["cache"] == "disk"
    assert MemoryOptions(max_cpu_memory="3GiB").budgets(torch.device("cpu"))[1] == 3 * 2**30
    assert os.path.exists(out / "model.safetensors.index.json")
