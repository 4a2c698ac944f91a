"""Reply events as OpenAI responses: whole objects, or server-sent events ending with ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Optional, Protocol

from pydantic import BaseModel

from ..service import BackendError, Reply, ReplyDone, ReplyEvent, TextDelta
from .errors import from_backend
from .pump import EventPump
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    Usage,
    _SamplingRequest,
    completion_id,
)

logger = logging.getLogger("glmchat.serve")


def finish_reason(reply: Reply) -> str:
    """OpenAI knows "stop" and "length"; a cancelled reply (its client left) ended like a stop."""
    return "length" if reply.finish_reason == "length" else "stop"


def usage(reply: Reply) -> Usage:
    return Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.new_tokens,
                 total_tokens=reply.prompt_tokens + reply.new_tokens)


class ReplyFormat(Protocol):
    def opening(self) -> list[BaseModel]: ...
    def delta(self, text: str) -> BaseModel: ...
    def closing(self, reply: Reply) -> list[BaseModel]: ...
    def whole(self, text: str, reply: Reply) -> BaseModel: ...


class _Format:
    prefix = ""

    def __init__(self, model: str, body: _SamplingRequest):
        self.id = completion_id(self.prefix)
        self.model = model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)


class ChatFormat(_Format):
    prefix = "chatcmpl"

    def _chunk(self, delta: Delta, finish: Optional[str] = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

    def opening(self) -> list[BaseModel]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def delta(self, text: str) -> BaseModel:
        return self._chunk(Delta(content=text))

    def closing(self, reply: Reply) -> list[BaseModel]:
        chunks: list[BaseModel] = [self._chunk(Delta(), finish_reason(reply))]
        if self.include_usage:
            chunks.append(ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage(reply)))
        return chunks

    def whole(self, text: str, reply: Reply) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason(reply))
        return ChatCompletion(id=self.id, model=self.model, choices=[choice], usage=usage(reply))


class CompletionFormat(_Format):
    prefix = "cmpl"

    def _chunk(self, text: str, finish: Optional[str] = None) -> Completion:
        return Completion(id=self.id, model=self.model, choices=[CompletionChoice(text=text, finish_reason=finish)])

    def opening(self) -> list[BaseModel]:
        return []

    def delta(self, text: str) -> BaseModel:
        return self._chunk(text)

    def closing(self, reply: Reply) -> list[BaseModel]:
        chunks: list[BaseModel] = [self._chunk("", finish_reason(reply))]
        if self.include_usage:
            chunks.append(Completion(id=self.id, model=self.model, choices=[], usage=usage(reply)))
        return chunks

    def whole(self, text: str, reply: Reply) -> BaseModel:
        return Completion(id=self.id, model=self.model, usage=usage(reply),
                          choices=[CompletionChoice(text=text, finish_reason=finish_reason(reply))])


# Characters that Python's str.splitlines (and so httpx's aiter_lines, and many a client's line reader) takes
# for line ends, though SSE ends lines at \r and \n only: a reply holding one would cut its data line in two.
# JSON puts them only inside strings, where the \uXXXX escape means the same text.
_LINE_BREAKS = {c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_ESCAPE_BREAKS = str.maketrans(_LINE_BREAKS)


def _event(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json().translate(_ESCAPE_BREAKS)}\n\n"


class DeltaEvents:
    """A reply's text events from one dump of its format's text chunk, of which only the text changes: building
    and dumping a pydantic chunk a token took 15 us, a large part of the server's work a token at 64 streams.
    The text is written as pydantic writes a JSON string (json.dumps escapes the same characters the same way)."""

    _MARK = "\x00"  # a character no reply holds (the tokenizers never decode to it), escaped as \u0000

    def __init__(self, fmt: ReplyFormat):
        head, _, tail = _event(fmt.delta(self._MARK)).partition(json.dumps(self._MARK))
        self._head, self._tail = head, tail

    def __call__(self, text: str) -> str:
        return self._head + json.dumps(text, ensure_ascii=False).translate(_ESCAPE_BREAKS) + self._tail


async def sse_stream(pump: EventPump, first: Optional[ReplyEvent], fmt: ReplyFormat) -> AsyncIterator[str]:
    """The reply as server-sent events; closing it (the client left, the server stops) cancels the reply."""
    try:
        for chunk in fmt.opening():
            yield _event(chunk)
        event, text_event = first, DeltaEvents(fmt)
        while event is not None:
            if isinstance(event, TextDelta) and event.text:
                yield text_event(event.text)
            elif isinstance(event, ReplyDone):
                for chunk in fmt.closing(event.reply):
                    yield _event(chunk)
            event = await pump.next()
    except BackendError as err:  # after the status line went out: an error event, as OpenAI sends it
        api = from_backend(err)
        yield _event(ErrorResponse(error=ErrorBody(message=api.message, type="invalid_request_error", code=api.code)))
    except Exception as err:  # a bug of ours: the client hears of it, the log gets the traceback
        logger.exception("a streamed reply failed")
        yield _event(ErrorResponse(error=ErrorBody(message=f"the server failed ({type(err).__name__}: {err}); the "
                                                   "server's log has the details.", type="api_error", code="internal_error")))
    finally:
        pump.close()
    yield "data: [DONE]\n\n"
