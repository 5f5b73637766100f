"""Model families: one module per family, each with a `SPEC` (arch/base.py). A new family is one
module plus its line in FAMILIES."""

import importlib

from ..errors import StreamResizeError

FAMILIES = ("llama", "mistral")


def specs():
    return [importlib.import_module(f"{__name__}.{name}").SPEC for name in FAMILIES]


def spec_for(config, where="config.json"):
    """The spec whose architectures config.json names, or a clear error listing the supported ones."""
    architectures = config.get("architectures") or []
    for spec in specs():
        if any(a in spec.architectures for a in architectures):
            return spec
    supported = ", ".join(a for s in specs() for a in s.architectures)
    raise StreamResizeError(f"{where}: architectures {architectures or '(none)'} not supported; supported: {supported}")


def spec_named(name):
    """The spec of family `name` (an output config's base_model_type)."""
    if name not in FAMILIES:
        raise StreamResizeError(f"model family '{name}' unknown; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}").SPEC
