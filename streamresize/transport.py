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
    exp(−C/ε) to stay representable in float64, and the log-domain variant otherwise. If plain Sinkhorn
    (chosen by "auto" or asked for) breaks down, i.e. raises or gives a non-finite or degenerate plan
    (see `plan_breakdown`), the log-domain variant is run instead and info["fallback"] says why. A
    plan that is still broken raises StreamResizeError rather than being used. Returns P and a dict
    with the OT cost, the plan's entropy, iterations and marginal error (not converging within
    max_iter is not a breakdown: it shows as marginal_error).
    """
    scale = cost.median().clamp_min(1e-30)
    normalized = cost / scale
    if solver == "auto":
        solver = "sinkhorn" if epsilon >= 0.02 and float(normalized.max()) / epsilon < 600 else "sinkhorn_log"
    if solver not in ("emd", "sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"):
        raise StreamResizeError(f"unknown OT solver '{solver}'; choose auto, sinkhorn, sinkhorn_log, "
                                "sinkhorn_stabilized or emd")
    fallback = None
    if solver == "sinkhorn":
        try:
            plan, iterations, stopped = _run_solver(a, b, normalized, epsilon, solver, max_iter, tol)
            problem = ", and ".join(why for why in (stopped, plan_breakdown(plan, solver, a, b)) if why) or None
        except (ArithmeticError, RuntimeError, ValueError) as e:  # the log-domain solve below decides
            problem = f"raised {type(e).__name__}: {e}"
        if problem is not None:  # plain Sinkhorn broke down: fall back to the log-domain variant
            fallback, solver = f"sinkhorn {problem}", "sinkhorn_log"
    if solver != "sinkhorn":
        plan, iterations, _ = _run_solver(a, b, normalized, epsilon, solver, max_iter, tol)
        problem = plan_breakdown(plan, solver, a, b)
        if problem is not None:
            raise StreamResizeError(_breakdown_message(a, b, epsilon, solver, fallback, problem))
    positive = plan[plan > 0]
    info = {
        "ot_cost": float((plan * cost).sum()),
        "plan_entropy": float(-(positive * positive.log()).sum()),
        "iterations": iterations,
        "solver": solver,
        "marginal_error": float(max((plan.sum(1) - a).abs().max(), (plan.sum(0) - b).abs().max())),
    }
    if fallback is not None:
        info["fallback"] = fallback
    return plan, info


def _run_solver(a, b, normalized, epsilon, solver, max_iter, tol):
    """One solve on the median-normalized cost: (plan, iterations or None, why POT stopped early or None).

    POT's warnings are not shown: non-convergence is reported as marginal_error in the log instead, and
    plain Sinkhorn's "numerical errors" stop (it then returns the previous iterate) is returned here.
    """
    if solver == "emd":
        return ot.emd(a, b, normalized, numItermax=max(100000, 50 * max_iter)), None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, log = ot.sinkhorn(a, b, normalized, epsilon, method=solver, numItermax=max_iter,
                                stopThr=tol, log=True)
    stopped = next((f"stopped early on numerical errors (POT: '{w.message}')" for w in caught
                    if "numerical error" in str(w.message).lower()), None)
    return plan, int(log.get("niter", max_iter)), stopped


def plan_breakdown(plan, solver, a, b, rtol=1e-6):
    """Why a plan from `solver` is broken, or None if it is usable (merely unconverged counts as usable).

    Any solver: a non-finite entry. Plain Sinkhorn: a neuron with a positive marginal but no mass in the
    plan (exp(−C/ε) underflowed to zero for its whole row or column). Plain and log-domain Sinkhorn:
    neither marginal met to rtol. Each of their completed iterations ends with one marginal exact up to
    rounding, however far from convergence, so missing both means the solve broke down before its
    first scaling or lost all precision. (sinkhorn_stabilized resets its scalings when it absorbs them,
    so an unconverged plan of it may miss both; it and emd are only checked for non-finite entries.)
    """
    if not bool(torch.isfinite(plan).all()):
        bad = int((~torch.isfinite(plan)).sum())
        return f"gave a plan with {bad} non-finite entr{'y' if bad == 1 else 'ies'}"
    if solver not in ("sinkhorn", "sinkhorn_log"):
        return None
    rows, cols = plan.sum(1), plan.sum(0)
    if solver == "sinkhorn":
        empty = int(((rows <= 0) & (a > 0)).sum()) + int(((cols <= 0) & (b > 0)).sum())
        if empty:
            return (f"gave {empty} neuron(s) no mass at all (exp(-cost/epsilon) underflowed to zero for a "
                    "whole row or column of the plan)")
    row_error = float(((rows - a).abs() / a.clamp_min(1e-300)).max())
    col_error = float(((cols - b).abs() / b.clamp_min(1e-300)).max())
    if min(row_error, col_error) > rtol:
        return (f"met neither marginal (relative errors {row_error:.3g} on the sources, {col_error:.3g} on "
                "the kept neurons)")
    return None


def _breakdown_message(a, b, epsilon, solver, fallback, problem):
    entropic = solver != "emd"
    what = f"optimal transport of {len(a)} neurons onto {len(b)} kept ones failed"
    what += f" at epsilon={epsilon:g} (relative to the median cost): " if entropic else " (solver emd): "
    if fallback is not None:
        what += f"plain {fallback}, and the log-domain fallback (sinkhorn_log) {problem}"
    else:
        what += f"{solver} {problem}"
    if not entropic:
        fix = "use an entropic solver instead, e.g. -o solver=sinkhorn_log -o epsilon=0.05"
    else:
        larger = f"-o epsilon={max(0.05, 10 * epsilon):g}" if epsilon > 0 else "-o epsilon=0.05"
        others = ("the exact -o solver=emd" if solver == "sinkhorn_log"
                  else "-o solver=sinkhorn_log or the exact -o solver=emd")
        fix = f"raise the regularization (e.g. {larger}; the default is 0.05) or use {others}"
    return f"{what}. To fix it, {fix}."


def transport_map(plan, a):
    """T = diag(1/a) P: each source neuron sends all of its value to the targets (rows sum to 1)."""
    return plan / a.clamp_min(1e-300)[:, None]


def orthonormal_factor(transport):
    """Q of T = Q R with diag(R) > 0, so the factor is unique; R cancels against T⁺ (methods.md §2.6)."""
    q, r = torch.linalg.qr(transport)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs[None, :], r * signs[:, None]
