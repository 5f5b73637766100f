"""MLP intermediate neurons: keep k of d_ff in gate/up, and fold the dropped ones into down_proj
(DOTResize's transport map, or its least-squares refit) or drop them (plain pruning)."""

import torch

from ..errors import StreamResizeError
from .dotresize import merge_map, options_with_defaults
from .obs import obs_order
from .support import Frame, support_frame

OBS_DAMP = 0.01  # H + 0.01 x mean(diag H) I for the selection only; the final refit is undamped
OBS_UPDATES = 64  # updates of H⁻¹ per MLP at most (each O(d_ff²)): neurons are removed in batches beyond


def choose_neurons(stats, width, kind, down, batch=0):
    """The kept neurons' frame. `obs`: greedy structured OBS on down_proj's columns (the block's
    output error with the rest refitted); otherwise a score (norm, variance, mean_abs) times the
    neuron's down_proj column norm."""
    if kind != "obs":
        return support_frame(stats, width, kind, weight_norms=down.double().norm(dim=0))
    remove = down.shape[1] - width
    batch = batch or max(1, -(-remove // OBS_UPDATES))
    order = obs_order(stats.gram, down, remove=remove, damp=OBS_DAMP, batch=batch)
    keep = torch.tensor(order.kept(down.shape[1], remove), device=stats.gram.device)
    return Frame(None, stats.gram, stats.sum, stats.count, keep)


def narrow_mlp(stats, width, method, options, readers, down):
    """Return (readers', down', info): readers (gate, up) keep rows S; down_proj (d x d_ff) becomes d x k.

    stats: moments of the intermediate activations u = act(gate x) * up x.
    """
    o = options_with_defaults(options)
    support_kind = options.get("mlp_support", "auto")
    if support_kind == "auto":
        support_kind = o["support"] if o["support"] != "pca" else "norm"  # neurons cannot be rotated
    frame = choose_neurons(stats, width, support_kind, down, int(options.get("obs_batch", 0)))
    keep = frame.support
    down = down.double()
    reader = options.get("mlp_reader", "ot")
    info = {"width": width, "method": method, "support": support_kind}
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
