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


def _dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or default).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
