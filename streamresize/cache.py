"""Hidden states of every calibration sequence: in memory-mapped files in the work dir, or in memory
(the compute device's, or pinned host memory for a GPU) with the files kept as the resume state.

Two files alternate as a block's input and output; a third holds the attention point's signals
inside a block. With the `disk` location RAM only ever holds a micro-batch; the memory planner
(`placement.py`) picks the location and the micro-batch size.
"""

import os

import numpy as np
import torch

LOCATIONS = ("device", "pinned", "disk")
NAMES = ("hidden_a", "hidden_b", "scratch")
PERSIST_CHUNK = 64 << 20  # floats per write when an in-memory cache file is saved or restored


class MemoryView:
    """One in-memory cache file seen at a width: the counterpart of a memmap view."""

    def __init__(self, tensor):
        self.tensor = tensor

    def flush(self):
        pass


class ActivationCache:
    def __init__(self, work_dir, num_sequences, seq_length, max_width, location="disk", device="cpu",
                 micro_batch=None):
        if location not in LOCATIONS:
            raise ValueError(f"cache location {location}: choose one of {LOCATIONS}")
        self.work_dir = work_dir
        self.shape = (num_sequences, seq_length)
        self.max_width = max_width
        self.location = location
        self.micro_batch = micro_batch  # the planner's cap on sequences per micro-batch
        self.bytes = num_sequences * seq_length * max_width * 4
        for name in NAMES:
            path = self.path(name)
            if not os.path.exists(path) or os.path.getsize(path) != self.bytes:
                with open(path, "wb") as f:
                    f.truncate(self.bytes)
        self._memory = {}
        self._where = torch.device("cpu") if location == "pinned" else torch.device(device)
        if location != "disk":
            for name in NAMES:
                self._memory[name] = torch.empty(self.bytes // 4, dtype=torch.float32, device=self._where,
                                                 pin_memory=location == "pinned")

    def add_file(self, name, resumable=False):
        """One more full-size file beside the three, in the same location. DISP keeps a sub-block's
        update in one: its contents live only within a block. A `resumable` one (a paired stream such
        as the dense model's hidden states) also keeps its file on disk, as the resume state."""
        path = self.path(name)
        if self.location != "disk":
            self._memory[name] = torch.empty(self.bytes // 4, dtype=torch.float32, device=self._where,
                                             pin_memory=self.location == "pinned")
        if (self.location == "disk" or resumable) and (not os.path.exists(path) or
                                                       os.path.getsize(path) != self.bytes):
            with open(path, "wb") as f:
                f.truncate(self.bytes)

    def path(self, name):
        return os.path.join(self.work_dir, f"{name}.f32")

    def view(self, name, width):
        """The file as a (sequences, tokens, width) float32 array; narrower widths pack at the front."""
        if self.location != "disk":
            n = self.shape[0] * self.shape[1] * width
            return MemoryView(self._memory[name][:n].view(*self.shape, width))
        return np.memmap(self.path(name), dtype=np.float32, mode="r+", shape=(*self.shape, width))

    def batches(self, batch_size):
        """Micro-batches of at most `batch_size` sequences, and never more than the placement allows."""
        n = self.shape[0]
        if self.micro_batch:
            batch_size = min(batch_size, self.micro_batch)
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    def read(self, view, rows, device):
        if isinstance(view, MemoryView):  # always a copy: callers may write over the rows they read
            part = view.tensor[rows[0]:rows[1]]
            return part.to(device, non_blocking=part.is_pinned(), copy=True)
        return torch.from_numpy(np.ascontiguousarray(view[rows[0]:rows[1]])).to(device)

    @staticmethod
    def write(view, rows, tensor):
        if isinstance(view, MemoryView):
            part = view.tensor[rows[0]:rows[1]]
            part.copy_(tensor.detach().to(torch.float32), non_blocking=part.is_pinned())
            return
        view[rows[0]:rows[1]] = tensor.detach().to("cpu", torch.float32).numpy()

    def project_in_place(self, name, basis, batch_size, device):
        """Replace d-wide signals X by X @ basis (k-wide), packed at the front of the same file.

        Safe in place: micro-batch j's k-wide rows end before micro-batch j+1's d-wide rows begin.
        """
        wide, narrow = self.view(name, basis.shape[0]), self.view(name, basis.shape[1])
        for rows in self.batches(batch_size):
            x = self.read(wide, rows, device)
            self.write(narrow, rows, (x.double() @ basis.double()).float())
        narrow.flush()

    # ---- the in-memory locations keep their files as the resume state ----------------------

    def persist_later(self, name, width):
        """A function, safe to call from another thread, that writes the first `width` columns' worth
        of an in-memory file to disk and fsyncs it, as the resume state (the memmap of the `disk`
        location is its own file). The data must not change until it has run; the engine only reads
        this file meanwhile (it is the next block's input)."""
        if self.location == "disk":
            return lambda: None
        flat = self._memory[name][:self.shape[0] * self.shape[1] * width]
        on_gpu = flat.device.type == "cuda" or flat.is_pinned()
        ready = torch.cuda.Event() if on_gpu else None
        if ready is not None:
            ready.record()  # after the copies that filled this file, queued by the engine's thread

        def write():
            if ready is not None:
                ready.synchronize()
            stream = torch.cuda.Stream(flat.device) if flat.device.type == "cuda" else None
            with open(self.path(name), "r+b") as f, torch.cuda.stream(stream):
                for start in range(0, flat.numel(), PERSIST_CHUNK):
                    f.write(flat[start:start + PERSIST_CHUNK].cpu().numpy().data)
                f.flush()
                os.fsync(f.fileno())

        return write

    def restore(self, name):
        """Load a file written by an earlier (crashed) run back into memory."""
        if self.location == "disk":
            return
        flat = self._memory[name]
        with open(self.path(name), "rb") as f:
            for start in range(0, flat.numel(), PERSIST_CHUNK):
                part = flat[start:start + PERSIST_CHUNK]
                host = part if part.device.type == "cpu" else torch.empty(part.numel(), dtype=torch.float32)
                f.readinto(memoryview(host.numpy()))
                if host is not part:
                    part.copy_(host)
