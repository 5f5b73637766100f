"""A tiny random Llama (GQA, several shards) and English-like text, built offline for the tests."""

import os
import random

import torch

WORDS = ("the a of and to in is was for on that with as by at from his her it an were are which this be "
         "river city music film war king church school team game state party island language station "
         "born known called played built founded became located released named served won held used "
         "first second new old large small north south early late major national local public").split()


def make_text(path, documents, seed):
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))]
        paragraphs.append(" ".join(sentences))
    with open(path, "w") as f:
        f.write("\n\n".join(paragraphs) + "\n")
    return path


def make_tokenizer(texts_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(texts_path) as f:
        tok.train_from_iterator(f.read().split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# family (arch.FAMILIES) -> transformers config and model classes of its tiny test models
TINY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                "phi3": ("Phi3Config", "Phi3ForCausalLM")}


def make_tiny_llama(path, tokenizer, dtype=torch.float32, seed=0, tie=False, layers=4, shards=3,
                    architecture="llama", **overrides):
    """A tiny random model of family `architecture` (TINY_CLASSES), saved in several shards; `overrides`
    replace config fields (vocab_size, rope_parameters, ...). Every 1-d tensor (norm gains, biases, q/k
    norms) is 1 + 0.3 N(0, 1), so folding and carrying them is exercised."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in TINY_CLASSES[architecture])
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                  pad_token_id=None, rms_norm_eps=1e-5)
    config = config_cls(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: not all ones, so folding is exercised
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:  # larger than the default init so that signals are not negligible
                p.normal_(0, 0.15)
    model = model.to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(total // shards + 1, 1024))
    tokenizer.save_pretrained(path)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= min(shards, 3)
    return path
