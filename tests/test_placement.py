"""The memory planner and `streamresize plan`: decisions within the budgets, sizes that match the
tensors actually read and written, disk space checked before any work."""

import glob
import json
import math
import os
import random

import pytest
import torch
from helpers import CALIB, cli, compress_args
from safetensors import safe_open

import streamresize
from streamresize import plan as plan_module
from streamresize.pipeline import Run
from streamresize.errors import StreamResizeError
from streamresize.placement import (HEADROOM, HOST_BASE, Footprint, MemoryOptions, footprint, parse_size,
                                    pinned_size, place)
from streamresize.plan import make_plan
from streamresize.recipe import load_recipe

GiB = 2**30


def _random_footprint(rng):
    return Footprint(step=rng.randint(1, 8) * GiB // 4, pass_fixed=rng.randint(1, 8) * GiB // 4,
                     per_sequence=rng.randint(1, 2000) * 2**20, cache=rng.randint(0, 64) * GiB // 4,
                     block_stored=rng.randint(1, 4000) * 2**20)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_placement_stays_within_the_budgets(device):
    """Over many random sizes and budgets: the plan fits, the micro-batch is the largest that fits,
    and the cache takes the fastest location that fits."""
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        fp = _random_footprint(rng)
        gpu, cpu = rng.randint(1, 96) * GiB // 2, rng.randint(1, 128) * GiB // 2
        max_batch = rng.randint(1, 16)
        budget = gpu if device == "cuda" else cpu
        base = HOST_BASE if device == "cpu" else 0
        try:
            p = place(fp, device, gpu, cpu, max_batch)
        except StreamResizeError as e:
            assert ("--max-gpu-memory" if device == "cuda" else "--max-cpu-memory") in str(e)
            assert base + fp.pass_fixed + fp.per_sequence > HEADROOM * budget or base + fp.step > HEADROOM * budget
            continue
        checked += 1
        assert 1 <= p.batch_size <= max_batch
        assert p.device_bytes <= HEADROOM * budget
        assert p.host_bytes <= HEADROOM * cpu
        if p.batch_size < max_batch:  # one more sequence would not have fitted
            assert base + fp.pass_fixed + (p.batch_size + 1) * fp.per_sequence > HEADROOM * budget
        without_cache = base + max(fp.step, fp.pass_fixed + p.batch_size * fp.per_sequence)
        if p.cache != "device":
            assert without_cache + fp.cache > HEADROOM * budget
        if device == "cpu":
            assert p.cache in ("device", "disk") and p.host_bytes == 0
        elif p.cache == "disk":
            assert HOST_BASE + 3 * pinned_size(fp.cache // 3) > HEADROOM * cpu
    assert checked > 500


def test_placement_on_a_24gb_card_for_7b_at_128x2048():
    """The planner's decisions for the GPU benchmark: bf16 compute, cache off the GPU, within 12 GB."""
    config = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_attention_heads": 32,
              "num_key_value_heads": 32}
    fp = footprint(config, 3072, 2, 2, 2, 128, 2048, narrow_mlp=False)
    p = place(fp, "cuda", parse_size("12GB"), parse_size("64GiB"), 8)
    assert p.cache == "pinned" and p.prefetch == "memory" and p.batch_size >= 1
    assert p.device_bytes <= 12e9
    small = place(fp, "cuda", parse_size("12GB"), parse_size("8GiB"), 8)
    assert small.cache == "disk"
    roomy = place(fp, "cuda", parse_size("80GB"), parse_size("64GiB"), 8)
    assert roomy.cache == "device" and roomy.batch_size == 8


def test_forced_cache_location_and_prefetch_off():
    fp = Footprint(step=GiB, pass_fixed=GiB, per_sequence=2**20, cache=GiB, block_stored=2**20)
    assert place(fp, "cpu", None, 64 * GiB, 8, cache="disk").cache == "disk"
    assert place(fp, "cpu", None, 64 * GiB, 8, prefetch=False).prefetch == "off"
    with pytest.raises(StreamResizeError, match="pinned needs a CUDA device"):
        place(fp, "cpu", None, 64 * GiB, 8, cache="pinned")


@pytest.mark.parametrize("text,expected", [("20GiB", 20 * GiB), ("12GB", 12 * 10**9), ("512MiB", 2**29),
                                           ("1.5GB", 1.5e9), ("3e9", 3e9), ("100", 100)])
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "GB", "12 parsecs", "-3GB", "1,5GB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(StreamResizeError, match="expected a size"):
        parse_size(text, "--max-gpu-memory")


