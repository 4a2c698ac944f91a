"""P-Tuning v2 data: read JSON lines and turn them into model inputs as ChatGLM2-6B's ``ptuning/main.py`` does.

``preprocess_train`` and ``preprocess_eval`` reproduce the original ``preprocess_function_train`` /
``preprocess_function_eval`` token for token (the golden test pins this), including two quirks:

* ``source_prefix`` goes in front of the whole built prompt (``prefix + build_prompt(query, history)``),
  i.e. before ``[Round 1]``, not in front of the query;
* with ``ignore_pad_token_for_loss`` every label equal to ``pad_token_id`` becomes -100, so a genuine
  token with the pad id (ChatGLM2's pad id 0 is ``<unk>``) is ignored by the loss too.

Examples are plain lists of ints; torch is only needed by the collate functions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

from backend.chat_format import (
    chatglm3_training_messages,
    conversation_as_round,
    conversation_eval_features,
    conversation_messages,
    conversation_train_features,
)
from backend.service import BackendError, ChatMessage

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label id the loss skips (torch CrossEntropyLoss ignore_index)


class DataError(BackendError):
    """A data file the user has to fix (or re-run with skip_bad_lines). The message names file:line."""


class PromptTokenizer(Protocol):
    """What preprocessing needs of a tokenizer (ChatGLMTokenizer has all of it)."""

    eos_token_id: int
    pad_token_id: int

    def build_prompt(self, query: str, history: Optional[list] = None) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One training pair read from a data file."""

    prompt: str
    response: str
    history: tuple[tuple[str, str], ...] = ()
    where: str = ""  # "file:line" it came from, for messages
    messages: tuple[ChatMessage, ...] = ()  # a ChatGLM3 demo "conversations" record (then prompt/response are "")


class ExampleList(list):
    """The examples of a file, plus what was left out so a CLI can say "skipped 3 bad lines"."""

    def __init__(self, items: Sequence[Example] = (), skipped: Sequence[str] = (), empty: int = 0):
        super().__init__(items)
        self.skipped: list[str] = list(skipped)  # one message per bad line skipped (skip_bad_lines=True)
        self.empty: int = empty  # lines dropped because prompt or response is empty, as the original does
        self.columns: tuple[str, ...] = ()  # the source's columns (of its first good record)


# --------------------------------------------------------------------------------------------- reading


def _flag(column_role: str) -> str:
    return {"prompt": "--prompt-column", "response": "--response-column", "history": "--history-column"}[column_role]


def _parse_record(
    record: Any,
    where: str,
    prompt_column: str,
    response_column: str,
    history_column: Optional[str],
) -> Optional[Example]:
    """One decoded JSON value -> Example, None when prompt/response is empty; DataError when unusable."""
    if isinstance(record, dict) and "conversations" in record and prompt_column not in record:
        try:  # the ChatGLM3 fine-tuning demo's format (backend/chat_format.py)
            return Example("", "", (), where, tuple(conversation_messages(record, where)))
        except DataError:
            raise
        except BackendError as err:
            raise DataError(str(err)) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object like {{\"{prompt_column}\": ..., \"{response_column}\": ...}}, "
            f"got a {type(record).__name__}; fix the line or pass --skip-bad-lines"
        )
    roles = [("prompt", prompt_column), ("response", response_column)]
    if history_column is not None:
        roles.append(("history", history_column))
    for role, column in roles:
        if column not in record:
            columns = ", ".join(record) if record else "(none)"
            raise DataError(
                f"{where}: missing column '{column}'; the columns here are {columns} — pass {_flag(role)}"
            )
    values = {}
    for role, column in roles[:2]:
        value = record[column]
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{where}: column '{column}' holds a {type(value).__name__}, expected text; "
                f"fix the line or pass --skip-bad-lines"
            )
        values[role] = value or ""
    history: list[tuple[str, str]] = []
    if history_column is not None and record[history_column] is not None:
        raw = record[history_column]
        ok = isinstance(raw, list) and all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in raw
        )
        if not ok:
            raise DataError(
                f"{where}: column '{history_column}' must be a list of [query, response] pairs of text; "
                f"fix the line or pass --skip-bad-lines"
            )
        history = [(q, r) for q, r in raw]
    if not values["prompt"] or not values["response"]:
        return None  # the original drops these silently: `if examples[prompt][i] and examples[response][i]`
    return Example(values["prompt"], values["response"], tuple(history), where)


def _records(path: Path, text: str):
    """Yield (where, decoded value or the JSONDecodeError) for each non-blank line or list item."""
    name = str(path)
    if text.lstrip().startswith("["):  # a .json file holding one JSON list
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{name}:{err.lineno}: not valid JSON ({err.msg}); the file starts with '[' so it is read as "
                f"one JSON list — fix it, or write one JSON object per line"
            ) from None
        for index, item in enumerate(items, start=1):
            yield f"{name}: item {index}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{name}:{lineno}", err


