"""SliceGPT's basis: the top principal directions of the (uncentered) signals at a point."""

import torch


def principal_basis(gram, width):
    """Eigenvectors of the Gram matrix for the `width` largest eigenvalues, with a fixed sign.

    The sign rule (largest-magnitude entry of each column positive) makes the
    result reproducible across runs and implementations.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    order = torch.argsort(eigenvalues, descending=True)[:width]
    basis = eigenvectors[:, order]
    pivot = basis.abs().argmax(0)
    signs = torch.sign(basis[pivot, torch.arange(width, device=basis.device)])
    signs[signs == 0] = 1
    return basis * signs


def solve(stats, width, options):
    return principal_basis(stats.gram, width), {}
