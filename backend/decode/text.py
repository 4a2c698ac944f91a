"""Reply text as token ids arrive: never half a multi-byte character, never a piece of a stop string.

The text grows by decoding a short window of the newest ids (the way vLLM and TGI detokenize a
stream), not the whole reply every token: with 64 replies streaming at once, decoding each reply
from its start put tens of milliseconds of tokenizer work between two decode steps.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..generation import process_response, without_partial_character


class IncrementalDecoder:
    """The raw text of a growing list of ids, decoded a few ids at a time.

    SentencePiece drops the space a piece begins with at the start of a decode, so a window is decoded
    together with the ids just before it (``_prefix``, where some text begins) and only what it adds is
    kept. A window that ends inside a multi-byte character ("\\ufffd") stays open until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.raw = ""  # decoded text of ids[:_read]
        self._prefix = 0  # the window decodes ids[_prefix:]; ids[_prefix:_read] are already in raw
        self._read = 0
        self._known = ""  # ids[_prefix:_read] decoded

    def add(self, token: int) -> bool:
        """Append ``token``; False while the newest ids end inside a character (raw is unchanged then)."""
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self._prefix:])
        if window.endswith("\ufffd"):
            return False
        if window.startswith(self._known):
            self.raw += window[len(self._known):]
        else:  # the window rewrote earlier text (not seen with SentencePiece): decode everything once
            self.raw = self.tokenizer.decode(self.ids)
        # the next window starts at the ids just settled, unless they decode to nothing but spaces (a silent
        # id, a lone space piece): a window must begin with text, or its first piece's space would be dropped
        settled = self.tokenizer.decode(self.ids[self._read:])
        if settled.strip():
            self._prefix, self._known = self._read, settled
        else:
            self._known = window
        self._read = len(self.ids)
        return True

    def full(self) -> str:
        """Every id decoded at once (the reply's final text, a cut-off character included)."""
        return self.tokenizer.decode(self.ids)


class ReplyText:
    def __init__(self, tokenizer, eos_token_ids: Iterable[int], stop: Sequence[str] = ()):
        self.eos = set(eos_token_ids)
        self.stop = [s for s in stop if s]
        self._decoder = IncrementalDecoder(tokenizer)
        self.shown = ""  # text handed out so far
        self.hit_stop = False  # a stop string was found: the reply ends before it

    @property
    def ids(self) -> list[int]:
        return self._decoder.ids

    def add(self, token: int) -> str:
        """The text to append for ``token`` (often "": a partial character, or a possible stop string)."""
        if token in self.eos or self.hit_stop:
            return ""
        if not self._decoder.add(token):
            return ""
        text = self._clean(self._decoder.raw)
        if text.endswith("\ufffd"):  # an invalid byte, then only spaces so far: wait for the next text
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
        return self._clean(self._decoder.full())

    def _clean(self, raw: str) -> str:
        """The original chat's clean-up, cut before the first stop string (which sets ``hit_stop``)."""
        text = process_response(raw)
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
