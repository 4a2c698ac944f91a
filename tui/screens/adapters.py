"""Pick the adapter for the next reply, or add a checkpoint from disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, OptionList, Static
from textual.widgets.option_list import Option

from backend.service import AdapterInfo, BackendError

from ..errors import report
from ..messages import AdaptersChanged

BASE_ID = "<base>"


@dataclass(frozen=True)
class AdapterChoice:
    name: Optional[str]  # None = base model


class AdapterPicker(ModalScreen[Optional[AdapterChoice]]):
    BINDINGS = [Binding("escape", "close", "Close")]

    class Added(Message):
        def __init__(self, added: list[AdapterInfo], adapters: list[AdapterInfo], active: Optional[str]) -> None:
            super().__init__()
            self.added, self.adapters, self.active = added, adapters, active

    class AddFailed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box", classes="dialog"):
            yield Static(Content.styled("Adapters", "bold"), classes="dialog-title")
            yield OptionList(id="adapter-list")
            yield Static(Content.styled("Enter: use for the next reply · Esc: close", "$text-muted"))
            yield Static("Add a checkpoint from disk (a checkpoint-N directory, or a run directory to scan):")  # wraps at 80 columns
            with Horizontal(classes="row"):
                yield Input(placeholder="output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-600", id="adapter-path")
                yield Button("Add", id="add-adapter", variant="primary")
            yield Static(id="adapter-error", classes="error")

    def on_mount(self) -> None:
        self._fill(self.app.adapters, self.app.active_adapter)
        self.query_one("#adapter-list").focus()

    def _fill(self, adapters, active: Optional[str], highlight: Optional[str] = None) -> None:
        options = [Option(self._label(None, "the model without a prefix", active is None), id=BASE_ID)]
        options += [
            Option(self._label(a.name, _details(a), a.name == active), id=a.name)
            for a in adapters
        ]
        listing = self.query_one("#adapter-list", OptionList)
        listing.set_options(options)
        target = highlight if highlight is not None else (active or BASE_ID)
        listing.highlighted = listing.get_option_index(target)

    @staticmethod
    def _label(name: Optional[str], detail: str, active: bool) -> Content:
        return Content.assemble(
            ("● " if active else "  ", "$text-success"), (name or "base", "bold"), "\n  ", (detail, "$text-muted")
        )

    @on(OptionList.OptionSelected, "#adapter-list")
    def use(self, event: OptionList.OptionSelected) -> None:
        option_id = event.option.id
        self.dismiss(AdapterChoice(None if option_id == BASE_ID else option_id))

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#add-adapter")
    @on(Input.Submitted, "#adapter-path")
    def add(self) -> None:
        path = self.query_one("#adapter-path", Input).value.strip()
        error = self.query_one("#adapter-error", Static)
        if not path:
            error.update("Type the path of a checkpoint directory first.")
            return
        error.update(Content.styled("Adding…", "$text-muted"))
        self._register(Path(path).expanduser())

    @work(thread=True, exclusive=True, exit_on_error=False, group="register")
    def _register(self, path: Path) -> None:
        backend = self.app.backend
        try:
            try:
                added = [backend.register_adapter(path)]
            except BackendError:
                # Not a checkpoint itself: maybe a run directory holding checkpoint-* directories.
                added = backend.scan_adapters(path) if path.is_dir() else []
                if not added:
                    raise
            adapters, active = backend.adapters(), backend.active_adapter
        except BaseException as err:
            self.post_message(self.AddFailed(str(report(err, "adding an adapter"))))
            return
        self.post_message(self.Added(added, adapters, active))

    def on_adapter_picker_added(self, message: Added) -> None:
        self.app.post_message(AdaptersChanged(message.adapters, message.active))
        self._fill(message.adapters, message.active, highlight=message.added[-1].name)
        names = ", ".join(a.name for a in message.added)
        self.query_one("#adapter-error", Static).update(Content.styled(f"Added {names}: Enter uses it.", "$text-success"))
        self.query_one("#adapter-path", Input).clear()
        self.query_one("#adapter-list").focus()

    def on_adapter_picker_add_failed(self, message: AddFailed) -> None:
        self.query_one("#adapter-error", Static).update(Content.styled(message.error, "$text-error"))


def _details(adapter) -> str:
    """pre_seq_len, the source prefix chat puts before each prompt (if the run had one), the path."""
    prefix = f" · prefix “{adapter.source_prefix}”" if adapter.source_prefix else ""
    return f"pre_seq_len {adapter.pre_seq_len}{prefix} · {adapter.path}"
