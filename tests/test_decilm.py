"""The decilm output format: per-block MLP widths written as DeciLM / nemotron-nas (`DeciLMForCausalLM`,
`block_configs` with `ffn_mult`), loaded by plain transformers with the shipped modeling code where
streamresize cannot be imported, matching the bundled output.

No method yields per-block MLP widths yet, so the fixtures make them: a tiny Llama / Mistral whose MLP is
768 wide, compressed as bundled (prune, nothing removed), then narrowed per block by dropping MLP neurons
(rows of gate/up, columns of down) and recording the widths in `intermediate_sizes`: a legitimate
bundled output, as a method that chose those widths would have written it."""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
from helpers import BLOCK_STREAMRESIZE, CALIB, cli, run_script
from safetensors import safe_open
from safetensors.torch import save_file

import streamresize
from streamresize import cli as cli_module
from streamresize import formats
from streamresize.checkpoint import INDEX_NAME
from streamresize.errors import StreamResizeError

HIDDEN, FFN = 64, 768


def ffn_mult_to_intermediate_size(ffn_mult, n_embd):
    """DeciLM's width rule, written out as the engines compute it: vLLM
    vllm/model_executor/models/nemotron_nas.py (`_ffn_mult_to_intermediate_size`, `_find_multiple`) and
    llama.cpp's converter (`DeciModel._ffn_mult_to_intermediate_size` / `_find_multiple`, in
    convert_hf_to_gguf.py, now conversion/deci.py): int(2 * ffn_mult * n_embd / 3), then rounded UP to
    the next multiple of 256."""
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    if intermediate_size % 256 == 0:
        return intermediate_size
    return intermediate_size + 256 - (intermediate_size % 256)


