"""The first screen: each loading stage with a progress bar; a failure says why and how to fix it."""

from __future__ import annotations

import threading
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Optional

from textual import work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, ProgressBar, Static

from backend.service import AdapterInfo, ChatBackend, LoadProgress, ProgressCallback

from ..errors import Problem, report

STAGE_LABELS = {
    "tokenizer": "Tokenizer",
    "weights": "Weights",
    "quantizing": "Quantizing",
    "adapters": "Adapters",
    "ready": "Ready",
}

Loader = Callable[[Namespace, ProgressCallback], ChatBackend]


@dataclass
class Loaded:
    """What the app needs once the model is up, read in the loading thread."""

    backend: ChatBackend
    adapters: list[AdapterInfo]
    active: Optional[str]


class LoadingScreen(Screen[Loaded]):
    BINDINGS = [
        Binding("r", "retry", "Retry"),
        Binding("q", "give_up", "Quit"),
    ]

    class Progress(Message):
        def __init__(self, progress: LoadProgress) -> None:
            super().__init__()
            self.progress = progress

    class Failed(Message):
        def __init__(self, problem: Problem) -> None:
            super().__init__()
            self.problem = problem

    class Done(Message):
        def __init__(self, loaded: Loaded) -> None:
            super().__init__()
            self.loaded = loaded

    def __init__(self, loader: Loader, args: Namespace, model_label: str) -> None:
        super().__init__()
        self._loader = loader
        self._args = args
        self._model_label = model_label
        self._stages: dict[str, LoadProgress] = {}
        self.problem: Optional[Problem] = None
        self.load_finished = threading.Event()  # the loading thread is done (it cannot be interrupted)

    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Static(Content.styled("glmchat", "bold $text-accent"), id="loading-title")
            yield Static(Content.assemble("Loading ", (self._model_label, "bold")), id="loading-model")
            yield Static(id="stages")
            yield ProgressBar(id="load-progress", show_eta=False)
            yield Static(id="load-message")
            yield Static(id="load-error")
        yield Footer()

    def on_mount(self) -> None:
        self.start()

    def start(self) -> None:
        self.problem = None
        self.load_finished.clear()
        self._stages.clear()
        self.query_one("#load-error").display = False
        self.query_one("#load-message").display = True
        self.query_one("#load-progress", ProgressBar).display = True
        self.query_one("#load-progress", ProgressBar).update(total=None, progress=0)
        self._render_stages()
        self.refresh_bindings()
        self._load()

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action in ("retry", "give_up"):
            return self.problem is not None  # keys of the failure view only
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def _load(self) -> None:
        # The load runs in a daemon thread of its own: it cannot be interrupted, and quitting must not wait for it.
        outcome: dict = {}
        finished = self.load_finished

        def load() -> None:
            try:
                backend = self._loader(self._args, lambda p: self.post_message(self.Progress(p)))
                outcome["loaded"] = Loaded(backend, backend.adapters(), backend.active_adapter)
            except BaseException as err:  # anything at all: the screen explains it instead of a traceback
                outcome["error"] = err
            finally:
                finished.set()

        threading.Thread(target=load, name="glmchat-load", daemon=True).start()
        worker = get_current_worker()
        while not finished.wait(0.1):
            if worker.is_cancelled:
                return
        if "error" in outcome:
            self.post_message(self.Failed(report(outcome["error"], "loading the model")))
        else:
            self.post_message(self.Done(outcome["loaded"]))

    def on_loading_screen_progress(self, message: Progress) -> None:
        progress = message.progress
        if progress.stage == "ready":
            self._stages.pop("ready", None)  # an engine may say ready before its adapters: keep it last
        self._stages[progress.stage] = progress
        bar = self.query_one("#load-progress", ProgressBar)
        if progress.total:
            bar.update(total=progress.total, progress=progress.current)
        elif progress.stage == "ready":
            bar.update(total=1, progress=1)
        else:
            bar.update(total=None)
        self.query_one("#load-message", Static).update(Content.styled(progress.message, "$text-muted"))
        self._render_stages()

    def on_loading_screen_done(self, message: Done) -> None:
        self.dismiss(message.loaded)

    def on_loading_screen_failed(self, message: Failed) -> None:
        self.problem = message.problem
        self.query_one("#load-progress").display = False
        self.query_one("#load-message").display = False
        error = self.query_one("#load-error", Static)
        parts: list = [("✗ Could not load the model\n\n", "bold $text-error"), message.problem.reason]
        if message.problem.fix:
            parts += ["\n\n", ("How to fix: ", "bold"), message.problem.fix]
        error.update(Content.assemble(*parts))
        error.display = True
        self._render_stages(failed=True)
        self.refresh_bindings()

    def action_give_up(self) -> None:
        self.app.exit(return_code=1)  # the model did not load: a failure for scripts too

    def action_retry(self) -> None:
        self.start()

    def _render_stages(self, failed: bool = False) -> None:
        names = list(self._stages)
        lines: list = []
        for i, name in enumerate(names):
            p = self._stages[name]
            current = i == len(names) - 1 and name != "ready"
            mark, style = ("✗ ", "$text-error") if current and failed else (("▸ ", "$text-accent") if current else ("✓ ", "$text-success"))
            label = STAGE_LABELS.get(name, name.capitalize())
            count = f" {p.current}/{p.total}" if p.total else ""
            lines += [(mark, style), (label, "bold" if current else ""), count, "\n"]
        stages = self.query_one("#stages", Static)
        stages.update(Content.assemble(*lines[:-1]) if lines else "")
        stages.display = bool(lines)
