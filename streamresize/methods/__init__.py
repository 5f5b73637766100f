"""Width methods. Each is a plug-in (`base.WidthMethod`) registered by name in `registry.py`; the pure
math they share (PCA, transport, supports, transforms) lives beside them and imports no pipeline."""

from ..errors import StreamResizeError


def target_width(width, sparsity, multiple=8):
    """SliceGPT's rule: round (1 - sparsity) * width down to a multiple, at least one multiple."""
    if not 0.0 <= sparsity < 1.0:
        raise StreamResizeError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return width
    kept = int((1.0 - sparsity) * width) // multiple * multiple
    return max(multiple, min(width, kept))
