"""Every key binding, with the user's remapping, and how to remap."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from .. import keys

SCOPES = {"app": "Everywhere", "chat": "Chat", "prompt": "Prompt", "training": "Training panel", "conversations": "Conversations"}


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Static(Content.styled("Keys", "bold"), classes="dialog-title")
            with VerticalScroll(id="help-scroll"):
                yield Static(self._table(), id="help-table")
                yield Static(self._remap_text(), id="help-remap")

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()

    def rows(self) -> list[tuple[str, str, str]]:
        """(keys as remapped, what it does, name in config.toml); a section title has only the first."""
        rows = []
        for scope, title in SCOPES.items():
            rows.append((f"[reverse] {title} [/]", "", ""))
            rows += [(self.app.key_display(a.name), a.help, a.name) for a in keys.ACTIONS if a.scope == scope]
            rows.append(("", "", ""))
        rows.append(("[reverse] Fixed [/]", "", ""))
        rows += [(key, what, "") for key, what in keys.FIXED_KEYS]
        return rows

    def _table(self) -> Table:
        table = Table(box=None, expand=True, padding=(0, 1), show_header=True, header_style="bold")
        table.add_column("Key", no_wrap=True, style="bold")
        table.add_column("What it does", ratio=1)
        table.add_column("Name in config.toml", no_wrap=True, style="dim")
        for row in self.rows():
            table.add_row(*row)
        return table

    def _remap_text(self) -> Content:
        path = self.app.key_config.path
        return Content.assemble(
            ("\nRemap keys in ", ""), (str(path), "bold"), (":\n", ""),
            ("[keys]\nnext_adapter = \"ctrl+k\"\nregenerate = [\"ctrl+r\", \"f9\"]", "$text-accent"),
        )

    def action_close(self) -> None:
        self.dismiss(None)
