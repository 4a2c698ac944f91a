"""The main screen: the conversation, the prompt, the status bar."""

from __future__ import annotations

import threading
from copy import copy
from dataclasses import dataclass, field
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

from backend.service import History, Reply, ReplyDone, SamplingParams, TextDelta

from .. import keys
from ..conversation import Conversation, ReplyRecord, Turn, title_for
from ..errors import report
from ..export import adapter_label
from ..widgets.chat_log import WELCOME, ChatLog
from ..widgets.prompt import PromptInput
from ..widgets.reply import ReplyView, TurnView
from ..widgets.status_bar import StatusBar


@dataclass
class Generation:
    """The reply being written: which turn, with what, and how to stop it."""

    turn: Turn
    view: TurnView
    params: SamplingParams
    adapters: list[Optional[str]]
    system: str = ""  # the conversation's system prompt
    cancel: threading.Event = field(default_factory=threading.Event)
    records: dict[int, ReplyRecord] = field(default_factory=dict)
    failed: bool = False


# Messages from the reply worker (a thread) to the screen.
class ReplyDelta(Message):
    def __init__(self, generation: Generation, stream: int, text: str) -> None:
        super().__init__()
        self.generation, self.stream, self.text = generation, stream, text


class ReplyFinished(Message):
    def __init__(self, generation: Generation, stream: int, reply: Reply) -> None:
        super().__init__()
        self.generation, self.stream, self.reply = generation, stream, reply


class ReplyFailed(Message):
    def __init__(self, generation: Generation, error: str) -> None:
        super().__init__()
        self.generation, self.error = generation, error


class GenerationEnded(Message):
    def __init__(self, generation: Generation) -> None:
        super().__init__()
        self.generation = generation


