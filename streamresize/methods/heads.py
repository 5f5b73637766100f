"""Attention heads: how many a block keeps, and which, by structured OBS on o_proj's input groups.

With grouped-query attention (g query heads per KV head) the same number of query heads is removed
from every KV group, so the result is still a stock GQA layout (num_key_value_heads unchanged);
where every query head has its own key and value (g = 1), whole heads go with their k and v rows.
Rotary embedding and head_dim are untouched.
"""

from dataclasses import dataclass

import torch

from ..errors import StreamResizeError
from .neurons import OBS_DAMP, output_error
from .obs import obs_order, refit


@dataclass(frozen=True)
class HeadLayout:
    heads: int       # query heads
    kv_heads: int
    head_dim: int

    @property
    def group(self):
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config):
        heads = config["num_attention_heads"]
        return cls(heads, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads)

    def kept(self, sparsity):
        """The layout after removing `sparsity` of the query heads (rounded to whole heads per group)."""
        if sparsity <= 0:
            return self
        if self.group > 1:
            per_group = max(1, round(self.group * (1 - sparsity)))
            return HeadLayout(self.kv_heads * per_group, self.kv_heads, self.head_dim)
        kv = max(1, round(self.kv_heads * (1 - sparsity)))
        return HeadLayout(kv, kv, self.head_dim)

    @property
    def rounds(self):
        """How many removal rounds the layout allows (a round: one query head from every KV group, or one
        whole head where each query head has its own KV head); at least one head per group stays."""
        return self.group - 1 if self.group > 1 else self.heads - 1

    def after(self, rounds):
        """The layout after `rounds` removal rounds."""
        if self.group > 1:
            return HeadLayout(self.heads - rounds * self.kv_heads, self.kv_heads, self.head_dim)
        return HeadLayout(self.heads - rounds, self.kv_heads - rounds, self.head_dim)

    def rows(self, heads):
        """Row indices of the given heads in a q (or k/v) projection."""
        return (torch.tensor(heads)[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).flatten()


def _head_order(gram, w_o, layout, remove, row_scale=None):
    """Greedy OBS order of `remove` query heads (per KV group under grouped-query attention); `row_scale`
    weighs o_proj's output channels (√ of the loss's Fisher)."""
    rounds = None
    if layout.group > 1:
        rounds = [set(range(k * layout.group, (k + 1) * layout.group)) for k in range(layout.kv_heads)]
    return obs_order(gram, w_o, group=layout.head_dim, remove=remove, damp=OBS_DAMP, rounds=rounds,
                     row_scale=row_scale)


def head_curve(gram, w_o, layout, row_scale=None):
    """o_proj's output error after 0, 1, ... `layout.rounds` removal rounds (OBS with the refit), in the
    units of `gram` (for `--allocation global`)."""
    per_round = layout.heads - layout.after(1).heads if layout.rounds else 0
    order = _head_order(gram, w_o, layout, layout.rounds * per_round, row_scale)
    return [order.cost(r * per_round) for r in range(layout.rounds + 1)]


def select_heads(gram, w_o, layout, kept, row_scale=None):
    """(kept query heads, kept KV heads, o_proj refitted on the kept columns, info).

    gram: E[z zᵀ] of o_proj's input z (heads x head_dim wide); w_o: d x (heads x head_dim)."""
    if kept.head_dim != layout.head_dim or kept.kv_heads > layout.kv_heads:
        raise StreamResizeError(f"cannot narrow {layout} to {kept}")
    if layout.group > 1 and kept.kv_heads != layout.kv_heads:
        raise StreamResizeError("with grouped-query attention only query heads are removed, per KV group")
    remove = layout.heads - kept.heads
    heads = _head_order(gram, w_o, layout, remove, row_scale).kept(layout.heads, remove)
    kv = list(range(layout.kv_heads)) if layout.group > 1 else heads
    columns = layout.rows(heads).to(gram.device)
    merged = refit(gram, w_o, columns)
    info = {"heads": len(heads), "of": layout.heads, "kept": heads,
            "local_error": output_error(gram.double(), w_o.double(), columns, merged),
            "prune_error": output_error(gram.double(), w_o.double(), columns, w_o.double()[:, columns])}
    return heads, kv, merged.to(w_o.dtype), info
