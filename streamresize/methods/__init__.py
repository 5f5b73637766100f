"""Width methods: each maps a point's statistics to an orthonormal basis of the kept width."""

from ..errors import StreamResizeError
from . import disp, disp_learned, dotresize, pca, prune

# disp keeps the residual width and selects channels per block: it has its own block step
# (disp_engine.py) and no per-point solver.
METHODS = {"pca": pca.solve, "prune": prune.solve, "dotresize": dotresize.solve, "disp": None}


def method_defaults(name):
    """Each method's default options (the settings chosen by measurement, see BENCHMARKS.md)."""
    if name == "dotresize":
        return dict(dotresize.DEFAULTS)
    if name == "disp":
        return {**disp.DEFAULTS, **disp_learned.DEFAULTS}
    if name == "prune":
        return {"support": dotresize.DEFAULTS["support"], "reader": "pinv"}
    return {"reader": "pinv"}


def solver(name):
    if name not in METHODS:
        raise StreamResizeError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def target_width(width, sparsity, multiple=8):
    """SliceGPT's rule: round (1 - sparsity) * width down to a multiple, at least one multiple."""
    if not 0.0 <= sparsity < 1.0:
        raise StreamResizeError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return width
    kept = int((1.0 - sparsity) * width) // multiple * multiple
    return max(multiple, min(width, kept))
