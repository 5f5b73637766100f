"""Entropic optimal transport between neurons, from float64 moments alone (DOTResize, methods.md §2).

Everything here works on the Gram matrix G = XᵀX, the column sums and the token
count of the signals X at one point, so no activation matrix is ever stored.
All functions run on whatever device the moments are on (POT's torch backend).
"""

import warnings

import ot
import torch

from .errors import StreamResizeError

SUPPORTS = ("norm", "variance", "mean_abs", "pca")
COSTS = ("sqeuclidean", "correlation")
MARGINALS = ("uniform", "energy")


def neuron_scores(gram, sums, abs_sums, count, kind):
    """Importance of each neuron for choosing the kept support."""
    if kind == "norm":
        return gram.diagonal().clamp_min(0).sqrt()
    if kind == "variance":
        mean = sums / count
        return gram.diagonal() / count - mean ** 2
    if kind == "mean_abs":
        return abs_sums / count
    raise StreamResizeError(f"support '{kind}' is not a neuron score; choose from {', '.join(SUPPORTS)}")


def top_support(scores, width):
    """Indices of the `width` highest scores, in ascending index order (keeps neuron order stable)."""
    return torch.sort(torch.topk(scores, width).indices).values


def cost_matrix(gram, sums, count, support, kind="sqeuclidean", normalize=False):
    """Cost (d x k) between every neuron and each kept neuron, from the moments.

    sqeuclidean: ‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij (per-neuron normalized: divided by ‖x_i‖‖x_j‖).
    correlation: 1 − Pearson correlation of the two activation columns.
    """
    diag = gram.diagonal().clamp_min(0)
    if kind == "sqeuclidean":
        if normalize:
            scale = diag.sqrt().clamp_min(1e-30)
            g = gram / scale[:, None] / scale[None, :]
            cost = 2.0 - 2.0 * g[:, support]
        else:
            cost = diag[:, None] + diag[support][None, :] - 2.0 * gram[:, support]
    elif kind == "correlation":
        mean = sums / count
        cov = gram[:, support] / count - mean[:, None] * mean[support][None, :]
        var = (diag / count - mean ** 2).clamp_min(1e-30)
        cost = 1.0 - cov / (var[:, None].sqrt() * var[support][None, :].sqrt())
    else:
        raise StreamResizeError(f"unknown cost '{kind}'; choose from {', '.join(COSTS)}")
    return cost.clamp_min(0)


def marginals(gram, support, kind="uniform"):
    d, k = gram.shape[0], len(support)
    if kind == "uniform":
        a = torch.full((d,), 1.0 / d, dtype=gram.dtype, device=gram.device)
        b = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        return a, b
    if kind == "energy":
        energy = gram.diagonal().clamp_min(0) + 1e-12 * gram.diagonal().abs().max().clamp_min(1e-30)
        return energy / energy.sum(), energy[support] / energy[support].sum()
    raise StreamResizeError(f"unknown marginals '{kind}'; choose from {', '.join(MARGINALS)}")


def solve_plan(a, b, cost, epsilon=0.05, solver="auto", max_iter=2000, tol=1e-9):
    """Transport plan P (d x k) with marginals a, b; ε is relative to the median cost.

    solver "auto" uses plain Sinkhorn (matrix-vector products, fast) where ε is large enough for
    exp(−C/ε) to stay representable in float64, and the log-domain variant otherwise or if plain
    Sinkhorn breaks down. Returns P and a dict with the OT cost, the plan's entropy, iterations
    and marginal error.
    """
    scale = cost.median().clamp_min(1e-30)
    normalized = cost / scale
    if solver == "auto":
        solver = "sinkhorn" if epsilon >= 0.02 and float(normalized.max()) / epsilon < 600 else "sinkhorn_log"
    if solver == "emd":
        plan = ot.emd(a, b, normalized, numItermax=max(100000, 50 * max_iter))
        iterations = None
    elif solver in ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"):
        with warnings.catch_warnings():  # non-convergence is reported as marginal_error in the log instead
            warnings.simplefilter("ignore")
            plan, log = ot.sinkhorn(a, b, normalized, epsilon, method=solver, numItermax=max_iter,
                                    stopThr=tol, log=True)
        iterations = int(log.get("niter", max_iter))
    else:
        raise StreamResizeError(f"unknown OT solver '{solver}'; choose auto, sinkhorn, sinkhorn_log, "
                                "sinkhorn_stabilized or emd")
        if solver == "sinkhorn" and not torch.isfinite(plan).all():
            return solve_plan(a, b, cost, epsilon, "sinkhorn_log", max_iter, tol)
    plan = torch.nan_to_num(plan)
    positive = plan[plan > 0]
    info = {
        "ot_cost": float((plan * cost).sum()),
        "plan_entropy": float(-(positive * positive.log()).sum()),
        "iterations": iterations,
        "solver": solver,
        "marginal_error": float(max((plan.sum(1) - a).abs().max(), (plan.sum(0) - b).abs().max())),
    }
    return plan, info


def transport_map(plan, a):
    """T = diag(1/a) P: each source neuron sends all of its value to the targets (rows sum to 1)."""
    return plan / a.clamp_min(1e-300)[:, None]


def orthonormal_factor(transport):
    """Q of T = Q R with diag(R) > 0, so the factor is unique; R cancels against T⁺ (methods.md §2.6)."""
    q, r = torch.linalg.qr(transport)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs[None, :], r * signs[:, None]
