"""Chat messages to prompt token ids: the one place the model family's chat format is applied.

A tokenizer that knows its family's format (ChatGLM3's role tokens) provides ``build_chat_ids``;
otherwise the ChatGLM2 rule of the original ``openai_api.py``: a leading system message is
prepended to the last user message's text, the turns before it are (user, assistant) pairs, and
the last message is the user's.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .service import BackendError, ChatMessage, History


def chat_prompt_ids(tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    if hasattr(tokenizer, "build_chat_ids"):
        return list(tokenizer.build_chat_ids(messages))
    query, history = chatglm2_turns(messages)
    return tokenizer.encode(tokenizer.build_prompt(query, history))


def messages_of(query: str, history: History, system: Optional[str] = None) -> list[ChatMessage]:
    """The app's (query, history) conversation as messages."""
    messages = [ChatMessage("system", system)] if system else []
    for user, assistant in history:
        messages += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
    return messages + [ChatMessage("user", query)]


def chatglm2_turns(messages: Sequence[ChatMessage]) -> tuple[str, History]:
    """(query, history) as ChatGLM2's ``build_prompt`` takes them."""
    if not messages or messages[-1].role != "user":
        raise BackendError("the last message must be the user's; end the messages with a user message.")
    earlier = list(messages[:-1])
    query = messages[-1].content
    if earlier and earlier[0].role == "system":
        query = earlier.pop(0).content + query
    pairs = [tuple(earlier[i:i + 2]) for i in range(0, len(earlier), 2)]
    if any(len(p) != 2 or p[0].role != "user" or p[1].role != "assistant" for p in pairs):
        raise BackendError("messages before the last must alternate user, assistant (after an optional first system message).")
    return query, [(u.content, a.content) for u, a in pairs]