def _compressor(model, out, texts, memory=None, **options):
    recipe = load_recipe(None, {**CALIB, "dataset": [texts["calib"]], **options})
    return Run(model, str(out), recipe, memory=memory)


ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}


def _tensor_bytes(path):
    """{tensor name: bytes} of a safetensors file, as safetensors itself reads it."""
    sizes = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            sizes[name] = ELEMENT_BYTES[part.get_dtype()] * math.prod(part.get_shape())
    return sizes


def test_plan_sizes_match_the_tensors_read_and_written(tiny_model, texts, tmp_path, pca_quarter):
    out = tmp_path / "out"
    compressor = _compressor(tiny_model, out, texts, sparsity=0.25)
    plan = make_plan(compressor)
    source = {}
    for shard in glob.glob(os.path.join(tiny_model, "*.safetensors")):
        source.update(_tensor_bytes(shard))
    config = compressor.source_config
    steps = {s.name: s for s in plan.steps}
    assert steps["embedding"].read_bytes == source["model.embed_tokens.weight"]
    for i in range(config["num_hidden_layers"]):
        block = sum(v for k, v in source.items() if k.startswith(f"model.layers.{i}."))
        assert steps[f"block {i}"].read_bytes == block
    assert steps["head"].read_bytes == source["lm_head.weight"] + source["model.norm.weight"]
    assert sum(s.read_bytes for s in plan.steps) == sum(source.values())
    n, seq = CALIB["num_calibration_samples"], CALIB["max_seq_length"]
    assert plan.cache_bytes == 3 * n * seq * config["hidden_size"] * 4

    compressed = pca_quarter.out  # what this recipe (sparsity 0.25, CALIB) wrote
    written = {"embedding": "model-embed.safetensors", "head": "model-head.safetensors",
               **{f"block {i}": f"model-block-{i:05d}.safetensors" for i in range(config["num_hidden_layers"])}}
    for name, shard in written.items():
        assert steps[name].output_bytes == sum(_tensor_bytes(os.path.join(compressed, shard)).values()), name


def test_plan_command_prints_a_row_per_step_and_json(tiny_model, texts, tmp_path):
    result = cli("plan", tiny_model, tmp_path / "out", "--dataset", texts["calib"], "--sparsity", "0.25",
                 "--num-calibration-samples", 12, "--max-seq-length", 32, "--max-cpu-memory", "4GiB")
    lines = result.stdout.strip().splitlines()
    plan = json.loads(lines[-1])
    rows = [line.split()[0] + " " + line.split()[1] for line in lines if line.startswith(("embedding", "block", "head"))]
    assert len(plan["steps"]) == len(rows) == 4 + 2
    assert plan["placement"]["batch_size"] == 8 and plan["budgets"]["cpu"] == 4 * GiB
    assert plan["seconds"] > 0 and all(s["seconds"] is not None for s in plan["steps"])
    assert "disk at" in result.stdout and not (tmp_path / "out").exists()


