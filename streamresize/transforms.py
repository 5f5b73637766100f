"""Weight transforms shared by every width method.

A method only decides a basis Q (d x k, orthonormal columns) per transform
point; the residual then carries h Q. Weights are PyTorch `nn.Linear` weights
(out x in), transformed in float64.
"""

import torch


def fold_norm(reader_weight, norm_weight):
    """A reader of RMSNorm(h) * g becomes a reader of the weightless RMSNorm(h)."""
    return reader_weight.double() * norm_weight.double()[None, :]


def rotate_reader(weight, basis):
    """A linear reading the residual (out x d) reads the narrowed residual: W Q (out x k)."""
    return weight.double() @ basis


def rotate_writer(weight, basis):
    """A linear writing into the residual (d x in) writes the narrowed residual: Qᵀ W (k x in)."""
    return basis.T @ weight.double()


def rotate_embedding(embedding, basis):
    """Embedding rows are writers into point 0: E Q (vocab x k)."""
    return embedding.double() @ basis


def shortcut(previous_basis, next_basis):
    """The skip path between two points as an `nn.Linear` weight: (Q_prevᵀ Q_next)ᵀ (k_next x k_prev).

    None when both points share one basis (the skip path is then the identity).
    """
    if previous_basis.shape == next_basis.shape and torch.equal(previous_basis, next_basis):
        return None
    return (previous_basis.T @ next_basis).T.contiguous()

