"""Committing a finished step in the background: the resume state (an in-memory activation cache's
file, then the manifest) is written while the next block computes, so a large cache costs no wait.

At most one commit is in flight: the next one first waits for it, so the manifest on disk always
names a step whose files are complete, and a crash at any moment resumes from a consistent state.
"""

import threading
import time

from .runtime import current_step, fault_point, set_thread_step


class BackgroundCommit:
    def __init__(self):
        self._thread = None
        self._error = None
        self.wait_seconds = 0.0  # time the engine spent waiting for a commit to finish

    def start(self, work):
        """Run work() in a background thread, after the previous commit has finished."""
        self.join()
        self._thread = threading.Thread(target=self._run, args=(work, current_step()), name="streamresize-commit")
        self._thread.start()

    def _run(self, work, step):
        set_thread_step(step)  # the test points of the writes below are named by the step they commit
        try:
            work()
            fault_point("committed")  # the manifest saved, the obsolete files removed
        except BaseException as e:  # handed to the engine's thread at the next join
            self._error = e

    def join(self, raise_errors=True):
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self.wait_seconds += time.perf_counter() - start
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_errors:
            raise error

    def take_wait_seconds(self):
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds
