"""`streamresize eval`: perplexity against transformers' own loss, zero-shot scoring on a model whose
logits are constructed, task files, speed and memory plumbing."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import cli

from streamresize.errors import StreamResizeError
from streamresize.evaluate import save_result
from streamresize.speed import PeakMemory
from streamresize.zeroshot import evaluate_task, read_task, shipped_tasks, task_path


def _last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- perplexity ---------------------------------------------------------------------------------

def _transformers_perplexity(model_dir, text_path, seq, stride, count):
    """Perplexity from transformers' own loss: each window's labels mask what an earlier window scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(text_path) as f:
        documents = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total_nll, total_tokens = 0.0, 0
    for w in range(count):
        ids = torch.tensor([stream[w * stride:w * stride + seq]])
        labels = ids.clone()
        if w > 0:
            labels[:, :seq - stride] = -100  # tokens the previous window already predicted
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(ids, labels=labels).loss  # mean over the scored next-token predictions
        total_nll += float(loss) * scored
        total_tokens += scored
    return math.exp(total_nll / total_tokens), total_tokens


@pytest.mark.parametrize("stride", [None, 8, 20])
def test_perplexity_equals_transformers_on_the_same_windows(tiny_model, texts, stride):
    seq, count = 32, 5
    args = ["eval", tiny_model, "--dataset", texts["heldout"], "--max-seq-length", seq, "--num-samples", count]
    result = _last_json(cli(*args, *(["--stride", stride] if stride else [])))
    expected, tokens = _transformers_perplexity(tiny_model, texts["heldout"], seq, stride or seq, count)
    assert result["windows"] == count and result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_stride_out_of_range_is_an_error(tiny_model, texts):
    r = cli("eval", tiny_model, "--dataset", texts["heldout"], "--max-seq-length", 32, "--stride", 40, check=False)
    assert r.returncode == 2 and "--stride 40" in r.stderr


# ---- zero-shot on a model whose logits are constructed ----------------------------------------------

WORDS = [f"w{i}" for i in range(20)] + ["x", "supercalifragilistic"]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _bigram_llama(table):
    """A stock LlamaForCausalLM whose logits at each position are table[current token]: one-hot
    embeddings, blocks that add nothing (zero output projections), the norm's scale undone, and the
    table as the head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = table.shape[0]
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=vocab, rms_norm_eps=0.0,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(vocab ** -0.5)  # RMSNorm of a one-hot vector is sqrt(vocab) times it
        model.lm_head.weight.copy_(torch.as_tensor(table, dtype=torch.float32).T)
    return model


def _write_task(path, items):
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return str(path)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _by_hand(tokenizer, table, items):
    """acc and acc_norm from the table: log-softmax of the previous word's row, summed over the choice."""
    logprobs = table - np.log(np.exp(table).sum(1, keepdims=True))
    acc, acc_norm = [], []
    for item in items:
        lls = []
        for choice in item["choices"]:
            words = _ids(tokenizer, item["context"]) + _ids(tokenizer, choice)
            start = len(_ids(tokenizer, item["context"]))
            lls.append(sum(logprobs[words[t - 1], words[t]] for t in range(start, len(words))))
        lls = np.asarray(lls)
        acc.append(np.argmax(lls) == item["label"])
        acc_norm.append(np.argmax(lls / np.asarray([len(c) for c in item["choices"]])) == item["label"])
    return float(np.mean(acc)), float(np.mean(acc_norm))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_accuracy_matches_the_constructed_logits(tmp_path, seed):
    rng = random.Random(seed)
    tokenizer = _word_tokenizer()
    table = np.random.default_rng(seed).normal(0, 2, (len(tokenizer), len(tokenizer)))
    items = []
    for _ in range(40):
        n = rng.randint(2, 5)
        items.append({"context": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
                      "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(n)],
                      "label": rng.randrange(n)})
    result = evaluate_task(_bigram_llama(table), tokenizer, _write_task(tmp_path / "t.jsonl", items), batch_size=3)
    assert (result["acc"], result["acc_norm"]) == pytest.approx(_by_hand(tokenizer, table, items))
    assert result["items"] == 40


def test_loglikelihoods_equal_the_sum_over_the_constructed_logits():
    """Each request's score is its continuation's summed log-probability, whatever the other requests in
    its batch (the head runs only on the batch's scored positions: logits_to_keep)."""
    from streamresize.zeroshot import loglikelihoods

    rng = np.random.default_rng(5)
    table = rng.normal(0, 2, (12, 12))
    logprobs = table - np.log(np.exp(table).sum(1, keepdims=True))
    requests = [(rng.integers(0, 12, int(rng.integers(1, 9))).tolist(), rng.integers(0, 12, int(rng.integers(1, 6))).tolist())
                for _ in range(23)]
    want = [sum(logprobs[([*c, *t])[len(c) + k - 1], t[k]] for k in range(len(t))) for c, t in requests]
    for batch_size in (1, 4, 23):
        got = loglikelihoods(_bigram_llama(table), requests, max_length=64, batch_size=batch_size)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_zero_shot_known_answers(tmp_path):
    """A chain model (w_i is followed by w_i+1) always picks the chain; under flat logits acc picks the
    fewest tokens and acc_norm the most characters per token, as lm-eval's length normalization does."""
    tokenizer = _word_tokenizer()
    index = {w: tokenizer.convert_tokens_to_ids(w) for w in WORDS}
    chain = np.zeros((len(tokenizer), len(tokenizer)))
    for i in range(19):
        chain[index[f"w{i}"], index[f"w{i + 1}"]] = 10.0
    items = [{"context": "w1 w2 w3", "choices": ["w7 w1", "w4 w5", "x"], "label": 1},
             {"context": "w9", "choices": ["w10 w11 w12", "w3", "w0 w0", "x"], "label": 0}]
    model = _bigram_llama(chain)
    result = evaluate_task(model, tokenizer, _write_task(tmp_path / "chain.jsonl", items))
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0

    flat = _bigram_llama(np.zeros((len(tokenizer), len(tokenizer))))
    items = [{"context": "w1", "choices": ["x", "supercalifragilistic w2", "w3 w4"], "label": 1}]
    result = evaluate_task(flat, tokenizer, _write_task(tmp_path / "flat.jsonl", items))
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_eval_tasks_from_the_command_line(tiny_model, tmp_path):
    """The CLI path: a task file and the shipped task, the table, and the JSON result file."""
    items = [{"context": "The river", "choices": ["was built.", "of the city and the king.", "is"], "label": 0}] * 3
    path = _write_task(tmp_path / "mine.jsonl", items)
    output = tmp_path / "result.json"
    r = cli("eval", tiny_model, "--tasks", path, "wiki-next-sentence", "--limit", 4, "--max-seq-length", 128,
            "--output", output)
    result = _last_json(r)
    assert set(result["zeroshot"]) == {"mine", "wiki-next-sentence"}
    assert result["zeroshot"]["mine"]["items"] == 3 and result["zeroshot"]["wiki-next-sentence"]["items"] == 4
    assert result["zeroshot"]["mine"]["acc"] in (0.0, 1.0)  # three copies of one item
    assert "zero-shot" in r.stdout
    assert json.loads(output.read_text())["zeroshot"] == result["zeroshot"]


@pytest.mark.parametrize("record, message", [
    ("not json", "not valid JSON"),
    ('{"choices": ["a", "b"], "label": 0}', "'context'"),
    ('{"context": "c", "choices": ["a"], "label": 0}', "at least two"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "'label'"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', "'label'"),
])
def test_bad_task_file_names_the_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "label": 1}\n' + record + "\n")
    with pytest.raises(StreamResizeError, match=message) as e:
        read_task(str(path))
    assert f"{path}:2" in str(e.value)


def test_bad_task_exits_2(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "label": 5}\n')
    r = cli("eval", tiny_model, "--tasks", path, check=False)
    assert r.returncode == 2 and f"{path}:1" in r.stderr


def test_shipped_task_is_well_formed():
    assert "wiki-next-sentence" in shipped_tasks()
    items = read_task(task_path("wiki-next-sentence"))
    assert len(items) >= 200 and all(len(i["choices"]) == 4 for i in items)
    labels = [i["label"] for i in items]
    assert set(labels) == {0, 1, 2, 3}  # the answer's position carries no hint
    assert max(labels.count(k) for k in range(4)) < 0.4 * len(items)


