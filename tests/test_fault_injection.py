"""Fault injection (issue 15, item 1): the compressor killed at every step, for every method.

Each case runs `streamresize compress` in a separate process (forked from the suite's fork server, so it
starts in well under a second) with STREAMRESIZE_CRASH_AT=POINT, which ends it with os._exit(75) at that
point: no clean-up, no handlers, no flush, as SIGKILL or a power cut to the process would. Then:

- no killed run leaves an output a loader takes as complete: OUT_DIR holds no
  model.safetensors.index.json, unless the kill came after that index was written, and then OUT_DIR
  already is the complete, correct output;
- what the manifest says is committed is so: it never names a step the kill interrupted, and every
  shard it records is the uninterrupted run's shard;
- the same command, rerun, resumes where the manifest says and writes files byte-identical to an
  uninterrupted run (all but streamresize_run.json, which holds timings), with no temp file, no work dir
  and no staging directory left behind.

Points are STEP:PHASE, STEP being -1 (the embedding), a block, or prepare / head / finish / cleanup;
POINT#N is the N-th time the run passes POINT (points in loops). `STEP:tmp:NAME` is an atomic write whose
temp file is complete and synced but not renamed, `STEP:renamed:NAME` the same write renamed, its
directory not yet synced. The model has two blocks, so 1 is the last block. RELIABILITY.md lists what
each point is.

Torn files: a shard the manifest does not record yet (truncated, a byte flipped, or a half-written temp
file) is rewritten by the rerun; a shard the manifest records that changed since (its sha256 differs)
or that is missing stops the rerun with exit 2, naming the file, and `--restart` starts over.
"""

import json
import os

import pytest
from helpers import cli, compress_args, tree_digest
from tiny import make_tiny_llama

from streamresize.writer import RUN_LOG, file_sha256

pytestmark = pytest.mark.slow

INDEX = "model.safetensors.index.json"
KILLED = 75

VARIANTS = {
    "pca": {"method": "pca", "sparsity": 0.25},
    "prune": {"method": "prune", "sparsity": 0.25},
    "dotresize": {"method": "dotresize", "sparsity": 0.25, "mlp_sparsity": 0.25},
    "dotresize-shared": {"method": "dotresize", "sparsity": 0.25, "basis": "shared"},
    "disp": {"method": "disp", "sparsity": 0.3, "allocation": "global"},
    # The output written straight into OUT_DIR (no staging copy): the index is the last atomic write there.
    "prune-bundled": {"method": "prune", "sparsity": 0.25, "save_format": "bundled"},
    "pca-disk": {"method": "pca", "sparsity": 0.25, "cache_location": "disk"},
    # Structured OBS: heads and neurons, MLP widths from the dense model's error curves.
    "obs-global": {"method": "dotresize", "sparsity": 0.0, "mlp_sparsity": 0.5, "attention_sparsity": 0.5,
                   "allocation": "global", "option": ["mlp_support=obs", "mlp_reader=lstsq"]},
}

# Every method: a step's start, mid-way through a block's statistics (batch 2 of 3), before the solve,
# before propagating, every stage of a shard's and the manifest's atomic writes, the background commit,
# the head, the final writes and the work dir's clean-up.
EVERY_METHOD = [
    "-1:start", "-1:committing", "-1:committed",
    "0:start", "0:accumulating#2", "0:solving", "0:propagating",
    "1:tmp:model-block-00001.safetensors", "1:renamed:model-block-00001.safetensors", "1:committing",
    "1:tmp:manifest.json", "1:renamed:manifest.json", "1:committed",
    "head:start", "head:tmp:model-head.safetensors",
    "finish:renamed:config.json", "finish:tmp:model.safetensors.index.json", "finish:renamed:README.md",
    "cleanup:removing", "cleanup:removed#2",
]
# The same code for every method: for a few variants only.
WRITES = [
    "-1:tmp:model-embed.safetensors", "-1:renamed:model-embed.safetensors", "-1:tmp:manifest.json",
    "-1:renamed:manifest.json", "head:renamed:model-head.safetensors", "finish:tmp:streamresize_run.json",
    "finish:tmp:config.json", "finish:copied:tokenizer.json", "finish:renamed:model.safetensors.index.json",
    "finish:tmp:README.md", "cleanup:unmarked",
]
SLICING = ["-1:accumulating#2", "-1:solved", "-1:tmp:basis--1.safetensors", "0:solved#2", "0:accumulating#5",
           "1:renamed:basis-1.safetensors"]
