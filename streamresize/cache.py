"""Hidden states of every calibration sequence, kept in memory-mapped files in the work dir.

Two files alternate as a block's input and output; a third holds the
attention point's signals inside a block. RAM only ever holds a micro-batch.
"""

import os

import numpy as np
import torch


class ActivationCache:
    def __init__(self, work_dir, num_sequences, seq_length, max_width):
        self.work_dir = work_dir
        self.shape = (num_sequences, seq_length)
        self.max_width = max_width
        self.bytes = num_sequences * seq_length * max_width * 4
        for name in ("hidden_a", "hidden_b", "scratch"):
            self.add_file(name)

    def add_file(self, name):
        """One more full-size file (kept if it exists at the right size, so a resumed run finds it)."""
        path = self.path(name)
        if not os.path.exists(path) or os.path.getsize(path) != self.bytes:
            with open(path, "wb") as f:
                f.truncate(self.bytes)

    def path(self, name):
        return os.path.join(self.work_dir, f"{name}.f32")

    def view(self, name, width):
        """The file as a (sequences, tokens, width) float32 array; narrower widths pack at the front."""
        return np.memmap(self.path(name), dtype=np.float32, mode="r+", shape=(*self.shape, width))

    def batches(self, batch_size):
        n = self.shape[0]
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    def read(self, view, rows, device):
        return torch.from_numpy(np.ascontiguousarray(view[rows[0]:rows[1]])).to(device)

    @staticmethod
    def write(view, rows, tensor):
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
