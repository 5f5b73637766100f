"""Width methods. Each is a plug-in (`base.WidthMethod`) registered by name in `registry.py`; the pure
math they share (PCA, transport, supports, transforms) lives beside them and imports no pipeline."""

from ..errors import StreamResizeError


def target_width(width, sparsity, multiple=8):
    """SliceGPT's rule: round (1 - sparsity) * width down to a multiple, at least one multiple."""
    if not 0.0 <= sparsity < 1.0:
        raise StreamResizeError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return width
    kept = int((1.0 - sparsity) * width) // multiple * multiple
    return max(multiple, min(width, kept))


# Widths that are multiples of these run at full speed in GPU matrix kernels (tensor-core tiles);
# DeciLM's ffn_mult encoding can only express MLP widths that are multiples of 256.
GPU_MULTIPLES = (128, 64, 32, 16, 8)
DECILM_MULTIPLE = 256
MIN_STEPS = 16  # a multiple leaves at least this many widths to choose from
MAX_STEP_SHARE = 0.01  # one step of a width shared by every block costs at most this share of the parameters


def auto_multiple(width, unit_share=0.0):
    """The largest GPU-friendly multiple that leaves MIN_STEPS widths below `width` and whose one step
    costs at most MAX_STEP_SHARE of the model's parameters (at least 8). `unit_share`: what one unit of the
    width costs, as a share of the parameters, where every block takes the same width (on SmolLM2 a uniform
    multiple of 64 MLP neurons is 2.5 %, so `--target-size 0.8` kept 77.8 %); 0 where the step's cost is
    spread (per-block widths), so only MIN_STEPS decides."""
    return next((m for m in GPU_MULTIPLES if width // m >= MIN_STEPS and m * unit_share <= MAX_STEP_SHARE),
                GPU_MULTIPLES[-1])


def width_multiples(setting, hidden, intermediate, save_format="auto", mlp_unit_share=0.0):
    """(residual multiple, MLP multiple) for --width-multiple `setting` ("auto" or a number).
    `mlp_unit_share`: one MLP neuron in every block, as a share of the parameters (see auto_multiple)."""
    if setting == "auto":
        mlp = DECILM_MULTIPLE if save_format == "decilm" else auto_multiple(intermediate, mlp_unit_share)
        return auto_multiple(hidden), mlp
    if save_format == "decilm" and int(setting) % DECILM_MULTIPLE:
        raise StreamResizeError(f"--width-multiple {setting} with --save-format decilm: DeciLM's ffn_mult encoding "
                                f"needs MLP widths in multiples of {DECILM_MULTIPLE}; use --width-multiple "
                                f"{DECILM_MULTIPLE} or leave it at auto")
    return int(setting), int(setting)
