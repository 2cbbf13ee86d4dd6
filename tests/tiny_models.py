"""Tiny random-weight models for every supported architecture, built from configs (no network)."""

from __future__ import annotations

import functools

import torch
import transformers as T

VOCAB = 96
ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "bert"]


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_layer=3, n_embd=32, n_head=4, n_inner=48, n_positions=64,
                            bos_token_id=1, eos_token_id=2, activation_function="relu")
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**common)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "qwen3":
        return T.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma":
        return T.GemmaConfig(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma2":
        return T.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=16, **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=16, **common)
    if arch == "phi3":
        return T.Phi3Config(num_key_value_heads=2, **common)
    if arch == "opt":
        return T.OPTConfig(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=48,
                           word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    if arch == "bert":
        return T.BertConfig(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    raise KeyError(arch)


@functools.lru_cache(maxsize=None)
def tiny_hf_model(arch: str):
    torch.manual_seed(0)
    config = tiny_config(arch)
    if arch == "bert":
        return T.BertModel(config).eval()
    return T.AutoModelForCausalLM.from_config(config).eval()


class ByteTokenizer:
    """A minimal tokenizer stand-in (bytes mod vocab) so tiny models take text without any download."""

    pad_token_id = 0
    eos_token = None
    unk_token = None
    pad_token = None
    model_max_length = 64

    def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None, **_):
        single = isinstance(texts, str)
        ids = [[3 + (b % (VOCAB - 3)) for b in t.encode()] for t in ([texts] if single else texts)]
        if truncation and max_length is not None:
            ids = [row[:max_length] for row in ids]
        return {"input_ids": ids[0] if single else ids}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(i)) for i in row) for row in ids]


def tiny_model(arch: str):
    import actlab

    return actlab.load(tiny_hf_model(arch), tokenizer=ByteTokenizer())
