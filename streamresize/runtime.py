"""Small facts about the running process that the pipeline and the methods both use, and the stop
request that a pre-empting scheduler's signal leaves for the pipeline to act on."""

import os
import resource
import signal
import threading
import time

# Exit status of a run that stopped early but left a state the same command resumes from: a signal
# (SIGTERM, SIGINT, SIGUSR1) asked it to stop. A scheduler should requeue the job on this status.
EXIT_RESUMABLE = 85
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(Exception):
    """The run stopped at a step boundary because a signal asked it to; its state is resumable."""

    def __init__(self, message, signal_name=None):
        super().__init__(message)
        self.signal_name = signal_name


def resolve_device(name):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_mb(device):
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, gpu


# ---- stopping on a signal -------------------------------------------------------------------------

_stop = {"signal": None, "count": 0}


def _write_stderr(text):
    """A line straight to file descriptor 2: safe inside a signal handler, unlike logging's locks."""
    try:
        os.write(2, (time.strftime("%Y-%m-%d %H:%M:%S") + " " + text + "\n").encode())
    except OSError:
        pass


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    _stop["count"] += 1
    if _stop["signal"] is not None:
        _write_stderr(f"ERROR {name} received a second time: exiting now (status {EXIT_RESUMABLE}); the last "
                      "committed step is kept, rerun the same command to resume")
        os._exit(EXIT_RESUMABLE)
    _stop["signal"] = name
    _write_stderr(f"WARNING {name} received: stopping after the current step (status {EXIT_RESUMABLE}, "
                  "resumable); send a second signal to exit at once")


def install_stop_handlers(signals=STOP_SIGNALS):
    """From now on SIGTERM, SIGINT and SIGUSR1 ask the run to stop at its next step boundary
    (`stop_requested`); a second signal exits at once with EXIT_RESUMABLE (the manifest is the commit
    point, so that too resumes). Clears an earlier request. Returns a function that puts the previous
    handlers back; outside the main thread (where Python cannot install handlers) it does nothing."""
    _stop.update(signal=None, count=0)
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for name in signals:
        number = getattr(signal, name)
        previous[number] = signal.signal(number, _on_signal)

    def restore():
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    return restore


def stop_requested():
    """The name of the signal that asked the run to stop (e.g. 'SIGTERM'), or None."""
    return _stop["signal"]


# ---- test hooks -----------------------------------------------------------------------------------

CRASH_ENV = "STREAMRESIZE_CRASH_AT"
PAUSE_ENV = "STREAMRESIZE_PAUSE_AT"
CRASH_STATUS = 75

# The step the run is in: "claim", "prepare", -1 (the embedding), a block's number, "head", "finish",
# "cleanup". The pipeline sets it (`set_step`); a background commit carries the step it commits
# (`set_thread_step`), so the points of writers that do not know the step are still named by it.
_current = {"step": None}
_thread = threading.local()
_hits = {}
_hits_lock = threading.Lock()


def set_step(step):
    """The step the pipeline is in from now on; names the test points of code that does not know it."""
    _current["step"] = step


def set_thread_step(step):
    """The step of work done in this thread (a background commit) whatever the main thread does meanwhile."""
    _thread.step = step


def current_step():
    return getattr(_thread, "step", _current["step"])


def fault_point(phase):
    """`crash_point` at `phase` of the current step (`set_step`): for code below the pipeline (the
    writers, the manifest, the work dir's clean-up) that does not know which step it serves."""
    if CRASH_ENV in os.environ or PAUSE_ENV in os.environ:
        _hook(f"{current_step()}:{phase}")


def crash_point(block, phase):
    """Test hooks at named points of the run (STEP:PHASE, e.g. 2:start). STREAMRESIZE_CRASH_AT kills
    the process there with os._exit(75), as a power cut would (no clean-up, no handlers, no flush);
    POINT#N kills at the N-th time the run passes POINT (a point in a loop). STREAMRESIZE_PAUSE_AT
    (comma-separated points) writes "paused at POINT" to stderr and waits there until a signal arrives
    (at most 120 s), so that a test can deliver one at a known moment. With neither variable set a
    hook costs two dictionary look-ups."""
    if CRASH_ENV in os.environ or PAUSE_ENV in os.environ:
        _hook(f"{block}:{phase}")


def _hook(point):
    crash = os.environ.get(CRASH_ENV)
    if crash:
        if crash == point:
            os._exit(CRASH_STATUS)
        name, sep, nth = crash.rpartition("#")
        if sep and name == point:
            with _hits_lock:
                _hits[point] = count = _hits.get(point, 0) + 1
            if str(count) == nth:
                os._exit(CRASH_STATUS)
    if point in os.environ.get(PAUSE_ENV, "").split(","):
        seen = _stop["count"]
        _write_stderr(f"INFO paused at {point}")
        deadline = time.monotonic() + 120
        while _stop["count"] == seen and time.monotonic() < deadline:
            time.sleep(0.02)