def make_source(path, tokenizer, architecture="llama", tie=False, seed=0, layers=3, shards=3):
    """A tiny random checkpoint as tests/tiny.py makes them, with an MLP 768 wide (a multiple of 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[architecture]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                        pad_token_id=None, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # norms not all ones, so the folding is exercised
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=total // shards + 1)
    tokenizer.save_pretrained(path)
    return path


def narrow_mlps(bundled, out, widths, seed=0):
    """Copy the bundled output `bundled` to `out`, keeping widths[i] of block i's MLP neurons (a random
    subset, in order): rows of gate_proj / up_proj, columns of down_proj; `intermediate_sizes` updated."""
    shutil.copytree(bundled, out)
    index = json.load(open(out / INDEX_NAME))
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        for name in list(tensors):
            if ".mlp." not in name:
                continue
            block = int(name.split(".")[2])
            order = torch.randperm(FFN, generator=torch.Generator().manual_seed(seed + block))
            keep = order[:widths[block]].sort().values
            tensors[name] = (tensors[name][:, keep] if "down_proj" in name else tensors[name][keep]).contiguous()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    index["metadata"]["total_size"] = sum(os.path.getsize(out / s) for s in set(index["weight_map"].values()))
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = json.load(open(out / "config.json"))
    config["intermediate_sizes"] = list(widths)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@pytest.fixture(scope="module")
def bundled_outputs(tmp_path_factory, tokenizer, texts):
    """{(family, tied): bundled output with every MLP 768 wide}."""
    root = tmp_path_factory.mktemp("decilm")
    outputs = {}
    for family, tied in (("llama", False), ("llama", True), ("mistral", False)):
        source = make_source(str(root / f"src-{family}-{tied}"), tokenizer, family, tie=tied, seed=3 + tied)
        out = root / f"bundled-{family}-{tied}"
        streamresize.compress(source, str(out), method="prune", sparsity=0.0, mlp_sparsity=0.0, save_format="bundled",
                              dataset=[texts["calib"]], **CALIB)
        outputs[family, tied] = out
    # the residual narrowed 64 -> 48 by one shared basis, the MLPs kept whole: stock norms sqrt(64/48)
    source = make_source(str(root / "src-shared"), tokenizer, seed=5)
    out = root / "bundled-shared"
    streamresize.compress(source, str(out), method="pca", sparsity=0.25, basis="shared", head="untied",
                          mlp_sparsity=0.0, save_format="bundled", dataset=[texts["calib"]], **CALIB)
    outputs["shared", False] = out
    return outputs


PLAIN_LOAD = BLOCK_STREAMRESIZE + textwrap.dedent('''
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    model_dir, ids_path, out_dir = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(ids_path))
    with torch.no_grad():
        np.save(out_dir + "/logits.npy", model(ids).logits.numpy())
        # the KV cache: the prefix once, then the last token alone, against the whole sequence at once
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True)
        np.save(out_dir + "/step.npy", step.logits[:, -1].numpy())
        prompt = ids[:1, :6]
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        np.save(out_dir + "/generated.npy", np.stack([cached.numpy(), uncached.numpy()]))
    print(type(model).__module__, type(model).__name__)
''')


def plain_load(model_dir, ids, tmp_path):
    """Logits, cached last-step logits and (cached, uncached) greedy generations from plain transformers
    with trust_remote_code, in a process where streamresize cannot be imported."""
    work = tmp_path / "plain"
    work.mkdir(exist_ok=True)
    np.save(work / "ids.npy", ids.numpy())
    (work / "plain_load.py").write_text(PLAIN_LOAD)
    r = run_script(work / "plain_load.py", model_dir, work / "ids.npy", work)
    return ({name: torch.from_numpy(np.load(work / f"{name}.npy")) for name in ("logits", "step", "generated")},
            r.stdout.strip().splitlines()[-1])


def bundled_logits(model_dir, ids):
    with torch.no_grad():
        return streamresize.load(str(model_dir))(ids).logits


IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family, tied, widths", [("llama", False, (768, 512, 256)), ("llama", True, (256, 768, 512)),
                                                  ("mistral", False, (512, 256, 768)), ("llama", False, (512, 0, 256)),
                                                  ("shared", False, (256, 512, 768))],
                         ids=["llama", "llama-tied", "mistral", "no-op-mlp", "shared-basis"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the bundled model's width-0 MLP
def test_decilm_loads_with_plain_transformers_and_matches_bundled(bundled_outputs, tmp_path, family, tied, widths):
    bundled = narrow_mlps(bundled_outputs[family, tied], tmp_path / "bundled", widths)
    assert formats.export(str(bundled), str(tmp_path / "decilm"), "decilm") == "decilm"
    out = tmp_path / "decilm"
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                                  "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert config["tie_word_embeddings"] == tied and config["num_key_value_heads"] == 2
    assert not set(config) & set(formats.BUNDLED_KEYS) - {"auto_map"}
    assert {"configuration_decilm.py", "modeling_decilm.py"} <= set(os.listdir(out))
    assert "modeling_streamresize.py" not in os.listdir(out)
    weight_map = json.load(open(out / INDEX_NAME))["weight_map"]
    for i, width in enumerate(widths):  # a width-0 MLP: no MLP weights and no norm before it
        assert (f"model.layers.{i}.mlp.down_proj.weight" in weight_map) == (width > 0)
        assert (f"model.layers.{i}.post_attention_layernorm.weight" in weight_map) == (width > 0)
        assert config["block_configs"][i]["ffn"]["no_op"] == (width == 0)
    assert ("lm_head.weight" in weight_map) != tied
    if family == "shared":  # residual 48 wide: explicit head_dim, eps x 64/48, ffn_mult against 48
        assert config["hidden_size"] == 48 and config["head_dim"] == 16
        assert config["rms_norm_eps"] == pytest.approx(1e-5 * 64 / 48)
        assert [b["ffn"]["ffn_mult"] for b in config["block_configs"]] == [8.0, 16.0, 24.0]
        assert "llama.cpp / Ollama | cannot: its DeciLM converter takes the head size as hidden_size / " \
               "num_attention_heads (48 / 4)" in open(out / "README.md").read()

    result, name = plain_load(out, IDS, tmp_path)
    assert name.endswith("modeling_decilm DeciLMForCausalLM"), name  # the shipped code, not streamresize's
    reference = bundled_logits(bundled, IDS)
    assert (result["logits"] - reference).abs().max().item() < 1e-4
    assert (result["step"] - reference[:, -1]).abs().max().item() < 1e-4
    cached, uncached = result["generated"]
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)


def test_ffn_mult_reproduces_every_width(bundled_outputs, tmp_path):
    widths = (768, 256, 512)
    bundled = narrow_mlps(bundled_outputs["llama", False], tmp_path / "bundled", widths)
    formats.export(str(bundled), str(tmp_path / "decilm"), "decilm")
    config = json.load(open(tmp_path / "decilm" / "config.json"))
    for block, width in zip(config["block_configs"], widths):
        # llama.cpp's converter asserts a float ffn_mult and an int n_heads_in_group
        assert isinstance(block["ffn"]["ffn_mult"], float) and block["attention"]["n_heads_in_group"] == 2
        assert ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"], config["hidden_size"]) == width
        assert block["attention"]["no_op"] is False and block["ffn"]["replace_with_linear"] is False
    assert config["intermediate_size"] == max(widths)
    # The chosen ffn_mult survives float round-off for realistic sizes too (int() truncates: a product a
    # hair under w would still round up to w, one a hair over it would not)
    for hidden in (64, 960, 2048, 3072, 4096, 5120, 6144, 8192, 12288, 16384, 2304, 1000, 46 * 16):
        for width in range(256, 4 * hidden + 1, 256):
            mult = formats.ffn_mult_for(width, hidden)
            assert mult is not None and ffn_mult_to_intermediate_size(mult, hidden) == width, (hidden, width)


def test_a_width_not_a_multiple_of_256_is_refused_and_leaves_nothing(bundled_outputs, tmp_path):
    bundled = narrow_mlps(bundled_outputs["llama", False], tmp_path / "bundled", (768, 512, 300))
    message = ("MLP width 300 in block 2 is not a multiple of 256, which DeciLM's ffn_mult encoding requires; "
               "compress with --width-multiple 256")
    with pytest.raises(StreamResizeError, match=f"cannot be written as a DeciLM checkpoint: {message}"):
        formats.export(str(bundled), str(tmp_path / "direct"), "decilm")
    assert not (tmp_path / "direct").exists()
    r = cli("export", bundled, tmp_path / "refused", "--format", "decilm", check=False)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "refused").exists()
    (tmp_path / "empty").mkdir()
    assert cli("export", bundled, tmp_path / "empty", "--format", "decilm", check=False).returncode == 2
    assert os.listdir(tmp_path / "empty") == []


def test_decilm_refused_for_what_only_bundled_holds(tiny_model, texts, tmp_path):
    """Per-point bases (skip matrices) and DISP index sets: the stock format's reasons."""
    pca = tmp_path / "pca"
    streamresize.compress(tiny_model, str(pca), method="pca", sparsity=0.25, save_format="bundled",
                          dataset=[texts["calib"]], **CALIB)
    with pytest.raises(StreamResizeError, match="DeciLM checkpoint: per-point bases carry skip-path matrices"):
        formats.export(str(pca), str(tmp_path / "out"), "decilm")
    config = json.load(open(pca / "config.json"))
    assert formats.decilm_problem({**config, "disp_widths": [[1] * 5]}) == formats.DISP_PROBLEM


