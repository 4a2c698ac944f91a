"""Streaming never shows "\ufffd" for a character whose bytes span several tokens (byte-fallback pieces),
also when the reply is cut off inside such a character."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest

from backend.decode.batcher import Batcher
from backend.decode.protocol import FINISH_LENGTH, RowToken
from backend.engine import ChatEngine
from backend.service import ReplyDone, SamplingParams, TextDelta
from helpers_tiny import make_tiny_model_dir

# 龘 is not in the tiny vocabulary: it becomes three byte pieces <0xE9> <0xBE> <0x98>.
TEXT = "龘好龘 a龘"


class ScriptedDecoder:
    """The decoder protocol with the model's token choices replaced by a fixed script (one row at a time):
    the real engine, batcher and tokenizer turn them into text."""

    max_batch, context_length = 1, 512

    def __init__(self, ids: list[int]) -> None:
        self.ids, self._rows = ids, {}

    def check(self, request) -> None:
        pass

    def fits(self, request) -> bool:
        return not self._rows

    def add(self, row, request) -> None:
        self._rows[row] = (request, 0)

    def step(self):
        out = []
        for row, (request, n) in list(self._rows.items()):
            last = n + 1 >= min(len(self.ids), request.params.max_new_tokens)
            out.append(RowToken(row, self.ids[n], FINISH_LENGTH if last else None))
            self._rows[row] = (request, n + 1)
            if last:
                del self._rows[row]
        return out

    def failed(self):
        return []

    def drop(self, row) -> None:
        self._rows.pop(row, None)

    @property
    def rows(self) -> int:
        return len(self._rows)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("chars") / "model")
    return ChatEngine.load(str(model), quantization="none", engine="eager", device="cpu")


@contextmanager
def script(engine: ChatEngine, text: str, monkeypatch) -> Iterator[list[int]]:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    pieces = engine.tokenizer.convert_ids_to_tokens(ids)
    assert pieces.count("<0xE9>") == 3, "the test needs a character split across byte tokens"
    scripted = Batcher(ScriptedDecoder(ids))
    monkeypatch.setattr(engine, "batcher", scripted)
    yield ids
    scripted.close()


def run(engine: ChatEngine, max_new_tokens: int) -> tuple[list[str], str]:
    events = list(engine.stream_reply("q", [], SamplingParams(temperature=0, max_new_tokens=max_new_tokens)))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    [done] = [e for e in events if isinstance(e, ReplyDone)]
    return deltas, done.reply.text


def test_split_characters_stream_whole(engine, monkeypatch):
    with script(engine, TEXT, monkeypatch) as ids:
        deltas, text = run(engine, len(ids))
    assert text == TEXT and "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_a_reply_cut_inside_a_character_drops_the_partial_bytes(engine, monkeypatch):
    with script(engine, TEXT, monkeypatch) as ids:
        deltas, text = run(engine, len(ids) - 1)  # out of tokens after two of the last character's three bytes
    assert text == TEXT[:-1].rstrip() and "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
