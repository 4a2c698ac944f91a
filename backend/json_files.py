"""JSON files users hand us (a model's config.json and weight index, an adapter's config.json): valid JSON
of the wrong shape is one sentence naming the file and the key, never a traceback further in.

The type checks are written once: a config's keys are checked against the type hints of the function that
takes them (``ChatGLMConfig.__init__``), so a key added there is checked too.
"""

from __future__ import annotations

import json
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from .service import BackendError


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; BackendError naming ``fix`` when it is unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackendError(f"{path} is not valid JSON ({_reason(err)}); {fix}.") from None
    except OSError as err:
        raise BackendError(f"{path} could not be read ({err.strerror or err}); {fix}.") from None
    if not isinstance(data, dict):
        raise BackendError(f"{path} holds {describe(data)} where a JSON object ({{...}}) belongs; {fix}.")
    return data


def check_keys_fit(data: Mapping[str, Any], function: Callable, source: Path, fix: str) -> None:
    """Every key of ``data`` that ``function`` takes as a parameter holds a value of its annotated type."""
    hints = parameter_types(function)
    for key, value in data.items():
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise BackendError(
                f"{source}: \"{key}\" is {describe(value)} but must be {_type_name(expected)}; {fix}."
            )


@lru_cache(maxsize=None)
def parameter_types(function: Callable) -> dict[str, Any]:
    """``{parameter: annotated type}`` of ``function`` (string annotations resolved)."""
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return hints


def _matches(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(expected))
    if expected is type(None):
        return value is None
    origin = typing.get_origin(expected) or expected
    if not isinstance(origin, type):
        return True  # an annotation we do not check (a TypeVar, a Literal...)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON writes 1e-5 and 1 alike
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)  # true is not a layer count
    return isinstance(value, origin)


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(member) for member in typing.get_args(expected))
    origin = typing.get_origin(expected) or expected
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(origin, getattr(origin, "__name__", str(origin)))


def describe(value: Any) -> str:
    """``a list``, ``the string "two"``, ``the number 3``: what a file holds, for the sentence."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40], ensure_ascii=False)}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _reason(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno}, column {err.colno}"
    return "not UTF-8 text"
