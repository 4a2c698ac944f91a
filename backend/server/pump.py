"""A reply's events awaited in asyncio: ``AsyncEvents`` for a backend with async streams (``ChatEngine``,
whose decoding thread hands each token to the event loop), ``EventPump`` for a blocking one, run in a thread.

``EventPump`` gives each request a thread of its own rather than a slot in anyio's worker pool: that
pool holds 40 threads, fewer than the rows a batched engine decodes at once, and a reply occupies its
thread for the whole reply. Closing either sets the request's cancel event at once, so a client that
goes away frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, Optional

from ..service import ReplyEvent

_END = object()


class EventPump:
    def __init__(self, start: Callable[[threading.Event], Iterator[ReplyEvent]], name: str = "glmchat-reply"):
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._start = start
        self.finished = threading.Event()  # the thread is done with the backend
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self._start(self.cancel):
                self._put(event)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting request, raised there
            self._put(err)
        finally:
            self.finished.set()
            self._put(_END)

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            self.cancel.set()

    async def next(self) -> Optional[ReplyEvent]:
        """The next event, None at the end; an exception from the backend is raised here."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay at the end for later calls
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """The client is gone or done: stop the reply (a finished one is unaffected)."""
        self.cancel.set()


class AsyncEvents:
    """``EventPump``'s interface over an async reply stream: no thread, no hop between threads a token (with 64
    streams, a thread each cost the server most of the engine's rate: BENCHMARKS.md). ``on_end`` runs once,
    when the stream ends or is closed."""

    def __init__(self, start: Callable[[threading.Event], AsyncIterator[ReplyEvent]], on_end: Callable[[], None]):
        self.cancel = threading.Event()
        self._events = start(self.cancel)
        self._on_end: Optional[Callable[[], None]] = on_end

    async def next(self) -> Optional[ReplyEvent]:
        """The next event, None at the end; an exception from the backend is raised here."""
        if self._on_end is None:
            return None
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            self._ended()
            return None
        except BaseException:
            self._ended()
            raise

    def close(self) -> None:
        """The client is gone or done: stop the reply (its row is freed at the engine's next step)."""
        self.cancel.set()
        self._ended()

    def _ended(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()
