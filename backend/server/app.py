"""The OpenAI-compatible HTTP API on any ``service.ChatBackend``: ``create_app(backend)``.

The server owns only the wire format, the key and streaming; admission (BusyError is 429), prompts,
batching, adapters and sampling are the backend's (the same contract the app uses in-process). Each reply
runs in a thread of its own (``pump.EventPump``) and the request's cancel event is set as soon as
the client goes away, so its batch row is freed at the next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import threading
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from ..service import AdapterInfo, BackendError, ChatBackend, ChatMessage, ReplyDone, ReplyEvent, SamplingParams, TextDelta
from .errors import APIError, BodySizeLimit, from_backend, install_error_handlers
from .pump import AsyncEvents, EventPump
from .replies import ChatFormat, CompletionFormat, ReplyFormat, sse_stream
from .schemas import (
    AdapterCard,
    AdapterRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    _SamplingRequest,
)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def base_model_id(name: str) -> str:
    """A directory or hub id as a model id: its last part (``THUDM/chatglm2-6b`` -> ``chatglm2-6b``)."""
    return name.rstrip("/").rsplit("/", 1)[-1] or name


class InFlight:
    """Counts replies in flight (for /health); the engine itself refuses requests beyond its rows and
    queue (``service.BusyError``, answered 429)."""

    def __init__(self):
        self.running = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.running += 1

    def leave(self) -> None:
        with self._lock:
            self.running -= 1


class Server:
    """What the routes share: the backend, the model names and the count of replies in flight."""

    def __init__(self, backend: ChatBackend, model_name: Optional[str]):
        self.backend = backend
        self.base = model_name or base_model_id(backend.info.name)
        self.in_flight = InFlight()

    # -- names -----------------------------------------------------------------------

    def adapter_id(self, name: str) -> str:
        return f"{self.base}:{name}"

    def adapter_for(self, model: Optional[str]) -> Optional[str]:
        """The adapter a request's ``model`` names (None = the base model); 404 for anything else."""
        if model in (None, "", self.base, self.backend.info.name):
            return None
        names = [a.name for a in self.backend.adapters()]
        name = model[len(self.base) + 1:] if model.startswith(self.base + ":") else model
        if name in names:
            return name
        listed = ", ".join([self.base] + [self.adapter_id(n) for n in names])
        raise APIError(404, f"the model '{model}' does not exist on this server; use one of: {listed}.", "model",
                       "model_not_found")

    def cards(self) -> list[ModelCard]:
        info = self.backend.info
        base = ModelCard(id=self.base, root=self.base, max_model_len=info.context_length,
                         glmchat=dataclasses.asdict(info))
        return [base] + [self._adapter_card(a) for a in self.backend.adapters()]

    def _adapter_card(self, adapter: AdapterInfo) -> ModelCard:
        card = AdapterCard(name=adapter.name, path=str(adapter.path), pre_seq_len=adapter.pre_seq_len,
                           prefix_projection=adapter.prefix_projection)
        return ModelCard(id=self.adapter_id(adapter.name), root=self.base, parent=self.base,
                         max_model_len=self.backend.info.context_length, adapter=card)

    # -- replies ---------------------------------------------------------------------

    def sampling(self, body: _SamplingRequest) -> SamplingParams:
        context = self.backend.info.context_length
        limit = body.token_limit
        if limit is not None and limit > context:
            raise APIError(400, f"max_tokens is {limit}, but the model's context is {context} tokens for the prompt "
                           "and the reply together; ask for fewer.", "max_tokens", "context_length_exceeded")
        default = SamplingParams()
        pick = lambda value, fallback: fallback if value is None else value  # noqa: E731
        return SamplingParams(
            temperature=pick(body.temperature, default.temperature),
            top_p=pick(body.top_p, default.top_p),
            top_k=pick(body.top_k, default.top_k),
            repetition_penalty=pick(body.repetition_penalty, default.repetition_penalty),
            max_new_tokens=pick(limit, default.max_new_tokens),
        )

    async def respond(self, request: Request, stream: bool, fmt: ReplyFormat,
                      start: Callable[[threading.Event], Iterator[ReplyEvent]],
                      astart: Optional[Callable[[threading.Event], AsyncIterator[ReplyEvent]]] = None):
        """Start the reply (``astart``, the async form, where the backend has one); its first event (or the
        backend's refusal) decides the status code."""
        self.in_flight.enter()
        pump = AsyncEvents(astart, self.in_flight.leave) if astart is not None else EventPump(self._counted(start))
        streaming = False
        try:
            first = await until_disconnected(request, pump.next())
            if stream:
                streaming = True  # from here the stream owns the pump and closes it
                return StreamingResponse(sse_stream(pump, first, fmt), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(await until_disconnected(request, collect(pump, first, fmt)))
        except BackendError as err:
            raise from_backend(err) from None
        finally:
            if not streaming:
                pump.close()

    def _counted(self, start):
        def run(cancel: threading.Event) -> Iterator[ReplyEvent]:
            try:
                yield from start(cancel)
            finally:
                self.in_flight.leave()
        return run


class ClientGone(Exception):
    """The client disconnected before the reply started (nothing is sent back)."""


async def until_disconnected(request: Request, awaitable):
    """``awaitable``'s result, or ClientGone as soon as the client disconnects (its work is cancelled)."""
    work = asyncio.ensure_future(awaitable)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    raise ClientGone()


async def collect(pump: EventPump, first: Optional[ReplyEvent], fmt: ReplyFormat) -> dict:
    """A whole (non-streamed) reply as one response object."""
    text, event = [], first
    while event is not None:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ReplyDone):
            return fmt.whole(event.reply.text if event.reply.text else "".join(text), event.reply).model_dump(exclude_none=True)
        event = await pump.next()
    raise BackendError("the engine ended the reply without finishing it; try again.")


