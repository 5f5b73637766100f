"""MLP intermediate neurons: keep k of d_ff in gate/up, and fold the dropped ones into down_proj
(DOTResize's transport map, or its least-squares refit) or drop them (plain pruning)."""

import torch

from ..errors import StreamResizeError
from .dotresize import merge_map, options_with_defaults
from .obs import energy, obs_order, solve_ridged
from .support import Frame, support_frame

OBS_DAMP = 0.01  # H + 0.01 x mean(diag H) I for the selection only; the final refit is undamped
OBS_UPDATES = 64  # updates of H⁻¹ per MLP at most (each O(d_ff²)): neurons are removed in batches beyond


def choose_neurons(stats, width, kind, down, batch=0, scratch=None, row_scale=None):
    """The kept neurons' frame. `obs`: greedy structured OBS on down_proj's columns (the block's
    output error with the rest refitted); otherwise a score (norm, variance, mean_abs) times the
    neuron's down_proj column norm. `scratch(name, shape)`: float64 buffers for the d_ff² solve.
    `row_scale`: a weight per output channel (√ of the loss's Fisher) the error is measured with."""
    if kind != "obs":
        scored = down.double() if row_scale is None else down.double() * row_scale[:, None]
        return support_frame(stats, width, kind, weight_norms=scored.norm(dim=0))
    remove = down.shape[1] - width
    batch = batch or max(1, -(-remove // OBS_UPDATES))
    n = down.shape[1]
    order = obs_order(stats.gram, down, remove=remove, damp=OBS_DAMP, batch=batch,
                      buffer=scratch("obs-inverse", (n, n)) if scratch else None, row_scale=row_scale)
    keep = torch.tensor(order.kept(down.shape[1], remove), device=stats.gram.device)
    return Frame(None, stats.gram, stats.sum, stats.count, keep)


def narrow_mlp(stats, width, method, options, readers, down, scratch=None, row_scale=None):
    """Return (readers', down', info): readers (gate, up) keep rows S; down_proj (d x d_ff) becomes d x k.

    stats: moments of the intermediate activations u = act(gate x) * up x. scratch(name, shape): where
    the d_ff² and k² float64 work matrices live (memory-mapped files, so a 7B MLP's solve stays out of
    anonymous memory); None: in memory. row_scale: see choose_neurons (the refit does not depend on it).
    """
    o = options_with_defaults(options)
    support_kind = options.get("mlp_support", "auto")
    if support_kind == "auto":
        support_kind = o["support"] if o["support"] != "pca" else "norm"  # neurons cannot be rotated
    frame = choose_neurons(stats, width, support_kind, down, int(options.get("obs_batch", 0)), scratch, row_scale)
    keep = frame.support
    reader = options.get("mlp_reader", "ot")
    info = {"width": width, "method": method, "support": support_kind}
    if method == "prune":
        merged = down[:, keep].double()
    elif method == "dotresize" and reader == "ot":
        transport, info_ot = merge_map(frame, o)
        merged = down.double() @ transport
        info.update(info_ot)
    elif method == "dotresize" and reader == "lstsq":
        merged = refit_kept(stats.gram, down, keep, scratch("refit-inner", (len(keep), len(keep))) if scratch
                            else None)
    else:
        raise StreamResizeError(f"unknown MLP narrowing '{method}' / mlp_reader '{reader}'")
    info["local_error"] = output_error(stats.gram, down, keep, merged)
    info["prune_error"] = output_error(stats.gram, down, keep, None)
    return {role: w[keep] for role, w in readers.items()}, merged, info


def refit_kept(gram, down, keep, out=None, rows=1024):
    """D' = D H[:, S] (H_SS + εI)⁻¹: the least-squares refit of down_proj on the kept neurons S. H_SS is
    gathered into `out` (k x k) a block of rows at a time and factored in place, so besides it only
    d x d_ff matrices are made."""
    g, k = gram, len(keep)

    def fill(inner):
        for r0 in range(0, k, rows):
            inner[r0:r0 + rows] = g[keep[r0:r0 + rows]][:, keep]

    cross = torch.empty(down.shape[0], k, dtype=torch.float64, device=g.device)  # D H[:, S], in blocks
    for c0 in range(0, k, rows):
        columns = g[:, keep[c0:c0 + rows]]
        for r0 in range(0, down.shape[0], rows):
            cross[r0:r0 + rows, c0:c0 + rows] = down[r0:r0 + rows].double() @ columns
    return solve_ridged(fill, k, cross.T, 1e-8, out).T.to(g.device)


def output_error(gram, down, keep, merged, rows=512):
    """‖U Dᵀ − U_S D'ᵀ‖ / ‖U Dᵀ‖ of the MLP output, from the activation moments alone (D' = None: the
    kept columns as they are, plain pruning). By blocks of rows: no float64 copy of a 7B down_proj."""
    total, error = 0.0, 0.0
    for r0 in range(0, down.shape[0], rows):
        part = down[r0:r0 + rows].to(torch.float64, copy=True)  # a copy: it is changed below
        total += energy(part, gram)
        if merged is None:
            part[:, keep] = 0
        else:
            part[:, keep] -= merged[r0:r0 + rows]
        error += energy(part, gram)
    return float(max(error / total, 0.0) ** 0.5) if total > 0 else 0.0
