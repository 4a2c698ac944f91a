"""The OpenAI wire format glmchat serves, as pydantic models (requests validated, responses built).

Only the fields glmchat acts on are declared; other OpenAI fields a client sends (``user``,
``presence_penalty``, ...) are accepted and ignored, as OpenAI-compatible servers do, so existing
clients work unchanged. ``repetition_penalty`` and ``top_k`` are the usual extensions (vLLM's names).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant", "observation"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Request):
    role: Role
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """Newer clients send content as parts, ``[{"type": "text", "text": ...}]``: their text, joined."""
        if not isinstance(value, list):
            return value
        if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise ValueError("only text parts ({\"type\": \"text\", \"text\": ...}) are understood; send the text")
        return "".join(p["text"] for p in value)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: Optional[str] = None  # None: the base model
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer OpenAI name of max_tokens
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_SamplingRequest):
    prompt: str


class AdapterRequest(_Request):
    path: str = Field(min_length=1, description="a checkpoint directory, or a run directory of checkpoint-* on the server")
    name: Optional[str] = None


# ------------------------------------------------------------------ responses


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterCard(BaseModel):
    name: str
    path: str
    pre_seq_len: int
    prefix_projection: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "glmchat"
    root: str
    parent: Optional[str] = None
    max_model_len: int
    adapter: Optional[AdapterCard] = None  # set on BASE:ADAPTER entries
    glmchat: Optional[dict] = None  # the base model's service.ModelInfo, for glmchat --server


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[str]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    """Also each streamed chunk of /v1/completions (OpenAI streams this same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