def test_lm_eval_missing_is_a_clear_error(tiny_model):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm_eval is installed")
    except ImportError:
        pass
    r = cli("eval", tiny_model, "--lm-eval", "hellaswag", check=False)
    assert r.returncode == 2 and "lm_eval" in r.stderr


# ---- speed and memory -----------------------------------------------------------------------------

def test_peak_memory_sees_an_allocation():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak RSS reset needs Linux")
    with PeakMemory("cpu") as small:
        torch.ones(1000).sum()
    with PeakMemory("cpu") as large:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert large.peak_mb > 60 and small.peak_mb < 30


def test_speed_against_the_recorded_source(tiny_model, tmp_path, pca_quarter):
    """Not a timing test: the output names its source, both are measured, ratios are relative to it."""
    out = tmp_path / "out"
    shutil.copytree(pca_quarter.out, out)  # a finished `compress --sparsity 0.25`; eval writes into it
    r = cli("eval", out, "--speed", "--prompt-length", 8, "--new-tokens", 4, "--repeats", 2, "--device", "cpu")
    speed = _last_json(r)["speed"]
    assert speed["source"] == os.path.abspath(tiny_model)
    model, source = speed["models"]["model"], speed["models"]["source"]
    assert source["prefill_ratio"] == 1.0 and source["decode_ratio"] == 1.0
    assert model["prefill_ratio"] == pytest.approx(model["prefill_tokens_per_s"] / source["prefill_tokens_per_s"])
    assert model["weights_mb"] < source["weights_mb"]
    assert all(v["decode_tokens_per_s"] > 0 for v in (model, source))
    # The default result file sits in the output, where `report` finds it.
    assert json.loads((out / "streamresize_eval.json").read_text())["speed"]["models"].keys() == {"model", "source"}


def test_missing_baseline_is_an_error_before_any_work(tiny_model, tmp_path):
    r = cli("eval", tiny_model, "--speed", "--baseline", tmp_path / "nowhere", check=False)
    assert r.returncode == 2 and str(tmp_path / "nowhere") in r.stderr and "--baseline" in r.stderr


def test_results_of_the_same_checkpoint_are_merged(tmp_path):
    path = str(tmp_path / "e.json")
    save_result({"config_sha256": "a", "perplexity": 10.0}, path)
    assert save_result({"config_sha256": "a", "speed": {}}, path) == {"config_sha256": "a", "perplexity": 10.0,
                                                                       "speed": {}}
    assert save_result({"config_sha256": "b", "speed": {}}, path) == {"config_sha256": "b", "speed": {}}


def _task_builder():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_zeroshot_task.py")
    spec = importlib.util.spec_from_file_location("make_zeroshot_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_builder_picks_the_true_next_sentence(texts, tmp_path):
    builder = _task_builder()
    articles = builder.read_articles(texts["heldout"])
    sentences = [builder.split_sentences(a) for a in articles]
    first = builder.write_task(texts["heldout"], str(tmp_path / "a.jsonl"), items=20, seed=3)
    again = builder.write_task(texts["heldout"], str(tmp_path / "b.jsonl"), items=20, seed=3)
    assert open(first).read() == open(again).read()  # deterministic for a seed
    other = builder.write_task(texts["heldout"], str(tmp_path / "c.jsonl"), items=20, seed=4)
    assert open(first).read() != open(other).read()
    for item in read_task(first):
        article = next(s for s in sentences if s[0] == item["context"])
        answer = item["choices"][item["label"]]
        assert answer == article[1]
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert choice not in article  # distractors come from other articles
                assert abs(len(choice) - len(answer)) <= 0.25 * len(answer)


def test_sentence_split_keeps_initials_and_abbreviations():
    builder = _task_builder()
    text = "John F. Kennedy was born in Brookline. He moved to Washington, D.C. later. Dr. Smith came."
    assert builder.split_sentences(text) == ["John F. Kennedy was born in Brookline.",
                                             "He moved to Washington, D.C. later.", "Dr. Smith came."]
