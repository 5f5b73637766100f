"""Data-parallel compression (issue 14): ranks of a torchrun launch split the calibration sequences.

One test runs the real launcher (`python -m torch.distributed.run --nproc_per_node 2`, gloo on the
CPU). The others start the ranks themselves, as forked processes of the suite's fork server, with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT): a process starts in well under a second instead of ten, each rank can get its own test
hooks, and each rank's exit status is seen directly (torchrun reports any failed worker as its own
status 1).

Outputs are compared with a single-process run tensor by tensor (fp32 within 1e-6 relative: the
statistics are summed in another order, which may change the last bits), and byte for byte between two
runs with the same number of processes.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import CALIB, HF_ENV, _child, _cli_main, cli, compress_args, process_context, tree_digest
from safetensors.torch import load_file

from streamresize import distributed
from streamresize.runtime import EXIT_RESUMABLE
from streamresize.writer import RUN_LOG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOTRESIZE = {"method": "dotresize", "sparsity": 0.25, "mlp_sparsity": 0.3}
DISP = {"method": "disp", "sparsity": 0.3}
DISP_GLOBAL = {"method": "disp", "sparsity": 0.3, "allocation": "global"}  # error curves: a pre-pass with its own sums


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    """One rank: `streamresize ARGS` in a forked process with torchrun's environment for it."""

    def __init__(self, args, rank, world, port, logs, env=None):
        os.makedirs(logs, exist_ok=True)
        self.rank = rank
        self.stderr_path = os.path.join(logs, f"stderr-{rank}")
        ranks_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        self.process = process_context().Process(
            target=_child, args=(_cli_main, ([str(a) for a in args],), {**os.environ, **HF_ENV, **ranks_env,
                                                                         **(env or {})},
                                 os.path.join(logs, f"stdout-{rank}"), self.stderr_path))
        self.process.start()

    @property
    def stderr(self):
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while text not in self.stderr:
            if not self.process.is_alive():
                raise AssertionError(f"rank {self.rank} ended ({self.process.exitcode}) before {text!r}:\n{self.stderr}")
            if time.time() > deadline:
                raise AssertionError(f"rank {self.rank}: no {text!r} within {timeout} s:\n{self.stderr}")
            time.sleep(0.02)

    def signal(self, number):
        os.kill(self.process.pid, number)

    def finish(self, timeout=120):
        self.process.join(timeout)
        if self.process.exitcode is None:  # what torchrun does to the rest of a failed group
            self.process.kill()
            self.process.join()
            return "killed"
        return self.process.exitcode


def launch(args, world, logs, env=None, rank_env=None):
    port = free_port()
    return [Rank(args, r, world, port, os.path.join(logs), {**(env or {}), **((rank_env or {}).get(r, {}))})
            for r in range(world)]


def finish_all(ranks, timeout=120):
    return [r.finish(timeout) for r in ranks]


def run_ranks(args, world, logs, env=None):
    ranks = launch(args, world, logs, env)
    codes = finish_all(ranks)
    assert codes == [0] * world, "\n".join(f"rank {r.rank} ({c}):\n{r.stderr}" for r, c in zip(ranks, codes))
    return ranks


def assert_close_tensors(a, b, rel=1e-6):
    names = sorted(n for n in os.listdir(a) if n.endswith(".safetensors"))
    assert names == sorted(n for n in os.listdir(b) if n.endswith(".safetensors"))
    for name in names:
        ta, tb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert ta.keys() == tb.keys(), name
        for key in ta:
            x, y = ta[key], tb[key]
            assert x.shape == y.shape and x.dtype == y.dtype, (name, key)
            if x.is_floating_point():
                x, y = x.double(), y.double()
                assert float((x - y).norm()) <= rel * max(float(x.norm()), 1e-30), (name, key)
            else:
                assert torch.equal(x, y), (name, key)


def same_bytes(a, b):
    assert tree_digest(a, exclude=(RUN_LOG,)) == tree_digest(b, exclude=(RUN_LOG,))


def work_dir_gone(out):
    return not os.path.exists(str(out) + ".streamresize-work")


