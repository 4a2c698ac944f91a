"""Reply text as token ids arrive: never half a multi-byte character, never a piece of a stop string."""

from __future__ import annotations

from typing import Iterable, Sequence

from ..generation import process_response, without_partial_character


class ReplyText:
    def __init__(self, tokenizer, eos_token_ids: Iterable[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = ""  # text handed out so far
        self.hit_stop = False  # a stop string was found: the reply ends before it

    def add(self, token: int) -> str:
        """The text to append for ``token`` (often "": a partial character, or a possible stop string)."""
        if token in self.eos or self.hit_stop:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        if not self.hit_stop:
            text = text[: len(text) - self._held_back(text)]
        return self._advance(text)

    def finish(self) -> str:
        """The last piece (a held-back tail) once the reply has ended; a character cut off by the end of the
        reply (stopped, or out of tokens) is dropped, never shown as a replacement character."""
        return self._advance(without_partial_character(self.text))

    @property
    def text(self) -> str:
        return self._text()

    def _text(self) -> str:
        text = process_response(self.tokenizer.decode(self.ids))
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit_stop = True
            return text[:cut].rstrip() if cut else ""
        return text

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that could begin a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)

    def _advance(self, text: str) -> str:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            delta, self.shown = text[len(self.shown):], text
            return delta
        return ""
