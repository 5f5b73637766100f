"""Model families: one module per family, each with a `SPEC` (arch/base.py). A new family is one
module plus its line in FAMILIES."""

import importlib

from ..errors import StreamResizeError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


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


FORMAT_NAMES = ("stock", "decilm", "bundled")


def support_matrix(methods):
    """The README's support matrix (family x method x output format), rendered from the adapters as a
    markdown table; `methods`: the registered method names (arch imports no method)."""
    header = ["family", "architectures", "differs from Llama's tensors", *methods, *FORMAT_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec in specs():
        plain_norms = {f"{spec.attn_norm}.weight", f"{spec.mlp_norm}.weight"}
        carried = ", ".join([f"`{name}`" for name in spec.extra_tensors if name not in plain_norms]
                            + [f"`{name}` (fused {' + '.join(p.rsplit('.', 1)[-1] for p in parts)})"
                               for name, parts in spec.fused]
                            + ([f"every norm keeps its weight (not folded; `{spec.mlp_norm}` before the MLP)"]
                               if not spec.norms_folded else [])
                            + (["embedding output x sqrt(hidden_size)"] if spec.embedding_scale else [])) or "-"
        cells = [spec.name, ", ".join(f"`{a}`" for a in spec.architectures), carried]
        taken = "yes" if spec.norms_folded else "MLP neurons and heads (--sparsity 0)"
        cells += [taken if spec.method_problem(m) is None else f"no: {spec.refused_why}" for m in methods]
        cells += ["yes" if f in spec.formats else f"no: {spec.formats_why}" for f in FORMAT_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
