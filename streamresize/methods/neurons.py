"""MLP intermediate neurons: keep k of d_ff in gate/up, and fold the dropped ones into down_proj
(DOTResize's transport map, or its least-squares refit) or drop them (plain pruning)."""

import torch

from ..errors import StreamResizeError
from .dotresize import merge_map, options_with_defaults
from .support import support_frame


def narrow_mlp(stats, width, method, options, readers, down):
    """Return (readers', down', info): readers (gate, up) keep rows S; down_proj (d x d_ff) becomes d x k.

    stats: moments of the intermediate activations u = act(gate x) * up x.
    """
    o = options_with_defaults(options)
    support_kind = o["support"] if o["support"] != "pca" else "norm"  # neurons cannot be rotated
    frame = support_frame(stats, width, support_kind, weight_norms=down.double().norm(dim=0))
    keep = frame.support
    down = down.double()
    reader = options.get("mlp_reader", "ot")
    info = {"width": width, "method": method}
    if method == "prune":
        merged = down[:, keep]
    elif method == "dotresize" and reader == "ot":
        transport, info_ot = merge_map(frame, o)
        merged = down @ transport
        info.update(info_ot)
    elif method == "dotresize" and reader == "lstsq":
        g = stats.gram
        inner = g[keep][:, keep]
        inner = inner + 1e-8 * inner.diagonal().mean().clamp_min(1e-30) * torch.eye(len(keep), dtype=g.dtype,
                                                                                      device=g.device)
        merged = down @ torch.linalg.solve(inner, g[keep]).T
    else:
        raise StreamResizeError(f"unknown MLP narrowing '{method}' / mlp_reader '{reader}'")
    info["local_error"] = output_error(stats.gram, down, keep, merged)
    info["prune_error"] = output_error(stats.gram, down, keep, down[:, keep])
    return {role: w[keep] for role, w in readers.items()}, merged, info


def output_error(gram, down, keep, merged):
    """‖U Dᵀ − U_S D'ᵀ‖ / ‖U Dᵀ‖ of the MLP output, from the activation moments alone."""
    approx = torch.zeros_like(down)
    approx[:, keep] = merged
    diff = down - approx
    total = torch.trace(down @ gram @ down.T)
    return float((torch.trace(diff @ gram @ diff.T) / total).clamp_min(0).sqrt()) if total > 0 else 0.0
