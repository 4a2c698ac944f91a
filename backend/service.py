"""The service boundary between the chat engine and any front end (the TUI, the CLI).

Only plain data lives here: no torch import, so a front end and its fake backend can
use these types without loading the model stack. ``backend.engine.ChatEngine`` is the
real implementation of :class:`ChatBackend`; tests use a fake one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

History = list[tuple[str, str]]  # [(query, response), ...] like the original chat()


@dataclass(frozen=True)
class LoadProgress:
    """One step of model loading, for a progress bar."""

    stage: str  # "tokenizer" | "weights" | "quantizing" | "adapters" | "ready"
    current: int = 0  # e.g. shard i (1-based) ...
    total: int = 0  # ... of n; 0 when the stage has no count
    message: str = ""


ProgressCallback = Callable[[LoadProgress], None]


@dataclass
class SamplingParams:
    """Generation settings. temperature 0 means greedy decoding."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# The command lines' --dtype (glmchat, glmchat serve): what the loader picks when it is not given.
DTYPE_HELP = ("compute dtype (default: bf16 where the GPU has it, fp16 under 8-bit and on cards without bf16 "
              "such as the T4 and V100, fp32 on the CPU)")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # directory or hub id as given
    precision: str  # "bf16" | "fp16" | "fp32" | "8bit" | "4bit"
    device: str  # "cuda:0" | "cpu"
    engine: str = "eager"  # "eager" | "fast"
    family: str = "chatglm2"  # "chatglm2" | "chatglm3"
    variant: str = "chatglm2-6b"  # e.g. "chatglm2-6b-32k", "chatglm3-6b-base", "chatglm2-6b-int4"
    context_length: int = 8192  # prompt + reply tokens one request may use
    max_batch: int = 1  # rows decoded together
    # what the engine chose that the user should hear of once, e.g. a smaller cache because GPU memory is short
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    """A registered P-Tuning v2 checkpoint."""

    name: str  # unique label shown in the UI, e.g. "advertisegen/checkpoint-600"
    path: Path
    pre_seq_len: int
    prefix_projection: bool
    source_prefix: str = ""  # the run's --source-prefix: put in front of every prompt this adapter answers


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation in the OpenAI style; the model family's chat format turns a list
    of them into the prompt (ChatGLM2: a system text is prepended to the first query, as the
    original ``openai_api.py`` does; ChatGLM3: its own role tokens)."""

    role: str  # "system" | "user" | "assistant" | "observation"
    content: str


@dataclass
class Reply:
    """A finished (or stopped) reply."""

    text: str
    adapter: Optional[str]  # None = base model
    stopped: bool = False  # True when cancelled mid-reply; text is the partial reply
    new_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (eos or a stop string) | "length" | "cancelled"
    # from the request to its first new token (queueing and the prompt included), which is not always the first
    # text: a token can end inside a character, and a stop-string candidate is held back
    first_token_seconds: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TextDelta:
    """A piece of reply text to append. ``stream`` tells which column in compare mode."""

    text: str
    stream: int = 0


@dataclass(frozen=True)
class ReplyDone:
    reply: Reply
    stream: int = 0


ReplyEvent = Union[TextDelta, ReplyDone]


@dataclass
class TrainRequest:
    """P-Tuning v2 options, with the original train.sh defaults."""

    train_file: Union[Path, Sequence[Path]]  # one file, directory or cached dataset id, or several to blend
    output_dir: Path
    validation_file: Optional[Path] = None
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: Optional[str] = None
    source_prefix: str = ""
    max_source_length: int = 64
    max_target_length: int = 128
    pre_seq_len: int = 128
    prefix_projection: bool = False
    learning_rate: float = 2e-2
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_steps: int = 3000
    num_train_epochs: Optional[float] = None
    logging_steps: int = 10
    save_steps: int = 1000
    seed: int = 42
    gradient_checkpointing: bool = False
    # recompute each MLP's up-projection in the backward: less memory, ~13% slower; None: only when that lets a
    # larger micro-batch fit
    recompute_mlp: Optional[bool] = None
    resume: Optional[str] = None  # None | "latest" | a checkpoint directory
    init_checkpoint: Optional[Path] = None  # start from this prefix (weights only), as the original --ptuning_checkpoint
    overwrite_output_dir: bool = False
    skip_bad_lines: bool = False
    eval_steps: Optional[int] = None  # evaluate every N steps when a validation file is given
    mix: Optional[Sequence[float]] = None  # blend weights, one per train_file (None: in proportion to their sizes)
    micro_batch_size: Optional[int] = None  # examples through the model at once; None = the most that fits
    optim: str = "adamw_hf"  # "adamw_hf" (transformers 4.30's AdamW, the original's) or "adamw_torch"
    lr_scheduler_type: str = "linear"  # any name transformers' get_scheduler knows
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    report_to: str = "none"  # "none", "tensorboard" or "wandb"; progress.jsonl is written in any case


@dataclass(frozen=True)
class TrainProgress:
    """One progress event; the same fields are written as JSON lines to progress.jsonl."""

    step: int
    total_steps: int
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    epoch: Optional[float] = None
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    samples_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    gpu_mem_gb: Optional[float] = None
    eval_metrics: Optional[dict] = None
    checkpoint: Optional[str] = None  # set when a checkpoint was just saved
    event: str = "log"  # "start" | "log" | "eval" | "save" | "done" | "stopped"
    micro_batch_size: Optional[int] = None  # on "start": examples through the model at once
    recompute_mlp: Optional[bool] = None  # on "start": MLP activations recomputed in the backward (else kept)


@dataclass
class TrainResult:
    output_dir: Path
    last_checkpoint: Optional[Path]
    steps_done: int
    stopped: bool = False
    checkpoints: list[Path] = field(default_factory=list)


class BackendError(Exception):
    """A problem the user can fix. ``str(err)`` is one sentence saying what and how."""


class BusyError(BackendError):
    """Every decoding row is taken and the waiting queue is full; try again later (HTTP 429)."""


class ChatBackend(Protocol):
    """What a front end may ask of the engine. All methods may block: call them off the UI thread."""

    info: ModelInfo

    def adapters(self) -> list[AdapterInfo]: ...

    @property
    def active_adapter(self) -> Optional[str]: ...

    def register_adapter(self, path: Union[str, Path], name: Optional[str] = None) -> AdapterInfo: ...

    def scan_adapters(self, directory: Union[str, Path]) -> list[AdapterInfo]: ...

    def switch_adapter(self, name: Optional[str]) -> None: ...

    # Replies may be asked for from many threads at once: the engine decodes concurrent requests
    # together, one batch row each, and a set ``cancel`` frees the row at the next token.

    def stream_reply(
        self,
        query: str,
        history: History,
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ...,  # default: the active adapter
        seed: Optional[int] = None,
        system: Optional[str] = None,
    ) -> Iterator[ReplyEvent]: ...

    def stream_messages(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ...,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
    ) -> Iterator[ReplyEvent]:
        """The reply to the last user message of ``messages``; ``stop`` strings end it (not included)."""
        ...

    def stream_completion(
        self,
        prompt: str,
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        adapter: Union[str, None, object] = ...,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
    ) -> Iterator[ReplyEvent]:
        """A raw continuation of ``prompt`` (no chat format; special-token text stays text)."""
        ...

    def compare(
        self,
        query: str,
        history: History,
        params: SamplingParams,
        adapters: Sequence[Optional[str]],
        cancel: Optional[threading.Event] = None,
        seed: Optional[int] = None,
        system: Optional[str] = None,
    ) -> Iterator[ReplyEvent]: ...

    def train(
        self,
        request: TrainRequest,
        progress: Callable[[TrainProgress], None],
        cancel: Optional[threading.Event] = None,
    ) -> TrainResult: ...

    def gpu_memory_gb(self) -> Optional[float]: ...