POINTS = {
    "pca": EVERY_METHOD + SLICING + WRITES,
    "prune": EVERY_METHOD + SLICING,
    "dotresize": EVERY_METHOD + SLICING + ["0:narrowed", "1:solved"],
    "dotresize-shared": EVERY_METHOD + [
        "prepare:accumulating#2", "prepare:shared-basis#1", "prepare:tmp:shared-basis.safetensors",
        "prepare:renamed:shared-basis.safetensors"],
    "disp": EVERY_METHOD + WRITES + [
        "prepare:curves#1", "prepare:tmp:disp-curves.json", "prepare:renamed:disp-curves.json",
        "0:selected#2", "1:accumulating#7", "1:selected#3"],
    "prune-bundled": [p for p in EVERY_METHOD if "README" not in p] + [
        "finish:renamed:model.safetensors.index.json", "finish:copied:tokenizer.json", "cleanup:unmarked"],
    "pca-disk": ["0:accumulating#2", "0:propagating", "1:start", "1:committing", "1:committed"],
    "obs-global": ["prepare:accumulating#2", "prepare:curves#1", "prepare:tmp:mlp-curves.json",
                   "prepare:renamed:mlp-curves.json", "-1:start", "0:accumulating#2", "0:heads", "0:narrowed",
                   "1:heads", "1:committed", "head:start", "finish:tmp:model.safetensors.index.json"],
}


def _after_the_index(point, variant):
    """Whether OUT_DIR holds the finished output (its index included) when the run is killed at `point`."""
    if point.startswith("cleanup:"):
        return True
    return VARIANTS[variant].get("save_format") == "bundled" and point == "finish:renamed:" + INDEX


# Known failures, each a bug the matrix found and the fix it needs.
KNOWN = {}  # (variant, point): reason, for a bug the matrix found and that is not fixed yet (none now)
CASES = [pytest.param(variant, point, id=f"{variant}-{point}", marks=[pytest.mark.xfail(
             reason=KNOWN[variant, point], strict=True)] if (variant, point) in KNOWN else [])
         for variant, points in POINTS.items() for point in points]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    """A two-block tiny Llama (three input shards): every step of a run, at half the cost of four blocks."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("fault-model")), tokenizer, layers=2, seed=7)


class References:
    """The uninterrupted output of each variant, made once per module on first use (read-only)."""

    def __init__(self, model, calib, root):
        self.model, self.calib, self.root = model, calib, root
        self.outputs = {}

    def args(self, variant, out):
        return compress_args(self.model, out, self.calib, **VARIANTS[variant])

    def __call__(self, variant):
        if variant not in self.outputs:
            out = self.root / variant
            cli(*self.args(variant, out))
            self.outputs[variant] = (out, tree_digest(out, exclude={RUN_LOG}))
        return self.outputs[variant]


@pytest.fixture(scope="module")
def references(model, texts, tmp_path_factory):
    return References(model, texts["calib"], tmp_path_factory.mktemp("fault-references"))


def _work(out):
    return str(out) + ".streamresize-work"


def _manifest(out):
    path = os.path.join(_work(out), "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _find(out, name):
    """Where a run keeps shard `name` before it is published: OUT_DIR itself, or a staging copy in the
    work dir."""
    for root in (os.path.join(_work(out), ".streamresize-bundled"), str(out), _work(out)):  # staging first
        for folder, _, files in os.walk(root):
            if name in files:
                return os.path.join(folder, name)
    raise AssertionError(f"{name}: not found under {out} or its work dir")


def _kill(references, variant, out, point, extra=()):
    crashed = cli(*references.args(variant, out), *extra, env={"STREAMRESIZE_CRASH_AT": point}, check=False)
    assert crashed.returncode == KILLED, f"the run did not reach {point} ({crashed.returncode}):\n{crashed.stderr}"
    return crashed


def _assert_never_complete_unless_finished(out, point, variant, reference_digest):
    if _after_the_index(point, variant):
        assert (out / INDEX).exists(), f"{point}: comes after the index, which is missing"
        assert tree_digest(out, exclude={RUN_LOG}) == reference_digest, \
            f"{point}: OUT_DIR holds an index, so it must be the complete, correct output"
    else:
        assert not (out / INDEX).exists(), f"killed at {point}, the partial output is marked complete"
        assert not (out / "model.safetensors").exists()


def _bundled(output):
    with open(os.path.join(output, "config.json")) as f:
        return json.load(f)["model_type"] == "streamresize"


def _assert_committed_state_is_true(out, point, reference):
    """The manifest names no step the kill interrupted, and every shard it records is the reference's."""
    manifest = _manifest(out)
    if manifest is None:
        return -1
    step, phase = point.split(":", 1)
    committed = manifest["next_block"]
    if step.lstrip("-").isdigit():
        done = phase in ("renamed:manifest.json", "committed")  # this step's manifest is on disk
        assert committed <= int(step) + done, f"{point}: the manifest names an interrupted step as done"
    finished = (out / INDEX).exists()  # then the published output is checked whole, after the rerun
    for name, sha in ({} if finished else manifest["shards"]).items():
        assert file_sha256(_find(out, name)) == sha, f"{point}: {name} differs from what the manifest records"
        if _bundled(reference):  # a stock reference holds the shards rewritten; the final output is compared
            assert sha == file_sha256(os.path.join(reference, name)), f"{point}: committed {name} is not the reference's"
    return committed


