"""The model structure panel: the same page as ``glmchat --info``, read from the backend off the UI thread."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static


class StructureScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "close", "Close")]

    class Loaded(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(id="structure-box", classes="dialog"):
            yield Static(Content.styled("Model structure", "bold"), classes="dialog-title")
            with VerticalScroll(id="structure-scroll"):
                yield Static(Content.styled("reading the model…", "italic $text-muted"), id="structure-text")

    def on_mount(self) -> None:
        self.query_one("#structure-scroll").focus()
        self._read()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _read(self) -> None:
        describe = getattr(self.app.backend, "model_structure", None)
        if describe is None:  # a backend without the page (e.g. a remote one that predates it)
            text = "This backend does not describe its model."
        else:
            try:
                text = describe()
            except Exception as err:  # a status page is not worth a crash
                text = f"Could not read the model structure: {err}"
        self.post_message(self.Loaded(text))

    def on_structure_screen_loaded(self, message: Loaded) -> None:
        self.query_one("#structure-text", Static).update(Content(message.text))

    def action_close(self) -> None:
        self.dismiss(None)
