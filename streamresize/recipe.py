"""A compression recipe: YAML file, then command-line overrides on top; saved with the output."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import yaml

from .errors import StreamResizeError


@dataclass
class Recipe:
    method: str = "pca"
    sparsity: float = 0.25
    mlp_sparsity: float = 0.0  # fraction of MLP intermediate neurons removed
    target_size: float | None = None  # fraction of the source's total parameters; sets both sparsities
    mlp_ratio: float | str = 1.0  # with target_size: MLP sparsity = mlp_ratio x residual sparsity; "fill":
    # the residual keeps --sparsity and the MLP width meets the budget
    mlp_method: str = "auto"  # auto: dotresize merges MLP neurons, the other methods prune them
    basis: str = "per-point"  # per-point (SliceGPT: shortcut matrices between points) | shared (one basis, none)
    allocation: str = "uniform"  # disp: uniform (every block the same fraction) | global (one budget)
    head: str = "auto"  # tied | untied; auto: untied for pca (SliceGPT), tied for the others if the source ties
    dataset: list = field(default_factory=list)
    num_calibration_samples: int = 128
    max_seq_length: int = 2048
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    width_multiple: int = 8
    dtype: str = "auto"  # output dtype: auto = the input checkpoint's
    compute_dtype: str = "auto"  # the block's own compute: auto = bfloat16 on a GPU, float32 on the CPU
    method_options: dict = field(default_factory=dict)

    def resolved(self):
        return dataclasses.asdict(self)

    def digest(self):
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()


def load_recipe(path=None, overrides=None, method_options=None):
    """Defaults, then the YAML file, then the overrides that are not None; `method_options`
    are merged key by key over the recipe's own."""
    values = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise StreamResizeError(f"{path}: cannot read recipe ({e})") from e
        except yaml.YAMLError as e:
            raise StreamResizeError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(values, dict):
            raise StreamResizeError(f"{path}: a recipe is a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StreamResizeError(f"{path or 'recipe'}: unknown option(s) {', '.join(unknown)}")
    if method_options:
        values["method_options"] = {**(values.get("method_options") or {}), **method_options}
    if isinstance(values.get("dataset"), str):
        values["dataset"] = [values["dataset"]]
    return Recipe(**values)
