"""Continuous batching: one scheduler thread owns a decoder; callers submit rows and read token streams.

``Batcher.submit`` returns a :class:`TokenStream` at once (or raises ``BusyError`` when every row
is taken and the waiting queue is full, ``BackendError`` when the request can never run). The
thread admits waiting requests first come, first served while the decoder has a free row and
the memory for it (a request that does not fit waits at the head of the queue; one that could
not fit even alone is refused at submit), steps the decoder, and hands each token to its stream.
A cancelled stream's row is freed before the next step. ``run_when_idle`` runs a job on the thread while no
row runs (the decoder's warm-up, in the background of an app that just loaded), ahead of waiting requests.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

from ..service import BusyError
from .protocol import FINISH_CANCELLED, DecodeRequest, Decoder

_END = object()


class TokenStream:
    """The new token ids of one row, in order (thread-safe). ``finish_reason`` is set once it ends."""

    def __init__(self, batcher: "Batcher", row: int, request: DecodeRequest, cancel: Optional[threading.Event] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None):
        self._batcher, self.row, self.request = batcher, row, request
        # read with ``for`` (a blocking queue), or with ``async for`` on ``loop`` (the decoding thread hands each
        # token to the loop: a server needs no thread per reply)
        self._loop = loop
        self._items = asyncio.Queue() if loop is not None else queue.Queue()
        self.finish_reason: Optional[str] = None
        self.cancelled = threading.Event()
        self._caller_cancel = cancel  # the caller's own event (e.g. the app's stop key), watched between steps

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or (self._caller_cancel is not None and self._caller_cancel.is_set())

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    def cancel(self) -> None:
        """Free the row at the next step; the stream ends with finish_reason "cancelled"."""
        self.cancelled.set()
        self._batcher._wake()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._items.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[int]:
        while True:
            item = await self._items.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def _put(self, item, handoff: Optional["_Handoff"] = None) -> None:
        if self._loop is None:
            self._items.put(item)
        elif handoff is not None:
            handoff.add(self, item)
        else:
            _Handoff.send_one(self._loop, [(self, item)])

    def _end(self, reason: str, handoff: Optional["_Handoff"] = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._put(_END, handoff)

    def _fail(self, error: Exception) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._put(error)


class _Handoff:
    """One step's tokens for the streams read on event loops, handed to each loop in one call: a call per token
    woke the loop 64 times a step at 64 rows, and each wake-up is a write and a GIL handover."""

    def __init__(self):
        self._items: dict = {}  # loop -> [(stream, item)]

    def add(self, stream: TokenStream, item) -> None:
        self._items.setdefault(stream._loop, []).append((stream, item))

    def send(self) -> None:
        for loop, items in self._items.items():
            self.send_one(loop, items)
        self._items.clear()

    @staticmethod
    def send_one(loop: asyncio.AbstractEventLoop, items: list) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody reads these streams any more
            for stream, _ in items:
                stream.cancelled.set()


def _deliver(items: list) -> None:
    for stream, item in items:
        stream._items.put_nowait(item)


class Batcher:
    def __init__(self, decoder: Decoder, max_queue: int = 64, name: str = "decoder"):
        self.decoder = decoder
        self.max_queue = max_queue
        # held around each step: work that must not overlap decoding (a CUDA graph capture) takes it
        self.step_lock = threading.RLock()
        self._cond = threading.Condition()
        self._waiting: deque[TokenStream] = deque()
        self._running: dict[int, TokenStream] = {}
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    def submit(self, request: DecodeRequest, cancel: Optional[threading.Event] = None,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> TokenStream:
        """A stream of the request's new tokens; ``cancel`` (set from any thread) frees its row at the next step;
        ``loop``: the stream is read with ``async for`` on that event loop."""
        return self.submit_together([request], cancel, loop)[0]

    def submit_together(self, requests: Sequence[DecodeRequest], cancel: Optional[threading.Event] = None,
                        loop: Optional[asyncio.AbstractEventLoop] = None) -> list[TokenStream]:
        """``submit`` for requests that start together (a compare's columns): queued at once, so the thread admits
        them in one round and their prompts run in one pass; all are queued or none."""
        for request in requests:
            self.decoder.check(request)  # a request that can never run: its BackendError, at once
        with self._cond:
            # the waiting list holds new requests until the thread admits them: free rows count as room too
            if len(self._waiting) + len(self._running) + len(requests) > self.decoder.max_batch + self.max_queue:
                raise BusyError(f"all {self.decoder.max_batch} decoding rows are busy and {self.max_queue} requests wait; try again shortly.")
            streams = [TokenStream(self, next(self._ids), request, cancel, loop) for request in requests]
            self._waiting.extend(streams)
            self._cond.notify()
        return streams

    def run_when_idle(self, job: Callable[[], object]) -> Future:
        """Run ``job`` on the decoding thread as soon as no row runs, before admitting waiting requests (they wait
        for it); its result or exception comes back through the future."""
        done: Future = Future()
        with self._cond:
            if self._closed:
                done.cancel()
                return done
            self._jobs.append((job, done))
            self._cond.notify()
        return done

    def close(self) -> None:
        """Stop the thread; waiting and running streams end as cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._has_work())
                if self._closed:
                    break
                self._drop_cancelled()
                job = self._jobs.popleft() if self._jobs and not self._running else None
                if not self._jobs and job is None:  # a pending job: the running rows finish, no new one starts
                    self._admit()
            if job is not None:
                self._run_job(*job)
                continue
            if not self._running:
                continue
            with self.step_lock:
                try:
                    tokens = self.decoder.step()
                except Exception as exc:  # noqa: BLE001 - a failed step ends the rows in it, not the thread
                    self._fail_running(exc)
                    continue
                failed = self.decoder.failed()
            for row, error in failed:
                self._running.pop(row)._fail(error)
            handoff = _Handoff()
            for t in tokens:
                stream = self._running[t.row]
                stream._put(t.token, handoff)
                if t.finish is not None:
                    del self._running[t.row]
                    stream._end(t.finish, handoff)
            handoff.send()
        for stream in list(self._waiting) + list(self._running.values()):
            stream._end(FINISH_CANCELLED)
        for _, done in self._jobs:
            done.cancel()

    def _run_job(self, job: Callable[[], object], done: Future) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            with self.step_lock:
                result = job()
        except BaseException as exc:  # noqa: BLE001 - the caller's future carries it
            done.set_exception(exc)
        else:
            done.set_result(result)

    def _has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting) or bool(self._jobs)

    def _drop_cancelled(self) -> None:
        for row, stream in list(self._running.items()):
            if stream.is_cancelled():
                self.decoder.drop(row)
                del self._running[row]
                stream._end(FINISH_CANCELLED)
        for stream in [s for s in self._waiting if s.is_cancelled()]:
            self._waiting.remove(stream)
            stream._end(FINISH_CANCELLED)

    def _admit(self) -> None:
        """First come, first served: the head waits until it fits, and those behind it wait too."""
        while self._waiting and self.decoder.fits(self._waiting[0].request):
            stream = self._waiting.popleft()
            try:
                self.decoder.add(stream.row, stream.request)
            except Exception as exc:  # noqa: BLE001 - this request's error, on its stream
                stream._fail(exc)
                continue
            self._running[stream.row] = stream

    def _fail_running(self, error: Exception) -> None:
        for row, stream in list(self._running.items()):
            self.decoder.drop(row)
            stream._fail(error)
        self._running.clear()


def merge_streams(streams: Sequence[TokenStream]) -> Iterator[tuple[int, Optional[int]]]:
    """(index, token) from several streams as their tokens come, then (index, None) as each ends;
    an error in one stream is raised here after the others are cancelled."""
    events: queue.Queue = queue.Queue()

    def drain(i: int, stream: TokenStream) -> None:
        try:
            for token in stream:
                events.put((i, token))
            events.put((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            events.put((i, exc))

    for i, stream in enumerate(streams):
        threading.Thread(target=drain, args=(i, stream), daemon=True).start()
    open_streams = len(streams)
    try:
        while open_streams:
            i, item = events.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                open_streams -= 1
            yield i, item
    finally:
        for stream in streams:
            if stream.finish_reason is None:
                stream.cancel()
