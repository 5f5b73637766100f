"""DISP-LLM (Gao et al., arXiv 2410.11988): each block reads and writes its own subset of residual
channels. This module holds the pure parts: parameter counting, widths for a budget, channel
scores, selection and the optional least-squares refit. The streaming passes are in disp_method.py.

Index sets per block (the paper's I1..I5): attention inputs, attention outputs, MLP inputs, MLP
neurons, MLP outputs. Output channels are chosen by the exact energy their removal takes from the
residual update; inputs and neurons by the expected squared change of the consumer's output when the
channel is dropped alone (‖W[:, j]‖² E[x_j²], Wanda/FLAP-style), in residual units where one exists.
"""

import torch

from ..arch.base import BlockShape  # noqa: F401  (re-exported: the pure parts count with it)
from ..errors import StreamResizeError

# refit on by default: on SmolLM2-135M at sparsity 0.3 it takes perplexity from 502 to 144 (BENCHMARKS.md);
# refit=false is the paper's variant (no weight updates).
DEFAULTS = {"refit": True, "curve_samples": 16, "curve_points": 8}
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
ALLOCATIONS = ("uniform", "global", "learned")


def widths_at(shape, keep, multiple):
    """Every group keeps the same fraction of its full size, rounded to the width multiple."""
    widths = []
    for size in shape.full:
        n = int(round(keep * size / multiple)) * multiple
        widths.append(max(min(multiple, size), min(size, n)))
    return tuple(widths)


def keep_levels(shape, multiple):
    """The distinct widths one block can take: one level per rounding step of its widest group."""
    steps = max(shape.full) // multiple
    levels = {}
    for s in range(1, steps + 1):
        widths = widths_at(shape, s / steps, multiple)
        levels.setdefault(widths, s / steps)
    return sorted((keep, widths) for widths, keep in levels.items())


def uniform_widths(shapes, budget, multiple):
    """Every block the same fraction: the level whose total is nearest the budget."""
    levels = keep_levels(shapes[0], multiple)
    total = [sum(s.parameters(widths_at(s, keep, multiple)) for s in shapes) for keep, _ in levels]
    best = min(range(len(levels)), key=lambda j: abs(total[j] - budget))
    return [widths_at(s, levels[best][0], multiple) for s in shapes]


def interpolate(curve, width, full):
    """Piecewise-linear error at `width` from {width: error} points (error 0 at the full width)."""
    points = sorted({full: 0.0, **{int(k): float(v) for k, v in curve.items()}}.items())
    if width <= points[0][0]:
        return points[0][1]
    for (n0, e0), (n1, e1) in zip(points, points[1:]):
        if width <= n1:
            return e0 + (e1 - e0) * (width - n0) / (n1 - n0)
    return 0.0


def global_widths(shapes, curves, budget, multiple):
    """Dimension-independent widths for one global budget. curves[b][g] maps a width of group g of
    block b to the block's output error with only that group narrowed (errors add, to first order).
    Starting from the dense model, one rounding unit at a time is taken from the group whose error
    grows least per parameter saved (exact parameter counts at the current widths: the MLP's are
    products of widths), until the total is within the budget."""
    widths = [list(s.full) for s in shapes]
    errors = [[interpolate(curves[b][g], n, full) for g, (n, full) in enumerate(zip(widths[b], s.full))]
              for b, s in enumerate(shapes)]

    def best_step(b):  # (error added per parameter saved, group, new width, its error, parameters saved)
        shape, best = shapes[b], None
        now = shape.parameters(widths[b])
        for g, full in enumerate(shape.full):
            n = widths[b][g] - multiple
            if n < min(multiple, full):
                continue
            saved = now - shape.parameters(widths[b][:g] + [n] + widths[b][g + 1:])
            if saved > 0:
                error = interpolate(curves[b][g], n, full)
                step = ((error - errors[b][g]) / saved, g, n, error, saved)
                best = step if best is None or step[0] < best[0] else best
        return best

    steps = [best_step(b) for b in range(len(shapes))]
    total = sum(s.parameters(w) for s, w in zip(shapes, widths))
    while total > budget:
        candidates = [b for b, step in enumerate(steps) if step is not None]
        if not candidates:
            raise StreamResizeError("the budget is below the smallest widths the rounding allows")
        b = min(candidates, key=lambda c: (steps[c][0], c))
        _, g, n, error, saved = steps[b]
        widths[b][g], errors[b][g] = n, error
        total -= saved
        steps[b] = best_step(b)
    return [tuple(w) for w in widths]


def block_budget(shapes, sparsity=None, target_size=None, source_parameters=None):
    """Block-linear parameters to keep: (1 - sparsity) of them (the paper's pruning ratio), or, with
    target_size, what is left of that fraction of the whole model after the untouched tensors."""
    full = sum(s.parameters(s.full) for s in shapes)
    if target_size is None:
        if not 0.0 <= sparsity < 1.0:
            raise StreamResizeError(f"--sparsity must be in [0, 1), got {sparsity}")
        return (1.0 - sparsity) * full
    budget = target_size * source_parameters - (source_parameters - full)
    if budget <= 0:
        raise StreamResizeError(f"--target-size {target_size}: the embedding, head and norms alone take "
                                f"{(source_parameters - full) / source_parameters:.1%} of the parameters")
    return min(budget, full)


def top_indices(scores, k):
    """The k highest-scoring channels, as a sorted index tensor (ties broken by position)."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.sort(torch.topk(scores, k, sorted=False).indices).values


def input_scores(mean_square, weights):
    """Expected squared change of each consumer's output when input channel j alone is dropped,
    ‖W[:, j]‖² E[x_j²], each consumer normalised by its total so q, k and v (or gate and up) count alike."""
    score = torch.zeros_like(mean_square)
    for w in weights:
        column = w.double().pow(2).sum(0)
        score += column / column.sum().clamp_min(1e-30)
    return score * mean_square


def refit_columns(weight, gram, keep):
    """Least-squares refit of a linear layer on kept input columns: W_K + W_D G_DK G_KK⁻¹ minimises
    E‖x Wᵀ - x_K W'ᵀ‖² for inputs x with second moment G. Returns the (out x |K|) refitted weight."""
    d = gram.shape[0]
    mask = torch.ones(d, dtype=torch.bool, device=gram.device)
    mask[keep] = False
    drop = mask.nonzero().flatten()
    w = weight.double()
    if drop.numel() == 0:
        return weight[:, keep].clone()
    g_kk = gram[keep][:, keep]
    ridge = 1e-6 * g_kk.diagonal().mean().clamp_min(1e-30)
    g_kk = g_kk + ridge * torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    correction = torch.linalg.solve(g_kk, gram[keep][:, drop]).T  # |D| x |K|: x_D ≈ x_K correctionᵀ
    return (w[:, keep] + w[:, drop] @ correction).to(weight.dtype)


def check_allocation(name):
    if name not in ALLOCATIONS:
        raise StreamResizeError(f"--allocation {name}: choose one of {', '.join(ALLOCATIONS)}")


def curve_levels(points):
    """Keep fractions at which the dense pass measures each block's error curve."""
    return [round(1.0 - (j + 1) / (points + 1) * 0.9, 4) for j in range(points)] if points > 0 else []
