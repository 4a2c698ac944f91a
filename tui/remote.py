"""``glmchat --server URL``: the service protocol over HTTP, against a running ``glmchat serve``.

So a GPU box serves and a laptop chats: replies stream as server-sent events (stop closes the
stream, which frees the server's row), adapters are the server's models ``BASE:ADAPTER``, compare
is two concurrent streams. Training runs where the model is, so it is not offered here.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import httpx

from backend.service import (
    AdapterInfo,
    BackendError,
    BusyError,
    ChatMessage,
    History,
    LoadProgress,
    ModelInfo,
    ProgressCallback,
    Reply,
    ReplyDone,
    ReplyEvent,
    SamplingParams,
    TextDelta,
    TrainProgress,
    TrainRequest,
    TrainResult,
)

ACTIVE = object()  # "the active adapter", the default of the reply calls' adapter argument
_FINISHED = object()
TIMEOUT = httpx.Timeout(30.0, read=None)  # a reply may wait in the server's queue: no read limit
STOP_POLL_S = 0.05  # how often a reply waiting for the server looks at its stop event


def to_messages(query: str, history: History, system: Optional[str] = None) -> list[ChatMessage]:
    messages = [ChatMessage("system", system)] if system else []
    for old_query, response in history or []:
        messages += [ChatMessage("user", old_query), ChatMessage("assistant", response)]
    return messages + [ChatMessage("user", query)]


class RemoteBackend:
    """A ``service.ChatBackend`` whose model runs in ``glmchat serve`` at ``url``."""

    def __init__(self, url: str, api_key: Optional[str] = None):
        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)
        self._active: Optional[str] = None
        self.base = ""
        self.info = ModelInfo(self.url, "?", "?")

    @classmethod
    def connect(cls, url: str, api_key: Optional[str] = None, progress: Optional[ProgressCallback] = None) -> "RemoteBackend":
        report = progress or (lambda p: None)
        self = cls(url, api_key)
        report(LoadProgress("connecting", message=f"connecting to {self.url}"))
        adapters = self.adapters()
        report(LoadProgress("adapters", len(adapters), len(adapters), f"{len(adapters)} adapter(s) on the server"))
        report(LoadProgress("ready", 1, 1, "ready"))
        return self

    # -- HTTP ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        self._check(response)
        return response.json()

    def _unreachable(self, err: Exception) -> BackendError:
        return BackendError(f"cannot reach a glmchat server at {self.url} ({err or type(err).__name__}); "
                            "start one there with `glmchat serve`, or check --server.")

    def _check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"the server at {self.url} answered HTTP {response.status_code}; is it a glmchat server?"
        if response.status_code == 401:
            raise BackendError(f"the server at {self.url} refused the API key; pass the key it was started with: "
                               "--api-key KEY (or $GLMCHAT_API_KEY).")
        raise (BusyError if response.status_code == 429 else BackendError)(message)

    # -- adapters -------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        """The server's adapters, fresh (other clients may register some)."""
        cards = self._request("GET", "/v1/models")["data"]
        base = next(c for c in cards if not c.get("adapter"))
        self.base = base["id"]
        known = {f.name for f in dataclasses.fields(ModelInfo)}  # a newer server may say more
        info = {k: v for k, v in (base.get("glmchat") or {}).items() if k in known}
        info.setdefault("context_length", base.get("max_model_len", ModelInfo.context_length))
        host = self.url.split("://", 1)[-1]
        self.info = ModelInfo(**{"precision": "?", **info, "name": self.base, "device": f"{info.get('device', '?')} @ {host}"})
        return [_adapter_info(c["adapter"]) for c in cards if c.get("adapter")]

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active

    def register_adapter(self, path: Union[str, Path], name: Optional[str] = None) -> AdapterInfo:
        """A checkpoint on the server's disk (the path is the server's); a run directory registers every checkpoint."""
        return self._register(path, name)[-1]

    def scan_adapters(self, directory: Union[str, Path]) -> list[AdapterInfo]:
        return self._register(directory, None)

    def _register(self, path: Union[str, Path], name: Optional[str]) -> list[AdapterInfo]:
        body = {"path": str(path), **({"name": name} if name else {})}
        return [_adapter_info(c["adapter"]) for c in self._request("POST", "/v1/adapters", json=body)["data"]]

    def switch_adapter(self, name: Optional[str]) -> None:
        names = [a.name for a in self.adapters()]
        if name is not None and name not in names:
            raise BackendError(f"the server has no adapter named {name!r}; it has: {', '.join(names) or 'none'}.")
        self._active = name

    def _model(self, adapter) -> str:
        adapter = self._active if adapter is ACTIVE else adapter
        return self.base if adapter is None else f"{self.base}:{adapter}"

    # -- replies --------------------------------------------------------------------------

    def stream_reply(self, query: str, history: History, params: SamplingParams, cancel: Optional[threading.Event] = None,
                     adapter=ACTIVE, seed: Optional[int] = None, system: Optional[str] = None) -> Iterator[ReplyEvent]:
        return self.stream_messages(to_messages(query, history, system), params, cancel, adapter, seed)

    def stream_messages(self, messages: Sequence[ChatMessage], params: SamplingParams,
                        cancel: Optional[threading.Event] = None, adapter=ACTIVE, seed: Optional[int] = None,
                        stop: Sequence[str] = ()) -> Iterator[ReplyEvent]:
        body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
        return self._stream("/v1/chat/completions", body, params, cancel, adapter, seed, stop)

    def stream_completion(self, prompt: str, params: SamplingParams, cancel: Optional[threading.Event] = None,
                          adapter=ACTIVE, seed: Optional[int] = None, stop: Sequence[str] = ()) -> Iterator[ReplyEvent]:
        return self._stream("/v1/completions", {"prompt": prompt}, params, cancel, adapter, seed, stop)

    def _stream(self, path: str, body: dict, params: SamplingParams, cancel: Optional[threading.Event], adapter,
                seed: Optional[int], stop: Sequence[str], index: int = 0) -> Iterator[ReplyEvent]:
        """One streamed reply; a set ``cancel`` closes the connection (the server frees the row) and ends it stopped."""
        adapter = self._active if adapter is ACTIVE else adapter
        body = {**body, **_sampling(params, self.info.context_length), "model": self._model(adapter), "stream": True,
                "stream_options": {"include_usage": True}, **({"seed": seed} if seed is not None else {}),
                **({"stop": list(stop)} if stop else {})}
        start, text, finish, usage = time.perf_counter(), [], "cancelled", {}
        for chunk in self._chunks(path, body, cancel):
            if "error" in chunk:
                raise BackendError(chunk["error"].get("message", "the server failed the reply."))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece:
                    text.append(piece)
                    yield TextDelta(piece, index)
                finish = choice.get("finish_reason") or finish
        stopped = finish == "cancelled"
        reply = Reply("".join(text), adapter, stopped, usage.get("completion_tokens", 0), time.perf_counter() - start,
                      usage.get("prompt_tokens", 0), finish)
        yield ReplyDone(reply, index)

    def _chunks(self, path: str, body: dict, cancel) -> Iterator[dict]:
        """The reply's event chunks, read by a thread of its own on a connection of its own, so that a stop ends
        the reply at once, also while it waits in the server's queue and no byte has come back yet: the socket
        is shut down, which the server sees as the client leaving (it drops the waiting request)."""
        items: queue.Queue = queue.Queue()
        sockets: list = []

        def trace(name: str, info: dict) -> None:
            if name == "connection.connect_tcp.complete":
                sockets.append(info["return_value"].get_extra_info("socket"))

        def read() -> None:
            try:
                with httpx.Client(base_url=self.url, headers=self._http.headers, timeout=TIMEOUT) as client:
                    with client.stream("POST", path, json=body, extensions={"trace": trace}) as response:
                        self._check(response)
                        for chunk in _sse_chunks(response):
                            items.put(chunk)
            except BaseException as err:  # noqa: BLE001 - raised in the reader's thread below
                items.put(err)
            finally:
                items.put(_FINISHED)

        threading.Thread(target=read, name="glmchat-remote-reply", daemon=True).start()
        try:
            while not (cancel is not None and cancel.is_set()):
                try:
                    item = items.get(timeout=STOP_POLL_S)
                except queue.Empty:
                    continue
                if item is _FINISHED:
                    return
                if isinstance(item, httpx.TransportError):
                    raise self._unreachable(item) from None
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for sock in sockets:
                _shut_down(sock)

    def compare(self, query: str, history: History, params: SamplingParams, adapters: Sequence[Optional[str]] = (),
                cancel: Optional[threading.Event] = None, seed: Optional[int] = None) -> Iterator[ReplyEvent]:
        """Two adapters answer at once (two concurrent streams, one batch on the server), as streams 0 and 1."""
        pair = list(adapters) or [None, self._active]
        cancel = cancel or threading.Event()
        failed = threading.Event()
        events: queue.Queue = queue.Queue()
        body = {"messages": [{"role": m.role, "content": m.content} for m in to_messages(query, history)]}

        def run(index: int, adapter: Optional[str]) -> None:
            either = _Either(cancel, failed)
            try:
                for event in self._stream("/v1/chat/completions", body, params, either, adapter, seed, (), index):
                    events.put(event)
            except BaseException as err:  # noqa: BLE001 - raised in the caller's thread below
                failed.set()
                events.put(err)
            finally:
                events.put(_FINISHED)

        for i, adapter in enumerate(pair):
            threading.Thread(target=run, args=(i, adapter), name=f"glmchat-compare-{i}", daemon=True).start()
        running = len(pair)
        while running:
            item = events.get()
            if item is _FINISHED:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    # -- what runs only where the model is -----------------------------------------------------

    def train(self, request: TrainRequest, progress: Callable[[TrainProgress], None],
              cancel: Optional[threading.Event] = None) -> TrainResult:
        raise BackendError(f"training runs where the model is: start it on the server's machine (glmchat-train), "
                           f"then register the checkpoint here; this app is connected to {self.url}.")

    def gpu_memory_gb(self) -> Optional[float]:
        return None

    def close(self) -> None:
        self._http.close()


class _Either:
    """Set when either event is (the caller's stop, or the other column's failure)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _sampling(params: SamplingParams, context_length: int) -> dict:
    """The app's settings as request fields; the reply is capped at the context, as the engine caps it in-process."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty, "max_tokens": min(params.max_new_tokens, context_length)}


def _shut_down(sock) -> None:
    """End a connection now, also while another thread waits in recv on it (a close alone would not wake it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed: the reply had ended
        pass


def _sse_chunks(response: httpx.Response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _adapter_info(card: dict) -> AdapterInfo:
    return AdapterInfo(card["name"], Path(card["path"]), card["pre_seq_len"], card["prefix_projection"])
