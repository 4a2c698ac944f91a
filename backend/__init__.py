"""glmchat's backend: our ChatGLM2 as a transformers model, loading, adapters, chat engine, training.

``import backend`` registers the classes with transformers' Auto classes for
``model_type: chatglm``, so ``AutoConfig/AutoModel/AutoTokenizer.from_pretrained(path)`` use
them without ``trust_remote_code`` (see ``backend/registry.py``).
"""

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from .service import BackendError
from .registry import register_auto_classes

try:  # written in parallel; present in every release
    from .tokenization import ChatGLMTokenizer
except ImportError:  # pragma: no cover
    ChatGLMTokenizer = None

register_auto_classes()

__all__ = [
    "BackendError",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMTokenizer",
]
