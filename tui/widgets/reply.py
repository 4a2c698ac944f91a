"""One turn of the chat: the prompt, and its reply (two side by side in compare mode)."""

from __future__ import annotations

from typing import Optional, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.content import Content
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from ..conversation import ReplyRecord, Turn

from ..export import adapter_label

FLUSH_S = 0.1  # how often a streaming reply is redrawn (10 fps keeps the UI thread mostly idle)
# A reply with no text after this many seconds counts the wait in its header: a first reply on a GPU model the
# kernels were never tuned for waits tens of seconds (once), and a silent "writing…" looks like a hang.
WAIT_SHOWN_AFTER_S = 3.0


class ReplyView(Vertical, can_focus=True):
    """A reply as Markdown, streamed while it is written, with a header naming the adapter that wrote it."""

    def __init__(self, adapter: Optional[str], record: Optional[ReplyRecord] = None) -> None:
        super().__init__(classes="reply")
        self.adapter = record.adapter if record else adapter
        self.text = record.text if record else ""
        self.record = record
        self.error: Optional[str] = None
        self._stream: Optional[MarkdownStream] = None
        self._pending = ""  # tokens not yet shown
        self._flush_timer: Optional[Timer] = None
        self._waited_s = 0  # whole seconds without any text, shown once past WAIT_SHOWN_AFTER_S
        self._body = Markdown(self.text, classes="reply-body")
        self._header = Static(self._header_text(), classes="reply-header")

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._body

    def on_mount(self) -> None:
        if self.writing:
            self._wait_timer = self.set_interval(1.0, self._count_wait)

    def _count_wait(self) -> None:
        if self.text or not self.writing:
            self._wait_timer.stop()
            self._waited_s = 0
            self._header.update(self._header_text())
            return
        self._waited_s += 1
        if self._waited_s >= WAIT_SHOWN_AFTER_S:
            self._header.update(self._header_text())

    @property
    def writing(self) -> bool:
        return self.record is None and self.error is None

    async def append(self, text: str) -> None:
        """Take a token now; show it with the next flush (re-parsing Markdown per token would starve the UI)."""
        self.text += text
        self._pending += text
        if self._flush_timer is None:
            self._flush_timer = self.set_timer(FLUSH_S, self._flush)

    async def _flush(self) -> None:
        self._flush_timer = None
        if not self._pending:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self._body)
        pending, self._pending = self._pending, ""
        await self._stream.write(pending)

    async def finish(self, record: ReplyRecord) -> None:
        """The reply is complete (or stopped): render the whole text once, properly."""
        await self._close_stream()
        self.record, self.text, self.adapter = record, record.text, record.adapter
        self.set_class(record.stopped, "-stopped")
        await self._body.update(record.text)
        self._header.update(self._header_text())

    async def fail(self, message: str) -> None:
        await self._close_stream()
        await self._body.update(self.text)
        self.error = message
        self.add_class("-error")
        self._header.update(self._header_text())

    async def _close_stream(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        self._pending = ""  # the caller renders the whole text next
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    def _header_text(self) -> Content:
        parts: list = [("▍", "bold $accent"), (adapter_label(self.adapter), "bold")]
        record = self.record
        if self.error is not None:
            parts.append((f"  ✗ {self.error}", "bold $text-error"))
        elif record is None and self._waited_s >= WAIT_SHOWN_AFTER_S and not self.text:
            parts.append((f"  waiting for the first token · {self._waited_s} s{self._wait_hint()}", "italic $text-muted"))
        elif record is None:
            parts.append(("  writing…", "italic $text-muted"))
        else:
            if record.stopped:
                parts.append(("  ■ stopped", "bold $text-warning"))
            if record.new_tokens:
                parts.append((f"  {record.new_tokens} tokens · {record.tokens_per_s:.1f} tok/s", "$text-muted"))
        return Content.assemble(*parts)

    def _wait_hint(self) -> str:
        info = getattr(self.app, "model_info", None)
        on_gpu = info is not None and str(info.device).startswith("cuda")
        return " (a first reply on this GPU tunes its kernels, once)" if on_gpu else ""


class TurnView(Vertical):
    """The user's prompt and the reply views under it."""

    def __init__(self, turn: Turn, adapters: Sequence[Optional[str]]) -> None:
        super().__init__(classes="turn")
        self.turn = turn
        records = turn.replies or [None] * len(adapters)
        adapters = [r.adapter for r in turn.replies] if turn.replies else list(adapters)
        self.replies = [ReplyView(a, r) for a, r in zip(adapters, records)]

    def compose(self) -> ComposeResult:
        yield Static(Text(self.turn.query), classes="query")
        with Horizontal(classes="replies") if len(self.replies) > 1 else Vertical(classes="replies"):
            yield from self.replies

    async def restart(self, adapters: Sequence[Optional[str]]) -> None:
        """Replace the replies with empty ones, for a regenerated answer."""
        container = self.query_one(".replies")
        await container.remove()
        self.replies = [ReplyView(a) for a in adapters]
        new = Horizontal(*self.replies, classes="replies") if len(adapters) > 1 else Vertical(*self.replies, classes="replies")
        await self.mount(new)