def test_from_env_without_world_size_is_a_single_process():
    assert distributed.from_env({}) is None
    d = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (d.rank, d.world, d.local_rank, d.local_world, d.is_writer) == (3, 4, 1, 2, False)
    # contiguous, fixed shares that cover every sequence once
    assert [distributed.share(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert d.max_rows(10) == 3


def test_fingerprint_sees_every_bit():
    t = {"a": torch.randn(1000), "b": torch.arange(7)}
    base = distributed.fingerprint(t)
    flipped = t["a"].clone()
    flipped.view(torch.int32)[123] ^= 1
    assert distributed.fingerprint({**t, "a": flipped}) != base
    assert distributed.fingerprint({"a": t["a"].bfloat16(), "b": t["b"]}) != base
    assert distributed.fingerprint(dict(t)) == base


def test_torchrun_two_processes_write_the_single_process_output(tiny_model, texts, tmp_path, pca_quarter):
    """The real launcher, gloo on the CPU; the single process ran without torch.distributed."""
    assert not torch.distributed.is_initialized()
    out = tmp_path / "out"
    env = {**os.environ, **HF_ENV, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "streamresize", *map(str, compress_args(tiny_model, out, texts["calib"], sparsity=0.25))],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_close_tensors(pca_quarter.out, out)
    assert work_dir_gone(out)
    run_log = __import__("json").load(open(out / RUN_LOG))
    blocks = [s for s in run_log["steps"] if s.get("block") is not None]
    assert blocks and all(s["collectives"] > 0 and s["reduced_bytes"] > 0 for s in blocks)
    # a second distributed run (ranks started by hand with torchrun's environment): the same bytes
    again = tmp_path / "again"
    run_ranks(compress_args(tiny_model, again, texts["calib"], sparsity=0.25), 2, tmp_path / "logs")
    same_bytes(out, again)


@pytest.mark.parametrize("options", [DOTRESIZE, DISP, DISP_GLOBAL], ids=["dotresize-mlp", "disp", "disp-global"])
def test_two_ranks_match_one_process_and_each_other(tiny_model, texts, tmp_path, options):
    single = tmp_path / "single"
    cli(*compress_args(tiny_model, single, texts["calib"], **options))
    outs = []
    for n in range(2):
        out = tmp_path / f"dist{n}"
        run_ranks(compress_args(tiny_model, out, texts["calib"], **options), 2, tmp_path / f"logs{n}")
        outs.append(out)
    assert_close_tensors(single, outs[0])
    same_bytes(outs[0], outs[1])
    assert work_dir_gone(outs[0])


@pytest.fixture(scope="module")
def dist_reference(tiny_model, texts, tmp_path_factory):
    """The uninterrupted two-rank pca output that interrupted runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("dist-ref") / "out"
    run_ranks(compress_args(tiny_model, out, texts["calib"], sparsity=0.25), 2, str(out) + "-logs")
    return out


def test_sigkill_of_one_rank_then_relaunch_resumes_to_the_same_output(tiny_model, texts, tmp_path, dist_reference):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    ranks = launch(args, 2, tmp_path / "logs", rank_env={1: {"STREAMRESIZE_PAUSE_AT": "2:start"}})
    ranks[1].wait_for("paused at 2:start")  # blocks 0 and 1 committed; rank 0 waits in block 2's first sum
    ranks[1].signal(signal.SIGKILL)
    codes = finish_all(ranks, timeout=60)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert not os.path.exists(out / "model.safetensors.index.json")
    ranks = run_ranks(args, 2, tmp_path / "logs2")
    assert "resuming at block 2" in ranks[0].stderr
    same_bytes(dist_reference, out)
    assert work_dir_gone(out)


def test_a_kill_between_the_ranks_commit_and_the_manifest_resumes(tiny_model, texts, tmp_path, dist_reference):
    """Rank 0 dies after every rank's cache for block 2 is durable but before its manifest says so: rank 1's
    marker is one step ahead of the manifest, and both resume at block 1."""
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    ranks = launch(args, 2, tmp_path / "logs", rank_env={0: {"STREAMRESIZE_CRASH_AT": "1:persisted"}})
    codes = finish_all(ranks, timeout=60)
    assert codes[0] == 75 and codes[1] != 0
    ranks = run_ranks(args, 2, tmp_path / "logs2")
    assert "resuming at block 1" in ranks[0].stderr
    same_bytes(dist_reference, out)


def test_sigterm_stops_every_rank_at_the_same_step_with_the_resumable_status(tiny_model, texts, tmp_path,
                                                                             dist_reference):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    ranks = launch(args, 2, tmp_path / "logs", rank_env={1: {"STREAMRESIZE_PAUSE_AT": "1:start"}})
    ranks[1].wait_for("paused at 1:start")
    ranks[1].signal(signal.SIGTERM)  # one rank only: the other learns of it at the step boundary
    codes = finish_all(ranks, timeout=60)
    assert codes == [EXIT_RESUMABLE, EXIT_RESUMABLE], [r.stderr for r in ranks]
    assert "stopped by SIGTERM (on another rank) after block 2/4" in ranks[0].stderr
    assert "stopped by SIGTERM after block 2/4" in ranks[1].stderr
    ranks = launch(args, 2, tmp_path / "logs2", env={"STREAMRESIZE_PAUSE_AT": "3:start"})
    for r in ranks:
        r.wait_for("paused at 3:start")
    for r in ranks:
        r.signal(signal.SIGTERM)
    assert finish_all(ranks, timeout=60) == [EXIT_RESUMABLE, EXIT_RESUMABLE]
    run_ranks(args, 2, tmp_path / "logs3")
    same_bytes(dist_reference, out)


def test_another_world_size_on_resume_is_refused_naming_restart(tiny_model, texts, tmp_path, pca_quarter):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    codes = finish_all(launch(args, 2, tmp_path / "logs", env={"STREAMRESIZE_CRASH_AT": "2:start"}))
    assert codes == [75, 75]
    ranks = launch(args, 3, tmp_path / "logs3")
    assert finish_all(ranks) == [2, 2, 2]
    assert "started with 2 process(es)" in ranks[0].stderr and "--restart" in ranks[0].stderr
    assert "rank 0 failed" in ranks[1].stderr
    single = cli(*args, check=False)  # one process is another world size too
    assert single.returncode == 2 and "started with 2 process(es)" in single.stderr
    # a rank whose saved state is gone (node-local scratch of another node) is refused, naming --restart
    rank_dir = str(out) + ".streamresize-work/rank-00001"
    os.rename(rank_dir, rank_dir + "-moved")
    ranks = launch(args, 2, tmp_path / "logs4")
    assert finish_all(ranks) == [2, 2]
    assert "rank 1 needs its saved activation cache for block 2" in ranks[1].stderr and "--restart" in ranks[1].stderr
    shutil.rmtree(rank_dir)
    os.rename(rank_dir + "-moved", rank_dir)
    # --restart in one process: starts over, writes the single-process output, leaves no rank folder behind
    cli(*args, "--restart")
    same_bytes(pca_quarter.out, out)
    assert work_dir_gone(out)


def test_plan_counts_one_rank_share(tiny_model, texts, tmp_path):
    import json

    base = ["plan", tiny_model, str(tmp_path / "o"), "--dataset", texts["calib"],
            *sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in CALIB.items()], [])]
    one = json.loads(cli(*base).stdout.strip().splitlines()[-1])
    two = json.loads(cli(*base, "--world-size", "2").stdout.strip().splitlines()[-1])
    assert two["cache_bytes"] * 2 == one["cache_bytes"]


def test_calibration_tokenized_once_gives_the_same_ids(tiny_model, texts, tmp_path):
    """tools/slurm/tokenize_calibration.py: the token stream saved once samples the windows the text gives."""
    import numpy as np
    from helpers import run_script

    from streamresize.calibration import calibration_ids
    from streamresize.errors import StreamResizeError

    ids_path = tmp_path / "calib-ids.npy"
    run_script(os.path.join(REPO, "tools", "slurm", "tokenize_calibration.py"), tiny_model, texts["calib"],
               "--out", ids_path)
    n, seq = CALIB["num_calibration_samples"], CALIB["max_seq_length"]
    assert np.array_equal(calibration_ids(tiny_model, [str(ids_path)], n, seq, 0),
                          calibration_ids(tiny_model, [texts["calib"]], n, seq, 0))
    np.save(tmp_path / "bad.npy", np.full(1000, 10**6))
    with pytest.raises(StreamResizeError, match="vocabulary"):
        calibration_ids(tiny_model, [str(tmp_path / "bad.npy")], n, seq, 0)
    np.save(tmp_path / "2d.npy", np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(StreamResizeError, match="1-D integer array"):
        calibration_ids(tiny_model, [str(tmp_path / "2d.npy")], n, seq, 0)


def test_fewer_sequences_than_processes_is_refused(tiny_model, texts, tmp_path):
    from streamresize.errors import StreamResizeError
    from streamresize.pipeline import Run
    from streamresize.recipe import load_recipe

    recipe = load_recipe(None, {"dataset": [texts["calib"]], "num_calibration_samples": 3, "max_seq_length": 32})
    with pytest.raises(StreamResizeError, match="--num-calibration-samples 3: fewer sequences than the 4 processes"):
        Run(tiny_model, tmp_path / "o", recipe, dist=distributed.Dist(0, 4))
