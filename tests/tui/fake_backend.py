"""A fake ChatBackend: canned replies streamed word by word, adapters, a fake training run.

Deterministic: the same query and adapter give the same reply; timings are on a fake clock
(50 tokens/s, 0.1 s per training step) so status bars and snapshots do not depend on the machine.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from backend.service import (
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

ACTIVE = object()  # stream_reply's default: the active adapter
FAKE_TOKENS_PER_S = 50.0
FAKE_STEP_S = 0.1


def canned_reply(query: str, adapter: Optional[str], turn: int) -> str:
    """The reply the fake gives: names the adapter and the round, so tests can tell replies apart."""
    who = adapter or "base"
    q = query.lower()
    if "code" in q:
        return (
            f"Round {turn}, **{who}** writes code:\n\n```python\ndef greet(name):\n"
            f"    return f\"hello {{name}}\"\n```\n\nThat is all."
        )
    if "long" in q:
        return " ".join(f"{who}-word{i}" for i in range(400))
    return f"Round {turn}, **{who}** answers: {query}"


def write_checkpoint(directory: Path, pre_seq_len: int = 128, prefix_projection: bool = False, source_prefix: str = "") -> Path:
    """A directory that looks like a P-Tuning v2 checkpoint to the fake (and to a human)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}
    if source_prefix:
        config["source_prefix"] = source_prefix
    (directory / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (directory / "pytorch_model.bin").write_bytes(b"fake prefix encoder")
    return directory


class FakeBackend:
    def __init__(
        self,
        *,
        token_delay: float = 0.0,
        train_step_delay: float = 0.0,
        info: ModelInfo = ModelInfo("fake/chatglm2-6b", "bf16", "cpu", "eager"),
        gpu_memory: Optional[float] = 3.25,
    ) -> None:
        self.info = info
        self.token_delay = token_delay
        self.train_step_delay = train_step_delay
        self._gpu_memory = gpu_memory
        self._adapters: dict[str, AdapterInfo] = {}
        self._active: Optional[str] = None
        self._lock = threading.Lock()
        self.calls: list[tuple[str, tuple]] = []  # (method, args) for tests to inspect

    # -- loading -------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str,
        quantization: Optional[str],
        adapters: Sequence[str],
        adapter_dirs: Sequence[str],
        progress: Callable[[LoadProgress], None],
        demo: bool = False,
        **options,
    ) -> "FakeBackend":
        """Like ChatEngine.load: reports each stage; a model path that does not exist fails like the real one."""
        step_delay = options.pop("step_delay", 0.0)
        engine = options.pop("engine", "eager")
        sample_adapters = options.pop("sample_adapters", 0)
        if model.startswith(("/", ".")) and not Path(model).exists():
            raise BackendError(f"No model at {model}: pass --model a directory with config.json and weights, or a hub id.")
        stages = [LoadProgress("tokenizer", message="tokenizer.model")]
        stages += [LoadProgress("weights", i, 3, f"shard {i}/3") for i in range(1, 4)]
        if quantization:
            stages.append(LoadProgress("quantizing", message=quantization))
        for stage in stages:
            progress(stage)
            time.sleep(step_delay)
        backend = cls(info=ModelInfo(model, quantization or "bf16", "cpu", engine), **options)
        paths = list(adapters)
        if sample_adapters:  # a throwaway run directory, so a dev session has adapters to switch between
            run = Path(tempfile.mkdtemp(prefix="glmchat-fake-")) / "adgen-pt-128-2e-2"
            paths += [str(write_checkpoint(run / f"checkpoint-{600 * i}")) for i in range(1, sample_adapters + 1)]
        for i, path in enumerate(paths, 1):
            progress(LoadProgress("adapters", i, len(paths), str(path)))
            backend.register_adapter(path)
        for directory in adapter_dirs:
            progress(LoadProgress("adapters", message=str(directory)))
            backend.scan_adapters(directory)
        progress(LoadProgress("ready"))
        return backend

    # -- adapters ------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return list(self._adapters.values())

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active

    def register_adapter(self, path: Union[str, Path], name: Optional[str] = None) -> AdapterInfo:
        path = Path(path)
        self.calls.append(("register_adapter", (str(path), name)))
        if not (path / "pytorch_model.bin").is_file() or not (path / "config.json").is_file():
            raise BackendError(
                f"No P-Tuning checkpoint at {path}: expected a directory with pytorch_model.bin and config.json "
                "(e.g. output/<run>/checkpoint-600)."
            )
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        info = AdapterInfo(
            name or f"{path.parent.name}/{path.name}",
            path,
            int(config.get("pre_seq_len", 128)),
            bool(config.get("prefix_projection", False)),
            str(config.get("source_prefix", "")),
        )
        with self._lock:
            for existing in self._adapters.values():
                if existing.path == info.path:
                    return existing
            self._adapters[info.name] = info
        return info

    def scan_adapters(self, directory: Union[str, Path]) -> list[AdapterInfo]:
        directory = Path(directory)
        if not directory.is_dir():
            raise BackendError(f"No directory {directory}: pass --adapters a training output directory.")
        found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return [self.register_adapter(p) for p in found if (p / "pytorch_model.bin").is_file()]

    def switch_adapter(self, name: Optional[str]) -> None:
        self.calls.append(("switch_adapter", (name,)))
        if name is not None and name not in self._adapters:
            raise BackendError(f"No adapter named {name}: register it first.")
        self._active = name

    # -- chat ------------------------------------------------------------------------

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
        adapter = self._active if adapter is ACTIVE else adapter
        self.calls.append(("stream_reply", (query, list(history), params, adapter, system)))
        yield from self._stream(query, history, params, cancel, adapter, 0)

    def compare(
        self,
        query: str,
        history: History,
        params: SamplingParams,
        adapters: Sequence[Optional[str]],
        cancel: Optional[threading.Event] = None,
        seed: Optional[int] = None,
        system: Optional[str] = None,
    ) -> Iterator[ReplyEvent]:
        self.calls.append(("compare", (query, list(history), params, list(adapters), system)))
        streams = [self._stream(query, history, params, cancel, a, i) for i, a in enumerate(adapters)]
        while streams:  # interleave the columns token by token, as a batched engine would
            for stream in list(streams):
                event = next(stream, None)
                if event is None:
                    streams.remove(stream)
                else:
                    yield event

    def _stream(self, query, history, params, cancel, adapter, stream) -> Iterator[ReplyEvent]:
        if adapter is not None and adapter not in self._adapters:
            raise BackendError(f"No adapter named {adapter}: register it first.")
        words = canned_reply(query, adapter, len(history) + 1).split(" ")[: params.max_new_tokens]
        text, stopped = "", False
        for i, word in enumerate(words):
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            if self.token_delay:
                time.sleep(self.token_delay)
            piece = word if i == 0 else " " + word
            text += piece
            yield TextDelta(piece, stream)
        n = len(text.split(" ")) if text else 0
        yield ReplyDone(Reply(text, adapter, stopped, n, n / FAKE_TOKENS_PER_S), stream)

    # -- training --------------------------------------------------------------------

    def train(
        self,
        request: TrainRequest,
        progress: Callable[[TrainProgress], None],
        cancel: Optional[threading.Event] = None,
    ) -> TrainResult:
        self.calls.append(("train", (request,)))
        if not Path(request.train_file).is_file():
            raise BackendError(f"No training data at {request.train_file}: give a JSON lines file.")
        out = Path(request.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "progress.jsonl").open("w", encoding="utf-8")
        total = request.max_steps
        checkpoints: list[Path] = []

        def emit(event: TrainProgress) -> None:
            log.write(json.dumps(asdict(event)) + "\n")
            log.flush()
            progress(event)

        def save(step: int) -> TrainProgress:
            path = write_checkpoint(out / f"checkpoint-{step}", request.pre_seq_len, request.prefix_projection)
            checkpoints.append(path)
            return TrainProgress(step, total, elapsed_s=step * FAKE_STEP_S, checkpoint=str(path), event="save")

        try:
            emit(TrainProgress(0, total, event="start", micro_batch_size=8, recompute_mlp=True))
            for step in range(1, total + 1):
                if cancel is not None and cancel.is_set():
                    done = step - 1
                    if done and (not checkpoints or checkpoints[-1].name != f"checkpoint-{done}"):
                        emit(save(done))
                    emit(TrainProgress(done, total, elapsed_s=done * FAKE_STEP_S, event="stopped"))
                    return TrainResult(out, checkpoints[-1] if checkpoints else None, done, True, checkpoints)
                if self.train_step_delay:
                    time.sleep(self.train_step_delay)
                elapsed = step * FAKE_STEP_S
                if step % request.logging_steps == 0:
                    emit(TrainProgress(
                        step, total, loss=round(4.0 / (1 + 0.05 * step), 4),
                        learning_rate=request.learning_rate * (1 - step / total), epoch=step / 100,
                        elapsed_s=elapsed, eta_s=(total - step) * FAKE_STEP_S,
                        samples_per_s=request.per_device_train_batch_size * request.gradient_accumulation_steps / FAKE_STEP_S,
                        tokens_per_s=1920.0, gpu_mem_gb=self._gpu_memory, event="log",
                    ))
                if request.eval_steps and request.validation_file and step % request.eval_steps == 0:
                    emit(TrainProgress(step, total, elapsed_s=elapsed, event="eval",
                                       eval_metrics={"bleu-4": 8.1, "rouge-1": 31.12}))
                if step % request.save_steps == 0 or step == total:
                    emit(save(step))
            emit(TrainProgress(total, total, elapsed_s=total * FAKE_STEP_S, eta_s=0.0, event="done"))
            return TrainResult(out, checkpoints[-1] if checkpoints else None, total, False, checkpoints)
        finally:
            log.close()

    def gpu_memory_gb(self) -> Optional[float]:
        return self._gpu_memory
