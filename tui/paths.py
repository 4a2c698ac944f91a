"""Where glmchat keeps its files: platformdirs user dirs, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "glmchat"


def data_dir() -> Path:
    """Conversations database, exports and logs (GLMCHAT_DATA_DIR overrides)."""
    return _dir("GLMCHAT_DATA_DIR", platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """config.toml with the [keys] table (GLMCHAT_CONFIG_DIR overrides)."""
    return _dir("GLMCHAT_CONFIG_DIR", platformdirs.user_config_dir(APP_NAME, appauthor=False))


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or default).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
