"""Streamed reply text decodes a window of new ids a token, and still equals decoding the whole reply."""

from __future__ import annotations

import random

import pytest

from backend.decode.text import IncrementalDecoder, ReplyText
from backend.tokenization import ChatGLM3Tokenizer, ChatGLMTokenizer

from helpers_tiny import make_tokenizer_file

TEXT = "你好，世界。 Hello world . , ! ? 's n't 12 3.5 [[训练时间]] 的 了 是 \n\n  tab\t x   "


def random_ids(tok, rng: random.Random) -> list[int]:
    """Words, lone UTF-8 bytes (characters split across tokens), spaces, silent and out-of-vocabulary ids."""
    byte_ids = [tok.sp_model.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    words = tok.encode(TEXT, add_special_tokens=False)
    ids = []
    for _ in range(rng.randrange(1, 60)):
        r = rng.random()
        ids.append(rng.choice(byte_ids) if r < 0.2 else rng.choice(words) if r < 0.7 else rng.randrange(0, tok.vocab_size + 5))
    return ids


@pytest.fixture(scope="module", params=["real", "tiny3"])
def tokenizer(request, tmp_path_factory):
    if request.param == "real":  # skipped when ../shared is absent
        return ChatGLMTokenizer(str(request.getfixturevalue("real_tokenizer_file")))
    return ChatGLM3Tokenizer(str(make_tokenizer_file(tmp_path_factory.mktemp("tok3"))))


def test_incremental_text_equals_one_decode(tokenizer):
    for seed in range(1500):
        ids = random_ids(tokenizer, random.Random(seed))
        decoder = IncrementalDecoder(tokenizer)
        for token in ids:
            decoder.add(token)
        assert decoder.raw == tokenizer.decode(ids[: decoder._read]), seed
        assert decoder.full() == tokenizer.decode(ids)


class WholeDecodeReplyText(ReplyText):
    """The reference: every token decodes the whole reply (what ReplyText did before the window)."""

    def add(self, token: int) -> str:
        if token in self.eos or self.hit_stop:
            return ""
        self._decoder.ids.append(token)
        text = self.text
        if text.endswith("\ufffd"):
            return ""
        if not self.hit_stop:
            text = text[: len(text) - self._held_back(text)]
        return self._advance(text)


def test_streamed_deltas_equal_whole_reply_decoding(tokenizer):
    for seed in range(300):
        ids = random_ids(tokenizer, random.Random(seed))
        stop = ["。"] if seed % 3 == 0 else []
        fast, reference = ReplyText(tokenizer, [], stop), WholeDecodeReplyText(tokenizer, [], stop)
        assert [fast.add(t) for t in ids] == [reference.add(t) for t in ids], seed
        assert fast.finish() == reference.finish() and fast.hit_stop == reference.hit_stop


def test_a_space_after_silent_ids_is_kept(tokenizer):
    """The window after ids that decode to nothing must not begin there (its first space would vanish)."""
    apostrophe = tokenizer.encode(" 's", add_special_tokens=False)
    ids = tokenizer.encode("n", add_special_tokens=False) + [tokenizer.vocab_size + 1] + apostrophe
    decoder = IncrementalDecoder(tokenizer)
    for token in ids:
        decoder.add(token)
    assert decoder.raw == tokenizer.decode(ids)
