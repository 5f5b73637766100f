"""Spending one parameter budget across layers (`--allocation global`): every layer's cost of
removing its next group of neurons (or its next round of attention heads), ranked together, cheapest
per parameter first.

A curve gives a layer's error after r removal steps, on a scale that compares layers (the block
output's error relative to the residual stream it is added to, per token). Steps are taken greedily
by their marginal cost per parameter until the budget is met, so with one kind of step the total
width kept is exactly the uniform allocation's and only its spread differs.
"""

import heapq

from ..errors import StreamResizeError


def allocate(curves, step_parameters, remove, max_steps=None):
    """Steps taken from each curve: the cheapest marginal error per parameter first, until at least
    `remove` parameters are gone. Returns the number of steps per curve.

    curves[j][r]: error after r steps of curve j (curves[j][0] = 0); step_parameters[j]: parameters one
    step of curve j removes; max_steps[j]: the most steps curve j may take (default: its length - 1).
    """
    limits = [len(c) - 1 for c in curves] if max_steps is None else [min(m, len(c) - 1)
                                                                      for m, c in zip(max_steps, curves)]
    taken = [0] * len(curves)

    def entry(j):
        r = taken[j]
        if r >= limits[j]:
            return None
        return ((curves[j][r + 1] - curves[j][r]) / step_parameters[j], j)

    heap = [e for e in (entry(j) for j in range(len(curves))) if e is not None]
    heapq.heapify(heap)
    removed = 0
    while removed < remove:
        if not heap:
            raise StreamResizeError(f"global allocation: cannot remove {remove} parameters within the smallest "
                                    f"widths allowed ({removed} at most)")
        _, j = heapq.heappop(heap)
        taken[j] += 1
        removed += step_parameters[j]
        nxt = entry(j)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return taken


def global_widths(curves, full, keep_total, multiple, min_width=None):
    """Per-layer widths summing to `keep_total` (a multiple of `multiple` below sum(full)).

    curves[i][r]: error of layer i with r x `multiple` neurons removed (curves[i][0] = 0).
    full[i]: layer i's full width. min_width: the narrowest a layer may become (default `multiple`).
    """
    min_width = multiple if min_width is None else min_width
    steps = (sum(full) - keep_total) // multiple
    if steps < 0 or (sum(full) - keep_total) % multiple:
        raise StreamResizeError(f"global allocation: {keep_total} kept neurons is not the full {sum(full)} "
                                f"minus a multiple of {multiple}")
    limits = [max(0, (n - min_width) // multiple) for n in full]
    if steps > sum(min(m, len(c) - 1) for m, c in zip(limits, curves)):
        raise StreamResizeError(f"global allocation: cannot remove {steps * multiple} neurons while keeping "
                                f"every layer at least {min_width} wide")
    taken = allocate(curves, [multiple] * len(full), steps * multiple, limits)
    return [n - r * multiple for n, r in zip(full, taken)]
