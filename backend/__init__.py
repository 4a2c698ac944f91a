"""glmchat's backend: our ChatGLM2 as a transformers model, loading, adapters, chat engine, training.

``import backend`` is light (no torch, no transformers): ``backend.service`` and the app's first
screen import in milliseconds. The model classes load on first use (``backend.ChatGLMConfig``...).

``backend.register()`` registers them with transformers' Auto classes for ``model_type: chatglm``,
so ``AutoConfig/AutoModel/AutoTokenizer.from_pretrained(path)`` use them without
``trust_remote_code`` (see ``backend/registry.py``); ``backend.loading`` calls it for the app.
It is a call, not a side effect of ``import backend``, because every ``import backend.service``
runs this file first and must stay free of torch.
"""

import importlib
import logging

from .service import BackendError

# name -> submodule that defines it; imported on first access (torch comes with them)
_LAZY = {
    "ChatGLMConfig": ".configuration",
    "ChatGLMModel": ".modeling",
    "ChatGLMForConditionalGeneration": ".modeling",
    "ChatGLMTokenizer": ".tokenization",
}


def register() -> None:
    """Register our classes with transformers' Auto classes (idempotent; imports torch)."""
    from .registry import register_auto_classes

    register_auto_classes()


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


# bitsandbytes logs this on every 8-bit matmul of a non-fp16 model; the cast is expected.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda r: "inputs will be cast" not in r.getMessage())
# and this when it imports on a CPU with AVX512-BF16 and the `kernels` package (a transformers dependency) but no
# hub access: it falls back to its own 4-bit CPU kernel, and glmchat works offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())

__all__ = ["BackendError", "register", *_LAZY]
