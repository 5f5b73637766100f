"""Attention heads: how many a block keeps, and which, by structured OBS on o_proj's input groups.

With grouped-query attention (g query heads per KV head) a removal round takes either one query head
from every KV group (the default: num_key_value_heads unchanged) or, with `head_unit=kv_group`, one
whole KV group, its key and value heads with its g query heads. Either way the result is a stock GQA
layout. Where every query head has its own key and value (g = 1), whole heads go with their k and v
rows. Rotary embedding and head_dim are untouched.
"""

from dataclasses import dataclass, field

import torch

from ..errors import StreamResizeError
from .neurons import OBS_DAMP, output_error
from .obs import obs_order, refit


@dataclass(frozen=True)
class HeadLayout:
    heads: int       # query heads
    kv_heads: int
    head_dim: int
    by_group: bool = field(default=False, compare=False)  # a round removes a whole KV group (head_unit=kv_group)

    @property
    def group(self):
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config, by_group=False):
        heads = config["num_attention_heads"]
        return cls(heads, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, by_group)

    @property
    def per_query(self):
        """Whether a round takes one query head from every KV group (rather than whole KV groups)."""
        return self.group > 1 and not self.by_group

    def kept(self, sparsity):
        """The layout after removing `sparsity` of the query heads (rounded to whole heads per group, or
        to whole KV groups)."""
        if sparsity <= 0:
            return self
        if self.per_query:
            per_group = max(1, round(self.group * (1 - sparsity)))
            return HeadLayout(self.kv_heads * per_group, self.kv_heads, self.head_dim, self.by_group)
        kv = max(1, round(self.kv_heads * (1 - sparsity)))
        return HeadLayout(kv * self.group, kv, self.head_dim, self.by_group)

    @property
    def rounds(self):
        """How many removal rounds the layout allows (a round: one query head from every KV group, or one
        whole KV group, which is one whole head where each query head has its own KV head); at least one
        head per group, and one group, stays."""
        return self.group - 1 if self.per_query else self.kv_heads - 1

    def after(self, rounds):
        """The layout after `rounds` removal rounds."""
        if self.per_query:
            return HeadLayout(self.heads - rounds * self.kv_heads, self.kv_heads, self.head_dim, self.by_group)
        return HeadLayout(self.heads - rounds * self.group, self.kv_heads - rounds, self.head_dim, self.by_group)

    def rounds_to(self, kept):
        """The rounds that make this layout `kept`; refused where no number of them does."""
        step = self.heads - self.after(1).heads if self.rounds else 0
        n = (self.heads - kept.heads) // step if step else 0
        if kept.head_dim != self.head_dim or not 0 <= n <= self.rounds or self.after(n) != kept:
            unit = "one query head per KV group" if self.per_query else "whole KV groups"
            raise StreamResizeError(f"cannot narrow {self.heads} query / {self.kv_heads} KV heads to {kept.heads} / "
                                    f"{kept.kv_heads} by removing {unit}")
        return n

    def rows(self, heads):
        """Row indices of the given heads in a q (or k/v) projection."""
        return (torch.tensor(heads)[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).flatten()


def _head_order(gram, w_o, layout, rounds, row_scale=None):
    """Greedy OBS order of `rounds` removal rounds: (order, units removed per round, query heads per unit).
    A unit is a query head (one from every KV group per round) or a whole KV group (its query heads'
    columns of o_proj together). `row_scale` weighs o_proj's output channels (√ of the loss's Fisher)."""
    if layout.per_query:
        sets = [set(range(k * layout.group, (k + 1) * layout.group)) for k in range(layout.kv_heads)]
        order = obs_order(gram, w_o, group=layout.head_dim, remove=rounds * layout.kv_heads, damp=OBS_DAMP,
                          rounds=sets, row_scale=row_scale)
        return order, layout.kv_heads, 1
    order = obs_order(gram, w_o, group=layout.group * layout.head_dim, remove=rounds, damp=OBS_DAMP,
                      row_scale=row_scale)
    return order, 1, layout.group


def head_curve(gram, w_o, layout, row_scale=None):
    """o_proj's output error after 0, 1, ... `layout.rounds` removal rounds (OBS with the refit), in the
    units of `gram` (for `--allocation global`)."""
    order, per_round, _ = _head_order(gram, w_o, layout, layout.rounds, row_scale)
    return [order.cost(r * per_round) for r in range(layout.rounds + 1)]


def select_heads(gram, w_o, layout, kept, row_scale=None):
    """(kept query heads, kept KV heads, o_proj refitted on the kept columns, info).

    gram: E[z zᵀ] of o_proj's input z (heads x head_dim wide); w_o: d x (heads x head_dim)."""
    rounds = layout.rounds_to(kept)
    order, per_round, per_unit = _head_order(gram, w_o, layout, rounds, row_scale)
    units = order.kept(layout.heads // per_unit, rounds * per_round)
    heads = [u * per_unit + j for u in units for j in range(per_unit)]
    kv = list(range(layout.kv_heads)) if layout.per_query else units  # whole groups: the kept groups' KV heads
    columns = layout.rows(heads).to(gram.device)
    merged = refit(gram, w_o, columns)
    info = {"heads": len(heads), "of": layout.heads, "kept": heads,
            "local_error": output_error(gram.double(), w_o.double(), columns, merged),
            "prune_error": output_error(gram.double(), w_o.double(), columns, w_o.double()[:, columns])}
    return heads, kv, merged.to(w_o.dtype), info
