"""Saved conversations: search, reopen, rename, export to Markdown, delete."""

from __future__ import annotations

import time
from typing import Optional

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from .. import keys
from ..conversation import Conversation, title_for, turns_label
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
            yield Input(placeholder="Search titles and prompts…", id="conversation-search", compact=True)
            yield OptionList(id="conversation-list")
            yield Input(id="conversation-rename", compact=True)
            yield Static(id="conversations-note")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#conversation-rename").display = False
        self._fill()
        self.query_one("#conversation-list").focus()

    @property
    def search_text(self) -> str:
        return self.query_one("#conversation-search", Input).value.strip()

    def _fill(self, highlight: Optional[int] = None) -> None:
        listing = self.query_one("#conversation-list", OptionList)
        try:
            summaries = self.store.conversations(self.search_text)
        except StoreError as err:
            self._note(str(err), error=True)
            summaries = []
        listing.set_options([Option(self._label(s), id=str(s.id)) for s in summaries])
        ids = [s.id for s in summaries]
        if summaries:
            listing.highlighted = ids.index(highlight) if highlight in ids else 0
            self._note("")
        elif self.search_text:
            self._note(f"No conversation mentions “{self.search_text}”.")
        else:
            self._note("No saved conversations yet.")

    @on(Input.Changed, "#conversation-search")
    def _search(self) -> None:
        self._confirm_delete = None
        self._fill()

    @on(Input.Submitted, "#conversation-search")
    def _search_done(self) -> None:
        self.query_one("#conversation-list").focus()

    def action_search(self) -> None:
        self.query_one("#conversation-search").focus()

    def action_rename(self) -> None:
        conversation_id = self._selected_id()
        if conversation_id is None:
            return
        title = next((s.title for s in self.store.conversations() if s.id == conversation_id), "")
        box = self.query_one("#conversation-rename", Input)
        box.value, box.display = title, True
        box.focus()
        self._note("Type the new title and press Enter (Esc keeps the old one).")

    @on(Input.Submitted, "#conversation-rename")
    def _renamed(self, event: Input.Submitted) -> None:
        conversation_id, title = self._selected_id(), title_for(event.value, width=80)
        if conversation_id is None or not title:
            self._note("A title needs at least one character.", error=True)
            return
        try:
            conversation = self.store.load(conversation_id)
            conversation.title = title
            self.store.update_details(conversation)
        except StoreError as err:
            self._note(str(err), error=True)
            return
        if self.app.chat.conversation.id == conversation_id:
            self.app.chat.conversation.title = title
        self._end_rename()
        self._fill(highlight=conversation_id)
        self._note(f"Renamed to “{title}”.")

    def _end_rename(self) -> None:
        self.query_one("#conversation-rename").display = False
        self.query_one("#conversation-list").focus()

    @staticmethod
    def _label(summary: ConversationSummary) -> Content:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.updated_at))
        turns = turns_label(summary.turns)
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
            await self.app.chat.show_conversation(Conversation(system=self.app.prefs.system))  # it is gone: start afresh
        self._fill()
        self._note("Deleted.")

    def action_close(self) -> None:
        if self.query_one("#conversation-rename").display:
            self._end_rename()
            self._note("")
            return
        self.dismiss(None)
