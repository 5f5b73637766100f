"""Width methods by name. `compress`, `plan` and the recipe check all look methods up here; a method
module is imported only when its method is used, so the pipeline imports none of them.

A new method is one module with a `WidthMethod` subclass and one line here.
"""

import importlib

from ..errors import StreamResizeError

METHODS = {
    "pca": "streamresize.methods.slicing:PcaMethod",
    "prune": "streamresize.methods.slicing:PruneMethod",
    "dotresize": "streamresize.methods.slicing:DotResizeMethod",
    "disp": "streamresize.methods.disp_method:DispMethod",
}


def method_class(name):
    if name not in METHODS:
        raise StreamResizeError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name, run):
    """The method `name` set up for `run` (a pipeline.Run): options checked, widths chosen."""
    return method_class(name)(run)
