"""Structured OBS: which column groups of a writer to remove, by their effect on its output.

A writer into the residual (down_proj for MLP neurons, o_proj for attention heads) computes
y = W x. With H = E[x xᵀ] (float64 moments), removing the columns S and refitting the rest by least
squares raises the output error by

    ΔE(S) = tr(W_S ((H⁻¹)_SS)⁻¹ W_Sᵀ),

and the refit is W ← W − W_S ((H⁻¹)_SS)⁻¹ (H⁻¹)_S,: with H⁻¹ ← H⁻¹ − (H⁻¹)_:,S ((H⁻¹)_SS)⁻¹ (H⁻¹)_S,:
(the inverse of H on the kept set). Removing the cheapest group, updating, and repeating gives the
greedy order of ZipLM / OBC; the cumulative error after m removals is the least-squares optimum on
the kept set, so the curve doubles as the cost of each width in `global` allocation.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import lapack  # in-place Cholesky (SciPy comes with POT)

from ..errors import StreamResizeError

log = logging.getLogger("streamresize")


@dataclass
class ObsOrder:
    """The greedy result: groups in removal order and the output error after each removal."""

    removed: list          # group indices, first removed first
    errors: list           # cumulative ΔE after each removal (same units as tr(W H Wᵀ))
    total: float           # tr(W H Wᵀ): the output energy the errors compare against

    def kept(self, n_groups, remove):
        """Indices of the groups left after the first `remove` removals, ascending."""
        gone = set(self.removed[:remove])
        return [g for g in range(n_groups) if g not in gone]

    def cost(self, remove):
        return 0.0 if remove == 0 else self.errors[remove - 1]


def energy(weight, gram, rows=512):
    """tr(W H Wᵀ), `rows` rows of W at a time: no temporary the size of W (a 7B down_proj is 360 MB
    in float64)."""
    total = 0.0
    for r0 in range(0, weight.shape[0], rows):
        part = weight[r0:r0 + rows].double()
        total += float(((part @ gram) * part).sum())
    return total


def ridged(fill, n, device, ridge, out=None):
    """A + λI in a buffer, factored by Cholesky: (buffer, factor). `fill(buffer)` writes the symmetric
    positive semi-definite A; λ = ridge x its mean diagonal. A Gram matrix of fewer tokens than columns is
    singular, and float32 products can leave it slightly indefinite: where the factorization fails, λ
    grows 100x (logged) and A is written again, up to 1 % of the mean diagonal."""
    h = torch.empty(n, n, dtype=torch.float64, device=device) if out is None else out
    while True:
        fill(h)
        scale = float(h.diagonal().mean().clamp_min(1e-30))
        h.diagonal().add_(ridge * scale)
        factor = _cholesky_in_place(h)
        if factor is not None:
            return h, factor
        if ridge >= 1e-2:
            raise StreamResizeError(f"a {n} x {n} Gram matrix is not positive definite even with a ridge of "
                                    f"{ridge:g} x its mean diagonal (non-finite activations?)")
        log.warning("a %d x %d Gram matrix is singular or indefinite at ridge %g; retrying with %g", n, n, ridge,
                    ridge * 100)
        ridge *= 100


def _cholesky_in_place(h):
    """The upper Cholesky factor of the CPU buffer h, written over it by LAPACK (a NumPy view), or the
    lower one of a GPU tensor as a new tensor; None where h is not positive definite."""
    if h.device.type != "cpu":
        factor, info = torch.linalg.cholesky_ex(h)
        return factor if int(info) == 0 else None
    a = h.numpy().T  # the same memory, Fortran order; h is symmetric, so the same matrix
    factor, info = lapack.dpotrf(a, lower=0, overwrite_a=1, clean=0)
    return factor if info == 0 else None


def damped_inverse(gram, damp, out=None):
    """(H + λI)⁻¹ with λ = damp x mean diagonal: dead inputs (zero rows of H) stay invertible.
    `out`: an n x n float64 buffer to build it in (a memory-mapped scratch file for a 7B MLP's 11008²):
    on the CPU the factorization and inverse are done in place, so nothing else holds n² floats."""
    h, factor = ridged(lambda buffer: buffer.copy_(gram), gram.shape[0], gram.device, damp, out)
    if h.device.type != "cpu":
        # cholesky_solve, not cholesky_inverse: the same result, and much faster (measured at n = 1536)
        h.copy_(torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), factor))
        return h
    inverse, info = lapack.dpotri(factor, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(inverse, factor):
        raise StreamResizeError(f"the inverse from a Cholesky factor failed (LAPACK info {info})")
    return symmetric_from_lower(h)


def symmetric_from_lower(h, rows=1024):
    """Copy the lower triangle of h onto its upper one, in place, `rows` rows at a time."""
    n = h.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h[r0:r1, r1:] = h[r1:, r0:r1].T
        block = h[r0:r1, r0:r1]
        block.copy_(torch.tril(block) + torch.tril(block, -1).T)
    return h


def solve_ridged(fill, n, rhs, ridge=1e-8, out=None, overwrite=False):
    """(A + λI)⁻¹ rhs, A written by `fill` into `out` (or a new buffer) and factored there (see ridged).
    `overwrite`: on the CPU the solution may be written over a float64, column-major `rhs`."""
    h, factor = ridged(fill, n, rhs.device, ridge, out)
    if h.device.type != "cpu":
        return torch.cholesky_solve(rhs.to(torch.float64), factor)
    x, info = lapack.dpotrs(factor, rhs.detach().to(torch.float64).cpu().numpy(), lower=0,
                            overwrite_b=int(overwrite))
    return torch.from_numpy(x)  # Fortran order as LAPACK returns it; torch takes the strides


def _group_scores(weight, inverse, group, alive):
    """ΔE of removing each alive group on its own, from the current W and H⁻¹."""
    idx = alive[:, None] * group + torch.arange(group, device=weight.device)[None, :]  # (G, g)
    if group == 1:  # column norms without a copy of W
        return torch.linalg.vector_norm(weight, dim=0)[alive].pow(2) / inverse.diagonal()[alive].clamp_min(1e-300)
    blocks = inverse[idx[:, :, None], idx[:, None, :]]                                  # (G, g, g)
    w = weight[:, idx].permute(1, 0, 2)                                                  # (G, out, g)
    return torch.einsum("gor,gor->g", w @ torch.linalg.inv(blocks), w)


def obs_order(gram, weight, group=1, remove=None, damp=0.01, batch=1, rounds=None, buffer=None, row_scale=None):
    """Greedy OBS removal of column groups of `weight` (out x n, groups of `group` consecutive
    columns), `batch` groups per update. `rounds`: a list of group sets; when given, every update
    removes one group from each set (attention heads: the same number from every KV group, so the
    result stays a stock GQA layout). `buffer`: n x n float64 scratch for H⁻¹ (see damped_inverse).
    `row_scale`: a weight per output row, the error then Σ_r s_r² ‖ΔW_r X‖² (the order changes, the
    refit of each row does not). Returns ObsOrder; `weight` is not modified."""
    w = weight.detach().to(torch.float64).clone()
    if row_scale is not None:
        w *= row_scale.to(w)[:, None]
    h = gram.to(torch.float64)
    inverse = damped_inverse(h, damp, out=buffer)
    n_groups = w.shape[1] // group
    remove = n_groups - 1 if remove is None else min(remove, n_groups)
    alive = torch.ones(n_groups, dtype=torch.bool, device=w.device)
    removed, errors, total_error = [], [], 0.0
    total = energy(w, h)
    while len(removed) < remove:
        ids = torch.nonzero(alive).flatten()
        scores = _group_scores(w, inverse, group, ids)
        if rounds is not None:
            chosen = []
            for members in rounds:
                mask = torch.tensor([int(g) in members for g in ids.tolist()], device=w.device)
                if mask.any():
                    chosen.append(int(ids[mask][torch.argmin(scores[mask])]))
        else:
            take = min(batch, remove - len(removed))
            chosen = ids[torch.topk(scores, take, largest=False).indices].tolist()
        cols = (torch.tensor(chosen, device=w.device)[:, None] * group
                + torch.arange(group, device=w.device)[None, :]).flatten()
        block = torch.linalg.inv(inverse[cols][:, cols])
        w_s = w[:, cols]
        total_error += float(((w_s @ block) * w_s).sum().clamp_min(0))
        w.addmm_(w_s @ block, inverse[cols], alpha=-1)
        inverse.addmm_(inverse[:, cols] @ block, inverse[cols], alpha=-1)
        inverse[cols] = 0
        inverse[:, cols] = 0
        inverse[cols, cols] = 1.0  # removed columns: inert (their W is zero now)
        w[:, cols] = 0
        alive[torch.tensor(chosen, device=w.device)] = False
        for g in chosen:
            removed.append(g)
            errors.append(total_error)
    return ObsOrder(removed, errors, total)


def refit(gram, weight, keep_columns, damp=0.0):
    """W' (out x |S|) minimizing tr((W − W' P_S) H (W − W' P_S)ᵀ): the OBS compensation in closed form."""
    h = gram.to(torch.float64)
    inner = h[keep_columns][:, keep_columns]
    eye = torch.eye(len(keep_columns), dtype=h.dtype, device=h.device)
    inner = inner + max(damp, 1e-8) * inner.diagonal().mean().clamp_min(1e-30) * eye
    return weight.to(torch.float64) @ torch.linalg.solve(inner, h[keep_columns]).T
