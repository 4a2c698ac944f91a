"""Saved conversations: reopen, export to Markdown, delete."""

from __future__ import annotations

import time
from typing import Optional

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from .. import keys
from ..conversation import Conversation
from ..store import ConversationStore, ConversationSummary, StoreError


class ConversationsScreen(ModalScreen[Optional[Conversation]]):
    BINDINGS = keys.bindings("conversations")

    def __init__(self, store: ConversationStore) -> None:
        super().__init__()
        self.store = store
        self._confirm_delete: Optional[int] = None

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-box", classes="dialog"):
            yield Static(Content.styled("Conversations", "bold"), classes="dialog-title")
            yield OptionList(id="conversation-list")
            yield Static(id="conversations-note")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._fill()
        self.query_one("#conversation-list").focus()

    def _fill(self) -> None:
        listing = self.query_one("#conversation-list", OptionList)
        try:
            summaries = self.store.conversations()
        except StoreError as err:
            self._note(str(err), error=True)
            summaries = []
        listing.set_options([Option(self._label(s), id=str(s.id)) for s in summaries])
        if summaries:
            listing.highlighted = 0
        else:
            self._note("No saved conversations yet.")

    @staticmethod
    def _label(summary: ConversationSummary) -> Content:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.updated_at))
        turns = f"{summary.turns} turn" + ("s" if summary.turns != 1 else "")
        return Content.assemble(
            (summary.title or "(untitled)", "bold"), "\n",
            (f"  {when} · {turns} · {', '.join(summary.adapters) or '-'}", "$text-muted"),
        )

    def _note(self, text: str, error: bool = False) -> None:
        self.query_one("#conversations-note", Static).update(Content.styled(text, "$text-error" if error else "$text-muted"))

    def _selected_id(self) -> Optional[int]:
        listing = self.query_one("#conversation-list", OptionList)
        if listing.highlighted is None:
            return None
        return int(listing.get_option_at_index(listing.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        conversation_id = self._selected_id()
        if conversation_id is None:
            return
        try:
            self.dismiss(self.store.load(conversation_id))
        except StoreError as err:
            self._note(str(err), error=True)

    def action_export(self) -> None:
        conversation_id = self._selected_id()
        if conversation_id is None:
            return
        try:
            conversation = self.store.load(conversation_id)
        except StoreError as err:
            self._note(str(err), error=True)
            return
        path = self.app.export_conversation(conversation)
        if path is not None:
            self._note(f"Exported to {path}")

    async def action_delete(self) -> None:
        conversation_id = self._selected_id()
        if conversation_id is None:
            return
        if self._confirm_delete != conversation_id:
            self._confirm_delete = conversation_id
            self._note(f"Press {self.app.key_display('delete_conversation')} again to delete this conversation.", error=True)
            return
        self._confirm_delete = None
        try:
            self.store.delete_conversation(conversation_id)
        except StoreError as err:
            self._note(str(err), error=True)
            return
        if self.app.chat.conversation.id == conversation_id:
            await self.app.chat.show_conversation(Conversation())  # it is gone: the chat starts afresh
        self._fill()
        self._note("Deleted.")

    def action_close(self) -> None:
        self.dismiss(None)
