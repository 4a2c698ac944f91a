"""Helpers for the server tests: the service contract on today's engine, and a server on a free port.

``EngineContract`` gives ``ChatEngine`` the contract's concurrent-reply calls (``stream_messages``,
``stream_completion``, stop strings, ``Reply.prompt_tokens``/``finish_reason``) on top of its
``stream_reply``. It runs the real model, one reply at a time (max_batch 1); it goes once the
batched engine implements the contract itself. Run as a script, it is ``glmchat serve`` on it:
``python tests/serving.py --model DIR ...`` (for the subprocess tests: curl, SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.service import BackendError, ChatMessage, Reply, ReplyDone, ReplyEvent, SamplingParams, TextDelta  # noqa: E402

ACTIVE = ...


def query_history(messages: Sequence[ChatMessage]):
    """ChatGLM2's reading of messages (the original openai_api.py): system text before the query."""
    if not messages or messages[-1].role != "user":
        raise BackendError("the last message must be the user's; ChatGLM2 answers a user message.")
    query, previous = messages[-1].content, list(messages[:-1])
    if previous and previous[0].role == "system":
        query = previous.pop(0).content + query
    roles = [m.role for m in previous]
    if roles != ["user", "assistant"] * (len(previous) // 2):
        raise BackendError(f"ChatGLM2 takes an optional system message then user/assistant pairs, got roles {roles}.")
    return query, [(previous[i].content, previous[i + 1].content) for i in range(0, len(previous), 2)]


class EngineContract:
    def __init__(self, engine):
        self.engine = engine
        self.info = dataclasses.replace(engine.info, context_length=engine.model.config.seq_length, max_batch=1)
        self.prompts: list[list[int]] = []  # the prompt ids of every request, in order
        self.replies: list[Reply] = []  # every finished reply, in order
        self.cancels: list[threading.Event] = []  # every request's cancel event, in order

    @contextlib.contextmanager
    def busy(self):
        """Occupy the engine's one row from the test (its lock), so that requests queue behind it however
        fast the tiny model is; they go on when the block ends."""
        with self.engine._lock:
            yield

    # adapters and the in-process calls: the engine's own
    def adapters(self):
        return self.engine.adapters()

    @property
    def active_adapter(self):
        return self.engine.active_adapter

    def register_adapter(self, path, name=None):
        return self.engine.register_adapter(path, name)

    def scan_adapters(self, directory):
        return self.engine.scan_adapters(directory)

    def switch_adapter(self, name):
        return self.engine.switch_adapter(name)

    def gpu_memory_gb(self):
        return None

    def _adapter(self, adapter):
        return self.engine.active_adapter if adapter is ACTIVE else adapter

    def stream_messages(self, messages: Sequence[ChatMessage], params: SamplingParams,
                        cancel: Optional[threading.Event] = None, adapter=ACTIVE, seed: Optional[int] = None,
                        stop: Sequence[str] = ()) -> Iterator[ReplyEvent]:
        query, history = query_history(messages)
        ids = self.engine.prompt_ids(query, history)
        outer, inner = cancel or threading.Event(), threading.Event()
        self.prompts.append(ids)
        self.cancels.append(outer)
        events = self.engine.stream_reply(query, history, params, cancel=inner, adapter=self._adapter(adapter), seed=seed)
        yield from self._with_stops(events, len(ids), params, stop, outer, inner)

    def stream_completion(self, prompt: str, params: SamplingParams, cancel: Optional[threading.Event] = None,
                          adapter=ACTIVE, seed: Optional[int] = None, stop: Sequence[str] = ()) -> Iterator[ReplyEvent]:
        ids = self.engine.tokenizer.encode(prompt)
        outer, inner = cancel or threading.Event(), threading.Event()
        self.prompts.append(ids)
        self.cancels.append(outer)
        yield from self._with_stops(self._raw(ids, params, inner, self._adapter(adapter), seed), len(ids), params,
                                    stop, outer, inner)

    def _raw(self, ids, params, cancel, adapter, seed) -> Iterator[ReplyEvent]:
        """A continuation of ``ids`` with no chat format and no clean-up of the text."""
        engine, eos = self.engine, [self.engine.tokenizer.eos_token_id]
        with engine._lock:
            decoder = engine._decoder_for(0, adapter)
            new, sent = [], ""
            for token in decoder.generate(ids, params, eos, cancel, engine._generator(seed)):
                if token in eos:
                    break
                new.append(token)
                text = engine.tokenizer.decode(new)
                if not text.endswith("\ufffd") and len(text) > len(sent):
                    yield TextDelta(text[len(sent):])
                    sent = text
            yield ReplyDone(Reply(sent, adapter, cancel.is_set(), len(new)))

    def _with_stops(self, events, prompt_tokens, params, stops, outer, inner) -> Iterator[ReplyEvent]:
        """Pass the deltas on, ending the reply at the first stop string (held back until it cannot be one)."""
        hold = max((len(s) for s in stops), default=1) - 1
        buffer, sent, hit = "", 0, False
        for event in events:
            if outer.is_set():
                inner.set()
            if isinstance(event, TextDelta) and not hit:
                buffer += event.text
                cuts = [buffer.find(s) for s in stops if s in buffer]
                if cuts:
                    hit = True
                    inner.set()
                    buffer = buffer[:min(cuts)]
                end = len(buffer) if hit else len(buffer) - hold
                if end > sent:
                    yield TextDelta(buffer[sent:end])
                    sent = end
            elif isinstance(event, ReplyDone):
                if not hit and sent < len(buffer):
                    yield TextDelta(buffer[sent:])
                reply = event.reply
                reason = "stop" if hit else "cancelled" if outer.is_set() else (
                    "length" if reply.new_tokens >= params.max_new_tokens else "stop")
                final = Reply(buffer if hit else reply.text, reply.adapter, reason == "cancelled", reply.new_tokens,
                              reply.seconds, prompt_tokens, reason)
                self.replies.append(final)
                yield ReplyDone(final)


def contract_loader(args, progress) -> EngineContract:
    from backend.server.cli import load_engine

    return EngineContract(load_engine(args, progress))


def load_contract(model_dir: Path, *adapters: Path) -> EngineContract:
    from backend.engine import ChatEngine

    engine = ChatEngine.load(model=str(model_dir), quantization="none", engine="eager", device="cpu",
                             adapters=[str(a) for a in adapters])
    return EngineContract(engine)


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

    sys.exit(main(sys.argv[1:], load=contract_loader))
