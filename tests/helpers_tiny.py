"""Tiny ChatGLM2 models made by the tests themselves, so nothing here needs ../shared."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch

from backend.configuration import ChatGLMConfig
from backend.modeling import ChatGLMForConditionalGeneration
from backend.tokenization import ChatGLMTokenizer

_LINES = [
    "类型#上衣*材质#牛仔布*颜色#白色*风格#简约",
    "这件白色牛仔上衣简约大方，搭配什么都好看。",
    "类型#裙*颜色#红色*风格#复古",
    "红色的复古长裙，走起路来非常优雅。",
    "Hello, world! This is a tiny tokenizer for tests.",
    "问：你好\n\n答：你好，很高兴见到你。",
    "[Round 1]\n\n问：介绍一下你自己\n\n答：我是一个小模型。",
    "数字12345和English混合 tab\there",
] * 40


def make_tokenizer_file(directory: Path, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece BPE model the way the real one behaves (byte fallback, no normalisation)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_LINES), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


def tiny_config(vocab: int, **overrides) -> ChatGLMConfig:
    values = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
        multi_query_group_num=2, padded_vocab_size=vocab, seq_length=512,
    )
    values.update(overrides)
    return ChatGLMConfig(**values)


def make_tiny_model_dir(path: Path, seed: int = 0, safe_serialization: bool = True, **config) -> Path:
    """A complete ChatGLM2 directory (config, weights, tokenizer) with random weights."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = ChatGLMTokenizer(vocab_file=str(make_tokenizer_file(path / "_sp")))
    tokenizer.save_pretrained(str(path))
    vocab = (tokenizer.vocab_size + 63) // 64 * 64
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(tiny_config(vocab, **config))
    model.save_pretrained(str(path), safe_serialization=safe_serialization)
    for f in (path / "_sp").iterdir():
        f.unlink()
    (path / "_sp").rmdir()
    return path