def _key_check(api_key: Optional[str]):
    """A dependency: ``Authorization: Bearer KEY`` compared in constant time (no key: open)."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(authorization: Optional[str] = Header(None)) -> None:
        if expected is None:
            return
        if not hmac.compare_digest((authorization or "").encode(), expected):
            raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY' with the key "
                           "the server was started with.", code="invalid_api_key")

    return check


def create_app(backend: ChatBackend, api_key: Optional[str] = None, *, model_name: Optional[str] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``backend``; ``api_key`` guards every route but /health."""
    server = Server(backend, model_name)
    app = FastAPI(title="glmchat", summary="OpenAI-compatible API for ChatGLM2/ChatGLM3 and their P-Tuning v2 adapters",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if api_key is None else None)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    keyed = [Depends(_key_check(api_key))]

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, err: ClientGone):
        return JSONResponse({}, status_code=499)  # never read: the client has left

    @app.get("/health")
    async def health() -> dict:
        info = backend.info
        return {"status": "ok", "replies_in_flight": server.in_flight.running, "max_batch": info.max_batch}

    @app.get("/v1/models", dependencies=keyed, response_model_exclude_none=True)
    async def models() -> ModelList:
        return ModelList(data=server.cards())

    @app.get("/v1/models/{model_id:path}", dependencies=keyed, response_model_exclude_none=True)
    async def model(model_id: str) -> ModelCard:
        adapter = server.adapter_for(model_id)
        return next(c for c in server.cards() if c.id == (server.adapter_id(adapter) if adapter else server.base))

    @app.post("/v1/adapters", dependencies=keyed, response_model_exclude_none=True)
    async def register_adapter(body: AdapterRequest) -> ModelList:
        """Register a checkpoint (or every checkpoint-* of a run directory) found on the server's disk."""
        try:
            added = await run_in_threadpool(register_or_scan, backend, body.path, body.name)
        except BackendError as err:
            raise APIError(400, str(err), "path") from None
        return ModelList(data=[server._adapter_card(a) for a in added])

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter, params = server.adapter_for(body.model), server.sampling(body)
        messages = [ChatMessage(m.role, m.content) for m in body.messages]
        if messages[-1].role not in ("user", "observation"):
            raise APIError(400, f"the last message is the {messages[-1].role}'s; end 'messages' with the user's "
                           "message to get a reply to it.", "messages", "invalid_value")
        fmt = ChatFormat(body.model or server.base, body)
        options = dict(adapter=adapter, seed=body.seed, stop=body.stops)
        return await server.respond(
            request, body.stream, fmt, lambda cancel: backend.stream_messages(messages, params, cancel=cancel, **options),
            async_form(backend, "astream_messages", messages, params, **options))

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        adapter, params = server.adapter_for(body.model), server.sampling(body)
        fmt = CompletionFormat(body.model or server.base, body)
        options = dict(adapter=adapter, seed=body.seed, stop=body.stops)
        return await server.respond(
            request, body.stream, fmt, lambda cancel: backend.stream_completion(body.prompt, params, cancel=cancel, **options),
            async_form(backend, "astream_completion", body.prompt, params, **options))

    return app


def async_form(backend: ChatBackend, method: str, *args, **kwargs):
    """``cancel -> backend.method(*args, cancel=cancel, **kwargs)`` where the backend streams asynchronously, else None."""
    stream = getattr(backend, method, None)
    return None if stream is None else (lambda cancel: stream(*args, cancel=cancel, **kwargs))


def register_or_scan(backend: ChatBackend, path: str, name: Optional[str]) -> list[AdapterInfo]:
    """One checkpoint directory, or else a run directory holding checkpoint-* directories."""
    try:
        return [backend.register_adapter(path, name)]
    except BackendError:
        if not Path(path).is_dir():
            raise
        found = backend.scan_adapters(path)
        if not found:
            raise
        return found