class ChatScreen(Screen):
    BINDINGS = keys.bindings("chat")
    AUTO_FOCUS = "#prompt"

    def __init__(self) -> None:
        super().__init__()
        self.conversation = Conversation()
        self.generation: Optional[Generation] = None

    def compose(self) -> ComposeResult:
        key = self.app.key_display
        welcome = WELCOME.format(**{name: key(name) for name in ("next_adapter", "compare", "training", "help")})
        yield ChatLog(welcome, id="log")
        yield PromptInput(placeholder="Loading the model…", id="prompt", disabled=True)
        yield StatusBar(id="status")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        await self.log_view.show(self.conversation)

    @property
    def log_view(self) -> ChatLog:
        return self.query_one("#log", ChatLog)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    def model_ready(self) -> None:
        """Called by the app when the backend is loaded: the prompt opens."""
        self.prompt.disabled = False
        self.prompt.placeholder = f"Ask ChatGLM2…  (Enter sends, {self.app.key_display('newline')} breaks a line)"
        self.prompt.focus()

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action == "stop":
            return self.generation is not None  # Esc only shows (and acts) while a reply is written
        return True

    # -- sending and streaming -----------------------------------------------------------

    @on(PromptInput.Submitted, "#prompt")
    async def send(self, event: PromptInput.Submitted) -> None:
        query = event.value.strip()
        if not query or self.app.backend is None:
            return
        if self.generation is not None:
            self.notify(f"A reply is still being written: {self.app.key_display('stop')} stops it.", severity="warning")
            return
        self.prompt.clear()
        turn = Turn(query)
        self.conversation.turns.append(turn)
        if not self.conversation.title:
            self.conversation.title = title_for(query)
        await self._start(turn)

    async def _start(self, turn: Turn) -> None:
        adapters = list(self.app.compare_pair()) if self.app.compare_mode else [self.app.active_adapter]
        view = self.log_view.view_for(turn)
        if view is None:
            view = await self.log_view.add_turn(turn, adapters)
        else:
            await view.restart(adapters)
            self.log_view.anchor()
        history = self.conversation.history(upto=self.conversation.turns.index(turn))
        self.generation = Generation(turn, view, copy(self.app.params), adapters, self.conversation.system)
        self.refresh_bindings()
        self._write_reply(self.generation, turn.query, history)

    @work(thread=True, exclusive=True, exit_on_error=False, group="reply")
    def _write_reply(self, generation: Generation, query: str, history: History) -> None:
        backend, adapters = self.app.backend, generation.adapters
        texts = {i: "" for i in range(len(adapters))}
        finished: set[int] = set()
        system = {"system": generation.system} if generation.system else {}  # only when set: older backends lack it
        try:
            if len(adapters) == 1:
                events = backend.stream_reply(query, history, generation.params, cancel=generation.cancel,
                                              adapter=adapters[0], **system)
            else:
                events = backend.compare(query, history, generation.params, adapters, cancel=generation.cancel, **system)
            for event in events:
                if isinstance(event, TextDelta):
                    texts[event.stream] += event.text
                    self.post_message(ReplyDelta(generation, event.stream, event.text))
                elif isinstance(event, ReplyDone):
                    finished.add(event.stream)
                    self.post_message(ReplyFinished(generation, event.stream, event.reply))
        except BaseException as err:
            self.post_message(ReplyFailed(generation, str(report(err, "writing a reply"))))
        else:
            # A backend that returns early on cancel without a ReplyDone: its partial text counts as stopped.
            for i in set(texts) - finished:
                self.post_message(ReplyFinished(generation, i, Reply(texts[i], adapters[i], stopped=True)))
        self.post_message(GenerationEnded(generation))

    def _current(self, message: ReplyDelta | ReplyFinished | ReplyFailed | GenerationEnded) -> Optional[Generation]:
        """The generation a worker message belongs to, if it is still the current one."""
        return message.generation if message.generation is self.generation else None

    async def on_reply_delta(self, message: ReplyDelta) -> None:
        if self._current(message):
            await message.generation.view.replies[message.stream].append(message.text)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        generation = self._current(message)
        if generation is None:
            return
        record = ReplyRecord.from_reply(message.reply, generation.params)
        generation.records[message.stream] = record
        await generation.view.replies[message.stream].finish(record)

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        generation = self._current(message)
        if generation is None:
            return
        generation.failed = True
        for reply in generation.view.replies:
            if reply.writing:
                await reply.fail(message.error)
        self.notify(message.error, title="The reply failed", severity="error", timeout=10)

    def on_generation_ended(self, message: GenerationEnded) -> None:
        generation = self._current(message)
        if generation is None:
            return
        self.generation = None
        self.refresh_bindings()
        turn = generation.turn
        if generation.failed or len(generation.records) != len(generation.adapters):
            return  # not kept: the turn stays on screen with its error, regenerate retries it
        turn.replies = [generation.records[i] for i in range(len(generation.adapters))]
        self.app.last_tokens_per_s = turn.replies[-1].tokens_per_s
        self.app.save_turn(self.conversation, turn)

    # -- actions -----------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generation is not None:
            self.generation.cancel.set()

    def _busy(self) -> bool:
        if self.generation is not None:
            self.notify(f"A reply is being written: {self.app.key_display('stop')} stops it first.", severity="warning")
            return True
        return False

    async def action_regenerate(self) -> None:
        if self._busy() or self.app.backend is None:
            return
        if not self.conversation.turns:
            self.notify("Nothing to regenerate yet.", severity="warning")
            return
        turn = self.conversation.turns[-1]
        turn.replies = []
        await self._start(turn)

    async def action_edit_last(self) -> None:
        if self._busy():
            return
        if not self.conversation.turns:
            self.notify("No prompt to edit yet.", severity="warning")
            return
        turn = self.conversation.turns.pop()
        if not self.conversation.turns and self.conversation.title == title_for(turn.query):
            self.conversation.title = ""  # the edited prompt names the conversation again (a renamed one keeps its name)
        self.app.delete_turn(turn)
        await self.log_view.remove_turn(turn)
        self.prompt.value = turn.query
        self.prompt.focus()
        self.notify("The last prompt is back in the input: edit it and press Enter.")

    async def action_new_conversation(self) -> None:
        if self._busy():
            return
        await self.show_conversation(Conversation(system=self.app.prefs.system))
        self.prompt.focus()

    async def show_conversation(self, conversation: Conversation) -> None:
        self.conversation = conversation
        await self.log_view.show(conversation)
        self.app.remember_conversation(conversation)

    def action_copy_reply(self) -> None:
        focused = self.focused
        if isinstance(focused, ReplyView):
            reply = focused
        else:
            views = self.log_view.turn_views()
            reply = views[-1].replies[-1] if views else None
        if reply is None or not reply.text:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(reply.text)
        self.notify(f"Copied the reply of {adapter_label(reply.adapter)} ({len(reply.text)} characters).")

    def action_export(self) -> None:
        self.app.export_conversation(self.conversation)

    def open_conversation_ok(self) -> bool:
        return not self._busy()
