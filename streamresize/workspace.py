"""The directories a run writes to: one run at a time, and only the run's own files ever deleted.

A compression writes into two directories the user names: the output and the work dir (scratch). Both
are locked with `flock` for the whole run, so a second run on either refuses at once instead of
interleaving its shards with ours; the kernel drops the lock when a process dies, so a lock left by a
killed run is never stale. The work dir is claimed with a marker file only when it is new or empty,
and clean-up removes only the file names a run creates, so a `--work-dir` pointed at a folder of the
user's never loses a file.
"""

import errno
import fcntl
import fnmatch
import json
import os
import shutil

from .errors import StreamResizeError
from .runtime import fault_point

WORK_MARKER = ".streamresize-work"  # {"output": OUT_DIR}: this folder is a streamresize work dir
FALLBACK_LOCK = ".streamresize.lock"
BUNDLED_DIR = ".streamresize-bundled"  # the pipeline's own output when another format is published  # where a directory itself cannot be locked (some network file systems)
# Every name a run writes into its work dir (the activation cache, statistics, bases, resume state).
WORK_FILES = ("manifest.json", "manifest.json.tmp", "calibration_ids.npy", "calibration_ids.npy.tmp",
              "hidden_a.f32", "hidden_b.f32", "scratch.f32", "update.f32", "dense_a.f32", "dense_b.f32", "*.f32.tmp", "stats-*.f64", "stats-*.f64.*", "scratch-*.f64",
              "basis-*.safetensors", "basis-*.safetensors.tmp", "shared-basis.safetensors",
              "shared-basis.safetensors.tmp", "disp-curves.json", "disp-curves.json.tmp", "disp-learned.json",
              "disp-learned.json.tmp", "mlp-curves.json", "mlp-curves.json.tmp", "sensitivity.safetensors",
              "sensitivity.safetensors.tmp", "sensitivity-*.f32", "progress.json",
              "progress.json.tmp", FALLBACK_LOCK, WORK_MARKER)
RANK_DIRS = "rank-[0-9][0-9][0-9][0-9][0-9]"  # the work dirs of a data-parallel run's other ranks


def inside(path, parent):
    """True when `path` is `parent` or lies below it (symlinks resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_layout(model_dir, out_dir, work_dir):
    """Refuse directory choices in which one run's writes or clean-up could touch another's files."""
    if inside(out_dir, model_dir) or inside(model_dir, out_dir):
        raise StreamResizeError(f"{out_dir}: the output must not be the model directory, inside it, or hold it")
    for name, other in (("model directory", model_dir), ("output", out_dir)):
        if inside(work_dir, other) or inside(other, work_dir):
            raise StreamResizeError(
                f"{work_dir}: the work dir must not be the {name} ({other}), inside it, or hold it; "
                "choose a separate --work-dir")


def _lock_holder(path):
    """The pid holding an flock on `path`, read from /proc/locks (Linux); None where unknown."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and key in fields:
                    return int(fields[fields.index(key) - 1])
    except (OSError, ValueError):
        pass
    return None


def _describe(pid):
    if pid is None:
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"process {pid}" + (f" ({command[:200]})" if command else "")


class DirectoryLock:
    """An exclusive flock on a directory, held until `release` or the process ends."""

    def __init__(self, path, what):
        self.path, self.what, self.fd = path, what, None

    def acquire(self):
        target = self.path
        try:
            self.fd = os.open(target, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self
        except OSError as e:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if e.errno in (errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
                    return self._acquire_file()  # a directory fd cannot be locked here: use a lock file
                raise StreamResizeError(f"{target}: cannot lock the {self.what} ({e})") from e
            raise StreamResizeError(
                f"{target}: the {self.what} is in use by {_describe(_lock_holder(target))}; wait for that run to "
                "finish or stop it (a killed run releases its lock), or choose another directory") from e

    def _acquire_file(self):
        target = os.path.join(self.path, FALLBACK_LOCK)
        try:
            self.fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise StreamResizeError(
                f"{target}: the {self.what} is in use by {_describe(_lock_holder(target))} ({e})") from e
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class WorkDir:
    """The scratch directory of one run: claimed, locked, and emptied of the run's own files only."""

    def __init__(self, path, out_dir):
        self.path, self.out_dir = path, out_dir
        self.lock = None

    def claim(self):
        """Create or adopt the directory and lock it. A folder that already holds files is adopted only
        when an earlier run of streamresize marked it as its work dir."""
        marker = os.path.join(self.path, WORK_MARKER)
        if os.path.isdir(self.path) and not os.path.exists(marker):
            foreign = sorted(os.listdir(self.path))
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise StreamResizeError(
                    f"{self.path}: the work dir already holds files streamresize did not create ({shown}); "
                    "choose a new or empty --work-dir")
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock = DirectoryLock(self.path, "work dir").acquire()
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    json.dump({"output": self.out_dir}, f)
        except OSError as e:
            raise StreamResizeError(f"{self.path}: cannot create or write the work dir ({e.strerror})") from e
        return self

    def own_files(self):
        """The files in the directory that a run created (by name)."""
        if not os.path.isdir(self.path):
            return []
        return sorted(name for name in os.listdir(self.path)
                      if any(fnmatch.fnmatchcase(name, pattern) for pattern in WORK_FILES)
                      and os.path.isfile(os.path.join(self.path, name)))

    def clear(self, keep_marker=True):
        """Remove the run's files (for --restart, and after success), never anything else."""
        bundled = os.path.join(self.path, BUNDLED_DIR)
        if os.path.isdir(bundled) and os.path.exists(os.path.join(self.path, WORK_MARKER)):
            shutil.rmtree(bundled)  # named by the run, inside a folder the run claimed
        if os.path.exists(os.path.join(self.path, WORK_MARKER)) and os.path.isdir(self.path):
            for name in sorted(os.listdir(self.path)):  # other ranks' folders (a shared work dir), ours by marker
                rank_dir = os.path.join(self.path, name)
                if fnmatch.fnmatchcase(name, RANK_DIRS) and os.path.exists(os.path.join(rank_dir, WORK_MARKER)):
                    shutil.rmtree(rank_dir)
        for name in self.own_files():
            if keep_marker and name in (WORK_MARKER, FALLBACK_LOCK):
                continue
            os.remove(os.path.join(self.path, name))
            fault_point("removed")  # test point: STEP:removed#N, after the N-th file

    def remove(self):
        """After a finished run: the run's files, then the folder itself if nothing else is left in it.
        The marker goes last, so a kill in between leaves a folder a rerun still recognises."""
        fault_point("removing")  # test point: nothing removed yet
        self.clear(keep_marker=True)
        for name in (FALLBACK_LOCK, WORK_MARKER):
            path = os.path.join(self.path, name)
            if os.path.exists(path):
                os.remove(path)
        fault_point("unmarked")  # test point: the marker gone, the folder not yet
        self.release()
        try:
            os.rmdir(self.path)
        except OSError:
            pass  # the user's own files are still there: leave the folder

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None
