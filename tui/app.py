"""The glmchat app: loads the model behind a loading screen, then chat, adapters, compare, training."""

from __future__ import annotations

import threading
from argparse import Namespace
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from backend.service import AdapterInfo, ChatBackend, ModelInfo, ProgressCallback

from . import keys, paths
from .conversation import Conversation, Turn, turns_label
from .errors import report, setup_log
from .export import adapter_label, write_export
from .messages import AdaptersChanged, AdaptersRestored
from .preferences import load_preferences, save_preferences
from .screens.chat import ChatScreen
from .screens.loading import Loaded, Loader, LoadingScreen
from .store import ConversationStore, StoreError

DEFAULT_MODEL = "THUDM/chatglm2-6b"


def load_backend(args: Namespace, progress: ProgressCallback) -> ChatBackend:
    """Load the engine the command line asks for; blocks (call it off the UI thread).

    The app's default loader; tests pass their own (``GLMChatApp(args, loader=...)``).
    """
    if getattr(args, "server", None):  # glmchat --server URL: the model runs in `glmchat serve` there
        from .remote import RemoteBackend

        return RemoteBackend.connect(args.server, api_key=args.api_key, progress=progress)
    from backend.engine import ChatEngine  # heavy (torch): only now, in the loading thread

    engine = ChatEngine.load(
        model=args.model or (None if args.demo else DEFAULT_MODEL),
        quantization=args.quantization,  # None: the engine's default (8-bit on a GPU)
        adapters=list(args.adapter or []),
        adapter_dirs=list(args.adapters or []),
        progress=progress,
        demo=bool(args.demo),
        engine=args.engine or "auto",
        dtype=getattr(args, "dtype", None),
    )
    # the GPU decoder's tuning and graph captures while the user types, not in the first chat and compare
    engine.warm_up(wait=False)
    return engine