def read_examples(
    path: Union[str, Path],
    prompt_column: str,
    response_column: str,
    history_column: Optional[str] = None,
    skip_bad_lines: bool = False,
    cache_dir: Optional[str] = None,
) -> ExampleList:
    """Read a data source into examples: a JSON lines file (or a .json file holding a JSON list), a CSV
    or Parquet file, a directory of such files, or a dataset id in the local Hugging Face cache.

    Files go through ``datasets`` and its Arrow cache (keyed by the file's size and time), so a second
    run on a large file starts at once. A line that is not JSON or lacks a column raises DataError naming
    ``file:line`` and the fix; with ``skip_bad_lines`` such lines are skipped and listed in
    ``result.skipped`` (the caller reports them, once each). Blank lines are ignored; lines with an empty
    prompt or response are dropped (counted in ``result.empty``) like the original. No usable line at
    all raises DataError.
    """
    from .datasource import parsed_rows

    columns = (prompt_column, response_column, history_column)
    examples: list[Example] = []
    skipped: list[str] = []
    keys: list[str] = []
    empty = 0
    for row in parsed_rows(path, columns, cache_dir):
        if row["fatal"]:
            raise DataError(row["error"])
        if row["error"] is not None:
            if not skip_bad_lines:
                raise DataError(row["error"])
            skipped.append(row["error"])
            logger.debug("skipping bad line: %s", row["error"])
            continue
        if not keys and row["keys"]:
            keys = row["keys"].split("\x1f")
        if row["empty"]:
            empty += 1
        else:
            history = tuple(tuple(turn) for turn in row["history"] or ())
            messages = tuple(ChatMessage(role, content) for role, content in row.get("messages") or ())
            examples.append(Example(row["prompt"], row["response"], history, row["where"], messages))
    if not examples:
        if skipped:
            reason = f"all {len(skipped)} lines were bad, the first: {skipped[0]}"
        elif empty:
            reason = f"all {empty} lines have an empty '{prompt_column}' or '{response_column}'"
        else:
            reason = "the file is empty"
        raise DataError(f"{path}: no usable examples ({reason})")
    result = ExampleList(examples, skipped, empty)
    result.columns = tuple(keys)
    return result


def parse_row(record: Any, where: str, columns: tuple) -> dict:
    """One decoded record (or the JSONDecodeError of its line) -> a parsed row as the Arrow cache keeps it."""
    row = {"prompt": None, "response": None, "history": None, "where": where, "error": None, "fatal": False,
           "empty": False, "keys": "\x1f".join(record) if isinstance(record, dict) else "", "messages": None}
    try:
        if isinstance(record, json.JSONDecodeError):
            raise DataError(
                f"{where}: not valid JSON ({record.msg} at column {record.colno}); each line must be one "
                f"JSON object — fix the line or pass --skip-bad-lines"
            )
        example = _parse_record(record, where, *columns)
    except DataError as err:
        row["error"] = str(err)
        return row
    if example is None:
        row["empty"] = True
    else:
        row.update(prompt=example.prompt, response=example.response, history=[list(t) for t in example.history],
                   messages=[[m.role, m.content] for m in example.messages])
    return row


# --------------------------------------------------------------------------------------- preprocessing


def build_prompt(tokenizer: PromptTokenizer, query: str, history=None, source_prefix: str = "") -> str:
    """The model's prompt text: ``source_prefix + tokenizer.build_prompt(query, history)`` as the original."""
    history = [tuple(turn) for turn in history] if history else None
    return source_prefix + tokenizer.build_prompt(query, history)


def _encode(tokenizer: PromptTokenizer, text: str, add_special_tokens: bool, max_length: int) -> list[int]:
    # Same as HF encode(truncation=True, max_length=n): ChatGLM2's special tokens are a prefix
    # ([gMASK], sop), so cutting the full id list from the right keeps them and drops text tokens.
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))[:max_length]


def _chatglm3_conversations(examples: Sequence[Example], source_prefix: str) -> list[list[ChatMessage]]:
    return [list(ex.messages) if ex.messages else chatglm3_training_messages(ex.prompt, ex.response, list(ex.history), source_prefix)
            for ex in examples if ex.messages or (ex.prompt and ex.response)]


def _as_round(ex: Example) -> Example:
    """A conversation as a ChatGLM2 prompt/response example; others unchanged."""
    if not ex.messages:
        return ex
    try:
        query, response, history = conversation_as_round(ex.messages, ex.where)
    except BackendError as err:
        raise DataError(str(err)) from None
    return Example(query, response, tuple(history), ex.where)


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    if max_source_length < 1 or max_target_length < 1:
        raise DataError(
            f"max_source_length and max_target_length must be at least 1 "
            f"(got {max_source_length} and {max_target_length})"
        )