def test_auto_picks_decilm_stock_or_bundled(bundled_outputs, tmp_path):
    per_block = narrow_mlps(bundled_outputs["llama", False], tmp_path / "per-block", (768, 256, 512))
    uniform = narrow_mlps(bundled_outputs["llama", False], tmp_path / "uniform", (512, 512, 512))
    odd = narrow_mlps(bundled_outputs["llama", False], tmp_path / "odd", (768, 256, 520))
    assert formats.export(str(per_block), str(tmp_path / "a"), "auto") == "decilm"
    assert formats.export(str(uniform), str(tmp_path / "b"), "auto") == "stock"
    assert json.load(open(tmp_path / "b" / "config.json"))["model_type"] == "llama"
    assert formats.export(str(odd), str(tmp_path / "c"), "auto") == "bundled"
    card = open(tmp_path / "c" / "README.md").read()
    assert "the MLP widths differ per block" in card and "MLP width 520 in block 2 is not a multiple of 256" in card
    # an explicit decilm holds uniform widths too (multiples of 256)
    assert formats.export(str(uniform), str(tmp_path / "d"), "decilm") == "decilm"


def test_export_round_trip_card_and_format_switch(bundled_outputs, tmp_path):
    widths = (768, 0, 256)
    bundled = narrow_mlps(bundled_outputs["llama", True], tmp_path / "bundled", widths)
    before = {name: open(bundled / name, "rb").read() for name in os.listdir(bundled)}
    out = tmp_path / "decilm"
    r = cli("export", bundled, out, "--format", "decilm")
    assert r.returncode == 0 and "as decilm" in r.stderr
    assert {name: open(bundled / name, "rb").read() for name in os.listdir(bundled)} == before  # only read
    card = open(out / "README.md").read()
    assert "format: **decilm**" in card and "DeciLMForCausalLM" in card
    assert "from_pretrained(DIR, trust_remote_code=True)" in card
    assert "vllm serve DIR --trust-remote-code" in card
    assert "convert_hf_to_gguf.py DIR` (arch `deci`" in card and "| TGI | cannot" in card
    assert "MLP width per block: 0: 768 (`ffn_mult` 18.0), 1: none (`ffn.no_op`), 2: 256 (`ffn_mult` 6.0)." in card
    for name in ("configuration_decilm.py", "modeling_decilm.py"):  # shipped verbatim
        assert open(out / name).read() == open(os.path.join(os.path.dirname(formats.__file__), "modeling", name)).read()
    assert cli("export", out, tmp_path / "again", "--format", "decilm", check=False).returncode == 2  # not bundled
    assert not (tmp_path / "again").exists()
    # another format written into the same directory takes the other format's code with it
    formats.export(str(bundled), str(out), "bundled")
    assert "modeling_streamresize.py" in os.listdir(out) and "modeling_decilm.py" not in os.listdir(out)
    assert not {"configuration_decilm.py", "modeling_decilm.py"} & set(os.listdir(out))
    formats.export(str(bundled), str(out), "decilm")
    assert "modeling_streamresize.py" not in os.listdir(out) and "modeling_decilm.py" in os.listdir(out)
    uniform = narrow_mlps(bundled_outputs["llama", False], tmp_path / "uniform", (512, 512, 512))
    formats.export(str(uniform), str(out), "stock")
    assert not {"configuration_decilm.py", "modeling_decilm.py", "modeling_streamresize.py"} & set(os.listdir(out))


