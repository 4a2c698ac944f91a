"""The form for a P-Tuning v2 run: the main options of train_cli.py, with the original train.sh defaults."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional

from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.widgets import Checkbox, Input, Label

from backend.service import TrainRequest

DEFAULT_TRAIN_FILE = "AdvertiseGen/train.json"
DEFAULT_OUTPUT_DIR = "output/adgen-chatglm2-6b-pt-128-2e-2"

# (TrainRequest field, label, kind): kind is path | str | int | float | bool, "?" = may be left empty
PATH_FIELDS = (
    ("train_file", "Train file", "paths"),  # several, comma-separated, blend by the mix weights
    ("mix", "Mix weights", "floats?"),
    ("validation_file", "Validation file", "path?"),
    ("output_dir", "Output dir", "path"),
    ("resume", "Resume from", "str?"),
)
OPTION_FIELDS = (
    ("prompt_column", "Prompt column", "str"),
    ("response_column", "Response column", "str"),
    ("history_column", "History column", "str?"),
    ("source_prefix", "Source prefix", "str?"),
    ("max_source_length", "Max source len", "int"),
    ("max_target_length", "Max target len", "int"),
    ("pre_seq_len", "Pre seq len", "int"),
    ("learning_rate", "Learning rate", "float"),
    ("per_device_train_batch_size", "Batch size", "int"),
    ("gradient_accumulation_steps", "Grad accumulation", "int"),
    ("max_steps", "Max steps", "int"),
    ("logging_steps", "Logging steps", "int"),
    ("save_steps", "Save steps", "int"),
    ("eval_steps", "Eval steps", "int?"),
    ("seed", "Seed", "int"),
)
FLAG_FIELDS = (
    ("prefix_projection", "Prefix projection"),
    ("gradient_checkpointing", "Grad checkpointing"),
    ("overwrite_output_dir", "Overwrite output"),
    ("skip_bad_lines", "Skip bad lines"),
)
POSITIVE = {"max_source_length", "max_target_length", "pre_seq_len", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_steps", "logging_steps", "save_steps", "eval_steps"}


DEMO_OUTPUT_DIR = "output/demo-advertisegen"
_FLAG = re.compile(r"(pass )?--([a-z][a-z0-9_-]*)")


def in_form_terms(message: str) -> str:
    """A training error names command-line flags (``pass --overwrite-output-dir``); in the app the user
    sets the form's fields, so name those (``set “Overwrite output”``). Flags the form lacks stay."""
    labels = {name: label for name, label, *_kind in PATH_FIELDS + OPTION_FIELDS + FLAG_FIELDS}

    def field(match: re.Match) -> str:
        label = labels.get(match.group(2).replace("-", "_"))
        if label is None:
            return match.group(0)
        return f"{'set ' if match.group(1) else ''}“{label}”"

    return _FLAG.sub(field, message)


def field_label(name: str) -> str:
    """How the form calls a TrainRequest field, for the backend's request errors ("`pre_seq_len`")."""
    labels = {n: label for n, label, *_ in PATH_FIELDS + OPTION_FIELDS + FLAG_FIELDS}
    return f"“{labels[name]}”" if name in labels else name.replace("_", " ")


def defaults(demo: bool = False) -> dict:
    """train.sh's settings; with the demo model, the demo adapter's (about a minute on a CPU at most)."""
    if demo:
        from backend.demo import demo_train_request

        request = demo_train_request(DEMO_OUTPUT_DIR)
        values = {f.name: getattr(request, f.name) for f in fields(TrainRequest)}
        values["save_steps"] = values["max_steps"]  # one checkpoint at the end, to chat with
        return values
    values = {f.name: f.default for f in fields(TrainRequest) if f.default is not MISSING}
    values.update(train_file=DEFAULT_TRAIN_FILE, output_dir=DEFAULT_OUTPUT_DIR)
    return values


class TrainForm(VerticalScroll, can_focus=False):
    def __init__(self, *, demo: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.demo = demo

    def compose(self) -> ComposeResult:
        values = defaults(self.demo)
        with Grid(id="train-paths"):
            for name, label, _kind in PATH_FIELDS:
                yield Label(label)
                yield Input(_text(values.get(name)), id=f"train-{name}", compact=True)
        with Grid(id="train-options"):
            for name, label, _kind in OPTION_FIELDS:
                yield Label(label)
                yield Input(_text(values.get(name)), id=f"train-{name}", compact=True)
        with Grid(id="train-flags"):
            for name, label in FLAG_FIELDS:
                yield Checkbox(label, bool(values.get(name)), id=f"train-{name}", compact=True)

    def request(self) -> tuple[Optional[TrainRequest], list[str]]:
        """The TrainRequest the form describes, or the problems that stop it."""
        values, errors = {}, []
        for name, label, kind in PATH_FIELDS + OPTION_FIELDS:
            text = self.query_one(f"#train-{name}", Input).value.strip()
            optional, base = kind.endswith("?"), kind.rstrip("?")
            if not text:
                if optional:
                    values[name] = None if name != "source_prefix" else ""
                else:
                    errors.append(f"{label} is required.")
                continue
            try:
                value = {"path": Path, "str": str, "int": int, "float": float, "paths": _paths, "floats": _floats}[base](text)
            except ValueError:
                kind_text = {"int": "a whole number", "floats": "numbers separated by commas"}.get(base, "a number")
                errors.append(f"{label}: '{text}' is not {kind_text}.")
                continue
            if name in POSITIVE and value <= 0:
                errors.append(f"{label} must be above 0.")
                continue
            values[name] = value
        for name, _label in FLAG_FIELDS:
            values[name] = self.query_one(f"#train-{name}", Checkbox).value
        for name in ("train_file", "validation_file"):
            paths = values.get(name)
            for path in paths if isinstance(paths, list) else [paths]:
                if path is not None and not Path(path).expanduser().exists():
                    errors.append(f"{name.replace('_', ' ').capitalize()} {path} does not exist.")
        if isinstance(values.get("train_file"), list) and len(values["train_file"]) == 1:
            values["train_file"] = values["train_file"][0]
        if errors:
            return None, errors
        return TrainRequest(**values), []


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _paths(text: str) -> list[Path]:
    return [Path(part.strip()) for part in text.split(",") if part.strip()]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.replace(",", " ").split())
