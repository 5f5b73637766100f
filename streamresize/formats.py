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

`decilm` holds what stock cannot only because the MLP widths differ per block: the DeciLM / nemotron-nas
layout (`DeciLMForCausalLM`), the stock tensors plus a `block_configs` entry per block whose `ffn_mult`
DeciLM's rule maps back to that block's width (which must then be a multiple of 256); a width-0 MLP is an
`ffn.no_op`. vLLM and llama.cpp's converter have their own DeciLM code; transformers has none, so the
output carries ours (`configuration_decilm.py`, `modeling_decilm.py`, named in `auto_map`).

`auto` picks `stock` when it holds the result exactly, else `decilm` when that does, else `bundled`.
`export` converts any finished output, refusing with the reason when the result does not fit.
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

FORMATS = ("auto", "stock", "decilm", "bundled")
CARD = "README.md"
# Keys of a bundled config that only our modeling file reads.
DISP_PROBLEM = "DISP-LLM index sets (every block reads its own channels) need the bundled modeling code"
SHORTCUT_PROBLEM = "per-point bases carry skip-path matrices, which no stock architecture has"
HEADS_PROBLEM = ("the attention head counts differ per block (head_allocation=global); stock configs and DeciLM hold "
                 "one count of query heads")
BUNDLED_KEYS = ("base_model_type", "residual_widths", "intermediate_sizes", "shortcuts", "head_adapter", "attention_heads",
                "disp_widths", "auto_map", "linear_biases", "fused_linears", "block_norms", "embedding_scale")
# DeciLM: the modeling files every decilm output carries (copied from this package, named in auto_map).
DECILM_FILES = ("configuration_decilm.py", "modeling_decilm.py")
DECILM_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                   "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
DECILM_MULTIPLE = 256
# What each format's output may hold of the modeling files; the others are a different format's leftovers.
MODELING_FILES = {"bundled": (MODELING_FILE,), "decilm": DECILM_FILES, "stock": ()}


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
    if len({tuple(h) for h in config.get("attention_heads") or []}) > 1:
        return HEADS_PROBLEM
    widths = set(config.get("residual_widths") or [config["hidden_size"]])
    if len(widths) > 1:
        return f"the residual width differs between points ({min(widths)}-{max(widths)})"
    sizes = set(config.get("intermediate_sizes") or [config["intermediate_size"]])
    if len(sizes) > 1:
        return f"the MLP widths differ per block ({min(sizes)}-{max(sizes)}); a stock config has one intermediate_size"
    return None


def mlp_widths(config):
    """The MLP width of every block of a bundled config."""
    return config.get("intermediate_sizes") or [config["intermediate_size"]] * config["num_hidden_layers"]


