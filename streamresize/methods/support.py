"""The kept support at a point: which k neurons (or principal directions) stay, shared by
`prune` and `dotresize` so the two differ only in whether the rest is merged back."""

from dataclasses import dataclass

import torch

from ..transport import neuron_scores, top_support
from .pca import principal_basis


@dataclass
class Frame:
    """Moments in the coordinates the support is chosen in (neurons, or principal directions)."""

    rotation: torch.Tensor | None  # d x d orthonormal, or None for the neuron coordinates
    gram: torch.Tensor
    sums: torch.Tensor
    count: int
    support: torch.Tensor

    def to_neurons(self, basis):
        """A basis expressed in this frame, back in neuron coordinates."""
        return basis if self.rotation is None else self.rotation @ basis

    def selection(self):
        """The plain pruning basis: the identity columns of the support."""
        eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
        return eye[:, self.support]


def support_frame(stats, width, kind="norm", weight_norms=None):
    """Choose `width` kept coordinates. `weight_norms` scales neuron scores by their outgoing weights
    (used for MLP neurons, whose importance is activation times down-projection norm)."""
    gram, sums = stats.gram, stats.sum
    if kind == "pca":
        rotation = principal_basis(gram, gram.shape[0])
        gram = rotation.T @ gram @ rotation
        sums = rotation.T @ sums
        support = torch.arange(width, device=gram.device)  # principal directions come sorted
        return Frame(rotation, gram, sums, stats.count, support)
    scores = neuron_scores(gram, sums, stats.abs_sum, max(stats.count, 1), kind)
    if weight_norms is not None:
        scores = scores * weight_norms
    return Frame(None, gram, sums, stats.count, top_support(scores, width))
