"""What a width method is to the pipeline: a plug-in with its own options and steps.

The pipeline (`pipeline.Run`) owns the streaming: the checkpoint reader, the activation cache, the
prefetcher, the shard writer, the manifest and the commit of each step. A method owns the math: which
widths, which statistics, which transform, and what the output's config records. It reaches the
pipeline's services through `self.run` and commits each step with `self.run.commit_step`.
"""

from typing import ClassVar

from .options import resolve_options


class WidthMethod:
    name: ClassVar[str]
    OPTIONS: ClassVar[dict] = {}  # key -> options.Option
    SPARSITY: ClassVar[str] = ""  # what --sparsity means for this method (`streamresize methods`)
    cache_files: ClassVar[tuple] = ()  # activation-cache files beyond hidden_a, hidden_b and scratch
    # Streams that alternate with hidden_a / hidden_b (`dense`: dense_a / dense_b, full width) and are
    # committed and resumed with them; set per run in __init__.
    paired_streams: tuple = ()
    fixed_compute_dtype: ClassVar[object] = None  # a torch dtype the method always computes in, or None

    def __init__(self, run):
        self.run = run
        self.options = resolve_options(self.name, self.option_spec(run.recipe), run.recipe.method_options)

    @classmethod
    def option_spec(cls, recipe):
        """The options this method takes for `recipe` (some depend on other recipe fields)."""
        return cls.OPTIONS

    # ---- what the pipeline calls, in order ---------------------------------------------------------

    def prepare(self, first, progress):
        """Before the first step of this process (`first`: the step the run resumes at, -1 for none):
        a pre-pass such as a shared basis or error curves."""

    def embedding(self, progress):
        raise NotImplementedError

    def block(self, i, progress):
        raise NotImplementedError

    def head(self):
        """The tensors of the final step (final norm, head), as {name: tensor}."""
        raise NotImplementedError

    def output_config(self, config, weight_map):
        """The output's config.json fields this method decides, on top of the source's."""
        raise NotImplementedError

    def stock_problem(self):
        """Why this run's result cannot be a stock checkpoint, if that is known before it runs."""
        return None

    def record(self, steps):
        """Method-specific entries for config.json's "streamresize" record."""
        return {}
