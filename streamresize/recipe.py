"""A compression recipe: YAML file, then command-line overrides on top; saved with the output."""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import yaml

from .errors import StreamResizeError


@dataclass
class Recipe:
    method: str = "pca"
    sparsity: float = 0.25
    mlp_sparsity: float = 0.0  # fraction of MLP intermediate neurons removed
    attention_sparsity: float = 0.0  # fraction of attention query heads removed in every block
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
    width_multiple: int | str = "auto"  # auto: GPU-friendly (methods.auto_multiple), 256 for decilm MLP widths
    dtype: str = "auto"  # output dtype: auto = the input checkpoint's
    compute_dtype: str = "auto"  # the block's own compute: auto = bfloat16 on a GPU, float32 on the CPU
    # each micro-batch's Gram product before it is summed in float64: auto = float32 on a GPU, float64 on the CPU
    statistics_products: str = "auto"
    method_options: dict = field(default_factory=dict)

    def resolved(self):
        return dataclasses.asdict(self)

    def validate(self, sources=None):
        """Check every value's type and range before any long work; numbers written as strings in YAML
        (`1e-3` is a string to YAML 1.1) are converted. `sources` maps an option to the recipe file it
        came from (the others came from the command line or the caller). Raises a StreamResizeError
        naming the option, where it came from and what is wrong. Returns self."""
        sources = sources or {}

        def bad(name, problem, value=None):
            value = getattr(self, name) if value is None else value
            where = f"{sources[name]}: {name}: {value!r}" if name in sources else f"{_flag(name)} {value!r}"
            return StreamResizeError(f"{where}: {problem}")

        for name in INT_FIELDS:
            value = getattr(self, name)
            if name == "width_multiple" and isinstance(value, str) and value.strip() == "auto":
                self.width_multiple = "auto"
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not (math.isfinite(value) and value == int(value))):
                raise bad(name, "expected a whole number")
            setattr(self, name, int(value))
        for name in FLOAT_FIELDS + ("mlp_ratio",):
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FIELDS:
                continue
            if name == "mlp_ratio" and isinstance(value, str) and value.strip() == "fill":
                self.mlp_ratio = "fill"
                continue
            expected = "a number or 'fill'" if name == "mlp_ratio" else "a number"
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise bad(name, f"expected {expected}")
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise bad(name, f"expected {expected}") from None
            if not math.isfinite(value):
                raise bad(name, "expected a finite number", value)
            setattr(self, name, value)  # an int stays as written: the recipe's digest is of what was given
        for name in ("num_calibration_samples", "max_seq_length", "batch_size", "width_multiple"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.seed < 0:
            raise bad("seed", "must be at least 0")
        if self.mlp_ratio != "fill" and self.mlp_ratio < 0:
            raise bad("mlp_ratio", "must be at least 0")
        for name in ("sparsity", "mlp_sparsity", "attention_sparsity"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be at least 0 and below 1 (the fraction removed)")
        if self.target_size is not None and not 0 < self.target_size <= 1:
            raise bad("target_size", "must be above 0 and at most 1 (the fraction of the source's parameters kept)")
        from .methods.registry import METHODS

        for name, choices in {**CHOICES, "method": tuple(sorted(METHODS))}.items():
            if getattr(self, name) not in choices:
                raise bad(name, f"choose from {', '.join(choices)}")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "expected auto, cpu, cuda or cuda:N")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise bad("device", "expected auto, cpu, cuda or cuda:N") from None
        if not isinstance(self.dataset, list) or not all(isinstance(d, str) and d for d in self.dataset):
            raise bad("dataset", "expected file names (or random)")
        if self.method_options is None:
            self.method_options = {}
        if not isinstance(self.method_options, dict):
            raise bad("method_options", "expected a mapping of option: value")
        return self

    def digest(self):
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()


INT_FIELDS = ("num_calibration_samples", "max_seq_length", "batch_size", "seed", "width_multiple")
FLOAT_FIELDS = ("sparsity", "mlp_sparsity", "attention_sparsity", "target_size")
OPTIONAL_FIELDS = ("target_size",)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
CHOICES = {"mlp_method": ("auto", "prune", "dotresize"), "basis": ("per-point", "shared"),
           "allocation": ("uniform", "global", "learned"), "head": ("auto", "tied", "untied"),
           "dtype": DTYPE_CHOICES, "compute_dtype": DTYPE_CHOICES,
           "statistics_products": ("auto", "float64", "float32")}


def _flag(name):
    return "--" + name.replace("_", "-")


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
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    sources = {k: path for k in values}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k in given:
        sources.pop(k, None)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StreamResizeError(f"{path or 'recipe'}: unknown option(s) {', '.join(unknown)}")
    if method_options:
        values["method_options"] = {**(values.get("method_options") or {}), **method_options}
    if isinstance(values.get("dataset"), str):
        values["dataset"] = [values["dataset"]]
    if isinstance(values.get("dataset"), tuple):
        values["dataset"] = list(values["dataset"])
    return Recipe(**values).validate(sources)
