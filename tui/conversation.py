"""A conversation as the UI keeps it: turns of one prompt and one reply (two in compare mode)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from backend.service import History, Reply, SamplingParams


@dataclass
class ReplyRecord:
    """A finished reply with what produced it: the adapter and the sampling settings."""

    text: str
    adapter: Optional[str]  # None = base model
    params: SamplingParams
    stopped: bool = False
    new_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_reply(cls, reply: Reply, params: SamplingParams) -> "ReplyRecord":
        return cls(reply.text, reply.adapter, params, reply.stopped, reply.new_tokens, reply.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Turn:
    query: str
    replies: list[ReplyRecord] = field(default_factory=list)
    id: Optional[int] = None  # row id once stored

    @property
    def compare(self) -> bool:
        return len(self.replies) > 1

    @property
    def answer(self) -> Optional[ReplyRecord]:
        """The reply that continues the history: in compare mode the right column (the adapter under test)."""
        return self.replies[-1] if self.replies else None


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    title: str = ""
    id: Optional[int] = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    system: str = ""  # the system prompt every reply of this conversation is written under

    def history(self, upto: Optional[int] = None) -> History:
        """[(query, response), ...] of the turns before ``upto``, as ChatGLM2's chat() takes it."""
        return [(t.query, t.answer.text) for t in self.turns[:upto] if t.answer is not None]


def turns_label(n: int) -> str:
    return f"{n} turn" + ("" if n == 1 else "s")


def title_for(query: str, width: int = 48) -> str:
    """The first prompt in one line, cut at a word where there is one (CJK text has none: cut at the width)."""
    line = " ".join(query.split())
    if len(line) <= width:
        return line
    space = line.rfind(" ", 0, width)  # the last word that fits whole
    cut = line[:space] if space > width // 2 else line[: width - 1]
    return cut.rstrip(" ,.;:，。；：") + "…"


def params_to_dict(params: SamplingParams) -> dict:
    return asdict(params)


def params_from_dict(data: dict) -> SamplingParams:
    known = SamplingParams.__dataclass_fields__
    return SamplingParams(**{k: v for k, v in data.items() if k in known})
