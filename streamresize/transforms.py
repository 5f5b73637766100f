"""Weight transforms shared by every width method.

A method only decides a basis Q (d x k, orthonormal columns) per transform
point; the residual then carries h Q. Weights are PyTorch `nn.Linear` weights
(out x in), transformed in float64. A pruning basis (columns of the identity)
is applied by indexing, which gives the same numbers without a d x k product.
A point kept whole in its own coordinates has no basis at all (None): at 7B a
materialized d x d identity is 134 MB of float64 per copy, and multiplying by it
costs a d² product per token for nothing.
"""

import torch

ROWS = 4096  # rows per block when a vocabulary-sized matrix is transformed


def selected_columns(basis):
    """The indices i_j if column j of `basis` is the identity column e_{i_j} (a pruning basis), else None."""
    nonzero = basis != 0
    if not bool((nonzero.sum(0) == 1).all()):
        return None
    index = nonzero.to(torch.uint8).argmax(0)
    if not bool((basis[index, torch.arange(basis.shape[1], device=basis.device)] == 1).all()):
        return None
    return index


def fold_norm(reader_weight, norm_weight):
    """A reader of RMSNorm(h) * g becomes a reader of the weightless RMSNorm(h)."""
    return reader_weight.to(torch.float64, copy=True).mul_(norm_weight.double()[None, :])


def rotate_reader(weight, basis):
    """A linear reading the residual (out x d) reads the narrowed residual: W Q (out x k)."""
    if basis is None:
        return weight.double()
    index = selected_columns(basis)
    if index is not None:
        return weight[:, index].double()
    return weight.double() @ basis


def rotate_writer(weight, basis):
    """A linear writing into the residual (d x in) writes the narrowed residual: Qᵀ W (k x in)."""
    if basis is None:
        return weight.double()
    index = selected_columns(basis)
    if index is not None:
        return weight[index].double()
    return basis.T @ weight.double()


def through(x, matrix):
    """x @ matrix, with None standing for the identity (a point kept whole: no product at all)."""
    return x if matrix is None else x @ matrix


def by_rows(transform, weight, rows=ROWS, dtype=None):
    """transform(weight) computed a block of rows at a time, for a transform that acts on each row
    alone: a vocabulary-sized matrix never has a whole float64 copy. `dtype`: the result's (the
    output's, so that a 7B embedding is not held in float64 - 1 GB - until its shard is written)."""
    first = transform(weight[:rows])
    if dtype is not None:
        first = first.to(dtype)
    if weight.shape[0] <= rows:
        return first
    out = first.new_empty((weight.shape[0], *first.shape[1:]))
    out[:rows] = first
    for start in range(rows, weight.shape[0], rows):
        out[start:start + rows] = transform(weight[start:start + rows])  # cast to out's dtype in the copy
    return out


def rotate_embedding(embedding, basis, dtype=None):
    """Embedding rows are writers into point 0: E Q (vocab x k), in `dtype` (see by_rows)."""
    return by_rows(lambda rows: rotate_reader(rows, basis), embedding, dtype=dtype)


def shortcut(previous_basis, next_basis):
    """The skip path between two points as an `nn.Linear` weight: (Q_prevᵀ Q_next)ᵀ (k_next x k_prev).

    None when both points share one basis (the skip path is then the identity). A basis of None is
    the identity.
    """
    if previous_basis is None or next_basis is None:
        if previous_basis is None and next_basis is None:
            return None
        return next_basis.T.contiguous() if previous_basis is None else previous_basis.contiguous()
    if previous_basis.shape == next_basis.shape and torch.equal(previous_basis, next_basis):
        return None
    return (previous_basis.T @ next_basis).T.contiguous()

