"""A Markdown report, with PNG plots when matplotlib is installed, from what compression recorded
(`config.json` key `streamresize`, `streamresize_run.json`) and what `eval` measured
(`streamresize_eval.json`). Reads whatever per-point and per-block records a method wrote, so a
method with other statistics still gets its tables; only the plots look for known keys.
Several outputs (or eval JSON files, e.g. of the dense source) add a comparison: perplexity
against parameter count, one series per method.
"""

import hashlib
import json
import math
import os

from .writer import RUN_LOG
from .errors import StreamResizeError
from .evaluate import EVAL_RESULT
# Relative reconstruction errors that share a scale and are plotted together, with their legends.
PLOTTED_ERRORS = {"local_error": "this method", "pca_error": "PCA bound", "prune_error": "pruning"}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise StreamResizeError(f"{path}: not valid JSON: {e}") from e


def load_output(path):
    """What one compression (or one eval JSON file) recorded, as a dict with keys name, config, info,
    run, eval; info and run are empty for a plain eval file."""
    if os.path.isfile(path) and path.endswith(".json"):
        result = _read_json(path)
        if "parameters" not in result:
            raise StreamResizeError(f"{path}: not an eval result (no 'parameters'); write one with streamresize eval --output")
        return {"name": os.path.basename(path)[:-len(".json")], "path": path, "config": {}, "info": {}, "run": {},
                "eval": result}
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise StreamResizeError(f"{config_path}: missing; pass a streamresize output directory or an eval JSON file")
    config = _read_json(config_path)
    if "streamresize" not in config:
        raise StreamResizeError(f"{config_path}: no 'streamresize' record; not a streamresize output")
    run_path, eval_path = os.path.join(path, RUN_LOG), os.path.join(path, EVAL_RESULT)
    measured = _read_json(eval_path) if os.path.isfile(eval_path) else {}
    with open(config_path, "rb") as f:
        if measured.get("config_sha256") != hashlib.sha256(f.read()).hexdigest():
            measured = {}  # measured on an earlier checkpoint written to the same directory
    return {"name": os.path.basename(os.path.normpath(path)), "path": path, "config": config,
            "info": config["streamresize"], "run": _read_json(run_path) if os.path.isfile(run_path) else {},
            "eval": measured}


def point_name(index):
    """Point 0 is the embedding output; 2i+1 and 2i+2 follow block i's attention and MLP."""
    if index == 0:
        return "embedding"
    return f"block {(index - 1) // 2} {'attn' if index % 2 else 'mlp'}"


def _format(value):
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def table(rows, first=()):
    """Markdown table of dicts: the `first` columns, then every other scalar key in order of appearance."""
    columns = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    if not rows or not columns:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def points(output):
    """Per-point records with a readable `where` and the width, from the record or from config."""
    widths = output["config"].get("residual_widths") or []
    rows = []
    for i, record in enumerate(output["info"].get("points") or []):
        index = record.get("point", i)
        row = {"point": index, "where": point_name(index), **record}
        if "width" not in row and index < len(widths):
            row["width"] = widths[index]
        rows.append(row)
    return rows


def blocks(output):
    """Per-block rows: residual widths around the block, MLP width, its MLP record, time and memory."""
    config, run = output["config"], output["run"]
    widths, sizes = config.get("residual_widths") or [], config.get("intermediate_sizes") or []
    steps = {s["block"]: s for s in run.get("steps", []) if isinstance(s.get("block"), int)}
    layers = config.get("num_hidden_layers", len(sizes))
    mlp = output["info"].get("mlp") or []
    if not steps and len(mlp) == layers:  # no run log: the MLP records are in block order when all are there
        steps = {i: {"mlp": record} for i, record in enumerate(mlp)}
    rows = []
    for i in range(layers):
        row = {"block": i}
        if 2 * i + 2 < len(widths):
            row.update(width_in=widths[2 * i], width_attn=widths[2 * i + 1], width_out=widths[2 * i + 2])
        if i < len(sizes):
            row["mlp_width"] = sizes[i]
        step = steps.get(i, {})
        for key, value in (step.get("mlp") or {}).items():
            if key != "width":
                row[f"mlp_{key}"] = value
        for key in ("seconds", "peak_rss_mb", "peak_gpu_mb"):
            if step.get(key) is not None:
                row[key] = step[key]
        rows.append(row)
    return rows


