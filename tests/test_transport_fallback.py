"""solve_plan's fallback from plain Sinkhorn to the log-domain solver, and its error when no plan can be had.

Small problems only (8 neurons onto 5): every test runs in milliseconds.
"""

import ot
import pytest
import torch

from streamresize import transport
from streamresize.errors import StreamResizeError
from streamresize.statistics import PointStatistics
from streamresize.transport import cost_matrix, marginals, solve_plan, top_support


def _problem(marginal="uniform", copies=False):
    """8 random neurons onto the 5 largest; or (copies) 5 neurons and a noisy scaled copy of each."""
    g = torch.Generator().manual_seed(1)
    if copies:
        scale = torch.tensor([3, 2.5, 2, 1.5, 1.2], dtype=torch.float64)
        x = torch.randn(200, 5, generator=g, dtype=torch.float64) * scale
        noise = torch.randn(200, 5, generator=g, dtype=torch.float64)
        x = torch.cat([x, 0.8 * x[:, [2, 0, 4, 1, 3]] + 0.1 * noise], 1)
    else:
        x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    stats = PointStatistics(x.shape[1], "cpu")
    stats.add(x)
    support = top_support(stats.gram.diagonal(), 5)
    cost = cost_matrix(stats.gram, stats.sum, stats.count, support)
    a, b = marginals(stats.gram, support, marginal)
    return a, b, cost


def _assert_good_plan(plan, a, b, info):
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert torch.allclose(plan.sum(1), a, atol=1e-8) and torch.allclose(plan.sum(0), b, atol=1e-8)
    assert info["marginal_error"] < 1e-8


@pytest.mark.parametrize("marginal", ["uniform", "energy"])
def test_underflow_in_plain_sinkhorn_falls_back_to_log_domain(marginal):
    """ε = 1e-3 makes exp(−C/ε) underflow to 0 for every dropped neuron: plain Sinkhorn stops at its first
    iteration with a plan that gives those neurons no mass. The log-domain solver must take over."""
    a, b, cost = _problem(marginal)
    plan, info = solve_plan(a, b, cost, epsilon=1e-3, solver="sinkhorn")
    _assert_good_plan(plan, a, b, info)
    assert info["solver"] == "sinkhorn_log"
    assert "numerical errors at iteration 0" in info["fallback"] and "no mass" in info["fallback"]
    direct, _ = solve_plan(a, b, cost, epsilon=1e-3, solver="sinkhorn_log")
    assert torch.equal(plan, direct)


def test_plain_sinkhorn_stopping_midway_falls_back_to_log_domain():
    """Here plain Sinkhorn runs 16 iterations before its scalings overflow; POT then returns the previous
    iterate, finite and with one marginal met but the other off by 0.4. That is a breakdown, not a plan."""
    a, b, cost = _problem(copies=True)
    plan, info = solve_plan(a, b, cost, epsilon=1e-3, solver="sinkhorn", max_iter=300)
    assert info["solver"] == "sinkhorn_log" and "numerical errors at iteration 16" in info["fallback"]
    assert info["marginal_error"] < 1e-2
    direct, _ = solve_plan(a, b, cost, epsilon=1e-3, solver="sinkhorn_log", max_iter=300)
    assert torch.equal(plan, direct)


@pytest.mark.parametrize("failure", ["nan", "raises", "unscaled"])
def test_auto_falls_back_when_plain_sinkhorn_breaks(monkeypatch, failure):
    """"auto" picks plain Sinkhorn at ε = 0.05; whatever way that solve breaks (a non-finite plan, an
    exception, a plan that meets neither marginal), the log-domain result is used instead."""
    a, b, cost = _problem()
    real = ot.sinkhorn

    def broken(a_, b_, m, reg, method="sinkhorn", **kwargs):
        if method != "sinkhorn":
            return real(a_, b_, m, reg, method=method, **kwargs)
        if failure == "raises":
            raise FloatingPointError("overflow in u")
        plan, log = real(a_, b_, m, reg, method=method, **kwargs)
        if failure == "nan":
            plan = plan.clone()
            plan[2, 3] = float("nan")
        else:
            plan = torch.exp(-m / reg) / (len(a_) * len(b_))  # the initial scaling: no marginal met
        return plan, log

    monkeypatch.setattr(transport.ot, "sinkhorn", broken)
    plan, info = solve_plan(a, b, cost, epsilon=0.05)
    _assert_good_plan(plan, a, b, info)
    assert info["solver"] == "sinkhorn_log" and info["fallback"].startswith("sinkhorn ")
    monkeypatch.setattr(transport.ot, "sinkhorn", real)
    direct, _ = solve_plan(a, b, cost, epsilon=0.05, solver="sinkhorn_log")
    assert torch.equal(plan, direct)


def test_working_plain_sinkhorn_is_used_untouched():
    """The normal case: the plan is exactly POT's plain Sinkhorn plan, and no fallback is recorded."""
    a, b, cost = _problem()
    plan, info = solve_plan(a, b, cost, epsilon=0.05, tol=1e-12)
    assert info["solver"] == "sinkhorn" and "fallback" not in info
    expected = ot.sinkhorn(a, b, cost / cost.median(), 0.05, method="sinkhorn", numItermax=2000, stopThr=1e-12)
    assert torch.equal(plan, expected)
    # Non-convergence is not a breakdown: few iterations leave a marginal error, but the plan is kept.
    plan, info = solve_plan(a, b, cost, epsilon=0.05, solver="sinkhorn", max_iter=2, tol=1e-12)
    assert info["solver"] == "sinkhorn" and "fallback" not in info and info["marginal_error"] > 1e-9
    expected = ot.sinkhorn(a, b, cost / cost.median(), 0.05, method="sinkhorn", numItermax=2, stopThr=1e-12,
                           warn=False)
    assert torch.equal(plan, expected)


@pytest.mark.parametrize("epsilon", [0.0, 1e-300])
def test_no_usable_plan_raises_a_clear_error(epsilon):
    """ε = 0 gives NaN in both solvers; ε = 1e-300 underflows plain Sinkhorn and leaves the log-domain
    solver with no precision. Neither may come back as a zeroed or unscaled plan."""
    a, b, cost = _problem()
    with pytest.raises(StreamResizeError) as caught:
        solve_plan(a, b, cost, epsilon=epsilon, solver="sinkhorn", max_iter=100)
    message = str(caught.value)
    assert f"epsilon={epsilon:g}" in message and "8 neurons onto 5" in message
    assert "sinkhorn_log" in message and "-o epsilon=" in message and "-o solver=emd" in message


def test_log_domain_solver_giving_nan_raises(monkeypatch):
    """A non-finite plan from the solver the user chose is an error too, naming what to change."""
    a, b, cost = _problem()
    monkeypatch.setattr(transport.ot, "sinkhorn",
                        lambda a_, b_, m, *args, **kwargs: (torch.full_like(m, float("nan")), {"niter": 1}))
    with pytest.raises(StreamResizeError, match=r"sinkhorn_log gave a plan with 40 non-finite entries.*"
                                                r"-o epsilon=0\.1.*-o solver=emd"):
        solve_plan(a, b, cost, epsilon=0.01, solver="sinkhorn_log")
