"""Helpers for the server tests: the real ``ChatEngine`` on a tiny model, watched at its batcher, and a server on a free port.

``EngineLog`` records what the engine was asked (every submitted request with its ``TokenStream``, the rows the
decoder admitted) and can hold the decoding thread before its next step, so a test can fill the engine's rows
with real requests and keep them there as long as it needs, however fast or slow the machine. Run as a script,
this file is ``glmchat serve`` on a small engine (2 rows): ``python tests/serving.py --model DIR ...``
(for the subprocess tests: curl, SIGTERM).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.service import SamplingParams  # noqa: E402

MAX_BATCH, MAX_QUEUE = 2, 1  # small, so the tests can fill the rows and the queue


def load_engine(model_dir: Path, *adapters: Path, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE):
    from backend.engine import ChatEngine

    return ChatEngine.load(model=str(model_dir), quantization="none", engine="eager", device="cpu",
                           adapters=[str(a) for a in adapters], max_batch=max_batch, max_queue=max_queue)


class EngineLog:
    """The engine's batcher and decoder, watched: ``streams`` (every accepted request, in order), ``admitted``
    (the stream ids the decoder took a row for), and ``hold()`` to keep the decoding thread from its next step."""

    def __init__(self, engine):
        self.engine = engine
        self.streams: list = []
        self.admitted: set[int] = set()
        self._gate = threading.Condition()
        self._steps: Optional[int] = None  # decoding steps still allowed; None: any number
        batcher, decoder = engine.batcher, engine.decoder
        submit, add, step = batcher.submit, decoder.add, decoder.step

        def submitted(request, cancel=None, loop=None):
            stream = submit(request, cancel, loop)
            self.streams.append(stream)
            return stream

        def added(row, request):
            add(row, request)
            self.admitted.add(row)

        def gated_step():
            with self._gate:
                self._gate.wait_for(lambda: self._steps is None or self._steps > 0)
                if self._steps is not None:
                    self._steps -= 1
            return step()

        batcher.submit, decoder.add, decoder.step = submitted, added, gated_step

    @property
    def prompts(self) -> list[list[int]]:
        return [list(s.request.prompt_ids) for s in self.streams]

    def waiting(self) -> list:
        """Accepted streams not yet given a row nor ended."""
        return [s for s in self.streams if s.row not in self.admitted and s.finish_reason is None]

    @contextlib.contextmanager
    def hold(self, steps: int = 0):
        """Let ``steps`` more decoding steps run, then none while inside (rows are still admitted and cancels
        recorded: the batcher does that before a step); decoding goes on after."""
        self.allow(steps, start=True)
        try:
            yield self
        finally:
            with self._gate:
                self._steps = None
                self._gate.notify_all()

    def allow(self, steps: int, start: bool = False) -> None:
        """``steps`` more decoding steps while held."""
        with self._gate:
            self._steps = steps if start or self._steps is None else self._steps + steps
            self._gate.notify_all()

    @contextlib.contextmanager
    def rows_taken(self, n: Optional[int] = None):
        """Fill ``n`` rows (default: all) with long greedy replies, held still; they are cancelled at the end."""
        n = self.engine.info.max_batch if n is None else n
        cancel, seen = threading.Event(), len(self.streams)
        long = SamplingParams(temperature=0, max_new_tokens=self.engine.info.context_length)
        threads = [threading.Thread(target=lambda: list(self.engine.stream_reply("你好", [], long, cancel=cancel, adapter=None)),
                                    daemon=True) for _ in range(n)]
        with self.hold():
            for thread in threads:
                thread.start()
            wait_for(lambda: len(self.streams) >= seen + n, what=f"{n} long replies to reach the engine")
            wait_for(lambda: self._admitted_or_step(n), what=f"{n} long replies to take the engine's rows")
            try:
                yield self.streams[seen:seen + n]
            finally:
                cancel.set()
        for thread in threads:
            thread.join(60)
        wait_for(lambda: self.engine.decoder.rows == 0 and not self.waiting(), what="the rows to be freed")


    def _admitted_or_step(self, n: int) -> bool:
        """Whether ``n`` rows are taken; if not, one more step (the batcher admits between steps)."""
        if self.engine.decoder.rows >= n:
            return True
        with self._gate:
            self._steps = max(self._steps or 0, 1)
            self._gate.notify_all()
        return False


def serve_loader(args, progress):
    """``glmchat serve``'s loader with the tests' small engine (2 rows, 1 waiting)."""
    from backend.server.cli import load_engine as cli_load

    args.max_batch, args.max_queue = MAX_BATCH, MAX_QUEUE
    return cli_load(args, progress)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of this process; ``url`` once started."""

    def __init__(self, app, drain_s: float = 2.0):
        import uvicorn

        from backend.server.runner import bind

        self.sock = bind("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=drain_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_for(lambda: self.server.started, what="the server to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_for(condition, timeout: float = 60.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serving(backend, api_key: Optional[str] = None, **options):
    from backend.server.app import create_app

    with ServerThread(create_app(backend, api_key, **options)) as server:
        yield server


if __name__ == "__main__":
    from backend.server.cli import main

    sys.exit(main(sys.argv[1:], load=serve_loader))
