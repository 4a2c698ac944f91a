"""The chat engine: the in-process service the TUI, the CLI and the server talk to (``service.ChatBackend``).

One loaded base model serves every adapter. Every reply is a row of one batched decoder
(``backend.decode``), owned by a ``Batcher`` thread: concurrent replies from many threads decode
together, each with its own adapter, sampling, seed and stop, and compare is one batch of two.
No lock is held across a reply. The eager decoder keeps finished rows' caches, so a chat's next
turn feeds only its new tokens; the CUDA fast decoder keeps its last conversation's cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from .adapters import AdapterRegistry
from .chat_format import chatglm2_query_history, to_messages
from .data import build_prompt
from .decode import make_batch_decoder
from .decode.batcher import Batcher, TokenStream, merge_streams
from .decode.protocol import FINISH_CANCELLED, FINISH_STOP, DecodeRequest
from .decode.text import ReplyText
from .loading import LoadedModel, load_model
from .service import (
    AdapterInfo,
    BackendError,
    ChatMessage,
    History,
    LoadProgress,
    ModelInfo,
    Reply,
    ReplyDone,
    ReplyEvent,
    SamplingParams,
    TextDelta,
    TrainProgress,
    TrainRequest,
    TrainResult,
)

ACTIVE = object()  # "the active adapter", as the default of stream_reply's adapter argument
logger = logging.getLogger("glmchat.engine")


def _log_warm_up_failure(done: Future) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.warning("the decoder's warm-up failed (%s); graphs will be captured as replies need them",
                       done.exception())


_BACKEND_DIR = Path(__file__).resolve().parent


def own_notices(said) -> tuple:
    """The decoder's own choices (our UserWarnings), once each: a library's deprecation notice raised while the
    decoder is built (torch.jit's, say) is not for the user."""
    ours = (w for w in said if issubclass(w.category, UserWarning) and Path(w.filename).resolve().is_relative_to(_BACKEND_DIR))
    return tuple(dict.fromkeys(str(w.message) for w in ours))


class ChatEngine:
    def __init__(self, loaded: LoadedModel, engine: str = "auto", name: Optional[str] = None,
                 max_batch: Optional[int] = None, max_queue: int = 64):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.registry = AdapterRegistry(self.model.config, loaded.device, loaded.dtype)
        self._active: Optional[str] = None
        self._lock = threading.RLock()  # registry changes; replies never hold it
        with warnings.catch_warnings(record=True) as said:  # the decoder's choices, for every front end to show
            warnings.simplefilter("always")
            self.decoder = make_batch_decoder(self.model, engine, self.registry.prefix_kv, max_batch=max_batch)
        self.batcher = Batcher(self.decoder, max_queue=max_queue)
        kind = "eager" if type(self.decoder).__name__ == "EagerBatchDecoder" else "fast"
        self.info = ModelInfo(name or str(loaded.directory), loaded.precision, str(loaded.device), kind,
                              family=loaded.family.family, variant=loaded.family.variant,
                              context_length=self.decoder.context_length, max_batch=self.decoder.max_batch,
                              notices=own_notices(said))

    def close(self) -> None:
        """Stop the decoding thread (replies still running end as cancelled)."""
        self.batcher.close()

    def warm_up(self, wait: bool = True) -> Optional[Future]:
        """Tune the GPU kernels and capture the decode graphs now, not in the first replies (the fast decoder; the
        eager one has nothing to warm: None). Tuning is cached on disk per GPU model, so a card pays it once.
        ``wait`` False: on the decoding thread in the background, ahead of replies asked meanwhile (they wait for
        it); a failure there is logged and leaves the decoder to capture lazily, as without a warm-up. Where the
        cache already had to shrink to fit, the background warm-up tunes and runs a chat's replies one row at a time
        (no compare's graphs, no long prompt): the rest of the memory is left to the replies."""
        warm = getattr(self.decoder, "warm_up", None)
        if warm is None:
            return None
        if not wait and getattr(self.decoder, "memory_short", False):
            warm = functools.partial(warm, captures=False)
        done = self.batcher.run_when_idle(warm)
        if wait:
            done.result()
        else:
            done.add_done_callback(_log_warm_up_failure)
        return done

    # ------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: Optional[str] = None,
        quantization: Optional[str] = None,
        adapters: Iterable[str] = (),
        adapter_dirs: Iterable[str] = (),
        progress: Optional[Callable[[LoadProgress], None]] = None,
        demo: bool = False,
        engine: str = "auto",
        device: Optional[str] = None,
        max_batch: Optional[int] = None,
        max_queue: int = 64,
        dtype: Optional[str] = None,
    ) -> "ChatEngine":
        """``max_batch``: replies decoded together (default: the decoder's; two on the fast decoder, a chat and a compare);
        ``max_queue``: requests that may wait beyond them before ``BusyError``."""
        report = progress or (lambda p: None)
        adapters, adapter_dirs = list(adapters), list(adapter_dirs)
        if demo:
            from .demo import ensure_demo

            demo_files = ensure_demo(progress=report)
            model = str(demo_files.model_dir)
            quantization = quantization or "none"  # a 1M-parameter model gains nothing from 8-bit
            adapter_dirs.append(str(demo_files.adapters_dir))
        if not model:
            raise BackendError("no model given; pass --model PATH_OR_HUB_ID (e.g. THUDM/chatglm2-6b) or --demo.")
        if adapters and not demo:  # a cross-family adapter is refused before the weights load
            from .adapters import refuse_other_family
            from .families import detect_family
            from .loading import resolve_model_dir

            refuse_other_family(adapters, detect_family(resolve_model_dir(model)).family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU notice is shown by the caller, once
            # "ready" is said once, after the adapters
            loaded = load_model(model, quantization=quantization, device=device, dtype=dtype,
                                progress=lambda p: p.stage != "ready" and report(p))
        self = cls(loaded, engine=engine, name="demo" if demo else str(model), max_batch=max_batch, max_queue=max_queue)
        paths = [(p, False) for p in adapters] + [(d, True) for d in adapter_dirs]
        for i, (path, is_dir) in enumerate(paths, 1):
            report(LoadProgress("adapters", i - 1, len(paths), f"adapter {i}/{len(paths)}: {path}"))
            self.scan_adapters(path) if is_dir else self.register_adapter(path)
        report(LoadProgress("adapters", len(paths), len(paths), f"{len(self.adapters())} adapter(s) registered"))
        report(LoadProgress("ready", 1, 1, "ready"))
        return self

    # ------------------------------------------------------------ adapters

    def adapters(self) -> list[AdapterInfo]:
        return self.registry.list()

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active

    def register_adapter(self, path: Union[str, Path], name: Optional[str] = None) -> AdapterInfo:
        with self._lock:
            return self.registry.register(path, name)

    def scan_adapters(self, directory: Union[str, Path]) -> list[AdapterInfo]:
        with self._lock:
            return self.registry.scan(directory)

    def switch_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` (None = base model) answer the next reply; the conversation is kept."""
        if name not in self.registry:
            raise BackendError(f"no adapter named {name!r}; registered: {', '.join(a.name for a in self.adapters()) or 'none'}.")
        self._active = name

    # ------------------------------------------------------------ replies

    def prompt_ids(self, query: str, history: History, adapter: Optional[str] = None, system: Optional[str] = None) -> list[int]:
        return self._chat_ids(to_messages(query, history, system), adapter)

    def _chat_ids(self, messages: Sequence[ChatMessage], adapter: Optional[str]) -> list[int]:
        """The family's chat format (tokenizer.build_chat_ids); an adapter trained with a source prefix gets
        it in front of the prompt, as its training put it (the original main.py)."""
        prefix = self.registry.source_prefix(adapter)
        if prefix:
            query, history = chatglm2_query_history(messages)
            return self.tokenizer.encode(build_prompt(self.tokenizer, query, history, prefix))
        return list(self.tokenizer.build_chat_ids(list(messages)))

    def _adapter(self, adapter) -> Optional[str]:
        adapter = self._active if adapter is ACTIVE else adapter
        if adapter not in self.registry:
            raise BackendError(f"no adapter named {adapter!r}; registered: {', '.join(a.name for a in self.adapters()) or 'none'}.")
        return adapter

    def _submit(self, ids: list[int], params: SamplingParams, adapter: Optional[str], seed, cancel,
                stop_ids: Iterable[int], loop=None) -> TokenStream:
        return self.batcher.submit(DecodeRequest(ids, params, adapter, seed, frozenset(stop_ids)), cancel, loop)

    def _stream(self, stream: TokenStream, stop: Sequence[str] = ()) -> Iterator[ReplyEvent]:
        reply = _ReplyBuilder(self.tokenizer, stream, stop, 0)
        try:
            for token in stream:
                yield from reply.on_token(token)
                if reply.text.hit_stop:
                    break
        finally:
            if stream.finish_reason is None:  # a stop string, or the reader went away
                stream.cancel()
        yield from reply.on_end()

    async def _astream(self, stream: TokenStream, stop: Sequence[str] = ()) -> AsyncIterator[ReplyEvent]:
        """``_stream`` on an event loop: the decoding thread hands the tokens to the loop."""
        reply = _ReplyBuilder(self.tokenizer, stream, stop, 0)
        try:
            async for token in stream:
                for event in reply.on_token(token):
                    yield event
                if reply.text.hit_stop:
                    break
        finally:
            if stream.finish_reason is None:
                stream.cancel()
        for event in reply.on_end():
            yield event

    async def astream_messages(self, messages: Sequence[ChatMessage], params: SamplingParams,
                               cancel: Optional[threading.Event] = None, adapter: Union[str, None, object] = ACTIVE,
                               seed: Optional[int] = None, stop: Sequence[str] = ()) -> AsyncIterator[ReplyEvent]:
        """``stream_messages`` for a caller on an event loop (the server): no thread of its own per reply."""
        adapter = self._adapter(adapter)
        stream = self._submit(self._chat_ids(messages, adapter), params, adapter, seed, cancel,
                              self.tokenizer.chat_stop_ids(), asyncio.get_running_loop())
        async for event in self._astream(stream, stop):
            yield event

    async def astream_completion(self, prompt: str, params: SamplingParams, cancel: Optional[threading.Event] = None,
                                 adapter: Union[str, None, object] = ACTIVE, seed: Optional[int] = None,
                                 stop: Sequence[str] = ()) -> AsyncIterator[ReplyEvent]:
        """``stream_completion`` for a caller on an event loop."""
        adapter = self._adapter(adapter)
        stream = self._submit(self.tokenizer.encode(prompt), params, adapter, seed, cancel,
                              [self.tokenizer.eos_token_id], asyncio.get_running_loop())
        async for event in self._astream(stream, stop):
            yield event

    def stream_reply(
        self,
        query: str,
        history: History,
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ACTIVE,
        seed: Optional[int] = None,
        system: Optional[str] = None,
    ) -> Iterator[ReplyEvent]:
        """Text deltas of the reply to ``query`` after ``history``, then one ReplyDone."""
        adapter = self._adapter(adapter)
        ids = self.prompt_ids(query, history, adapter, system)
        yield from self._stream(self._submit(ids, params, adapter, seed, cancel, self.tokenizer.chat_stop_ids()))

    def stream_messages(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ACTIVE,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
    ) -> Iterator[ReplyEvent]:
        """The reply to the last user message of ``messages``; ``stop`` strings end it (not included)."""
        adapter = self._adapter(adapter)
        ids = self._chat_ids(messages, adapter)
        yield from self._stream(self._submit(ids, params, adapter, seed, cancel, self.tokenizer.chat_stop_ids()), stop)

    def stream_completion(
        self,
        prompt: str,
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ACTIVE,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
    ) -> Iterator[ReplyEvent]:
        """A raw continuation of ``prompt`` (no chat format; special-token text stays text)."""
        adapter = self._adapter(adapter)
        stream = self._submit(self.tokenizer.encode(prompt), params, adapter, seed, cancel, [self.tokenizer.eos_token_id])
        yield from self._stream(stream, stop)

    def reply(self, query: str, history: History, params: SamplingParams, **kw) -> Reply:
        for event in self.stream_reply(query, history, params, **kw):
            if isinstance(event, ReplyDone):
                return event.reply
        raise AssertionError("stream_reply ends with ReplyDone")

    def compare(
        self,
        query: str,
        history: History,
        params: SamplingParams,
        adapters: Sequence[Optional[str]] = (),
        cancel: Optional[threading.Event] = None,
        seed: Optional[int] = None,
        system: Optional[str] = None,
    ) -> Iterator[ReplyEvent]:
        """The same prompt answered by two adapters (default: base vs active) in one batch, as streams 0 and 1."""
        pair = [self._adapter(a) for a in (list(adapters) or [None, self._active])]
        stop = frozenset(self.tokenizer.chat_stop_ids())
        # an adapter's source prefix makes its prompt its own; both queued at once: their prompts run in one pass
        requests = [DecodeRequest(self.prompt_ids(query, history, a, system), params, a, seed, stop) for a in pair]
        streams = self.batcher.submit_together(requests, cancel)
        replies = [_ReplyBuilder(self.tokenizer, s, (), i) for i, s in enumerate(streams)]
        for i, token in merge_streams(streams):
            yield from replies[i].on_end() if token is None else replies[i].on_token(token)

    # ------------------------------------------------------------ training

    def train(
        self,
        request: TrainRequest,
        progress: Callable[[TrainProgress], None],
        cancel: Optional[threading.Event] = None,
    ) -> TrainResult:
        """P-Tuning v2 on the already-loaded base; chat keeps working meanwhile (the base is shared, frozen)."""
        from .training import train_prefix

        # CUDA graph capture must not overlap a decoding step: it holds the batcher's step lock for those few seconds.
        return train_prefix(self.model, self.tokenizer, request, progress=progress, cancel=cancel,
                            capture_lock=self.batcher.step_lock)

    def model_structure(self) -> str:
        """The "model structure" page (``glmchat --info``, the app's structure panel) as text."""
        from .structure import describe_model

        active = next((a for a in self.adapters() if a.name == self._active), None)
        adapter = (active.name, active.pre_seq_len, active.prefix_projection) if active else None
        return describe_model(self.model, self.info.family, self.info.variant, self.info.precision, adapter)

    def gpu_memory_gb(self) -> Optional[float]:
        if self.loaded.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.loaded.device) / 1e9


class _ReplyBuilder:
    """One reply's events from its token stream: text deltas, then ReplyDone."""

    def __init__(self, tokenizer, stream: TokenStream, stop: Sequence[str], slot: int):
        self.stream, self.slot = stream, slot
        self.text = ReplyText(tokenizer, stream.request.stop_token_ids, stop)
        self.new_tokens = 0
        self.start = time.perf_counter()
        self.first_token_at: Optional[float] = None

    def on_token(self, token: int) -> list[ReplyEvent]:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.new_tokens += 1
        delta = self.text.add(token)
        if self.text.hit_stop and self.stream.finish_reason is None:
            self.stream.cancel()
        return [TextDelta(delta, self.slot)] if delta else []

    def on_end(self) -> list[ReplyEvent]:
        events: list[ReplyEvent] = []
        tail = self.text.finish()  # a held-back partial character or stop-string candidate
        if tail:
            events.append(TextDelta(tail, self.slot))
        reason = FINISH_STOP if self.text.hit_stop else (self.stream.finish_reason or FINISH_CANCELLED)
        request = self.stream.request
        first = None if self.first_token_at is None else self.first_token_at - self.start
        events.append(ReplyDone(Reply(self.text.shown, request.adapter, reason == FINISH_CANCELLED, self.new_tokens,
                                      time.perf_counter() - self.start, len(request.prompt_ids), reason, first), self.slot))
        return events