def test_not_enough_disk_is_reported_by_plan_and_refused_by_compress(tiny_model, texts, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    from streamresize.cli import main

    out = tmp_path / "out"
    assert main(["plan", tiny_model, str(out), "--dataset", texts["calib"]]) == 2
    assert "NOT ENOUGH" in capsys.readouterr().out
    with pytest.raises(StreamResizeError, match="not enough disk space"):
        streamresize.compress(tiny_model, str(out), dataset=[texts["calib"]], **CALIB)
    assert not out.exists() and not os.path.exists(str(out) + ".streamresize-work")


def test_memory_budget_too_small_exits_2_naming_the_option(tiny_model, texts, tmp_path):
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"]), "--max-cpu-memory", "100MB", check=False)
    assert r.returncode == 2 and "--max-cpu-memory" in r.stderr and "too small" in r.stderr
    r = cli(*compress_args(tiny_model, tmp_path / "out", texts["calib"]), "--max-cpu-memory", "lots", check=False)
    assert r.returncode == 2 and "--max-cpu-memory lots" in r.stderr


def test_memory_options_are_not_part_of_the_recipe(tiny_model, texts, tmp_path):
    """A run that ran out of memory resumes with a smaller budget instead of starting over."""
    a = _compressor(tiny_model, tmp_path / "a", texts, MemoryOptions(max_cpu_memory="64GiB"))
    b = _compressor(tiny_model, tmp_path / "a", texts, MemoryOptions(max_cpu_memory="2GiB", cache_location="disk"))
    assert a.recipe.digest() == b.recipe.digest()


def test_plan_for_a_gpu_from_a_machine_without_one(tiny_model, texts, tmp_path):
    """`plan --device cuda --max-gpu-memory ...` works before a GPU is at hand (no weights, no CUDA)."""
    compressor = _compressor(tiny_model, tmp_path / "out", texts, MemoryOptions(max_gpu_memory="12GB"), device="cuda")
    plan = make_plan(compressor, measure=True)
    assert compressor.compute_dtype in (torch.bfloat16, torch.float16)
    assert plan.placement.cache == "device" and plan.budgets["gpu"] == 12 * 10**9
    if not torch.cuda.is_available():
        assert plan.throughput is None and plan.seconds is None
        with pytest.raises(StreamResizeError, match="--max-gpu-memory"):
            make_plan(_compressor(tiny_model, tmp_path / "out", texts, device="cuda"))


def test_an_mlp_solve_in_memory_mapped_files_is_not_counted_against_the_budget():
    """On the CPU the MLP neurons' d_ff² Gram and OBS inverse live in work-dir files (file-backed pages):
    the plan counts only the d x d_ff matrices, so a 7B MLP (11008² float64 = 0.97 GB each) fits a
    budget that would otherwise refuse it."""
    config = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_attention_heads": 32,
              "num_key_value_heads": 32}
    in_memory = footprint(config, 4096, 2, 4, 2, 8, 256, narrow_mlp=True)
    in_files = footprint(config, 4096, 2, 4, 2, 8, 256, narrow_mlp=True, mlp_in_files=True)
    assert in_memory.pass_fixed - in_files.pass_fixed == 8 * (11008 ** 2 - 4096 ** 2)
    assert in_files.step < in_memory.step
    with pytest.raises(StreamResizeError, match="too small"):
        place(in_memory, "cpu", None, parse_size("4GiB"), 8)
    assert place(in_files, "cpu", None, parse_size("4GiB"), 8).batch_size >= 1


def test_the_mlp_solve_is_counted_as_float64_work_that_obs_selection_adds_to():
    """A 7B MLP narrowed to 6528 of 11008 neurons: 3.9e12 float64 FLOPs with OBS selection (measured:
    117 s on this 2-core CPU, BENCHMARKS.md), of which the least-squares refit alone is about a quarter."""
    from streamresize.plan import mlp_solve_flops

    with_obs = mlp_solve_flops(4096, 11008, 6528, obs=True)
    refit_only = mlp_solve_flops(4096, 11008, 6528, obs=False)
    assert 3.7e12 < with_obs < 4.0e12
    assert 0.2 < refit_only / with_obs < 0.3
    ff, d = 11008, 4096  # nothing removed: the inverse and the refit, no greedy updates
    assert mlp_solve_flops(d, ff, ff, obs=True) == pytest.approx(ff ** 3 + 2 * d * ff * ff + ff ** 3 / 3 + 2 * ff * ff * d)


def test_points_kept_whole_are_planned_without_bases_or_residual_statistics():
    """An MLP-only run on a 7B shape: no d x d bases (five float64 / float32 copies, 0.67 GB at d = 4096)
    and no residual Gram in the fixed part of a pass; the MLP solve's files are not counted either."""
    config = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_attention_heads": 32,
              "num_key_value_heads": 32}
    with_bases = footprint(config, 4096, 2, 4, 2, 8, 256, narrow_mlp=True, mlp_in_files=True)
    whole = footprint(config, 4096, 2, 4, 2, 8, 256, narrow_mlp=True, mlp_in_files=True, bases=False)
    assert with_bases.pass_fixed - whole.pass_fixed == 5 * 8 * 4096 ** 2 + 8 * 4096 ** 2
    assert whole.step <= with_bases.step - 5 * 8 * 4096 ** 2


def test_a_global_allocation_is_planned_with_every_mlp_narrowed(tiny_model, texts, tmp_path):
    """Global allocation decides the MLP widths after the plan: the plan must still count the MLP
    neurons' statistics and solve in every block (it used to plan the source's width: nothing narrowed)."""
    options = dict(method="dotresize", sparsity=0.0, mlp_sparsity=0.5, width_multiple=8,
                   method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
    uniform = make_plan(_compressor(tiny_model, tmp_path / "u", texts, **options))
    spread = make_plan(_compressor(tiny_model, tmp_path / "g", texts, allocation="global", **options))
    ff = 96
    for a, b in zip(uniform.steps[1:-1], spread.steps[1:-1]):
        assert a.statistics_bytes == b.statistics_bytes == 8 * (ff * ff + 2 * ff)
        assert b.flops["float64"] >= a.flops["float64"]
