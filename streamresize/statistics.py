"""Second-order statistics of a transform point, accumulated on the device in float64."""

import os

import numpy as np
import torch


class PointStatistics:
    """Gram matrix, column sums and mean |x| of the signals X (tokens x d) at one point."""

    def __init__(self, width, device):
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x, mask=None):
        """Add a micro-batch (..., d); `mask` (...) excludes padding tokens."""
        x = x.reshape(-1, x.shape[-1]).double()
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        self.gram += x.T @ x
        self.sum += x.sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    @property
    def mean_abs(self):
        return self.abs_sum / max(self.count, 1)

    def offload(self, path):
        """Move the statistics to a memory-mapped file, freeing the device."""
        arrays = {"gram": self.gram, "sum": self.sum, "abs_sum": self.abs_sum}
        width = self.gram.shape[0]
        mm = np.memmap(path, dtype=np.float64, mode="w+", shape=(width + 2, width))
        for row, key in ((slice(0, width), "gram"), (width, "sum"), (width + 1, "abs_sum")):
            mm[row] = arrays[key].cpu().numpy()
        mm.flush()
        self.gram = torch.from_numpy(mm[:width])
        self.sum = torch.from_numpy(mm[width])
        self.abs_sum = torch.from_numpy(mm[width + 1])
        self._file = path

    def to(self, device):
        self.gram, self.sum, self.abs_sum = (t.to(device) for t in (self.gram, self.sum, self.abs_sum))
        return self

    def discard(self):
        path = getattr(self, "_file", None)
        self.gram = self.sum = self.abs_sum = None
        if path and os.path.exists(path):
            os.remove(path)


def relative_error(gram, basis):
    """‖X − X Q Qᵀ‖² / ‖X‖² from the Gram matrix alone (Q has orthonormal columns)."""
    total = torch.trace(gram)
    kept = torch.trace(basis.T @ gram @ basis)
    return float(((total - kept) / total).clamp_min(0).sqrt()) if total > 0 else 0.0
