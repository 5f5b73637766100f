"""Second-order statistics of a transform point, accumulated on the device in float64."""

import contextlib
import os

import numpy as np
import torch


_PRODUCTS = [torch.float64]  # the run's choice (pipeline.Run sets it with `products`)


@contextlib.contextmanager
def products(dtype):
    """Within this block, Gram products of micro-batches are formed in `dtype` (float32: TF32 must be
    off) and summed in float64."""
    saved = _PRODUCTS[0]
    _PRODUCTS[0] = dtype
    try:
        yield
    finally:
        _PRODUCTS[0] = saved


def gram_product(x, y=None):
    """xᵀ y (x, y: tokens x n / tokens x m) in the run's product precision, returned as float64."""
    dtype = _PRODUCTS[0]
    x = x.to(dtype)
    return (x.T @ (x if y is None else y.to(dtype))).double()


def add_gram_product(out, x, y=None):
    """out += xᵀ y (as gram_product) without an n x n temporary where the products are float64: a 7B
    MLP's 11008² is 0.97 GB, which would otherwise sit in anonymous memory beside a file-backed `out`."""
    if _PRODUCTS[0] == torch.float64 and out.dtype == torch.float64:
        x = x.to(torch.float64)
        return out.addmm_(x.T, x if y is None else y.to(torch.float64))
    return out.add_(gram_product(x, y))


class Moments:
    """Gram matrix, column sums and sums of |x| of the signals X (tokens x d) at one point, with the
    token count: sums, so that micro-batches, points and processes combine by adding (`merge`,
    `reduce`). Every statistic a method solves from passes through this type."""

    TENSORS = ("gram", "sum", "abs_sum")

    def __init__(self, width, device, gram_path=None):
        """`gram_path`: keep the Gram matrix in a memory-mapped file there from the start (a 7B MLP's
        11008² float64 on the CPU: file-backed pages, not anonymous memory); `offload` leaves it there."""
        self._files = []
        self._gram_file = gram_path
        if gram_path is not None:
            self.gram = scratch_matrix(gram_path, (width, width))  # a new file reads as zeros
            self._files.append(gram_path)
        else:
            self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x, mask=None):
        """Add a micro-batch (..., d); `mask` (...) excludes padding tokens."""
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        add_gram_product(self.gram, x)
        x = x.double()
        self.sum += x.sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    def merge(self, other, weight=1.0):
        """Add another set of moments, its signals scaled by sqrt(weight) (so its Gram by weight)."""
        self.gram += other.gram * weight
        self.sum += other.sum * weight ** 0.5
        self.abs_sum += other.abs_sum * weight ** 0.5
        self.count += other.count
        return self

    def reduce(self, all_reduce=None):
        """The sums over every process of a data-parallel run, in float64 and a fixed order:
        `all_reduce(tensor)` sums a tensor in place across processes. One process: unchanged."""
        if all_reduce is not None:
            for name in self.TENSORS:
                all_reduce(getattr(self, name))
            count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.gram.device)
            all_reduce(count)
            self.count = int(count.item())
        return self

    def offload(self, path):
        """Move the statistics to memory-mapped files, freeing the device."""
        for name in self.TENSORS:
            tensor = getattr(self, name)
            if tensor is None:
                continue
            file = f"{path}.{name}"
            if name == "gram" and self._gram_file is not None:
                continue  # already in its own file
            mm = np.memmap(file, dtype=np.float64, mode="w+", shape=tuple(tensor.shape))
            mm[...] = tensor.cpu().numpy()
            mm.flush()
            setattr(self, name, torch.from_numpy(mm))
            self._files.append(file)

    def to(self, device):
        for name in self.TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def discard(self):
        for name in self.TENSORS:
            setattr(self, name, None)
        for file in self._files:
            if os.path.exists(file):
                os.remove(file)


def scratch_matrix(path, shape):
    """A float64 work matrix in a memory-mapped file (its pages are file-backed: under memory pressure
    the kernel writes them back and drops them instead of the process running out of memory)."""
    return torch.from_numpy(np.memmap(path, dtype=np.float64, mode="w+", shape=tuple(shape)))


def relative_error(gram, basis):
    """‖X − X Q Qᵀ‖ / ‖X‖ from the Gram matrix alone (Q has orthonormal columns)."""
    total = torch.trace(gram)
    kept = torch.trace(basis.T @ gram @ basis)
    return float(((total - kept) / total).clamp_min(0).sqrt()) if total > 0 else 0.0


def pca_error(gram, width):
    """The smallest possible relative_error at this width (Eckart–Young), from eigenvalues alone."""
    eigenvalues = torch.linalg.eigvalsh(gram)
    total = eigenvalues.sum()
    kept = eigenvalues[-width:].sum()
    return float(((total - kept) / total).clamp_min(0).sqrt()) if total > 0 else 0.0


PointStatistics = Moments  # the name earlier code and tools use
