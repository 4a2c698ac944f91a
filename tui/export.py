"""A conversation as a Markdown document, with the adapter and settings of every reply."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .conversation import Conversation, ReplyRecord


def adapter_label(adapter: str | None) -> str:
    return adapter if adapter is not None else "base"


def reply_caption(reply: ReplyRecord) -> str:
    p = reply.params
    parts = [
        adapter_label(reply.adapter),
        f"temperature {p.temperature:g}",
        f"top_p {p.top_p:g}",
        f"max {p.max_new_tokens} tokens",
    ]
    if p.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {p.repetition_penalty:g}")
    if reply.stopped:
        parts.append("stopped")
    return " · ".join(parts)


def conversation_markdown(conversation: Conversation, model: str = "") -> str:
    title = conversation.title or "Conversation"
    lines = [f"# {title}", ""]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created_at))
    lines += [f"*{when}" + (f" · {model}" if model else "") + "*", ""]
    if conversation.system:
        lines += ["System prompt:", "", *(f"> {line}" for line in conversation.system.splitlines()), ""]
    for n, turn in enumerate(conversation.turns, 1):
        lines += [f"## {n}. You", "", turn.query, ""]
        for reply in turn.replies:
            lines += [f"### ChatGLM2 ({reply_caption(reply)})", "", reply.text, ""]
    return "\n".join(lines).rstrip() + "\n"


def export_path(directory: Path, conversation: Conversation) -> Path:
    slug = re.sub(r"[^\w-]+", "-", conversation.title or "conversation", flags=re.UNICODE).strip("-")[:40]
    return directory / f"{conversation.id or 'new'}-{slug or 'conversation'}.md"


def write_export(directory: Path, conversation: Conversation, model: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = export_path(directory, conversation)
    from backend.atomic import atomic_write_text

    atomic_write_text(path, conversation_markdown(conversation, model))
    return path