def ffn_mult_to_intermediate_size(ffn_mult, hidden_size):
    """DeciLM's MLP width for `ffn_mult`: int(2 m d / 3) rounded up to a multiple of 256, as vLLM
    (model_executor/models/nemotron_nas.py) and llama.cpp's converter (DeciModel) compute it; the same rule
    as modeling/configuration_decilm.py, which must stay importable without this package."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % DECILM_MULTIPLE == 0 else size + DECILM_MULTIPLE - size % DECILM_MULTIPLE


def ffn_mult_for(width, hidden_size):
    """An ffn_mult that DeciLM's rule maps back to exactly `width` (a positive multiple of 256), or None.
    1.5 w / d rounded to 6 decimals first (what NVIDIA's own block configs hold), checked through the rule,
    since int() truncates float round-off; then unrounded."""
    for mult in (round(1.5 * width / hidden_size, 6), 1.5 * width / hidden_size):
        if ffn_mult_to_intermediate_size(mult, hidden_size) == width:
            return float(mult)
    return None


def decilm_problem(config):
    """Why this bundled output cannot be written as DeciLM exactly, or None."""
    problem = stock_problem(config, None, None)
    if problem and not problem.startswith("the MLP widths differ per block"):
        return problem
    spec = spec_named(config.get("base_model_type", "llama"))
    if "decilm" not in spec.formats:
        return f"a {spec.name} model cannot be written as DeciLM: {spec.formats_why}"
    width = (config.get("residual_widths") or [config["hidden_size"]])[0]
    heads = config["num_attention_heads"]
    if width % heads:  # a narrowed residual, or attention heads removed
        return (f"the residual width {width} is not a multiple of the {heads} heads, which DeciLM's Llama-based "
                "config refuses")
    for block, size in enumerate(mlp_widths(config)):
        if size % DECILM_MULTIPLE:
            return (f"MLP width {size} in block {block} is not a multiple of {DECILM_MULTIPLE}, which DeciLM's "
                    f"ffn_mult encoding requires; compress with --width-multiple {DECILM_MULTIPLE}")
        if size and ffn_mult_for(size, width) is None:
            return f"no ffn_mult maps back to MLP width {size} in block {block} (residual width {width})"
    return None


def _unties_head(in_dir, weight_map):
    """Whether a stock writing would have to untie the head (its adapter is not diagonal)."""
    if "head_adapter.weight" not in weight_map:
        return False
    adapter = _load(in_dir, weight_map["head_adapter.weight"])["head_adapter.weight"]
    return adapter.dim() == 2 and not torch.equal(adapter, torch.diag(adapter.diagonal()))


def _head_tensors(in_dir, config, weight_map, width, gain):
    """Final norm weight and head for a stock output, plus whether the embedding stays tied and a note.
    `gain` is the stock norm weight that makes it divide by the original width (sqrt(d/k))."""
    if config.get("block_norms"):  # norms keep their weights: the final norm and any head as they are
        tensors = _load(in_dir, weight_map["model.norm.weight"])
        return tensors, "lm_head.weight" not in tensors, ""
    head_shard = weight_map.get("head_adapter.weight") or weight_map.get("lm_head.weight")
    tensors = _load(in_dir, head_shard)
    if "head_adapter.weight" not in tensors:
        head = tensors["lm_head.weight"]
        return {"model.norm.weight": torch.full((width,), gain, dtype=head.dtype), "lm_head.weight": head}, False, ""
    adapter = tensors["head_adapter.weight"]
    diagonal = adapter if adapter.dim() == 1 else adapter.diagonal()  # a 1-D adapter is the diagonal itself
    if adapter.dim() == 1 or torch.equal(adapter, torch.diag(diagonal)):
        return {"model.norm.weight": (diagonal.double() * gain).to(adapter.dtype)}, True, ""
    embedding = _load(in_dir, weight_map["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    head = (embedding.double() @ adapter.double()).to(adapter.dtype)
    note = (f"The head read the tied embedding through a {adapter.shape[0]} x {adapter.shape[1]} adapter that is "
            f"not diagonal; the stock output unties it (lm_head = E A), adding {head.numel()} parameters.")
    return {"model.norm.weight": torch.full((width,), gain, dtype=adapter.dtype), "lm_head.weight": head}, False, note


def _write_stock_tensors(in_dir, out_dir, config, weight_map, no_mlp=()):
    """The stock tensors of the bundled output in `in_dir`, written into `out_dir`: its shards with stock
    norm weights added, and the head. Blocks in `no_mlp` lose their MLP (a width-0 one) and its norm.
    Returns (base config, weight map, card note): the base config is the bundled one without our keys,
    with the stock widths and norm constants."""
    spec = spec_named(config.get("base_model_type", "llama"))
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    # One shared basis narrows the residual to k: a stock RMSNorm over k with weight sqrt(d/k) and eps
    # eps*d/k divides by exactly what ours divides by (sqrt(sum x^2 / d + eps)).
    width = (config.get("residual_widths") or [hidden])[0]
    gain = math.sqrt(hidden / width)
    embedding = "model.embed_tokens.weight"  # the output's dtype, from its header (no tensor read)
    dtype = SUPPORTED_DTYPES[read_safetensors_header(os.path.join(in_dir, weight_map[embedding]))[embedding]["dtype"]]
    writer = ShardWriter(out_dir, dtype)
    dropped = tuple(spec.block_name(i, role) + "." for i in no_mlp for role in (*spec.mlp_readers, spec.mlp_writer))
    new_map = {}
    for shard in sorted(set(weight_map.values())):
        tensors = {k: v for k, v in _load(in_dir, shard).items()
                   if k not in ("head_adapter.weight", "lm_head.weight") and not k.startswith(dropped)}
        for i in range(layers):
            if any(name.startswith(spec.block.format(i=i)) for name in tensors):
                # folded norms become weight-1 (or sqrt(d/k)) stock norms; kept ones are in the shard already
                folded = (spec.attn_norm,) + (() if i in no_mlp else (spec.mlp_norm,)) if spec.norms_folded else ()
                for role in folded:
                    tensors[spec.block_name(i, role) + ".weight"] = torch.full((width,), gain, dtype=dtype)
                for fused, parts in spec.fused:  # the family's own layout: parts merged back, in order
                    names = [spec.block_name(i, part) + ".weight" for part in parts]
                    if all(name in tensors for name in names):
                        tensors[spec.block_name(i, fused) + ".weight"] = torch.cat([tensors.pop(n) for n in names])
        if tensors:
            writer.write_shard(shard, tensors)
            new_map.update({name: shard for name in tensors})
    head, tied, note = _head_tensors(in_dir, config, weight_map, width, gain)
    if config.get("block_norms"):
        note = ("Unlike the sentence above, this family's norms are not folded: every norm keeps the source's "
                "weights, and the residual keeps its full width.")
    writer.write_shard("model-head.safetensors", head)
    new_map.update({name: "model-head.safetensors" for name in head})
    stock = {k: v for k, v in config.items() if k not in BUNDLED_KEYS}
    stock.update(architectures=[spec.architectures[0]], model_type=spec.stock_model_type, tie_word_embeddings=tied,
                 intermediate_size=mlp_widths(config)[0])
    if width < hidden:
        stock.update(hidden_size=width, head_dim=config.get("head_dim") or hidden // config["num_attention_heads"],
                     rms_norm_eps=config.get("rms_norm_eps", 1e-6) * hidden / width)
    return stock, new_map, note


def write_stock(in_dir, out_dir, config, weight_map):
    """Rewrite the bundled output in `in_dir` as its source architecture into `out_dir`; returns the
    config, the weight map and the card note."""
    stock, new_map, note = _write_stock_tensors(in_dir, out_dir, config, weight_map)
    width, heads = stock["hidden_size"], config["num_attention_heads"]
    if width % heads and stock["model_type"] == "llama":  # a narrowed residual, or heads removed
        # transformers' LlamaConfig refuses a hidden size its head count does not divide, even with
        # head_dim set; Mistral's layout is Llama's, and without a sliding window computes the same.
        stock.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
        note = (note + " " if note else "") + (
            f"Written as MistralForCausalLM (same layout as Llama, no sliding window): the residual width "
            f"{width} is not a multiple of the {heads} heads, which LlamaConfig refuses.")
    return stock, new_map, note


def write_decilm(in_dir, out_dir, config, weight_map):
    """Rewrite the bundled output in `in_dir` as DeciLM / nemotron-nas into `out_dir` (decilm_problem(config)
    must be None): the stock tensors, a width-0 MLP left out, and per block its `block_configs` entry.
    Returns the config, the weight map and the card note; the modeling files are the caller's."""
    widths = mlp_widths(config)
    out, new_map, note = _write_stock_tensors(in_dir, out_dir, config, weight_map,
                                              no_mlp={i for i, w in enumerate(widths) if w == 0})
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    window = out.pop("sliding_window", None)
    if window is not None and window < config.get("max_position_embeddings", window + 1):
        note = (note + " " if note else "") + (
            f"The source's sliding attention window ({window} tokens) is not written: DeciLM has no field for one "
            "(the bundled output did not apply it either).")
    blocks = [{"attention": {"n_heads_in_group": heads // kv_heads, "no_op": False, "replace_with_linear": False},
               "ffn": ({"ffn_mult": ffn_mult_for(w, out["hidden_size"]), "no_op": False, "replace_with_linear": False}
                       if w else {"ffn_mult": None, "no_op": True, "replace_with_linear": False})}
              for w in widths]
    out.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", auto_map=dict(DECILM_AUTO_MAP),
               block_configs=blocks, num_key_value_heads=kv_heads, intermediate_size=max(widths),
               head_dim=out.get("head_dim") or config["hidden_size"] // heads)
    return out, new_map, note


def export(in_dir, out_dir, fmt="auto", link=False, name=None):
    """Write the finished bundled output `in_dir` into `out_dir` as `fmt`; returns the format written.
    With `link`, bundled files are hard-linked where the file system allows (the pipeline's own staging
    copy: no second copy on disk, and the staging copy stays whole until clean-up, so a crash here
    resumes)."""
    if fmt not in FORMATS:
        raise StreamResizeError(f"--save-format {fmt}: choose from {', '.join(FORMATS)}")
    config = _read_config(in_dir)
    weight_map = _tensors(in_dir)
    if config.get("model_type") != "streamresize":
        # A stock or decilm output is already what export would write; converting back is not built.
        raise StreamResizeError(
            f"{name or in_dir}: a {config.get('model_type')!r} checkpoint, not a bundled streamresize output: "
            "export converts the bundled output compress writes (compress --save-format bundled keeps one); "
            "to change the format of this one, compress again with --save-format")
    problem = stock_problem(config, in_dir, weight_map)
    if fmt == "stock" and problem:
        raise StreamResizeError(f"{name or in_dir}: cannot be written as a stock checkpoint: {problem}")
    deci = decilm_problem(config) if fmt in ("auto", "decilm") else None
    if fmt == "decilm" and deci:
        raise StreamResizeError(f"{name or in_dir}: cannot be written as a DeciLM checkpoint: {deci}")
    chosen = fmt
    if fmt == "auto":
        target = "stock" if problem is None else "DeciLM" if deci is None else None
        if target and _unties_head(in_dir, weight_map):
            # Exact, but larger: the tied head would need a vocabulary-sized matrix of its own, which a
            # --target-size budget did not count. Only an explicit --save-format stock/decilm does that.
            problem = (f"the tied head reads through a non-diagonal adapter, which a {target} checkpoint could hold "
                       f"only by untying the head (a vocabulary-sized matrix more; --save-format {target.lower()} "
                       "does that)")
            target = None
        elif problem and deci and deci != problem:
            problem = f"{problem}, and DeciLM cannot hold them either: {deci}"
        chosen = {"stock": "stock", "DeciLM": "decilm", None: "bundled"}[target]
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
        writer = write_stock if chosen == "stock" else write_decilm
        out_config, new_map, note = writer(in_dir, out_dir, config, weight_map)
        for modeling in MODELING_FILES[chosen]:  # the code auto_map names: before the index, as all else
            with open(os.path.join(os.path.dirname(__file__), "modeling", modeling), "rb") as f:
                atomic_write_bytes(os.path.join(out_dir, modeling), f.read())
        atomic_write_json(os.path.join(out_dir, "config.json"), out_config)
        copy_tokenizer_files(in_dir, out_dir)
        for name in (RUN_LOG, "streamresize_eval.json"):
            if os.path.exists(os.path.join(in_dir, name)):
                shutil.copyfile(os.path.join(in_dir, name), os.path.join(out_dir, name))
        index = None
        parameters = sum(math.prod(_shape(out_dir, shard, name)) for name, shard in new_map.items())
    write_card(out_dir, out_config, chosen, problem if chosen == "bundled" else None, note, parameters)
    for other in set().union(*MODELING_FILES.values()) - set(MODELING_FILES[chosen]):
        if os.path.exists(os.path.join(out_dir, other)):  # another format's code, written here before
            os.remove(os.path.join(out_dir, other))
    if index is not None:
        _place(index, stale, link)
    else:
        total = sum(os.path.getsize(os.path.join(out_dir, s)) for s in set(new_map.values()))
        atomic_write_json(stale, {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))})
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
    elif fmt == "decilm":
        lines += _decilm_card(config)
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


