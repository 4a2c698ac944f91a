"""The chat screen driven through the real app: streaming, stop, regenerate, edit, copy, settings."""

from __future__ import annotations

from tui.screens.settings import SettingsScreen

from fake_backend import canned_reply
from tui_testing import make_app, replies, running, send, wait_until


async def test_typed_prompt_streams_a_markdown_reply():
    app = make_app(token_delay=0.04)
    async with running(app) as pilot:
        await pilot.press(*"write code")
        await pilot.press("enter")
        await wait_until(pilot, lambda: replies(app) and replies(app)[0].text, what="the first token")
        view = replies(app)[0]
        full = canned_reply("write code", None, 1)
        partial = view.text
        assert view.writing and 0 < len(partial) < len(full), "the reply shows while it is written"
        assert app.chat.prompt.value == ""
        await wait_until(pilot, lambda: app.chat.generation is None)
        assert view.text == full and view.record.adapter is None and not view.record.stopped
        assert "def greet" in view.query_one("Markdown").source
        assert view.query("MarkdownFence"), "the code block is rendered as a (highlighted) fence"
        assert "base" in str(view.query_one(".reply-header").render())
        assert app.last_tokens_per_s == view.record.tokens_per_s > 0
        assert "tok/s" in str(app.chat.query_one("#status").render())


async def test_second_turn_sends_the_history():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "first")
        await send(pilot, "second")
        calls = [args for name, args in app.backend.calls if name == "stream_reply"]
        assert calls[0][1] == [] and calls[1][1] == [("first", canned_reply("first", None, 1))]
        assert replies(app)[1].text == canned_reply("second", None, 2)


async def test_escape_stops_a_reply_and_keeps_the_partial_text():
    app = make_app(token_delay=0.005)
    async with running(app) as pilot:
        app.chat.prompt.value = "a long one"
        await pilot.press("enter")
        await wait_until(pilot, lambda: replies(app) and len(replies(app)[0].text) > 20, what="some text")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.generation is None, what="the reply to stop")
        view = replies(app)[0]
        full = canned_reply("a long one", None, 1)
        assert view.record.stopped and 20 < len(view.text) < len(full)
        assert view.has_class("-stopped") and "stopped" in str(view.query_one(".reply-header").render())
        turn = app.chat.conversation.turns[0]
        saved = app.store.load(app.chat.conversation.id).turns[0].replies[0]
        assert saved.stopped and saved.text == view.text == turn.answer.text


async def test_enter_while_writing_does_not_start_a_second_reply():
    app = make_app(token_delay=0.01)
    async with running(app) as pilot:
        app.chat.prompt.value = "long"
        await pilot.press("enter")
        await wait_until(pilot, lambda: replies(app) and replies(app)[0].text)
        app.chat.prompt.value = "another"
        await pilot.press("enter")
        await pilot.pause()
        assert len(app.chat.conversation.turns) == 1 and app.chat.prompt.value == "another"
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.generation is None)


async def test_regenerate_replaces_the_last_reply_with_the_current_adapter(checkpoints):
    app = make_app(["--adapter", str(checkpoints[0])])
    async with running(app) as pilot:
        await send(pilot, "first")
        await send(pilot, "again")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter == "adgen/checkpoint-600")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.chat.generation is None and replies(app)[-1].record is not None)
        assert len(app.chat.conversation.turns) == 2 and len(replies(app)) == 2
        last = app.backend.calls[-1]
        assert last[0] == "stream_reply" and last[1][0] == "again" and last[1][1] == [("first", canned_reply("first", None, 1))]
        assert replies(app)[-1].record.adapter == "adgen/checkpoint-600"
        stored = app.store.load(app.chat.conversation.id)
        assert [r.adapter for r in stored.turns[-1].replies] == ["adgen/checkpoint-600"]


