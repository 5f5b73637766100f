"""Output formats: the same compressed model written so that the serving stack loads it natively.

The pipeline always produces the `bundled` format first: config `model_type: streamresize`, weightless
norms (their gains folded into the linears that read them) and our modeling file, which can hold
anything a method produces (per-point bases with skip matrices, head adapters, DISP index sets).
When the result fits the source's own architecture, `stock` rewrites it as that architecture
(`LlamaForCausalLM`, `MistralForCausalLM`, ...), which transformers, vLLM, llama.cpp's converter and
TGI load with no remote code. The conversion is exact by construction, not a refit:

- residual kept whole, uniform MLP widths, no skip matrices: every norm becomes a stock RMSNorm with
  weight 1 (the folded gains stay in the readers, so the block computes the same products), and
  `intermediate_size` is the kept width;
- a tied head that read through a k x k adapter: the adapter is the final norm's gain when it is
  diagonal (then the embedding stays tied); otherwise the head is untied as E A, and the card says
  how many parameters that adds.

`auto` picks `stock` when it holds the result exactly, else `bundled`. `export` converts any finished
output, refusing with the reason when the result does not fit.
"""

import glob
import json
import math
import os
import shutil

import torch
from safetensors import safe_open

from .arch import spec_named
from .checkpoint import INDEX_NAME, INTEGER_DTYPES, SUPPORTED_DTYPES, parameter_count, read_safetensors_header
from .errors import StreamResizeError
from .writer import (MODELING_FILE, RUN_LOG, ShardWriter, atomic_write_bytes, atomic_write_json,
                     copy_tokenizer_files)

FORMATS = ("auto", "stock", "bundled")
CARD = "README.md"
# Keys of a bundled config that only our modeling file reads.
DISP_PROBLEM = "DISP-LLM index sets (every block reads its own channels) need the bundled modeling code"
SHORTCUT_PROBLEM = "per-point bases carry skip-path matrices, which no stock architecture has"
BUNDLED_KEYS = ("base_model_type", "residual_widths", "intermediate_sizes", "shortcuts", "head_adapter",
                "disp_widths", "auto_map")