def test_compress_save_format_decilm(tokenizer, texts, tmp_path):
    """--save-format decilm on a compression: written as decilm when it fits, refused with the reason (and
    nothing marked complete) when it does not."""
    source = make_source(str(tmp_path / "src"), tokenizer, layers=2, shards=2)
    options = dict(method="prune", sparsity=0.0, dataset=[texts["calib"]], **CALIB)
    summary = streamresize.compress(source, str(tmp_path / "fits"), mlp_sparsity=0.25, width_multiple=256,
                                    save_format="decilm", **options)
    assert summary["format"] == "decilm"
    assert json.load(open(tmp_path / "fits" / "config.json"))["block_configs"][0]["ffn"]["ffn_mult"] == 12.0
    # --width-multiple auto rounds MLP widths to 256 under decilm (768 x 0.7 = 537 -> 512) ...
    auto = streamresize.compress(source, str(tmp_path / "auto"), mlp_sparsity=0.3, save_format="decilm", **options)
    assert auto["format"] == "decilm"
    assert json.load(open(tmp_path / "auto" / "config.json"))["block_configs"][0]["ffn"]["ffn_mult"] == 12.0
    # ... and a multiple DeciLM cannot express is refused before any work.
    with pytest.raises(StreamResizeError, match="--width-multiple 8 with --save-format decilm"):
        streamresize.compress(source, str(tmp_path / "refused"), mlp_sparsity=0.3, width_multiple=8,
                              save_format="decilm", **options)
    assert not (tmp_path / "refused" / INDEX_NAME).exists()


def test_cli_lists_every_format():
    assert cli_module.FORMAT_CHOICES == formats.FORMATS and "decilm" in formats.FORMATS


def test_shipped_modeling_reads_per_layer_kv_heads_and_skips_no_op_sublayers():
    """What other DeciLM checkpoints hold and ours do not write: a no-op attention (no KV cache slot) and
    per-layer n_heads_in_group; the cache still serves generate() exactly."""
    from streamresize.modeling.configuration_decilm import DeciLMConfig
    from streamresize.modeling.modeling_decilm import DeciLMForCausalLM

    blocks = [{"attention": {"n_heads_in_group": None, "no_op": True}, "ffn": {"ffn_mult": 6.0, "no_op": False}},
              {"attention": {"n_heads_in_group": 4, "no_op": False}, "ffn": {"ffn_mult": None, "no_op": True}},
              {"attention": {"n_heads_in_group": 1, "no_op": False}, "ffn": {"ffn_mult": 12.0, "no_op": False}}]
    config = DeciLMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=512, num_hidden_layers=3, vocab_size=100, block_configs=blocks,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert config.block_configs[1].ffn.no_op and not hasattr(config.block_configs[0].ffn, "intermediate_size")
    torch.manual_seed(0)
    model = DeciLMForCausalLM(config).eval()
    layers = model.model.layers
    assert layers[0].self_attn is None and layers[0].input_layernorm is None and layers[0].mlp.up_proj.out_features == 256
    assert layers[1].mlp is None and layers[1].post_attention_layernorm is None
    assert [layers[i].self_attn.k_proj.out_features for i in (1, 2)] == [16, 64]
    assert [layers[i].self_attn.layer_idx for i in (1, 2)] == [0, 1]  # cache slots of attention layers only
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_streamresize_eval_loads_a_decilm_output_like_its_bundled_source(bundled_outputs, texts, tmp_path):
    """`streamresize eval` on a decilm output: this package's DeciLM classes, no remote code, and the
    same perplexity as the bundled output it was written from."""
    per_block = narrow_mlps(bundled_outputs["llama", False], tmp_path / "per-block", (768, 256, 512))
    formats.export(str(per_block), str(tmp_path / "decilm"), "decilm")
    results = []
    for out in (per_block, tmp_path / "decilm"):
        r = cli("eval", out, "--dataset", texts["heldout"], "--max-seq-length", 32, "--num-samples", 4)
        results.append(json.loads(r.stdout.strip().splitlines()[-1])["perplexity"])
    assert results[1] == pytest.approx(results[0], rel=1e-4)
