"""DOTResize: merge the dropped neurons into the kept ones with entropic optimal transport, and make
the merge safe for RMSNorm by keeping only the orthonormal factor Q of the transport map T = QR."""

from ..statistics import relative_error
from ..transport import cost_matrix, marginals, orthonormal_factor, solve_plan, transport_map
from .support import support_frame

DEFAULTS = {"support": "norm", "cost": "sqeuclidean", "normalize": False, "epsilon": 0.05,
            "marginals": "uniform", "solver": "auto", "max_iter": 2000, "tol": 1e-9,
            "reader": "lstsq", "mlp_reader": "lstsq"}  # chosen by measurement: BENCHMARKS.md


def options_with_defaults(options):
    return {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}


def merge_map(frame, o):
    """Transport map T (d x k) from every coordinate of the frame to the kept support."""
    cost = cost_matrix(frame.gram, frame.sums, max(frame.count, 1), frame.support, o["cost"], o["normalize"])
    a, b = marginals(frame.gram, frame.support, o["marginals"])
    plan, info = solve_plan(a, b, cost, o["epsilon"], o["solver"], o["max_iter"], o["tol"])
    return transport_map(plan, a), info


def solve(stats, width, options):
    o = options_with_defaults(options)
    frame = support_frame(stats, width, o["support"])
    transport, info = merge_map(frame, o)
    q, _ = orthonormal_factor(transport)
    basis = frame.to_neurons(q)
    info["prune_error"] = relative_error(stats.gram, frame.to_neurons(frame.selection()))
    return basis, info
