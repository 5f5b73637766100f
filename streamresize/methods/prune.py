"""Plain structured pruning: keep the support, drop the rest (the baseline DOTResize adds to)."""

from .support import support_frame


def solve(stats, width, options):
    frame = support_frame(stats, width, options.get("support", "norm"))
    return frame.to_neurons(frame.selection()), {"support": options.get("support", "norm")}
