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

from dataclasses import dataclass

import torch


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


def damped_inverse(gram, damp):
    """(H + λI)⁻¹ with λ = damp x mean diagonal: dead inputs (zero rows of H) stay invertible."""
    n = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(1e-30)
    h = gram + damp * scale * torch.eye(n, dtype=gram.dtype, device=gram.device)
    # cholesky_solve, not cholesky_inverse: the same result, and 30x faster on CPU (measured at n = 1536)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(eye, torch.linalg.cholesky(h))


def _group_scores(weight, inverse, group, alive):
    """ΔE of removing each alive group on its own, from the current W and H⁻¹."""
    idx = alive[:, None] * group + torch.arange(group, device=weight.device)[None, :]  # (G, g)
    if group == 1:
        return weight[:, alive].pow(2).sum(0) / inverse.diagonal()[alive].clamp_min(1e-300)
    blocks = inverse[idx[:, :, None], idx[:, None, :]]                                  # (G, g, g)
    w = weight[:, idx].permute(1, 0, 2)                                                  # (G, out, g)
    return torch.einsum("gor,gor->g", w @ torch.linalg.inv(blocks), w)


def obs_order(gram, weight, group=1, remove=None, damp=0.01, batch=1, rounds=None):
    """Greedy OBS removal of column groups of `weight` (out x n, groups of `group` consecutive
    columns), `batch` groups per update. `rounds`: a list of group sets; when given, every update
    removes one group from each set (attention heads: the same number from every KV group, so the
    result stays a stock GQA layout). Returns ObsOrder; `weight` is not modified."""
    w = weight.detach().to(torch.float64).clone()
    h = gram.to(torch.float64)
    inverse = damped_inverse(h, damp)
    n_groups = w.shape[1] // group
    remove = n_groups - 1 if remove is None else min(remove, n_groups)
    alive = torch.ones(n_groups, dtype=torch.bool, device=w.device)
    removed, errors, total_error = [], [], 0.0
    total = float(((w @ h) * w).sum())
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
