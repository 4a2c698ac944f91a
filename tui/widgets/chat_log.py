"""The scrolling conversation: turns stacked, following the bottom while a reply streams.

Only the latest turns are mounted: every layout visits each mounted widget, so a long conversation
would slow down streaming. Earlier turns come back with the "Show earlier turns" button.
"""

from __future__ import annotations

from typing import Optional, Sequence

from textual import on
from textual.containers import VerticalScroll
from textual.widgets import Button, Static

from ..conversation import Conversation, Turn
from .reply import TurnView

WELCOME = (
    "Type a prompt and press [b]Enter[/b].  "
    "[b]{next_adapter}[/b] switches adapter · [b]{compare}[/b] compares two · "
    "[b]{training}[/b] trains · [b]{help}[/b] lists every key."
)
MOUNTED_TURNS = 10  # turns kept mounted (more on request)


class ChatLog(VerticalScroll, can_focus=False):
    def __init__(self, welcome: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._welcome = welcome
        self._conversation = Conversation()
        self._limit = MOUNTED_TURNS

    def compose(self):
        yield Button("", id="earlier", compact=True)
        yield Static(self._welcome, id="welcome")

    def on_mount(self) -> None:
        self.query_one("#earlier").display = False
        self.anchor()

    def turn_views(self) -> list[TurnView]:
        return list(self.query_children(TurnView))

    def view_for(self, turn: Turn) -> Optional[TurnView]:
        return next((v for v in self.turn_views() if v.turn is turn), None)

    async def add_turn(self, turn: Turn, adapters: Sequence[Optional[str]]) -> TurnView:
        """Show a turn the screen just appended to the conversation."""
        view = TurnView(turn, adapters)
        await self.mount(view)
        await self._trim()
        self.anchor()
        return view

    async def remove_turn(self, turn: Turn) -> None:
        view = self.view_for(turn)
        if view is not None:
            await view.remove()
        self._update_chrome()

    async def show(self, conversation: Conversation) -> None:
        """Replace what is shown with ``conversation`` (finished turns)."""
        self._conversation = conversation
        self._limit = MOUNTED_TURNS
        await self.remove_children(TurnView)
        recent = conversation.turns[-self._limit:]
        if recent:
            await self.mount_all([TurnView(t, [r.adapter for r in t.replies]) for t in recent])
        self._update_chrome()
        self.anchor()

    @on(Button.Pressed, "#earlier")
    async def show_earlier(self) -> None:
        views = self.turn_views()
        first = self._conversation.turns.index(views[0].turn) if views else len(self._conversation.turns)
        earlier = self._conversation.turns[max(0, first - MOUNTED_TURNS):first]
        self._limit += len(earlier)
        self.release_anchor()
        if earlier:
            await self.mount_all([TurnView(t, [r.adapter for r in t.replies]) for t in earlier],
                                 after=self.query_one("#earlier"))
        self._update_chrome()
        self.scroll_home(animate=False)

    async def _trim(self) -> None:
        views = self.turn_views()
        if len(views) > self._limit:
            await self.remove_children(views[: len(views) - self._limit])
        self._update_chrome()

    def _update_chrome(self) -> None:
        views = self.turn_views()
        hidden = self._conversation.turns.index(views[0].turn) if views else 0
        earlier = self.query_one("#earlier", Button)
        earlier.display = hidden > 0
        earlier.label = f"▲ Show earlier turns ({hidden} not shown)"
        self.query_one("#welcome").display = not views
