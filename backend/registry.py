"""Register our classes with transformers' Auto classes for ``model_type: chatglm``.

A real chatglm2-6b directory carries ``auto_map`` entries pointing at its own python
files; with a local class registered, transformers resolves to ours and never imports them.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration

_registered = False


def register_auto_classes() -> None:
    global _registered
    if _registered:
        return
    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    try:
        from .tokenization import ChatGLMTokenizer
    except ImportError:  # pragma: no cover - written in parallel
        ChatGLMTokenizer = None
    if ChatGLMTokenizer is not None:
        AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    _registered = True
