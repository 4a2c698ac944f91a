"""The training panel: start P-Tuning v2 in-process, or follow a run's progress.jsonl; chat with its checkpoints."""

from __future__ import annotations

import json
import threading
from dataclasses import fields
from pathlib import Path
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, OptionList, Static, TabbedContent, TabPane

from backend.service import TrainProgress, TrainRequest, TrainResult

from .. import keys
from ..errors import report
from ..messages import AdaptersChanged
from ..widgets.train_form import DEFAULT_OUTPUT_DIR, TrainForm, in_form_terms
from ..widgets.train_monitor import TrainMonitor

FOLLOW_POLL_S = 0.5
PROGRESS_FILE = "progress.jsonl"
_EVENT_FIELDS = {f.name for f in fields(TrainProgress)}


def parse_progress_line(line: str) -> Optional[TrainProgress]:
    """One progress.jsonl line as a TrainProgress; None for a line that is not one (a torn write, a foreign field set)."""
    try:
        data = json.loads(line)
        return TrainProgress(**{k: v for k, v in data.items() if k in _EVENT_FIELDS})
    except (ValueError, TypeError, AttributeError):
        return None


def progress_file(path: Path) -> Path:
    return path if path.suffix == ".jsonl" else path / PROGRESS_FILE


class TrainEvents(Message):
    def __init__(self, events: list[TrainProgress]) -> None:
        super().__init__()
        self.events = events


class RunEnded(Message):
    def __init__(self, how: str, detail: str = "") -> None:
        super().__init__()
        self.how, self.detail = how, detail  # how: "done" | "stopped" | "failed" | "waiting"


class CheckpointActivated(Message):
    def __init__(self, name: Optional[str], error: Optional[str] = None) -> None:
        super().__init__()
        self.name, self.error = name, error