def other_records(output):
    """Lists of per-block records a method wrote beyond `points` (e.g. `mlp`), by key."""
    return {k: v for k, v in output["info"].items()
            if k != "points" and isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return os.path.basename(path)


def plot_output(plt, output, out_dir):
    """PNG plots of one output: width per point and per block, local error per point, time per step."""
    files, name = [], output["name"]
    rows, block_rows = points(output), blocks(output)
    if any("width" in r for r in rows) or any("mlp_width" in r for r in block_rows):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        xs = [r["point"] for r in rows if "width" in r]
        axes[0].plot(xs, [r["width"] for r in rows if "width" in r], marker="o", ms=3)
        axes[0].set(title="residual width per point", xlabel="point (0: embedding; 2i+1, 2i+2: block i)",
                    ylabel="width")
        mlp = [(r["block"], r["mlp_width"]) for r in block_rows if "mlp_width" in r]
        axes[1].bar([b for b, _ in mlp], [w for _, w in mlp])
        axes[1].set(title="MLP width per block", xlabel="block", ylabel="intermediate neurons")
        files.append(_save(fig, os.path.join(out_dir, f"{name}-widths.png")))
        plt.close(fig)
    errors = {k: [(r["point"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in PLOTTED_ERRORS}
    mlp_errors = {k: [(r["block"], r[f"mlp_{k}"]) for r in block_rows if isinstance(r.get(f"mlp_{k}"), (int, float))]
                  for k in PLOTTED_ERRORS}
    mlp_errors = {k: v for k, v in mlp_errors.items() if v}
    if any(errors.values()) or mlp_errors:
        fig, axes = plt.subplots(1, 2 if mlp_errors else 1, figsize=(10 if mlp_errors else 6, 3.5), squeeze=False)
        for key, series in errors.items():
            if series:
                axes[0][0].plot(*zip(*series), marker="o", ms=3, label=PLOTTED_ERRORS[key])
        axes[0][0].set(title="local relative error per point", xlabel="point", ylabel="relative error")
        axes[0][0].legend()
        for key, series in mlp_errors.items():
            axes[0][1].plot(*zip(*series), marker="o", ms=3, label=PLOTTED_ERRORS[key])
        if mlp_errors:
            axes[0][1].legend()
            axes[0][1].set(title="MLP narrowing error per block", xlabel="block", ylabel="relative error")
        files.append(_save(fig, os.path.join(out_dir, f"{name}-errors.png")))
        plt.close(fig)
    timed = [r for r in block_rows if isinstance(r.get("seconds"), (int, float))]
    if timed:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.bar([r["block"] for r in timed], [r["seconds"] for r in timed])
        ax.set(title="time per block", xlabel="block", ylabel="seconds")
        memory = [(r["block"], r["peak_rss_mb"]) for r in timed if r.get("peak_rss_mb") is not None]
        if memory:
            twin = ax.twinx()
            twin.plot(*zip(*memory), color="C1", marker=".", label="peak RSS so far")
            twin.set_ylabel("peak RSS (MB)")
            twin.legend(loc="upper right")
        files.append(_save(fig, os.path.join(out_dir, f"{name}-time.png")))
        plt.close(fig)
    return files


def comparison(outputs):
    """One row per output with a parameter count: method, parameters and what eval measured."""
    rows = []
    for o in outputs:
        e, info = o["eval"], o["info"]
        parameters = e.get("parameters")
        if parameters is None:
            continue
        source = info.get("source_parameters") or e.get("source_parameters")
        row = {"output": o["name"], "method": info.get("method") or e.get("method") or "dense",
               "parameters": parameters}
        if source:
            row["of source"] = f"{parameters / source:.1%}"
        if "perplexity" in e:
            row["perplexity"] = e["perplexity"]
        for task, r in (e.get("zeroshot") or {}).items():
            row[f"{task} acc"] = r.get("acc")
            row[f"{task} acc_norm"] = r.get("acc_norm")
        rows.append(row)
    return rows


def plot_comparison(plt, rows, out_dir):
    points_by_method = {}
    for r in rows:
        if isinstance(r.get("perplexity"), (int, float)):
            points_by_method.setdefault(r["method"], []).append((r["parameters"], r["perplexity"]))
    if not points_by_method:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, pts in sorted(points_by_method.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set(xlabel="parameters", ylabel="perplexity", yscale="log", title="perplexity against parameter count")
    ax.legend()
    ax.grid(True, alpha=0.3)
    file = _save(fig, os.path.join(out_dir, "perplexity-vs-parameters.png"))
    plt.close(fig)
    return [file]


def _summary(output):
    info, run, e = output["info"], output["run"], output["eval"]
    recipe = info.get("recipe") or {}
    lines = [f"- method: `{info.get('method', '?')}`" + (f", MLP: `{info['mlp_method']}`" if info.get("mlp_method") else "")]
    chosen = {k: recipe[k] for k in ("sparsity", "mlp_sparsity", "target_size", "mlp_ratio", "basis", "head",
                                      "num_calibration_samples", "max_seq_length") if recipe.get(k) is not None}
    if chosen:
        lines.append("- recipe: " + ", ".join(f"{k} {v}" for k, v in chosen.items()))
    if info.get("method_options"):
        lines.append("- method options: " + ", ".join(f"{k}={v}" for k, v in info["method_options"].items()))
    if e.get("parameters") and info.get("source_parameters"):
        lines.append(f"- parameters: {e['parameters']:,} of {info['source_parameters']:,} "
                     f"({e['parameters'] / info['source_parameters']:.1%})")
    elif info.get("source_parameters"):
        lines.append(f"- source parameters: {info['source_parameters']:,}")
    if run:
        memory = f"peak RSS {run['peak_rss_mb']:.0f} MB" if run.get("peak_rss_mb") is not None else ""
        if run.get("peak_gpu_mb"):
            memory += f", peak GPU {run['peak_gpu_mb']:.0f} MB"
        lines.append(f"- compression: {run.get('seconds', float('nan')):.1f} s on {run.get('device', '?')}"
                     + (f", {memory}" if memory else "") + (f"; source `{run['source']}`" if run.get("source") else ""))
    if "perplexity" in e:
        lines.append(f"- perplexity {e['perplexity']:.3f} on {e.get('windows')} windows x {e.get('max_seq_length')} "
                     f"tokens (stride {e.get('stride', e.get('max_seq_length'))})")
    for task, r in (e.get("zeroshot") or {}).items():
        lines.append(f"- zero-shot `{task}`: acc {r['acc']:.3f} ± {r.get('acc_stderr', float('nan')):.3f}, "
                     f"acc_norm {r['acc_norm']:.3f} ± {r.get('acc_norm_stderr', float('nan')):.3f} "
                     f"({r['items']} items, chance {r.get('chance', float('nan')):.3f})")
    return lines


def _speed_table(speed):
    rows = [{"model": label, **values} for label, values in speed.get("models", {}).items()]
    note = (f"Batch {speed.get('batch_size')}, prompt {speed.get('prompt_length')} tokens, "
            f"{speed.get('new_tokens')} greedy tokens, median of {speed.get('repeats')} interleaved runs on "
            f"{speed.get('device')}" + (f", {speed['threads']} threads" if speed.get("threads") else "") + ".")
    return note + "\n\n" + table(rows, first=("model",))


def write_report(inputs, out_dir):
    """Write report.md (and PNGs when matplotlib is installed) into out_dir; returns report.md's path."""
    outputs = [load_output(p) for p in inputs]
    os.makedirs(out_dir, exist_ok=True)
    plt = _pyplot()
    lines = ["# streamresize report", ""]
    if plt is None:
        lines += ["_matplotlib is not installed (`pip install streamresize[plots]`): text only._", ""]
    for output in outputs:
        if not output["info"]:
            continue
        lines += [f"## {output['name']}", "", f"`{os.path.abspath(output['path'])}`", "", *_summary(output), ""]
        for image in plot_output(plt, output, out_dir) if plt else []:
            lines += [f"![{image}]({image})", ""]
        if output["eval"].get("speed"):
            lines += ["### Speed and memory against the source", "", _speed_table(output["eval"]["speed"]), ""]
        lines += ["### Per point", "", table(points(output), first=("point", "where", "width")), ""]
        lines += ["### Per block", "", table(blocks(output), first=("block",)), ""]
        for key, records in other_records(output).items():
            if key != "mlp":  # already in the per-block table
                lines += [f"### {key}", "", table(records), ""]
    rows = comparison(outputs)
    if len(rows) > 1:
        lines += ["## Comparison", "", table(rows, first=("output", "method", "parameters")), ""]
        for image in plot_comparison(plt, rows, out_dir) if plt else []:
            lines += [f"![{image}]({image})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
