"""What the app remembers between runs: sampling settings, the system prompt, the adapters added in the
app (F4, F6), the conversation that was open. One JSON file in the user config dir, written atomically;
a broken file costs its values (with one notice), never the start."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from backend.service import SamplingParams

from backend.atomic import atomic_write_text
from .screens.settings import FIELDS as SAMPLING_FIELDS

PREFERENCES_FILE = "settings.json"


@dataclass
class Preferences:
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str = ""  # the system prompt of new conversations
    adapters: list[str] = field(default_factory=list)  # checkpoint directories added in the app
    conversation: Optional[int] = None  # the open conversation; None: a new, empty one
    remembers_conversation: bool = False  # False before the first save: then the latest conversation opens


def load_preferences(config_dir: Path) -> tuple[Preferences, list[str]]:
    """The saved preferences and the problems found reading them (each one sentence)."""
    path = config_dir / PREFERENCES_FILE
    prefs = Preferences()
    if not path.exists():
        return prefs, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return prefs, [f"{path} could not be read ({err}); using the default settings."]
    if not isinstance(data, dict):
        return prefs, [f"{path} is not a JSON object; using the default settings."]
    problems: list[str] = []
    params = data.get("params", {})
    if isinstance(params, dict):
        values = {}
        for name, label, parse, check, rule in SAMPLING_FIELDS:  # the rules the settings dialog applies
            value = params.get(name)
            if value is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and parse(value) == value and check(value):
                values[name] = parse(value)
            else:
                problems.append(f"{path}: {label.lower()} {value!r} is not {rule}; using {getattr(prefs.params, name)}.")
        prefs.params = replace(prefs.params, **values)
    if isinstance(data.get("system"), str):
        prefs.system = data["system"]
    if isinstance(data.get("adapters"), list):
        prefs.adapters = [p for p in data["adapters"] if isinstance(p, str)]
    if "conversation" in data:
        conversation = data["conversation"]
        prefs.remembers_conversation = True
        prefs.conversation = conversation if isinstance(conversation, int) and not isinstance(conversation, bool) else None
    return prefs, problems


def save_preferences(config_dir: Path, prefs: Preferences) -> None:
    """Write them atomically (a crash leaves the old file or the new one); raises OSError."""
    data = {
        "params": asdict(prefs.params),
        "system": prefs.system,
        "adapters": prefs.adapters,
        "conversation": prefs.conversation,
    }
    atomic_write_text(config_dir / PREFERENCES_FILE, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
