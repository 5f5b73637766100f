"""Read the next decoder block's tensors from disk in a background thread while the current block
computes, so the engine waits on the disk only for the first block.

Two ways to hold what was read, chosen by the memory placement:
- keep: the tensors themselves, in pinned memory when they go to a GPU (the host-to-device copy is
  then a fast asynchronous DMA). Costs one block of host memory.
- page cache: the bytes are read and dropped; the kernel keeps them in its page cache, so the
  engine's own read is a memory copy. Costs no memory of this process (for small-RAM machines).

Either way the engine gets exactly the bytes on disk, so results do not depend on prefetching.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .checkpoint import CheckpointReader

PAGE_CACHE_CHUNK = 64 << 20


class Prefetcher:
    def __init__(self, model_dir, group_names, keep, pin, enabled=True):
        """group_names(g) lists the tensors of group g (a block index), or [] past the last group.
        Disabled, it reads every tensor when asked, in the caller's thread."""
        self.reader = CheckpointReader(model_dir)  # its own reader: no state shared across threads
        self.group_names = group_names
        self.keep, self.pin, self.enabled = keep, pin, enabled
        self.wait_seconds = 0.0  # time the engine spent blocked on reads (ours or its own)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamresize-prefetch")
        self._pending = {}  # name -> future
        self._scheduled = set()
        self._lock = threading.Lock()

    def schedule(self, group):
        """Start reading a group in the background (once); returns at once."""
        with self._lock:
            if not self.enabled or group in self._scheduled:
                return
            self._scheduled.add(group)
            for name in self.group_names(group):
                self._pending[name] = self._pool.submit(self._read, name)

    def _read(self, name):
        if self.keep:
            return self.reader.read(name, pin=self.pin)
        self._touch(name)
        return None

    def _touch(self, name):
        """Read the tensor's bytes into a small reused buffer: afterwards they sit in the page cache."""
        path, start, length = self.reader.location(name)
        buffer = bytearray(min(PAGE_CACHE_CHUNK, max(length, 1)))
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while length > 0:
                got = f.readinto(view[:min(length, len(buffer))])
                if not got:
                    break
                length -= got

    def get(self, name, dtype, device):
        """The tensor `name` as `dtype` on `device`: from the background read if one was made."""
        start = time.perf_counter()
        with self._lock:
            future = self._pending.pop(name, None)
        tensor = future.result() if future is not None else None
        if tensor is None:
            tensor = self.reader.read(name)
        self.wait_seconds += time.perf_counter() - start
        device = torch.device(device)
        if device.type == "cuda":  # copy the stored dtype (half the bytes of float32), convert there
            return tensor.to(device, non_blocking=tensor.is_pinned()).to(dtype)
        return tensor.to(dtype)

    def take_wait_seconds(self):
        """Seconds spent waiting on reads since the last call."""
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds

    def close(self):
        """Cancel what has not started and wait for the read in flight: no thread outlives the run."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True)
        self.reader.close()
