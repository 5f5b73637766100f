"""Spending one parameter budget across layers (`--allocation global`): every layer's cost of
removing its next group of neurons, ranked together, cheapest first.

A layer's curve gives its error after removing r x `multiple` neurons, on a scale that compares
layers (the block output's error relative to the residual stream it is added to, per token). Removal
steps are taken greedily by their marginal cost until the budget is met, so the total width kept is
exactly the uniform allocation's and only its spread differs.
"""

import heapq

from ..errors import StreamResizeError


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
    removed = [0] * len(full)

    def entry(i):
        r = removed[i]
        if full[i] - (r + 1) * multiple < min_width or r + 1 >= len(curves[i]):
            return None
        return (curves[i][r + 1] - curves[i][r], i)

    heap = [e for e in (entry(i) for i in range(len(full))) if e is not None]
    heapq.heapify(heap)
    for _ in range(steps):
        if not heap:
            raise StreamResizeError(f"global allocation: cannot remove {steps * multiple} neurons while keeping "
                                    f"every layer at least {min_width} wide")
        _, i = heapq.heappop(heap)
        removed[i] += 1
        nxt = entry(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return [n - r * multiple for n, r in zip(full, removed)]