class TrainingScreen(Screen):
    BINDINGS = keys.bindings("training")

    def __init__(self) -> None:
        super().__init__()
        self.mode: Optional[str] = None  # "train" (in-process) | "follow" while a run is followed
        self._cancel: Optional[threading.Event] = None

    @property
    def _server(self) -> Optional[str]:
        """The glmchat server the app talks to (None: the model is in this process); a run must start there."""
        return getattr(getattr(self.app, "args", None), "server", None)

    def compose(self) -> ComposeResult:
        args, server = getattr(self.app, "args", None), self._server
        yield Static(Content.styled("Training · P-Tuning v2", "bold"), id="training-title")
        with TabbedContent(initial="new-run", id="training-tabs"):
            with TabPane("Monitor", id="monitor"):
                yield TrainMonitor(id="train-monitor")
            with TabPane("New run", id="new-run"):
                yield Static(Content.styled(self._where_runs_train(server), "$text-warning" if server else "$text-muted"),
                             id="train-where")
                yield TrainForm(id="train-form", demo=bool(getattr(args, "demo", False)))
                yield Static(id="train-form-error", classes="error")
                with Horizontal(classes="buttons"):
                    yield Button("Start training", id="start-run", variant="primary", disabled=bool(server))
            with TabPane("Follow a run", id="follow"):
                with Vertical(id="follow-box"):
                    yield Label(f"A run's output dir (it writes {PROGRESS_FILE}), e.g. from glmchat-train:")
                    with Horizontal(classes="row"):
                        yield Input(placeholder=f"e.g. {DEFAULT_OUTPUT_DIR}", id="follow-dir")
                        yield Button("Follow", id="follow-run", variant="primary")
                    yield Static(id="follow-error", classes="error")
        yield Footer(compact=True)

    @staticmethod
    def _where_runs_train(server: Optional[str]) -> str:
        if server:
            return (f"The model runs on the server at {server}, so training runs there: start glmchat-train on that "
                    "machine, register the checkpoint with the server, and pick it here (f4).")
        return "Trains a prefix on the loaded base model, in this process. Chat stays usable (slower)."

    def on_screen_resume(self) -> None:
        if self.mode is None and self.query_one(TabbedContent).active == "new-run":
            self.query_one("#train-train_file", Input).focus()

    @property
    def monitor(self) -> TrainMonitor:
        return self.query_one(TrainMonitor)

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action == "stop_training":
            return self.mode is not None
        if action == "start_training":  # not against a server: its model is not in this process
            return not self._server
        return True

    def action_close(self) -> None:
        self.app.pop_screen()

    # -- in-process run ----------------------------------------------------------------------

    def action_start_training(self) -> None:
        self.start_run()

    @on(Button.Pressed, "#start-run")
    def start_run(self) -> None:
        if self._busy():
            return
        request, errors = self.query_one(TrainForm).request()
        error = self.query_one("#train-form-error", Static)
        if errors:
            error.update(Content.styled("\n".join(errors), "$text-error"))
            return
        error.update("")
        self._begin("train", Content.assemble(("In-process run → ", "$text-muted"), (str(request.output_dir), "bold")),
                    request.output_dir)
        self._train(request, self._cancel)

    @work(thread=True, exclusive=True, exit_on_error=False, group="training")
    def _train(self, request: TrainRequest, cancel: threading.Event) -> None:
        try:
            result: TrainResult = self.app.backend.train(
                request, lambda event: self.post_message(TrainEvents([event])), cancel
            )
        except BaseException as err:
            self.post_message(RunEnded("failed", in_form_terms(str(report(err, "training")))))
            return
        self.post_message(RunEnded("stopped" if result.stopped else "done"))

    # -- following a run started elsewhere -------------------------------------------------------

    @on(Button.Pressed, "#follow-run")
    @on(Input.Submitted, "#follow-dir")
    def follow_run(self) -> None:
        if self._busy():
            return
        text = self.query_one("#follow-dir", Input).value.strip()
        error = self.query_one("#follow-error", Static)
        if not text:
            error.update(Content.styled("Type the run's output dir first.", "$text-error"))
            return
        path = Path(text).expanduser()
        if not path.exists():
            error.update(Content.styled(f"{path} does not exist: give the output_dir of a run.", "$text-error"))
            return
        error.update("")
        directory = path.parent if path.suffix == ".jsonl" else path
        self._begin("follow", Content.assemble(("Following → ", "$text-muted"), (str(progress_file(path)), "bold")),
                    directory)
        self._follow(progress_file(path), self._cancel)

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow")
    def _follow(self, path: Path, cancel: threading.Event) -> None:
        """Tail progress.jsonl: whole lines only, from the start, until the run says done or stopped."""
        offset, pending, waiting = 0, b"", False
        while not cancel.is_set():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if not waiting:
                    waiting = True
                    self.post_message(RunEnded("waiting", f"waiting for {path} to appear"))
                cancel.wait(FOLLOW_POLL_S)
                continue
            except OSError as err:
                self.post_message(RunEnded("failed", f"cannot read {path}: {err}"))
                return
            if size < offset:  # rewritten: a new run in the same directory
                offset, pending = 0, b""
            if size > offset:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
                offset += len(data)
                *lines, pending = (pending + data).split(b"\n")
                events = [e for e in (parse_progress_line(l.decode("utf-8", "replace")) for l in lines if l.strip()) if e]
                if events:
                    self.post_message(TrainEvents(events))
                    if events[-1].event in ("done", "stopped"):
                        self.post_message(RunEnded(events[-1].event))
                        return
            cancel.wait(FOLLOW_POLL_S)
        self.post_message(RunEnded("stopped", "no longer following"))

    # -- shared ---------------------------------------------------------------------------

    def _busy(self) -> bool:
        if self.mode is not None:
            what = "A run is in progress" if self.mode == "train" else "A run is being followed"
            self.notify(f"{what}: {self.app.key_display('stop_training')} stops it first.", severity="warning")
            return True
        return False

    def _begin(self, mode: str, title: Content, output_dir: Path) -> None:
        self.mode = mode
        self._cancel = threading.Event()
        self.monitor.start(title, output_dir)
        self.query_one("#stop-run", Button).disabled = False
        self.query_one("#stop-run", Button).display = True
        self.query_one("#stop-run", Button).label = "Stop · saves a checkpoint" if mode == "train" else "Stop following"
        self.query_one(TabbedContent).active = "monitor"
        self.query_one("#checkpoints").focus()
        self.refresh_bindings()
        self._status()

    def on_train_events(self, message: TrainEvents) -> None:
        self.monitor.add_events(message.events)
        self._status()

    def on_run_ended(self, message: RunEnded) -> None:
        if message.how == "waiting":
            self.app.training_status = "following: waiting"
            self.monitor.query_one("#train-steps", Static).update(Content.styled(message.detail, "$text-muted"))
            return
        self.mode = None
        self._cancel = None
        self.query_one("#stop-run", Button).disabled = True
        self.query_one("#stop-run", Button).display = False
        self.refresh_bindings()
        self.monitor.finish(message.detail if message.how == "failed" else message.how)
        self.app.training_status = ""
        if self.app.exit_after_training:
            self.app.exit()
            return
        if message.how == "failed":
            self.notify(message.detail, title="Training failed", severity="error", timeout=15)
        elif message.how in ("done", "stopped") and not message.detail:
            if not self.monitor.checkpoints:
                self.notify(f"Training {message.how}: no checkpoint.", title="Training")
                return
            # The chat keeps its adapter until one is picked: say how to chat with the new one.
            self.notify(f"Training {message.how}: {self.monitor.checkpoints[-1].name}. Press Enter on it in the list "
                        "(or “Chat with this checkpoint”) to chat with it.", title="Training", timeout=10)

    def _status(self) -> None:
        monitor = self.monitor
        verb = "training" if self.mode == "train" else "following"
        self.app.training_status = f"{verb} {monitor.step}/{monitor.total or '?'}"

    @on(Button.Pressed, "#stop-run")
    def action_stop_training(self) -> None:
        if self._cancel is None:
            return
        self._cancel.set()
        if self.mode == "train":
            self.monitor.query_one("#train-steps", Static).update(
                Content.styled("stopping: saving a checkpoint…", "$text-warning"))

    # -- chat with a checkpoint -------------------------------------------------------------

    @on(Button.Pressed, "#chat-with")
    @on(OptionList.OptionSelected, "#checkpoints")
    def chat_with_checkpoint(self) -> None:
        path = self.monitor.selected_checkpoint()
        if path is not None:
            self._activate(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="activate")
    def _activate(self, path: Path) -> None:
        backend = self.app.backend
        try:
            info = backend.register_adapter(path)
            backend.switch_adapter(info.name)
        except BaseException as err:
            self.post_message(CheckpointActivated(None, str(report(err, "activating a checkpoint"))))
            return
        self.app.post_message(AdaptersChanged(backend.adapters(), backend.active_adapter))
        self.post_message(CheckpointActivated(info.name))

    def on_checkpoint_activated(self, message: CheckpointActivated) -> None:
        if message.error:
            self.notify(message.error, title="Checkpoint not loaded", severity="error", timeout=10)
            return
        self.notify(f"Chatting with {message.name}", title="Adapter")
        if self.app.screen is self:
            self.app.pop_screen()
