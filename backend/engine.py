"""The chat engine: the in-process service the TUI and the CLI talk to (``service.ChatBackend``).

One loaded base model serves every adapter: switching only changes which precomputed prefix
the decoder writes into its cache's first slots. Replies stream as text deltas, reuse the
conversation's KV cache across turns, and stop when a cancel event is set.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from .adapters import AdapterRegistry
from .data import build_prompt
from .fast_decode import make_decoder
from .chat_format import to_messages
from .generation import stream_text, without_partial_character
from .loading import LoadedModel, load_model
from .service import (
    AdapterInfo,
    BackendError,
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
_NO_PREFIX_YET = object()  # a decoder whose prefix was never set


class ChatEngine:
    def __init__(self, loaded: LoadedModel, engine: str = "auto", name: Optional[str] = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.registry = AdapterRegistry(self.model.config, loaded.device, loaded.dtype)
        self._engine = engine
        self._decoders = [make_decoder(self.model, engine)]
        self._decoder_adapters: list[object] = [_NO_PREFIX_YET]  # which adapter's prefix each decoder holds
        self._active: Optional[str] = None
        self._lock = threading.RLock()  # one reply at a time uses the model's decoders
        kind = "fast" if type(self._decoders[0]).__name__ == "FastDecoder" else "eager"
        self.info = ModelInfo(name or str(loaded.directory), loaded.precision, str(loaded.device), kind,
                              family=loaded.family.family, variant=loaded.family.variant,
                              context_length=self.model.config.seq_length)

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
    ) -> "ChatEngine":
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
            loaded = load_model(model, quantization=quantization, device=device,
                                progress=lambda p: p.stage != "ready" and report(p))
        self = cls(loaded, engine=engine, name="demo" if demo else str(model))
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

    def _decoder_for(self, slot: int, adapter: Optional[str]):
        """Decoder ``slot`` holding ``adapter``'s prefix (its cache is rebuilt when the prefix changes)."""
        while len(self._decoders) <= slot:
            self._decoders.append(make_decoder(self.model, self._engine))
            self._decoder_adapters.append(_NO_PREFIX_YET)
        decoder = self._decoders[slot]
        if self._decoder_adapters[slot] != adapter:
            decoder.set_prefix(self.registry.prefix_kv(adapter))
            self._decoder_adapters[slot] = adapter
        return decoder

    # ------------------------------------------------------------ replies

    def prompt_ids(self, query: str, history: History, adapter: Optional[str] = None, system: Optional[str] = None) -> list[int]:
        """The family's chat format (tokenizer.build_chat_ids) for this turn; an adapter trained with a source
        prefix gets it in front of the prompt, as its training put it (the original main.py)."""
        prefix = self.registry.source_prefix(adapter)
        if prefix:
            return self.tokenizer.encode(build_prompt(self.tokenizer, query, history, prefix))
        return self.tokenizer.build_chat_ids(to_messages(query, history, system))

    def _reply_stream(self, slot, query, history, params, cancel, adapter, generator=None, system=None) -> Iterator[ReplyEvent]:
        ids = self.prompt_ids(query, history, adapter, system)
        limit = self.model.config.seq_length - len(ids)
        if limit <= 0:
            raise BackendError(f"the conversation is {len(ids)} tokens, the model's limit is {self.model.config.seq_length}; start a new conversation.")
        params = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, limit)})
        decoder = self._decoder_for(slot, adapter)
        eos = self.tokenizer.chat_stop_ids()  # ChatGLM3 also stops at <|user|> and <|observation|>
        start = time.perf_counter()
        emitted, new_ids = "", []

        def recorded():
            for token in decoder.generate(ids, params, eos, cancel, generator):
                new_ids.append(token)
                yield token

        for text in stream_text(self.tokenizer, recorded(), eos):
            if text.startswith(emitted) and len(text) > len(emitted):
                yield TextDelta(text[len(emitted):], slot)
                emitted = text
        text = without_partial_character(self.tokenizer.chat_response(new_ids))
        if text.startswith(emitted) and len(text) > len(emitted):  # a held-back partial character, at the end
            yield TextDelta(text[len(emitted):], slot)
        stopped = cancel is not None and cancel.is_set()
        yield ReplyDone(Reply(text, adapter, stopped, len(new_ids), time.perf_counter() - start), slot)

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
        """Text deltas of the reply to ``query`` after ``history`` (under a ``system`` text), then one ReplyDone."""
        adapter = self._active if adapter is ACTIVE else adapter
        generator = self._generator(seed)
        with self._lock:
            yield from self._reply_stream(0, query, history, params, cancel, adapter, generator, system)

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
    ) -> Iterator[ReplyEvent]:
        """The same prompt answered by two adapters (default: base vs active), interleaved as streams 0 and 1."""
        pair = list(adapters) or [None, self._active]
        with self._lock:
            streams = [self._reply_stream(i, query, history, params, cancel, a, self._generator(seed)) for i, a in enumerate(pair)]
            while streams:
                for stream in list(streams):
                    event = next(stream, None)
                    if event is None:
                        streams.remove(stream)
                    else:
                        yield event

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        g = torch.Generator(device=self.loaded.device)
        g.manual_seed(seed)
        return g

    # ------------------------------------------------------------ training

    def train(
        self,
        request: TrainRequest,
        progress: Callable[[TrainProgress], None],
        cancel: Optional[threading.Event] = None,
    ) -> TrainResult:
        """P-Tuning v2 on the already-loaded base; chat keeps working meanwhile (the base is shared, frozen)."""
        from .training import train_prefix

        # CUDA graph capture must not overlap a reply: it takes the engine's lock for those few seconds.
        return train_prefix(self.model, self.tokenizer, request, progress=progress, cancel=cancel, capture_lock=self._lock)

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
