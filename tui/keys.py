"""Every key binding in one table, and the [keys] table of config.toml that remaps them.

config.toml (in the user config dir, or $GLMCHAT_CONFIG_DIR):

    [keys]
    next_adapter = "ctrl+k"          # one key
    regenerate = ["ctrl+r", "f9"]    # or several
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

CONFIG_FILE = "config.toml"


@dataclass(frozen=True)
class KeyAction:
    name: str  # the name used in config.toml
    scope: str  # "app" | "chat" | "prompt" | "training" | "conversations"
    action: str  # the Textual action it runs
    key: str  # default key(s), comma separated
    description: str  # footer label
    help: str  # one line for the help screen
    show: bool = True  # shown in the footer

    @property
    def binding_id(self) -> str:
        return f"glmchat.{self.name}"


ACTIONS: tuple[KeyAction, ...] = (
    KeyAction("help", "app", "help", "f1", "Help", "Show this list of keys"),
    KeyAction("newline", "prompt", "newline", "ctrl+j,shift+enter", "Newline", "Start a new line in the prompt (Enter sends it)", show=False),
    KeyAction("stop", "chat", "stop", "escape", "Stop", "Stop the reply being written (the partial text stays)"),
    KeyAction("next_adapter", "chat", "app.next_adapter", "ctrl+t", "Adapter", "Cycle base → each registered adapter → base"),
    KeyAction("pick_adapter", "chat", "app.pick_adapter", "f4", "Pick", "Pick an adapter, or add a checkpoint from disk"),
    KeyAction("compare", "chat", "app.toggle_compare", "f5", "Compare", "Compare mode: each prompt answered by two adapters side by side"),
    KeyAction("training", "chat", "app.training", "f6", "Train", "Training panel: start a run or follow one"),
    KeyAction("settings", "chat", "app.settings", "f2", "Settings", "Settings: temperature, top_p, max new tokens, repetition penalty, system prompt"),
    KeyAction("conversations", "chat", "app.conversations", "f3", "History", "Saved conversations: reopen or export one"),
    KeyAction("structure", "chat", "app.structure", "ctrl+g", "Model", "Model structure: family, layers, heads, rotary settings, parameters and memory per part, the adapter's prefix", show=False),
    KeyAction("new_conversation", "chat", "new_conversation", "ctrl+n", "New", "Start a new conversation", show=False),
    KeyAction("regenerate", "chat", "regenerate", "ctrl+r", "Regenerate", "Write the last reply again", show=False),
    KeyAction("edit_last", "chat", "edit_last", "ctrl+l", "Edit last", "Move the last prompt back into the input to edit and resend it", show=False),
    KeyAction("copy_reply", "chat", "copy_reply", "ctrl+y", "Copy", "Copy the focused reply (or the last one) to the clipboard", show=False),
    KeyAction("export", "chat", "export", "ctrl+s", "Export", "Export the conversation to Markdown", show=False),
    KeyAction("start_training", "training", "start_training", "f7", "Start run", "Start the run the New run form describes"),
    KeyAction("stop_training", "training", "stop_training", "f8", "Stop run", "Stop the in-process run (it saves a checkpoint)"),
    KeyAction("close_training", "training", "close", "escape,f6", "Back", "Back to the chat (training keeps running)"),
    KeyAction("open_conversation", "conversations", "open", "enter", "Open", "Open the selected conversation", show=False),
    KeyAction("rename_conversation", "conversations", "rename", "f2", "Rename", "Rename the selected conversation"),
    KeyAction("search_conversations", "conversations", "search", "ctrl+f", "Search", "Search titles and prompts"),
    KeyAction("export_conversation", "conversations", "export", "ctrl+s", "Export", "Export the selected conversation to Markdown"),
    KeyAction("delete_conversation", "conversations", "delete", "delete", "Delete", "Delete the selected conversation"),
    KeyAction("close_conversations", "conversations", "close", "escape", "Back", "Back to the chat"),
)

# Keys that belong to Textual or to a text field; listed on the help screen, not remappable.
FIXED_KEYS: tuple[tuple[str, str], ...] = (
    ("⏎", "Send the prompt (in the input) / choose (in a list)"),
    ("^p", "Command palette: every action, and 'Use adapter …'"),
    ("tab / shift+tab", "Move focus (focus a reply to copy it)"),
    ("esc", "Close a dialog"),
    ("^q", "Quit"),
)


# The app's and the chat's keys come before the prompt's own editing keys (ctrl+k, ctrl+l, …), so a
# key remapped in config.toml works while typing and stays in the footer.
PRIORITY_SCOPES = ("app", "chat")


def bindings(scope: str) -> list[Binding]:
    return [
        Binding(a.key, a.action, a.description, show=a.show, id=a.binding_id, tooltip=a.help,
                priority=scope in PRIORITY_SCOPES)
        for a in ACTIONS
        if a.scope == scope
    ]


@dataclass
class KeyConfig:
    keymap: dict[str, str]  # binding id -> keys, for App.set_keymap
    warnings: list[str]  # problems in config.toml, shown to the user once
    path: Path

    def keys_for(self, action: KeyAction) -> str:
        return self.keymap.get(action.binding_id, action.key)


def load_key_config(config_dir: Path) -> KeyConfig:
    """Read [keys] from config.toml; a missing file means defaults, a broken one a warning and defaults."""
    path = config_dir / CONFIG_FILE
    config = KeyConfig({}, [], path)
    if not path.exists():
        return config
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("keys", {})
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as err:
        config.warnings.append(f"{path} could not be read ({err}); using the default keys.")
        return config
    if not isinstance(table, dict):
        config.warnings.append(f"{path}: [keys] must be a table of name = \"key\"; using the default keys.")
        return config
    by_name = {a.name: a for a in ACTIONS}
    for name, value in table.items():
        action = by_name.get(name)
        if action is None:
            config.warnings.append(f"{path}: unknown key action '{name}' (see the help screen for names).")
            continue
        keys = [value] if isinstance(value, str) else value
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
            config.warnings.append(f"{path}: {name} must be a key like \"ctrl+k\" or a list of them.")
            continue
        config.keymap[action.binding_id] = ",".join(k.strip().lower() for k in keys)
    _warn_clashes(config)
    return config


def _warn_clashes(config: KeyConfig) -> None:
    seen: dict[tuple[str, str], str] = {}
    for action in ACTIONS:
        for key in config.keys_for(action).split(","):
            other = seen.setdefault((action.scope, key), action.name)
            if other != action.name:
                config.warnings.append(f"{config.path}: '{key}' is bound to both {other} and {action.name}.")
