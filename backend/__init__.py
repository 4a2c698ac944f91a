"""glmchat's backend: our ChatGLM2 as a transformers model, loading, adapters, chat engine, training.

``import backend`` registers the classes with transformers' Auto classes for
``model_type: chatglm``, so ``AutoConfig/AutoModel/AutoTokenizer.from_pretrained(path)`` use
them without ``trust_remote_code`` (see ``backend/registry.py``).
"""

import logging

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from .service import BackendError
from .registry import register_auto_classes

try:  # written in parallel; present in every release
    from .tokenization import ChatGLMTokenizer
except ImportError:  # pragma: no cover
    ChatGLMTokenizer = None

register_auto_classes()
# bitsandbytes logs this on every 8-bit matmul of a non-fp16 model; the cast is expected.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda r: "inputs will be cast" not in r.getMessage())

__all__ = [
    "BackendError",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMTokenizer",
]