class GLMChatApp(App[None]):
    CSS_PATH = "glmchat.tcss"
    TITLE = "glmchat"
    BINDINGS = keys.bindings("app")
    # Below 100 columns the screens get "-narrow": the footer drops ^p palette (F1 lists it), forms take fewer columns.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]

    model_info: reactive[Optional[ModelInfo]] = reactive(None, init=False)
    adapters: reactive[tuple[AdapterInfo, ...]] = reactive((), init=False)
    active_adapter: reactive[Optional[str]] = reactive(None, init=False)
    compare_mode: reactive[bool] = reactive(False, init=False)
    last_tokens_per_s: reactive[Optional[float]] = reactive(None, init=False)
    training_status: reactive[str] = reactive("", init=False)

    def __init__(self, args: Namespace, *, loader: Loader = load_backend) -> None:
        super().__init__()
        self.args = args
        self.loader = loader
        self.backend: Optional[ChatBackend] = None
        self.data_dir = paths.data_dir()
        setup_log(self.data_dir)
        self.config_dir = paths.config_dir()
        self.key_config = keys.load_key_config(self.config_dir)
        self.prefs, self._prefs_problems = load_preferences(self.config_dir)
        saved = self.prefs.params  # the command line overrides what was saved, for this run only
        self.params = replace(
            saved,
            temperature=_or(args.temperature, saved.temperature),
            top_p=_or(args.top_p, saved.top_p),
            max_new_tokens=_or(args.max_new_tokens, saved.max_new_tokens),
        )
        self._command_line_adapters: set[str] = set()  # paths loaded from flags: not remembered
        self.store: Optional[ConversationStore] = None
        self._switch_lock = threading.Lock()  # one backend.switch_adapter at a time
        self._quit_confirmed = False
        self.exit_after_training = False  # set by a confirmed quit while a run goes in-process
        self._loading_screen: Optional[LoadingScreen] = None

    # -- start-up ------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        return ChatScreen()

    @property
    def chat(self) -> ChatScreen:
        return self.screen_stack[0]

    def on_mount(self) -> None:
        self.set_keymap(self.key_config.keymap)
        for warning in self.key_config.warnings:
            self.notify(warning, title="config.toml", severity="warning", timeout=10)
        for problem in self._prefs_problems:
            self.notify(problem, title="Saved settings", severity="warning", timeout=10)
        self._open_store()
        model = "demo model" if self.args.demo and not self.args.model else (self.args.model or DEFAULT_MODEL)
        model = getattr(self.args, "server", None) or model
        self._loading_screen = LoadingScreen(self.loader, self.args, model)
        self.push_screen(self._loading_screen, callback=self._loaded)

    def _open_store(self) -> None:
        try:
            self.store = ConversationStore.in_dir(self.data_dir)
        except (StoreError, OSError) as err:
            self.notify(f"Conversations will not be saved: {err}", severity="error", timeout=15)
            return
        if self.store.notice is not None:
            title = "Corrupt database set aside" if self.store.set_aside else "Conversations read-only"
            self.notify(self.store.notice, title=title, severity="error", timeout=30)

    async def _loaded(self, loaded: Loaded) -> None:
        from .screens.training import TrainingScreen  # plotext and friends: only once a model is up

        self.install_screen(TrainingScreen(), "training")
        self.backend = loaded.backend
        self.model_info = loaded.backend.info
        self.adapters = tuple(loaded.adapters)
        self.active_adapter = loaded.active
        self._command_line_adapters = {_path_key(a.path) for a in loaded.adapters}
        remembered = [p for p in self.prefs.adapters if p not in self._command_line_adapters]
        if remembered:
            self._restore_adapters(remembered)
        await self._reopen_last()
        self.chat.model_ready()
        for notice in self.model_info.notices:  # e.g. a smaller cache: memory was short
            self.notify(notice, title="Model loaded", severity="warning", timeout=15)

    async def _reopen_last(self) -> None:
        """glmchat reopens the conversation that was open when it quit; ctrl+n starts a fresh one."""
        self.chat.conversation.system = self.prefs.system
        if self.store is None:
            return
        try:
            wanted = self.prefs.conversation if self.prefs.remembers_conversation else self.store.latest_id()
            if wanted is None or not self.store.exists(wanted):
                return
            conversation = self.store.load(wanted)
        except StoreError as err:
            self.notify(str(err), severity="error")
            return
        await self.chat.show_conversation(conversation)
        self.notify(
            f"Reopened “{conversation.title}” ({turns_label(len(conversation.turns))}): "
            f"{self.key_display('new_conversation')} starts a new one, "
            f"{self.key_display('conversations')} lists the others.",
            timeout=5,
        )

    # -- what is remembered between runs ------------------------------------------------

    def remember_settings(self, **changes) -> None:
        """Change and write the remembered settings; a failed write is one notice, the app goes on."""
        for name, value in changes.items():
            setattr(self.prefs, name, value)
        try:
            save_preferences(self.config_dir, self.prefs)
        except OSError as err:
            self.notify(f"Settings not saved to {self.config_dir}: {err}.", severity="error", timeout=10)

    def remember_conversation(self, conversation: Conversation) -> None:
        if not self.prefs.remembers_conversation or self.prefs.conversation != conversation.id:
            self.remember_settings(conversation=conversation.id, remembers_conversation=True)

    @work(thread=True, exit_on_error=False, group="restore-adapters")
    def _restore_adapters(self, remembered: list[str]) -> None:
        """Register again the adapters added in the app last time; one that is gone is skipped."""
        missing, failed = [], []
        with self._switch_lock:
            for path in remembered:
                if not Path(path).exists():
                    missing.append(path)
                    continue
                try:
                    self.backend.register_adapter(path)
                except BaseException as err:
                    failed.append(str(report(err, "registering a remembered adapter")))
            self.post_message(AdaptersChanged(self.backend.adapters(), self.backend.active_adapter))
        self.post_message(AdaptersRestored(missing, failed))

    def on_adapters_restored(self, message: AdaptersRestored) -> None:
        if message.missing:
            self.notify(
                f"Adapters added earlier are no longer on disk and were skipped: {', '.join(message.missing)}.",
                title="Adapters", severity="warning", timeout=10,
            )
        for error in message.failed:
            self.notify(error, title="Adapter not restored", severity="error", timeout=10)

    @property
    def loading(self) -> bool:
        """The model load is still running (it cannot be interrupted)."""
        return self._loading_screen is not None and not self._loading_screen.load_finished.is_set()

    @property
    def training_in_process(self) -> bool:
        return self.backend is not None and self.get_screen("training").mode == "train"

    async def action_quit(self) -> None:
        """Quit; an in-process training run is stopped first and its checkpoint saved, then the app exits."""
        if self.training_in_process:
            if not self._quit_confirmed:
                self._quit_confirmed = True
                self.notify(
                    "A training run is going in this process: quitting stops it after saving a checkpoint. "
                    f"Press {self.get_key_display(Binding('ctrl+q', ''))} again to quit.",
                    severity="warning", timeout=8,
                )
                return
            self.exit_after_training = True
            self.get_screen("training").action_stop_training()
            self.notify("Stopping the training run: saving a checkpoint, then quitting…", timeout=30)
            return
        self.chat.action_stop()
        if self.backend is not None:
            self.get_screen("training").action_stop_training()  # a followed run: stop watching its file
        self.exit()

    # -- persistence (small transactions, on the UI thread) ---------------------------------

    def save_turn(self, conversation: Conversation, turn: Turn) -> None:
        if self.store is None or self.store.read_only:  # the notice at start said new turns are not saved
            return
        try:
            self.store.replace_replies(conversation, turn)
        except StoreError as err:
            self.notify(str(err), title="Not saved", severity="error", timeout=10)
            return
        self.remember_conversation(conversation)

    def update_conversation_details(self, conversation: Conversation) -> None:
        """Store a renamed title or a changed system prompt."""
        if self.store is None:
            return
        try:
            self.store.update_details(conversation)
        except StoreError as err:
            self.notify(str(err), title="Not saved", severity="error", timeout=10)

    def delete_turn(self, turn: Turn) -> None:
        if self.store is None or self.store.read_only:
            return
        try:
            self.store.delete_turn(turn)
        except StoreError as err:
            self.notify(str(err), severity="error")

    def export_conversation(self, conversation: Conversation) -> Optional[Path]:
        if not conversation.turns:
            self.notify("Nothing to export yet.", severity="warning")
            return None
        model = self.model_info.name if self.model_info else ""
        try:
            path = write_export(self.data_dir / "exports", conversation, model)
        except OSError as err:
            self.notify(f"Could not export: {err}.", severity="error")
            return None
        self.notify(f"Exported to {path}", title="Markdown export")
        return path

    # -- adapters -----------------------------------------------------------------------

    def adapter_names(self) -> list[Optional[str]]:
        return [None] + [a.name for a in self.adapters]

    def action_next_adapter(self) -> None:
        names = self.adapter_names()
        if len(names) == 1:
            self.notify(f"No adapters registered: {self.key_display('pick_adapter')} adds a checkpoint.", severity="warning")
            return
        current = names.index(self.active_adapter) if self.active_adapter in names else 0
        self.use_adapter(names[(current + 1) % len(names)])

    def use_adapter(self, name: Optional[str]) -> None:
        """Switch live: the UI shows the new adapter at once, the backend follows in a thread."""
        if self.backend is None:
            return
        self.active_adapter = name
        self.notify(f"Adapter: {adapter_label(name)}", timeout=2)
        self._switch_adapter(name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="adapter")
    def _switch_adapter(self, name: Optional[str]) -> None:
        error = None
        with self._switch_lock:
            try:
                self.backend.switch_adapter(name)
            except BaseException as err:
                error = str(report(err, "switching adapter"))
            self.post_message(AdaptersChanged(self.backend.adapters(), self.backend.active_adapter, error))

    def on_adapters_changed(self, message: AdaptersChanged) -> None:
        self.adapters = tuple(message.adapters)
        self.active_adapter = message.active
        added_here = [_path_key(a.path) for a in message.adapters if _path_key(a.path) not in self._command_line_adapters]
        if self.backend is not None and added_here != self.prefs.adapters:
            self.remember_settings(adapters=added_here)
        if message.error:
            self.notify(message.error, title="Adapter not switched", severity="error", timeout=10)

    def compare_pair(self) -> tuple[Optional[str], Optional[str]]:
        """Left: the base model; right: the active adapter (or the first one while base is active)."""
        right = self.active_adapter
        if right is None and self.adapters:
            right = self.adapters[0].name
        return None, right

    def action_toggle_compare(self) -> None:
        if not self.compare_mode and not self.adapters:
            self.notify(
                f"Compare needs an adapter: {self.key_display('pick_adapter')} adds a checkpoint.", severity="warning"
            )
            return
        self.compare_mode = not self.compare_mode
        if self.compare_mode:
            left, right = self.compare_pair()
            self.notify(f"Compare mode: {adapter_label(left)} ⇄ {adapter_label(right)}", timeout=3)
        else:
            self.notify("Compare mode off", timeout=2)

    # -- screens ------------------------------------------------------------------------

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_structure(self) -> None:
        from .screens.structure import StructureScreen

        if self.backend is not None and not isinstance(self.screen, StructureScreen):
            self.push_screen(StructureScreen())

    def action_pick_adapter(self) -> None:
        from .screens.adapters import AdapterPicker

        if self.backend is not None:
            self.push_screen(AdapterPicker(), callback=self._picked)

    def _picked(self, choice) -> None:
        if choice is not None and choice.name != self.active_adapter:
            self.use_adapter(choice.name)

    def action_settings(self) -> None:
        from .screens.settings import SettingsScreen

        self.push_screen(SettingsScreen(self.params, self.chat.conversation.system), callback=self._settings_saved)

    def _settings_saved(self, settings) -> None:
        if settings is None:
            return
        params = self.params = settings.params
        conversation = self.chat.conversation
        if settings.system != conversation.system:
            conversation.system = settings.system
            self.update_conversation_details(conversation)
        self.remember_settings(params=params, system=settings.system)
        system = f" · system prompt: {settings.system[:40]}" if settings.system else ""
        self.notify(
            f"temperature {params.temperature:g} · top_p {params.top_p:g} · "
            f"max {params.max_new_tokens} tokens · repetition penalty {params.repetition_penalty:g}{system}",
            title="Settings", timeout=3,
        )

    def action_conversations(self) -> None:
        from .screens.conversations import ConversationsScreen

        if self.store is None:
            self.notify("Conversations are not being saved (see the earlier error).", severity="error")
            return
        if self.chat.open_conversation_ok():
            self.push_screen(ConversationsScreen(self.store), callback=self._open_conversation)

    async def _open_conversation(self, conversation: Optional[Conversation]) -> None:
        if conversation is not None:
            await self.chat.show_conversation(conversation)
            self.chat.prompt.focus()

    def action_training(self) -> None:
        if self.backend is not None and self.screen is not self.get_screen("training"):
            self.push_screen("training")

    def key_display(self, name: str) -> str:
        """How the key(s) of a key action read in text, after the user's remapping."""
        action = next(a for a in keys.ACTIONS if a.name == name)
        return " / ".join(self.get_key_display(Binding(k, "")) for k in self.key_config.keys_for(action).split(","))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.backend is None:
            return
        chat = self.chat
        yield SystemCommand("Adapter picker", "Pick an adapter, or add a checkpoint from disk", self.action_pick_adapter)
        yield SystemCommand("Next adapter", "Cycle base → adapters", self.action_next_adapter)
        for name in self.adapter_names():
            if name != self.active_adapter:
                yield SystemCommand(f"Use adapter: {adapter_label(name)}", "Switch live; the conversation stays",
                                    lambda name=name: self.use_adapter(name))
        yield SystemCommand("Compare mode", "Toggle: answer each prompt with two adapters side by side", self.action_toggle_compare)
        yield SystemCommand("Training panel", "Start a P-Tuning v2 run, or follow one", self.action_training)
        yield SystemCommand("Sampling settings", "Temperature, top_p, max new tokens, repetition penalty", self.action_settings)
        yield SystemCommand("Conversations", "Reopen or export a saved conversation", self.action_conversations)
        yield SystemCommand("New conversation", "Start a fresh conversation", chat.action_new_conversation)
        yield SystemCommand("Regenerate last reply", "Write the last reply again", chat.action_regenerate)
        yield SystemCommand("Edit last prompt", "Move the last prompt back into the input", chat.action_edit_last)
        yield SystemCommand("Copy reply", "Copy the focused (or last) reply", chat.action_copy_reply)
        yield SystemCommand("Export to Markdown", "Write the conversation as a Markdown file", chat.action_export)
        yield SystemCommand("Help", "Every key binding", self.action_help)


def _or(value, default):
    return default if value is None else value


def _path_key(path) -> str:
    """One spelling per checkpoint directory, to compare and remember them."""
    return str(Path(path).expanduser().resolve())
