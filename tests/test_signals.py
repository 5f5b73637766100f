"""Pre-emption: SIGTERM, SIGINT and SIGUSR1 stop a compression at the next step boundary with exit
status 85 (EXIT_RESUMABLE), and a second signal exits at once with the same status; either way the same
command then resumes and writes files byte-identical to an uninterrupted run.

Each run is a separate process (a signal is the point), forked from the test suite's fork server. So
that the signal arrives at a known moment whatever the machine's speed, the run is held at a named
point by STREAMRESIZE_PAUSE_AT (it prints "paused at BLOCK:PHASE" and waits there for a signal); the
signal itself is a real one, sent from this process.
"""

import os
import re
import shutil
import signal
import time

import pytest
from helpers import HF_ENV, _child, _cli_main, cli, compress_args, process_context, tree_digest

from streamresize.runtime import EXIT_RESUMABLE
from streamresize.writer import RUN_LOG

INDEX = "model.safetensors.index.json"


class Run:
    """`streamresize ARGS` in a forked process whose stderr can be read while it runs."""

    def __init__(self, args, env, logs):
        self.stdout, self.stderr_path = str(logs / "stdout"), str(logs / "stderr")
        self.process = process_context().Process(
            target=_child, args=(_cli_main, ([str(a) for a in args],), {**HF_ENV, **env}, self.stdout,
                                 self.stderr_path))
        self.process.start()

    @property
    def stderr(self):
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, text, timeout=300):
        deadline = time.time() + timeout
        while text not in self.stderr:
            if not self.process.is_alive():
                raise AssertionError(f"the run ended ({self.process.exitcode}) before {text!r}:\n{self.stderr}")
            if time.time() > deadline:
                self.process.kill()
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.stderr}")
            time.sleep(0.02)

    def signal(self, number):
        os.kill(self.process.pid, number)

    def finish(self, timeout=300):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"the run did not exit within {timeout} s:\n{self.stderr}")
        return self.process.exitcode


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_at_the_next_step_and_the_rerun_resumes_identically(
        tiny_model, texts, tmp_path, pca_quarter, signum):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)  # the pca_quarter command
    run = Run(args, {"STREAMRESIZE_PAUSE_AT": "1:start"}, tmp_path)
    run.wait_for("block 1/4")  # block 0 is done
    run.wait_for("paused at 1:start")  # block 1 has begun
    run.signal(signum)
    status = run.finish()
    err = run.stderr
    assert status == EXIT_RESUMABLE, err
    assert f"{signum.name} received: stopping after the current step" in err
    assert f"stopped by {signum.name} after block 2/4; rerun the same command to resume" in err
    assert "block 2/4" in err and "block 3/4" not in err  # the block in progress was finished, no more
    assert "Traceback" not in err
    assert not (out / INDEX).exists()  # nothing marked complete
    r = cli(*args)
    assert "resuming at block 2 of 4" in r.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(pca_quarter.out, exclude={RUN_LOG})


def test_sigterm_without_test_hooks(tiny_model, texts, tmp_path, pca_quarter):
    """No pause: SIGTERM as soon as the first block's log line shows, while the rest still computes (three
    more blocks and the head: seconds on the tiny model, against the 20 ms this test takes to react)."""
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    run = Run(args, {}, tmp_path)
    run.wait_for("block 1/4")
    run.signal(signal.SIGTERM)
    assert run.finish() == EXIT_RESUMABLE, run.stderr
    assert re.search(r"stopped by SIGTERM after block [1-4]/4; rerun the same command to resume", run.stderr)
    assert not (out / INDEX).exists()
    r = cli(*args)
    assert "resuming at block" in r.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(pca_quarter.out, exclude={RUN_LOG})


def test_a_second_signal_exits_at_once_and_still_resumes_identically(tiny_model, texts, tmp_path, pca_quarter):
    out = tmp_path / "out"
    args = compress_args(tiny_model, out, texts["calib"], sparsity=0.25)
    # Held once as block 1 begins, then again while it commits (shard written, manifest not yet).
    run = Run(args, {"STREAMRESIZE_PAUSE_AT": "1:start,1:committing"}, tmp_path)
    run.wait_for("paused at 1:start")
    run.signal(signal.SIGTERM)
    run.wait_for("paused at 1:committing")
    run.signal(signal.SIGINT)
    status = run.finish()
    err = run.stderr
    assert status == EXIT_RESUMABLE, err
    assert "SIGINT received a second time: exiting now" in err
    assert "stopped by" not in err  # it did not wait for the step boundary
    assert not (out / INDEX).exists()
    r = cli(*args)
    # Block 1 was not committed, so it is redone (block 0's commit, in the background, has long landed
    # by then; were it still in flight, the rerun would redo block 0 too).
    assert re.search(r"resuming at block [01] of 4", r.stderr), r.stderr
    assert tree_digest(out, exclude={RUN_LOG}) == tree_digest(pca_quarter.out, exclude={RUN_LOG})


def test_in_process_handlers_are_restored_after_a_run(tiny_model, texts, tmp_path, pca_quarter):
    """`streamresize.cli.main` called in a process that has its own handlers gives them back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    out = tmp_path / "out"
    shutil.copytree(pca_quarter.out, out)
    cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25))  # a finished output: a no-op
    assert {s: signal.getsignal(s) for s in before} == before
