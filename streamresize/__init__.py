"""streamresize: make large language models narrower, one decoder block at a time."""

from .version import __version__  # noqa: F401


def load(model_dir, **kwargs):
    """Load a streamresize output (or any local causal LM) in-process, without trust_remote_code."""
    from .loading import load_model

    return load_model(model_dir, **kwargs)


def compress(model_dir, out_dir, recipe=None, **options):
    """Compress MODEL_DIR into OUT_DIR; `options` override the recipe (same names as the CLI)."""
    from .pipeline import compress as run
    from .recipe import load_recipe

    work_dir = options.pop("work_dir", None)
    restart = options.pop("restart", False)
    overwrite = options.pop("overwrite", False)
    save_format = options.pop("save_format", "auto")
    return run(model_dir, out_dir, load_recipe(recipe, options), work_dir=work_dir, restart=restart,
               overwrite=overwrite, save_format=save_format)