def train_ids(example: Example, tokenizer: PromptTokenizer, max_source_length: int, max_target_length: int,
              source_prefix: str = "") -> Optional[dict[str, list[int]]]:
    """One example's training feature ``{"input_ids", "labels"}``, padded to max_source + max_target + 1
    (None when its prompt or response is empty, as the original skips those). The per-example step a
    chat format with its own layout replaces.

    input_ids = prompt ids (with special tokens, cut to max_source_length) + answer ids (cut to
    max_target_length) + [eos], then pad ids; labels = -100 over the prompt and padding.
    """
    if not example.prompt or not example.response:
        return None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt = build_prompt(tokenizer, example.prompt, example.history, source_prefix)
    a_ids = _encode(tokenizer, prompt, True, max_source_length)
    b_ids = _encode(tokenizer, example.response, False, max_target_length)
    input_ids = a_ids + b_ids + [eos]
    labels = [pad] * len(a_ids) + b_ids + [eos]
    pad_len = max_source_length + max_target_length + 1 - len(input_ids)
    input_ids = input_ids + [pad] * pad_len
    labels = labels + [pad] * pad_len
    labels = [(t if t != pad else IGNORE_INDEX) for t in labels]  # ignore_pad_token_for_loss
    return {"input_ids": input_ids, "labels": labels}


def preprocess_train(
    examples: Sequence[Example],
    tokenizer: PromptTokenizer,
    max_source_length: int,
    max_target_length: int,
    source_prefix: str = "",
    to_ids=train_ids,
) -> list[dict[str, list[int]]]:
    """Training features of ``examples`` (see :func:`train_ids`, or another format's ``to_ids`` of the same
    signature), each padded to max_source + max_target + 1; examples it returns None for are skipped."""
    _check_lengths(max_source_length, max_target_length)
    max_seq_length = max_source_length + max_target_length + 1
    if getattr(tokenizer, "family", "chatglm2") == "chatglm3":  # its demo's format, whichever data format
        return conversation_train_features(tokenizer, _chatglm3_conversations(examples, source_prefix), max_seq_length)
    features = (to_ids(_as_round(ex), tokenizer, max_source_length, max_target_length, source_prefix) for ex in examples)
    return [f for f in features if f is not None]


def preprocess_eval(
    examples: Sequence[Example],
    tokenizer: PromptTokenizer,
    max_source_length: int,
    max_target_length: int,
    source_prefix: str = "",
) -> list[dict[str, list[int]]]:
    """Evaluation features ``{"input_ids", "labels"}``, unpadded; batch them with :func:`collate_eval`.

    input_ids = prompt ids with special tokens cut to max_source_length; labels = answer ids *with*
    special tokens (the original calls ``tokenizer(text_target=...)``) cut to max_target_length, pad -> -100.
    Decode labels with special tokens skipped for metrics.
    """
    _check_lengths(max_source_length, max_target_length)
    if getattr(tokenizer, "family", "chatglm2") == "chatglm3":
        return [f for messages in _chatglm3_conversations(examples, source_prefix)
                for f in conversation_eval_features(tokenizer, messages, max_source_length, max_target_length)]
    pad = tokenizer.pad_token_id
    features = []
    for ex in map(_as_round, examples):
        if not ex.prompt or not ex.response:
            continue
        prompt = build_prompt(tokenizer, ex.prompt, ex.history, source_prefix)
        input_ids = _encode(tokenizer, prompt, True, max_source_length)
        labels = _encode(tokenizer, ex.response, True, max_target_length)
        labels = [(t if t != pad else IGNORE_INDEX) for t in labels]
        features.append({"input_ids": input_ids, "labels": labels})
    return features


# -------------------------------------------------------------------------------------------- batching


def collate_train(features: Sequence[dict]) -> dict:
    """Stack already padded training features: input_ids, labels as LongTensor [batch, seq]."""
    import torch

    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long),
        "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
    }


def collate_eval(features: Sequence[dict], pad_token_id: int) -> dict:
    """LEFT-pad eval features for batched generation, as ChatGLM2's tokenizer pads.

    Returns LongTensors [batch, seq]: input_ids (pad id on the left), attention_mask (0 on padding),
    position_ids (0 on padding, then 0..n-1), and labels [batch, label_len] left-padded with -100.
    """
    import torch

    width = max(len(f["input_ids"]) for f in features)
    label_width = max(len(f["labels"]) for f in features)
    input_ids, attention_mask, position_ids, labels = [], [], [], []
    for f in features:
        ids = list(f["input_ids"])
        gap = width - len(ids)
        input_ids.append([pad_token_id] * gap + ids)
        attention_mask.append([0] * gap + [1] * len(ids))
        position_ids.append([0] * gap + list(range(len(ids))))
        labels.append([IGNORE_INDEX] * (label_width - len(f["labels"])) + list(f["labels"]))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
