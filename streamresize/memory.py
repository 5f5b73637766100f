"""Resident memory of this process, split into anonymous memory (what the engine allocates) and file
pages (memory-mapped checkpoint and cache files, which the kernel can drop and re-read at will).

Peak RSS alone mixes the two, so a 7B run whose cache files sit in the page cache would look as large
as the files; the anonymous peak is the part that must fit in RAM.
"""

import threading

STATUS = "/proc/self/status"
FIELDS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def status_mb():
    """{rss, hwm, anon, file, shmem} in MB from /proc/self/status; {} where that file does not exist."""
    values = {}
    try:
        with open(STATUS) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    values[FIELDS[key]] = int(rest.split()[0]) / 1024
    except OSError:
        return {}
    return values


class MemoryMonitor:
    """Samples the anonymous and file-backed RSS in a light background thread, so short peaks inside
    a step are seen; `step_peaks()` returns the peaks since the last call, `run_peaks()` the run's."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._step = {"anon": 0.0, "file": 0.0}
        self._run = {"anon": 0.0, "file": 0.0}
        self._thread = None

    def sample(self):
        now = status_mb()
        with self._lock:
            for key in ("anon", "file"):
                value = now.get(key, 0.0)
                self._step[key] = max(self._step[key], value)
                self._run[key] = max(self._run[key], value)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self):
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="streamresize-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step_peaks(self):
        self.sample()
        with self._lock:
            peaks = {"peak_anon_mb": self._step["anon"], "peak_file_mb": self._step["file"]}
            self._step = {"anon": 0.0, "file": 0.0}
        return peaks

    def run_peaks(self):
        self.sample()
        with self._lock:
            return {"peak_anon_mb": self._run["anon"], "peak_file_mb": self._run["file"]}
