"""Helpers for the app tests: the app on a fake backend, waiting for a condition, sending a prompt."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Callable

from fake_backend import FakeBackend

from tui.__main__ import parse_args
from tui.app import GLMChatApp
from tui.widgets.reply import ReplyView


def fake_loader(**options) -> Callable:
    """A loader for GLMChatApp that builds the fake from the parsed command line, as load_backend does."""

    def load(args, progress):
        return FakeBackend.load(
            model=args.model or "fake/chatglm2-6b",
            quantization=None if args.quantization in (None, "none") else args.quantization,
            adapters=args.adapter,
            adapter_dirs=args.adapters,
            progress=progress,
            **options,
        )

    return load


def make_app(argv: list[str] = (), **options) -> GLMChatApp:
    return GLMChatApp(parse_args(list(argv)), loader=fake_loader(**options))


async def wait_until(pilot, predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Pump the app until ``predicate()`` holds (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.01)


def ready(app: GLMChatApp) -> bool:
    # focus() lands on a later message, so an open prompt is not yet a prompt the keys reach
    return (app.backend is not None and not app.chat.prompt.disabled and app.screen is app.chat
            and app.focused is app.chat.prompt)


@asynccontextmanager
async def running(app: GLMChatApp, size: tuple[int, int] = (100, 30)):
    async with app.run_test(size=size) as pilot:
        await wait_until(pilot, lambda: ready(app), what="the model to load")
        yield pilot


async def send(pilot, text: str) -> None:
    """Type a prompt and press Enter, then wait for the reply to finish."""
    app = pilot.app
    app.chat.prompt.value = text
    app.chat.prompt.focus()
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.chat.generation is None and app.chat.conversation.turns
                     and app.chat.conversation.turns[-1].query == text, what=f"the reply to {text!r}")
    await pilot.pause()


def replies(app: GLMChatApp) -> list[ReplyView]:
    """Every reply view on the chat screen, oldest first."""
    return list(app.chat.query(ReplyView))
