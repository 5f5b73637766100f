"""Hand an already loaded model to lm-evaluation-harness (`lm_eval`), when the user has it installed.

The model object is passed in, so streamresize outputs need no trust_remote_code; the hub is kept
offline unless the user's environment says otherwise, so tasks must find their data locally
(e.g. task YAMLs with local `dataset_kwargs: {data_files: ...}` in a directory given by `include_path`).
"""

import os

from .errors import StreamResizeError


def run_lm_eval(model, tokenizer, tasks, include_path=None, limit=None, batch_size=8):
    """{task: {metric: value}} from lm_eval.simple_evaluate on the given model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise StreamResizeError(f"--lm-eval needs lm-evaluation-harness (pip install lm_eval): {e}") from e
    if include_path and not os.path.isdir(include_path):
        raise StreamResizeError(f"{include_path}: --lm-eval-include must be a directory of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise StreamResizeError(f"--lm-eval: unknown task(s) {', '.join(unknown)}"
                                + ("" if include_path else "; local task YAMLs go in --lm-eval-include DIR"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
    except Exception as e:  # lm_eval raises many kinds, e.g. when a dataset is not available offline
        raise StreamResizeError(f"--lm-eval {','.join(tasks)}: lm_eval failed: {type(e).__name__}: {e}") from e
    return {task: {metric.replace(",none", ""): value for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in output["results"].items()}
