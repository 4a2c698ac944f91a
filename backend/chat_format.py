"""The two families' chat formats as plain functions on messages and ids (no torch).

ChatGLM2 has numbered 问/答 rounds; a system text is put in front of the current query, as the
original ``openai_api.py`` does. ChatGLM3 frames each turn with a role token and a metadata line
(its ``build_chat_input``), replies after ``<|assistant|>`` and may answer with a tool call, which
the original ``eval``s: here it is parsed as literals only. Its fine-tuning demo's
``conversations`` data (role/content turns, loss on the assistant turns) is turned into ids here too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Optional, Sequence

from .service import BackendError, ChatMessage, History

CHATGLM3_ROLES = ("system", "user", "assistant", "observation")
IGNORE_INDEX = -100


def to_messages(query: str, history: History, system: Optional[str] = None) -> list[ChatMessage]:
    """(query, [(q, a), ...], system) as messages: the shape every front end's turn comes in."""
    messages = [ChatMessage("system", system)] if system else []
    for old_query, response in history or []:
        messages += [ChatMessage("user", old_query), ChatMessage("assistant", response)]
    return messages + [ChatMessage("user", query)]


def chatglm2_query_history(messages: Sequence[ChatMessage]) -> tuple[str, History]:
    """The ChatGLM2 ``openai_api.py`` reading of messages: a leading system text goes in front of the
    current query; the rest must be user/assistant pairs."""
    if not messages or messages[-1].role != "user":
        raise BackendError("the last message must be the user's; ChatGLM2 answers a user message.")
    query, previous = messages[-1].content, list(messages[:-1])
    if previous and previous[0].role == "system":
        query = previous.pop(0).content + query
    roles = [m.role for m in previous]
    if roles != ["user", "assistant"] * (len(previous) // 2):
        raise BackendError(
            f"ChatGLM2 takes an optional system message then user/assistant pairs, got roles {roles}; "
            "drop the extra messages or use a ChatGLM3 model for other roles."
        )
    return query, [(previous[i].content, previous[i + 1].content) for i in range(0, len(previous), 2)]


@dataclass(frozen=True)
class ChatGLM3Reply:
    """A ChatGLM3 reply: plain ``text``, or a call of the tool ``tool`` (its metadata line)."""

    text: str
    tool: Optional[str] = None
    parameters: Optional[dict] = None  # the call's literal arguments, when tools were offered


def chatglm3_response(output: str, tools_offered: bool = False) -> ChatGLM3Reply:
    """The original ``process_response``: the last ``<|assistant|>`` segment; a first line that is not
    blank is metadata (a tool name). Tool arguments are read as literals, never evaluated."""
    content, metadata = "", ""
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
    if not metadata.strip():
        return ChatGLM3Reply(content.strip().replace("[[训练时间]]", "2023年"))
    if tools_offered:
        code = "\n".join(content.split("\n")[1:-1])  # inside the ``` fence
        return ChatGLM3Reply(code, metadata.strip(), parse_tool_call(code))
    return ChatGLM3Reply(content, metadata.strip())


def parse_tool_call(code: str) -> dict:
    """``tool_call(a=1, b="x")`` -> ``{"a": 1, "b": "x"}``; anything but literal keyword arguments is refused."""
    try:
        call = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            raise ValueError("not a call with keyword arguments")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
    except (SyntaxError, ValueError) as err:
        raise BackendError(f"the model's tool call is not literal keyword arguments ({err}): {code[:80]!r}.") from None


# ------------------------------------------------------------------ ChatGLM3 fine-tuning data


def conversation_messages(record: object, where: str) -> list[ChatMessage]:
    """A ``conversations`` record (list of {role, content}) as messages; a wrong shape or role names ``where``."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise BackendError(f"{where}: expected {{\"conversations\": [{{\"role\": ..., \"content\": ...}}, ...]}}; fix the line.")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise BackendError(f"{where}: turn {i} of 'conversations' must be an object with a text 'content'; fix the line.")
        role = turn.get("role")
        if role not in CHATGLM3_ROLES:
            raise BackendError(f"{where}: turn {i} has role {role!r}, which ChatGLM3 does not have; use one of {', '.join(CHATGLM3_ROLES)}.")
        messages.append(ChatMessage(role, turn["content"]))
    if not any(m.role == "assistant" for m in messages):
        raise BackendError(f"{where}: the conversation has no assistant turn to learn; add one or drop the line.")
    return messages


def conversation_features(tokenizer, messages: Sequence[ChatMessage], max_length: int) -> dict[str, list[int]]:
    """input_ids and labels as the ChatGLM3 fine-tuning demo's ``process_batch`` builds them:
    ``[gMASK] sop``, each turn's role token, metadata line and text, then eos. A token is learnt when
    the token before it belongs to a turn that is not system or user (so an assistant turn's text and
    the token after it, not its role token); both lists cut to ``max_length``."""
    input_ids, learnt_after = list(tokenizer.get_prefix_tokens()), [False, False]
    for message in messages:
        ids = tokenizer.build_single_message(message.role, "", message.content)
        input_ids += ids
        learnt_after += [message.role not in ("system", "user")] * len(ids)
    input_ids.append(tokenizer.eos_token_id)
    labels = [t if learn else IGNORE_INDEX for t, learn in zip(input_ids, [False, *learnt_after])]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def chatglm3_training_messages(prompt: str, response: str, history: History, source_prefix: str = "") -> list[ChatMessage]:
    """A prompt/response pair (with history) as ChatGLM3 turns, so both data formats train its chat format."""
    return to_messages(source_prefix + prompt, history) + [ChatMessage("assistant", response)]


def conversation_train_features(tokenizer, conversations: Sequence[Sequence[ChatMessage]], max_length: int) -> list[dict[str, list[int]]]:
    """``conversation_features`` for each conversation, right-padded to ``max_length`` (pad id, -100)."""
    features = []
    for messages in conversations:
        f = conversation_features(tokenizer, messages, max_length)
        gap = max_length - len(f["input_ids"])
        features.append({"input_ids": f["input_ids"] + [tokenizer.pad_token_id] * gap, "labels": f["labels"] + [IGNORE_INDEX] * gap})
    return features


def conversation_eval_features(tokenizer, messages: Sequence[ChatMessage], max_source_length: int,
                               max_target_length: int) -> list[dict[str, list[int]]]:
    """As the demo's ``process_batch_eval``: one example per assistant turn, the context so far (cut to
    ``max_source_length``) plus ``<|assistant|>`` as input, the turn's metadata line, text and eos as label."""
    context, features = list(tokenizer.get_prefix_tokens()), []
    for message in messages:
        ids = tokenizer.build_single_message(message.role, "", message.content)
        if message.role == "assistant":
            features.append({"input_ids": context[:max_source_length] + ids[:1],
                             "labels": (ids[1:] + [tokenizer.eos_token_id])[:max_target_length]})
        context += ids
    return features


def conversation_as_round(messages: Sequence[ChatMessage], where: str) -> tuple[str, str, History]:
    """A conversation as ChatGLM2 training data: the last reply is the response, the turns before it
    the query and history (ChatGLM2's own fine-tuning learns only the last reply)."""
    if messages[-1].role != "assistant":
        raise BackendError(f"{where}: the conversation must end with an assistant turn to train ChatGLM2 on it; end it with one or drop the line.")
    try:
        query, history = chatglm2_query_history(messages[:-1])
    except BackendError as err:
        raise BackendError(f"{where}: {err}") from None
    return query, messages[-1].content, history