@pytest.mark.parametrize("variant,point", CASES)
def test_kill_then_rerun_writes_the_uninterrupted_output(references, tmp_path, variant, point):
    reference, reference_digest = references(variant)
    out = tmp_path / "out"
    _kill(references, variant, out, point)
    _assert_never_complete_unless_finished(out, point, variant, reference_digest)
    committed = _assert_committed_state_is_true(out, point, reference)

    finished = (out / INDEX).exists()
    resumed = cli(*references.args(variant, out))
    if point.startswith("cleanup:") or finished:  # finished before the kill: the rerun is a no-op
        assert json.loads(resumed.stdout.strip().splitlines()[-1]).get("already_complete"), resumed.stderr
    elif committed >= 0:
        assert f"resuming at block {committed} of" in resumed.stderr, resumed.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert not os.path.exists(_work(out)), os.listdir(_work(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or replaced copy beside it


# ---- torn and changed files ---------------------------------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path, offset=-3):
    """One byte of the tensor data changed (the header still parses)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x5A]))


TORN = [  # (variant, kill point, file damaged after the kill, damage)
    ("pca", "1:renamed:model-block-00001.safetensors", "model-block-00001.safetensors", _truncate),
    ("pca", "1:committing", "model-block-00001.safetensors", _flip),
    ("disp", "1:tmp:manifest.json", "model-block-00001.safetensors", _flip),
    ("prune-bundled", "1:tmp:model-block-00001.safetensors", "model-block-00001.safetensors.tmp", _truncate),
    ("prune-bundled", "head:renamed:model-head.safetensors", "model-head.safetensors", _flip),
    ("dotresize", "1:tmp:manifest.json", "manifest.json.tmp", _truncate),
]


@pytest.mark.parametrize("variant,point,name,damage", TORN,
                         ids=[f"{v}-{p}-{d.__name__.strip('_')}" for v, p, _, d in TORN])
def test_a_torn_file_not_yet_committed_is_redone(references, tmp_path, variant, point, name, damage):
    """Killed between a shard (or the manifest's temp file) and the manifest that would record it, then
    the file torn: the rerun writes it again and the output is the uninterrupted one."""
    reference, reference_digest = references(variant)
    out = tmp_path / "out"
    _kill(references, variant, out, point)
    manifest = _manifest(out)
    assert manifest is None or name not in manifest["shards"]
    damage(_find(out, name))
    cli(*references.args(variant, out))
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert not os.path.exists(_work(out))


CHANGED = [("pca", _flip), ("disp", _truncate), ("prune-bundled", os.remove)]


@pytest.mark.parametrize("variant,damage", CHANGED, ids=[f"{v}-{d.__name__.strip('_')}" for v, d in CHANGED])
def test_a_committed_shard_changed_since_is_named_and_restart_redoes_it(references, tmp_path, variant, damage):
    """Every block committed (killed as the head step begins), then a committed shard changed: its
    sha256 no longer matches the manifest. The rerun refuses, naming the shard, and marks nothing
    complete; --restart then writes the uninterrupted output."""
    reference, reference_digest = references(variant)
    out = tmp_path / "out"
    _kill(references, variant, out, "head:start")
    assert "model-block-00000.safetensors" in _manifest(out)["shards"]
    path = _find(out, "model-block-00000.safetensors")
    damage(path)
    refused = cli(*references.args(variant, out), check=False)
    assert refused.returncode == 2, refused.stderr
    assert path in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (out / INDEX).exists()
    cli(*references.args(variant, out), "--restart")
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert not os.path.exists(_work(out))


@pytest.mark.parametrize("point", ["finish:swap:old-aside", "finish:swap:new-in-place"])
def test_a_kill_while_swapping_in_a_replacement(references, tmp_path, point):
    """`--overwrite` of someone else's folder: the new output is written beside it and swapped in by two
    renames. Killed between them (no OUT_DIR at all for a moment) or before the old copy is deleted: the
    rerun finishes the swap and has nothing else to do."""
    reference, reference_digest = references("prune")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    _kill(references, "prune", out, point, extra=["--overwrite"])
    assert not (out / INDEX).exists() or tree_digest(out, exclude={RUN_LOG}) == reference_digest
    done = cli(*references.args("prune", out), "--overwrite")
    assert json.loads(done.stdout.strip().splitlines()[-1])["already_complete"], done.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_kill_during_the_clean_up_of_a_no_op_rerun(references, tmp_path):
    """Killed after the index, then the rerun (a no-op) killed while it cleans the work dir up: the
    output stays finished and correct, and a third run finishes the clean-up."""
    reference, reference_digest = references("pca")
    out = tmp_path / "out"
    _kill(references, "pca", out, "cleanup:removing")
    _kill(references, "pca", out, "claim:removed#1")  # the no-op's clean-up happens while claiming
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    done = cli(*references.args("pca", out))
    assert json.loads(done.stdout.strip().splitlines()[-1])["already_complete"]
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert not os.path.exists(_work(out))


def test_a_run_killed_again_and_again_still_writes_the_uninterrupted_output(references, tmp_path):
    """One run killed at a point of every step in turn, each rerun resuming the last one's state."""
    reference, reference_digest = references("dotresize")
    out = tmp_path / "out"
    for point in ("-1:solved", "0:accumulating#3", "0:narrowed", "1:renamed:model-block-00001.safetensors",
                  "head:tmp:model-head.safetensors", "finish:copied:tokenizer.json", "cleanup:removed#1"):
        _kill(references, "dotresize", out, point)
        _assert_never_complete_unless_finished(out, point, "dotresize", reference_digest)
        _assert_committed_state_is_true(out, point, reference)
    cli(*references.args("dotresize", out))
    assert tree_digest(out, exclude={RUN_LOG}) == reference_digest
    assert not os.path.exists(_work(out))


def test_hooks_are_inert_without_the_environment_and_count_with_it(monkeypatch):
    """No variable set: a point does nothing. POINT#N fires at the N-th pass of POINT only."""
    from streamresize import runtime

    class Killed(Exception):
        pass

    def exit_(status):
        raise Killed(status)

    monkeypatch.setattr(runtime.os, "_exit", exit_)
    monkeypatch.delenv("STREAMRESIZE_CRASH_AT", raising=False)
    monkeypatch.delenv("STREAMRESIZE_PAUSE_AT", raising=False)
    runtime.set_step(3)
    runtime.fault_point("start")
    runtime.crash_point(3, "start")
    monkeypatch.setenv("STREAMRESIZE_CRASH_AT", "test-step:counted#2")
    runtime.set_step("test-step")
    runtime.fault_point("other")  # another point: not counted
    runtime.fault_point("counted")
    with pytest.raises(Killed, match=str(KILLED)):
        runtime.fault_point("counted")
    monkeypatch.setenv("STREAMRESIZE_CRASH_AT", "test-step:plain")
    with pytest.raises(Killed):
        runtime.fault_point("plain")
    runtime.set_step(None)
