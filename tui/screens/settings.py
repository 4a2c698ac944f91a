"""Sampling settings and the system prompt for the next replies."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from backend.service import SamplingParams

# (field, label, parse, check, rule shown when the check fails)
FIELDS: tuple[tuple[str, str, Callable, Callable, str], ...] = (
    ("temperature", "Temperature", float, lambda v: v >= 0, "0 or more (0 = greedy)"),
    ("top_p", "Top p", float, lambda v: 0 < v <= 1, "above 0, at most 1"),
    ("max_new_tokens", "Max new tokens", int, lambda v: 1 <= v <= 32768, "1 to 32768"),
    ("repetition_penalty", "Repetition penalty", float, lambda v: v > 0, "above 0 (1 = off)"),
)


@dataclass(frozen=True)
class Settings:
    params: SamplingParams
    system: str  # the system prompt of this conversation and of new ones


class SettingsScreen(ModalScreen[Optional[Settings]]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, params: SamplingParams, system: str = "") -> None:
        super().__init__()
        self.params = params
        self.system = system

    def compose(self) -> ComposeResult:
        with Vertical(id="settings-box", classes="dialog"):
            yield Static(Content.styled("Settings", "bold"), classes="dialog-title")
            with Grid(id="settings-grid"):
                for name, label, *_rest, rule in FIELDS:
                    yield Label(label)
                    yield Input(str(getattr(self.params, name)), id=name, select_on_focus=True, compact=True)
                    yield Static(Content.styled(rule, "$text-muted"), classes="hint")
            yield Label(Content.assemble("System prompt ", ("(this conversation and new ones; empty = none)", "$text-muted")))
            yield TextArea(self.system, id="system", soft_wrap=True, compact=True, tab_behavior="focus")
            yield Static(id="settings-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    def read(self) -> tuple[Optional[Settings], list[str]]:
        values, errors = {}, []
        for name, label, parse, check, rule in FIELDS:
            text = self.query_one(f"#{name}", Input).value.strip()
            try:
                value = parse(text)
                if not check(value):
                    raise ValueError
            except ValueError:
                errors.append(f"{label}: '{text}' is not {rule}.")
                continue
            values[name] = value
        if errors:
            return None, errors
        system = self.query_one("#system", TextArea).text.strip()
        return Settings(replace(self.params, **values), system), []

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def save(self) -> None:
        settings, errors = self.read()
        if errors:
            self.query_one("#settings-error", Static).update(Content.styled("\n".join(errors), "$text-error"))
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
