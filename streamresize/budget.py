"""Parameter budget: the output's total parameter count from its widths, and the widths that meet
a target fraction of the source's parameters (`--target-size`)."""

from .arch.base import BlockShape
from .errors import StreamResizeError


def output_parameters(config, width, intermediate, shortcuts, tied_head, adapter=True, family=None):
    """Total stored parameters of a narrowed Llama-family model with uniform widths. A tied head reads
    through a k x k adapter (`adapter` true), or none (false: the final norm holds its gain); with
    `"diagonal"`, a k-vector where the residual is kept whole (the adapter is then the final norm's gain)
    and k x k where it is narrowed. With `family` (an ArchSpec) its norms, biases and q/k norms count too
    (an upper bound: a format that folds the norms stores fewer)."""
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    shape = BlockShape.from_config(config)
    skip = 2 * width * width if shortcuts else 0
    whole = adapter == "diagonal" and width == config["hidden_size"]
    adapter_parameters = width if whole else width * width if adapter else 0
    head = adapter_parameters if tied_head else vocab * width
    vectors = family.vector_parameters(config, width) if family is not None else 0
    return vocab * width + head + layers * (shape.parameters(shape.narrowed(width, intermediate)) + skip) + vectors


def widths_for_target(config, target, source_parameters, mlp_ratio, multiples, shortcuts, tied_head,
                      residual_width=None, adapter=True, family=None):
    """Widths whose output fits `target` x the source's parameters. Returns (width, intermediate).

    mlp_ratio a number: the largest residual width (a multiple of `multiple`) that fits, with the MLP
    losing `mlp_ratio` times the residual's sparsity. mlp_ratio "fill": the residual keeps
    `residual_width` and the MLP takes the largest width that fits. `multiples`: one number, or
    (residual multiple, MLP multiple).
    """
    multiple, mlp_multiple = multiples if isinstance(multiples, tuple) else (multiples, multiples)
    if not 0 < target <= 1:
        raise StreamResizeError(f"--target-size must be in (0, 1], got {target}")
    d, ff = config["hidden_size"], config["intermediate_size"]
    budget = target * source_parameters
    if mlp_ratio == "fill":
        for intermediate in range(ff // mlp_multiple * mlp_multiple, 0, -mlp_multiple):
            if output_parameters(config, residual_width, intermediate, shortcuts, tied_head, adapter, family) <= budget:
                return residual_width, intermediate
        raise StreamResizeError(f"--target-size {target}: the MLP alone cannot meet it at residual width "
                                f"{residual_width}; raise --sparsity")
    for width in range(d // multiple * multiple, 0, -multiple):
        sparsity = 1 - width / d
        mlp_sparsity = min(0.95, mlp_ratio * sparsity)
        intermediate = max(mlp_multiple, int((1 - mlp_sparsity) * ff) // mlp_multiple * mlp_multiple)
        if output_parameters(config, width, intermediate, shortcuts, tied_head, adapter, family) <= budget:
            return width, intermediate
    raise StreamResizeError(f"--target-size {target}: no width fits the budget")