def _read_config(in_dir):
    path = os.path.join(in_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StreamResizeError(f"{path}: cannot read the output's config ({e})") from e


def _tensors(in_dir):
    """{tensor name: shard file} of a finished output (its index must exist: completion)."""
    path = os.path.join(in_dir, INDEX_NAME)
    if not os.path.exists(path):
        raise StreamResizeError(f"{in_dir}: not a finished streamresize output (no {INDEX_NAME})")
    with open(path) as f:
        return json.load(f)["weight_map"]


def _load(in_dir, shard):
    with safe_open(os.path.join(in_dir, shard), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def stock_problem(config, in_dir, weight_map):
    """Why this bundled output cannot be written as its source architecture exactly, or None."""
    if config.get("model_type") != "streamresize":
        return f"its model_type is {config.get('model_type')!r}, not a bundled streamresize output"
    if config.get("disp_widths"):
        return DISP_PROBLEM
    if any(any(pair) for pair in config.get("shortcuts") or []):
        return SHORTCUT_PROBLEM
    widths = set(config.get("residual_widths") or [config["hidden_size"]])
    if len(widths) > 1:
        return f"the residual width differs between points ({min(widths)}-{max(widths)})"
    sizes = set(config.get("intermediate_sizes") or [config["intermediate_size"]])
    if len(sizes) > 1:
        return f"the MLP widths differ per block ({min(sizes)}-{max(sizes)}); a stock config has one intermediate_size"
    return None


def _unties_head(in_dir, weight_map):
    """Whether a stock writing would have to untie the head (its adapter is not diagonal)."""
    if "head_adapter.weight" not in weight_map:
        return False
    adapter = _load(in_dir, weight_map["head_adapter.weight"])["head_adapter.weight"]
    return not torch.equal(adapter, torch.diag(adapter.diagonal()))


def _head_tensors(in_dir, config, weight_map, width, gain):
    """Final norm weight and head for a stock output, plus whether the embedding stays tied and a note.
    `gain` is the stock norm weight that makes it divide by the original width (sqrt(d/k))."""
    head_shard = weight_map.get("head_adapter.weight") or weight_map.get("lm_head.weight")
    tensors = _load(in_dir, head_shard)
    if "head_adapter.weight" not in tensors:
        head = tensors["lm_head.weight"]
        return {"model.norm.weight": torch.full((width,), gain, dtype=head.dtype), "lm_head.weight": head}, False, ""
    adapter = tensors["head_adapter.weight"]
    diagonal = adapter.diagonal()
    if torch.equal(adapter, torch.diag(diagonal)):
        return {"model.norm.weight": (diagonal.double() * gain).to(adapter.dtype)}, True, ""
    embedding = _load(in_dir, weight_map["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    head = (embedding.double() @ adapter.double()).to(adapter.dtype)
    note = (f"The head read the tied embedding through a {adapter.shape[0]} x {adapter.shape[1]} adapter that is "
            f"not diagonal; the stock output unties it (lm_head = E A), adding {head.numel()} parameters.")
    return {"model.norm.weight": torch.full((width,), gain, dtype=adapter.dtype), "lm_head.weight": head}, False, note


def write_stock(in_dir, out_dir, config, weight_map):
    """Rewrite the bundled output in `in_dir` as its source architecture into `out_dir`; returns the card note."""
    spec = spec_named(config.get("base_model_type", "llama"))
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    # One shared basis narrows the residual to k: a stock RMSNorm over k with weight sqrt(d/k) and eps
    # eps*d/k divides by exactly what ours divides by (sqrt(sum x^2 / d + eps)).
    width = (config.get("residual_widths") or [hidden])[0]
    gain = math.sqrt(hidden / width)
    embedding = "model.embed_tokens.weight"  # the output's dtype, from its header (no tensor read)
    dtype = SUPPORTED_DTYPES[read_safetensors_header(os.path.join(in_dir, weight_map[embedding]))[embedding]["dtype"]]
    writer = ShardWriter(out_dir, dtype)
    new_map = {}
    for shard in sorted(set(weight_map.values())):
        tensors = {k: v for k, v in _load(in_dir, shard).items() if k not in ("head_adapter.weight", "lm_head.weight")}
        for i in range(layers):
            if any(name.startswith(spec.block.format(i=i)) for name in tensors):
                for role in (spec.attn_norm, spec.mlp_norm):
                    tensors[spec.block_name(i, role) + ".weight"] = torch.full((width,), gain, dtype=dtype)
        if tensors:
            writer.write_shard(shard, tensors)
            new_map.update({name: shard for name in tensors})
    head, tied, note = _head_tensors(in_dir, config, weight_map, width, gain)
    writer.write_shard("model-head.safetensors", head)
    new_map.update({name: "model-head.safetensors" for name in head})
    stock = {k: v for k, v in config.items() if k not in BUNDLED_KEYS}
    stock.update(architectures=[spec.architectures[0]], model_type=spec.name, tie_word_embeddings=tied,
                 intermediate_size=(config.get("intermediate_sizes") or [config["intermediate_size"]])[0])
    if width < hidden:
        heads = config["num_attention_heads"]
        stock.update(hidden_size=width, head_dim=config.get("head_dim") or hidden // heads,
                     rms_norm_eps=config.get("rms_norm_eps", 1e-6) * hidden / width)
        if width % heads and spec.name == "llama":
            # transformers' LlamaConfig refuses a hidden size its head count does not divide, even with
            # head_dim set; Mistral's layout is Llama's, and without a sliding window computes the same.
            stock.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
            note = (note + " " if note else "") + (
                f"Written as MistralForCausalLM (same layout as Llama, no sliding window): the residual width "
                f"{width} is not a multiple of the {heads} heads, which LlamaConfig refuses.")
    return stock, new_map, note


def export(in_dir, out_dir, fmt="auto", link=False, name=None):
    """Write the finished bundled output `in_dir` into `out_dir` as `fmt`; returns the format written.
    With `link`, bundled files are hard-linked where the file system allows (the pipeline's own staging
    copy: no second copy on disk, and the staging copy stays whole until clean-up, so a crash here
    resumes)."""
    if fmt not in FORMATS:
        raise StreamResizeError(f"--save-format {fmt}: choose from {', '.join(FORMATS)}")
    config = _read_config(in_dir)
    weight_map = _tensors(in_dir)
    problem = stock_problem(config, in_dir, weight_map)
    if fmt == "stock" and problem:
        raise StreamResizeError(f"{name or in_dir}: cannot be written as a stock checkpoint: {problem}")
    if fmt == "auto" and problem is None and _unties_head(in_dir, weight_map):
        # Exact, but larger: the tied head would need a vocabulary-sized matrix of its own, which a
        # --target-size budget did not count. Only an explicit --save-format stock does that.
        problem = ("the tied head reads through a non-diagonal adapter, which a stock checkpoint could hold only "
                   "by untying the head (a vocabulary-sized matrix more; --save-format stock does that)")
    chosen = "stock" if fmt == "stock" or (fmt == "auto" and problem is None) else "bundled"
    os.makedirs(out_dir, exist_ok=True)
    for temp in glob.glob(os.path.join(out_dir, "*.tmp")):  # writes a kill interrupted: never part of an output
        os.remove(temp)
    stale = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(stale):
        os.remove(stale)  # the index is written last: never an old one beside new shards
    note = ""
    if chosen == "bundled":
        parameters = parameter_count(in_dir)
        index = None
        for name in sorted(os.listdir(in_dir)):
            src, dst = os.path.join(in_dir, name), os.path.join(out_dir, name)
            if name == INDEX_NAME:
                index = src
            elif os.path.isfile(src):
                _place(src, dst, link)
        out_config = config
    else:
        out_config, new_map, note = write_stock(in_dir, out_dir, config, weight_map)
        atomic_write_json(os.path.join(out_dir, "config.json"), out_config)
        copy_tokenizer_files(in_dir, out_dir)
        for name in (RUN_LOG, "streamresize_eval.json"):
            if os.path.exists(os.path.join(in_dir, name)):
                shutil.copyfile(os.path.join(in_dir, name), os.path.join(out_dir, name))
        index = None
    if chosen == "stock":
        parameters = sum(math.prod(_shape(out_dir, shard, name)) for name, shard in new_map.items())
    write_card(out_dir, out_config, chosen, problem if chosen == "bundled" else None, note, parameters)
    if index is not None:
        _place(index, stale, link)
    else:
        total = sum(os.path.getsize(os.path.join(out_dir, s)) for s in set(new_map.values()))
        atomic_write_json(stale, {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))})
    for leftover in glob.glob(os.path.join(out_dir, MODELING_FILE)) if chosen == "stock" else []:
        os.remove(leftover)
    return chosen


def _place(src, dst, link):
    if os.path.exists(dst):
        os.remove(dst)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(src, dst)


def _shape(out_dir, shard, name):
    return read_safetensors_header(os.path.join(out_dir, shard))[name]["shape"]


def write_card(out_dir, config, fmt, why_bundled, note, parameters):
    """The output's README: what was done, the format, and which tools load it with which flags."""
    record = config.get("streamresize") or {}
    recipe = record.get("recipe") or {}
    lines = ["# A model narrowed by streamresize", "",
             f"- method: `{record.get('method', '?')}`"
             + (f" (MLP: `{record['mlp_method']}`)" if record.get("mlp_method") else ""),
             f"- parameters: {parameters:,}"
             + (f" ({100 * parameters / record['source_parameters']:.1f} % of the source's "
                f"{record['source_parameters']:,}, tied tensors counted once)" if record.get("source_parameters") else ""),
             f"- calibration: {recipe.get('num_calibration_samples', '?')} sequences x "
             f"{recipe.get('max_seq_length', '?')} tokens (token ids sha256 "
             f"`{str(record.get('calibration_ids_sha256', '?'))[:16]}...`)",
             f"- recipe: `{json.dumps({k: v for k, v in recipe.items() if k != 'dataset'}, sort_keys=True)}`",
             f"- format: **{fmt}**", ""]
    if fmt == "stock":
        arch = config["architectures"][0]
        lines += [f"A stock `{arch}` checkpoint (`model_type: {config['model_type']}`, `intermediate_size: "
                  f"{config.get('intermediate_size')}`); no remote code anywhere. Norm gains are folded into the "
                  "linears that read them, so the norm weights are 1 (sqrt(d/k) with rms_norm_eps scaled by d/k "
                  "where one shared basis narrowed the residual from d to k, so each norm still divides by the "
                  "original width), except the final norm of a tied head, which holds its gain.", "",
                  "| tool | how |", "|---|---|",
                  "| transformers | `AutoModelForCausalLM.from_pretrained(DIR)` |",
                  "| vLLM | `vllm serve DIR` |",
                  "| llama.cpp / Ollama | `python convert_hf_to_gguf.py DIR` |",
                  "| TGI | `--model-id DIR` |"]
    else:
        lines += ["The bundled format: `model_type: streamresize` with `modeling_streamresize.py` in this folder.",
                  f"It is bundled because {why_bundled}." if why_bundled else "", "",
                  "| tool | how |", "|---|---|",
                  "| transformers | `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, or "
                  "`streamresize.load(DIR)` in a process with streamresize installed |",
                  "| vLLM, llama.cpp, TGI | cannot load this format |"]
    if note:
        lines += ["", note]
    lines += ["", "Held-out perplexity and zero-shot accuracy: `streamresize eval DIR --dataset TEXT --tasks "
              "wiki-next-sentence` (written to `streamresize_eval.json`)."]
    atomic_write_bytes(os.path.join(out_dir, CARD), ("\n".join(lines) + "\n").encode())


def write_bundled_card(out_dir, config, weight_map):
    """The card of an output the pipeline writes as bundled directly (no export step), before its index."""
    parameters = 0
    for name, shard in weight_map.items():
        info = read_safetensors_header(os.path.join(out_dir, shard))[name]
        parameters += 0 if info["dtype"] in INTEGER_DTYPES else math.prod(info["shape"])
    write_card(out_dir, config, "bundled", stock_problem(config, out_dir, weight_map) or
               "--save-format bundled was asked for", "", parameters)