def _decilm_card(config):
    blocks = config["block_configs"]
    widths = [0 if b["ffn"]["no_op"] else ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], config["hidden_size"])
              for b in blocks]
    listed = ", ".join(f"{i}: {w} (`ffn_mult` {b['ffn']['ffn_mult']})" if w else f"{i}: none (`ffn.no_op`)"
                       for i, (w, b) in enumerate(zip(widths, blocks)))
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    if config["hidden_size"] == heads * head_dim:
        gguf = "`python convert_hf_to_gguf.py DIR` (arch `deci`: per-layer `feed_forward_length`)"
    else:
        gguf = (f"cannot: its DeciLM converter takes the head size as hidden_size / num_attention_heads "
                f"({config['hidden_size']} / {heads}), and this model's heads are {head_dim} wide")
    return ["A DeciLM / nemotron-nas checkpoint (`DeciLMForCausalLM`, `model_type: nemotron-nas`): a Llama whose "
            "`block_configs` give each block its own MLP width, which one stock `intermediate_size` cannot. "
            "A block's width is int(2 x `ffn_mult` x hidden_size / 3) rounded up to a multiple of 256, the rule "
            "vLLM and llama.cpp apply; a block without an MLP is an `ffn.no_op` (no MLP weights, no norm before "
            "it). Norm gains are folded into the linears that read them, as in the stock format (weights 1, or "
            "sqrt(d/k) with rms_norm_eps scaled by d/k where one shared basis narrowed the residual from d to k), "
            "except the final norm of a tied head, which holds its gain.", "",
            f"MLP width per block: {listed}.", "",
            "| tool | how |", "|---|---|",
            "| transformers | `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`: transformers has "
            "no DeciLM class; the code is in this folder (`configuration_decilm.py`, `modeling_decilm.py`, torch "
            "and transformers only) |",
            "| vLLM | `vllm serve DIR --trust-remote-code`: vLLM's own DeciLM modeling; the flag lets it build the "
            "config class |",
            f"| llama.cpp / Ollama | {gguf} |",
            "| TGI | cannot load this format (no DeciLM support) |"]


def write_bundled_card(out_dir, config, weight_map):
    """The card of an output the pipeline writes as bundled directly (no export step), before its index."""
    parameters = 0
    for name, shard in weight_map.items():
        info = read_safetensors_header(os.path.join(out_dir, shard))[name]
        parameters += 0 if info["dtype"] in INTEGER_DTYPES else math.prod(info["shape"])
    write_card(out_dir, config, "bundled", stock_problem(config, out_dir, weight_map) or
               "--save-format bundled was asked for", "", parameters)
