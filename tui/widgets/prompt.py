"""The prompt: multi-line, Enter sends, the newline key (ctrl+j / shift+enter, remappable) breaks a line,
and it grows with its text up to a few lines (then scrolls)."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

from .. import keys


# TextArea's own keys that are also app or chat keys by default (f6 select line, ctrl+l, ...) are dropped:
# the app's win anyway (priority), and the footer then keeps them in their own order.
_APP_KEYS = {key for a in keys.ACTIONS if a.scope in keys.PRIORITY_SCOPES for key in a.key.split(",")}


class PromptInput(TextArea, inherit_bindings=False):
    BINDINGS = [
        binding
        for key, bound in TextArea._merged_bindings.key_to_bindings.items()  # TextArea's keys and its bases'
        if key not in _APP_KEYS
        for binding in bound
    ] + keys.bindings("prompt")

    class Submitted(Message):
        """Enter was pressed: ``value`` is the whole text."""

        def __init__(self, prompt: "PromptInput", value: str) -> None:
            super().__init__()
            self.prompt, self.value = prompt, value

        @property
        def control(self) -> "PromptInput":
            return self.prompt

    def __init__(self, *, placeholder: str = "", id: str | None = None, disabled: bool = False) -> None:
        super().__init__(placeholder=placeholder, id=id, disabled=disabled, soft_wrap=True, compact=True,
                         show_line_numbers=False, tab_behavior="focus", highlight_cursor_line=False)

    @property
    def value(self) -> str:
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        """Replace the text and put the cursor at its end (as an edited prompt needs)."""
        self.text = text
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":  # TextArea would insert a newline: here Enter sends
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        start, end = self.selection
        self._replace_via_keyboard("\n", start, end)
