"""Token-by-token decoding for chat: sampling settings, the original nan/inf guard, streaming text.

``generate_tokens`` is the one decode loop behind ``stream_chat`` and the chat engine: it
feeds only what the cache has not seen, so a conversation's cache is reused across turns.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator, Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .service import SamplingParams


INVALID_SCORE_TOKEN = 5  # the original chat()'s token for a step whose scores hold nan/inf


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The original chat()'s guard: a step whose scores hold nan/inf emits INVALID_SCORE_TOKEN instead of crashing.

    Without a host branch (no sync), so the fast decoder can replay it inside a CUDA graph."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        invalid = torch.zeros_like(scores)
        invalid[..., INVALID_SCORE_TOKEN] = 5e4
        return torch.where(torch.isfinite(scores).all(), scores, invalid)


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if params.repetition_penalty and params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    procs.append(InvalidScoreLogitsProcessor())
    if not params.greedy:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k and params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    return procs


def process_response(text: str) -> str:
    """The original chat()'s clean-up of a reply."""
    return text.strip().replace("[[训练时间]]", "2023年")


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    cache,
    params: SamplingParams,
    eos_token_ids: Iterable[int],
    cancel: Optional[threading.Event] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield new token ids for the batch-1 prompt ``input_ids`` [1, n], extending ``cache`` in place.

    Tokens already in ``cache`` (after the prefix slots) are not fed again. Stops at an eos
    id (which is yielded), after ``params.max_new_tokens``, or when ``cancel`` is set.
    """
    eos = set(eos_token_ids)
    seen = cache.token_count()
    if seen >= input_ids.shape[1]:
        raise ValueError("the cache already holds the whole prompt; crop it to reuse it")
    procs = logits_processors(params)
    all_ids = input_ids
    feed = input_ids[:, seen:]
    for _ in range(params.max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        logits = model(feed, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        scores = procs(all_ids, logits)
        if params.greedy:
            token = scores.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        all_ids = torch.cat((all_ids, token), dim=1)
        feed = token
        token_id = int(token)
        yield token_id
        if token_id in eos:
            return


def without_partial_character(text: str) -> str:
    """A reply cut off (stopped, or out of tokens) inside a multi-byte character ends in "\ufffd": drop it."""
    return text.rstrip("\ufffd")


def stream_text(tokenizer, tokens: Iterable[int], eos_token_ids: Iterable[int]) -> Iterator[str]:
    """Turn new token ids into the reply text so far, skipping partial UTF-8 ("�") like the original."""
    eos = set(eos_token_ids)
    ids: list[int] = []
    for token in tokens:
        if token in eos:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text and not text.endswith("\ufffd"):
            yield process_response(text)