async def test_edit_last_prompt_and_resend():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "first")
        await send(pilot, "typo promt")
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.chat.prompt.value == "typo promt" and len(app.chat.conversation.turns) == 1
        assert len(app.store.load(app.chat.conversation.id).turns) == 1
        app.chat.prompt.value = "typo prompt"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat.generation is None and len(app.chat.conversation.turns) == 2
                         and app.chat.conversation.turns[-1].replies)
        assert [t.query for t in app.store.load(app.chat.conversation.id).turns] == ["first", "typo prompt"]


async def test_new_conversation_starts_empty():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "first")
        old = app.chat.conversation.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.chat.conversation.turns == [] and not replies(app)
        await send(pilot, "fresh")
        assert app.chat.conversation.id != old
        assert app.backend.calls[-1][1][1] == [], "a new conversation has no history"


async def test_copy_reply():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        await pilot.press("ctrl+y")
        assert app.clipboard == canned_reply("two", None, 2)
        replies(app)[0].focus()
        await pilot.press("ctrl+y")
        assert app.clipboard == canned_reply("one", None, 1)


async def test_settings_dialog_validates_and_applies():
    app = make_app(["--temperature", "0.5"])
    async with running(app) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        dialog = app.screen
        assert dialog.query_one("#temperature").value == "0.5"
        dialog.query_one("#top_p").value = "2"
        await pilot.click("#save")
        assert isinstance(app.screen, SettingsScreen)
        assert "Top p: '2' is not above 0, at most 1." in str(dialog.query_one("#settings-error").render())
        dialog.query_one("#top_p").value = "0.9"
        dialog.query_one("#max_new_tokens").value = "3"
        dialog.query_one("#repetition_penalty").value = "1.2"
        dialog.query_one("#repetition_penalty").focus()
        await pilot.press("enter")  # Enter in a field saves too
        await wait_until(pilot, lambda: app.screen is app.chat)
        assert (app.params.temperature, app.params.top_p, app.params.max_new_tokens, app.params.repetition_penalty) == (
            0.5, 0.9, 3, 1.2)
        await send(pilot, "count the words please")
        record = replies(app)[0].record
        assert record.new_tokens == 3 and record.params.repetition_penalty == 1.2
        assert app.store.load(app.chat.conversation.id).turns[0].replies[0].params.max_new_tokens == 3


async def test_backend_error_during_a_reply_is_shown_not_raised(checkpoints):
    app = make_app()
    async with running(app) as pilot:
        app.active_adapter = "ghost"  # an adapter the backend does not know: it raises BackendError
        await send(pilot, "hello")
        view = replies(app)[0]
        assert view.has_class("-error") and "No adapter named ghost" in str(view.query_one(".reply-header").render())
        assert app.chat.conversation.history() == [] and app.chat.conversation.id is None, "not saved"


async def test_a_slow_first_token_counts_the_wait_in_the_reply_header(monkeypatch):
    """A first reply on a GPU whose kernels were never tuned waits tens of seconds: the header counts the wait
    instead of a silent "writing…", and says why on a GPU; the count goes once text arrives."""
    from backend.service import ModelInfo
    from tui.__main__ import parse_args
    from tui.app import GLMChatApp
    from tui.widgets import reply as reply_module

    from fake_backend import FakeBackend

    monkeypatch.setattr(reply_module, "WAIT_SHOWN_AFTER_S", 1)
    info = ModelInfo("fake/chatglm2-6b", "4bit", "cuda:0", "fast")
    app = GLMChatApp(parse_args([]), loader=lambda args, progress: FakeBackend(info=info, token_delay=2.5))
    async with running(app) as pilot:
        app.params.max_new_tokens = 2
        app.chat.prompt.value = "你好"
        await pilot.press("enter")
        await wait_until(pilot, lambda: replies(app), what="the reply view")
        view = replies(app)[-1]
        await wait_until(pilot, lambda: "waiting for the first token" in str(view._header.render()), timeout=5,
                         what="the wait count")
        assert "tunes its kernels" in str(view._header.render())
        await wait_until(pilot, lambda: view.text, timeout=10, what="the first token")
        await wait_until(pilot, lambda: "writing…" in str(view._header.render()), timeout=2, what="the count to go")
        await wait_until(pilot, lambda: app.chat.generation is None, timeout=10, what="the reply's end")
