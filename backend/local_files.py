"""Checks of the model and adapter paths a user gives, without torch: the command line runs them before
the (seconds-long) torch import, so a mistyped path fails at once; loading runs the same checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from .service import BackendError


def local_model_dir(name_or_path: Union[str, os.PathLike]) -> Optional[Path]:
    """The model directory ``name_or_path`` names, or None when it is a hub id (``owner/name``) to resolve
    through the hub; :class:`BackendError` when it names no model directory."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BackendError(f"{path} is a file; pass the model directory that holds config.json and the weights.")
        if not (path / "config.json").is_file():
            raise BackendError(f"{path} is not a ChatGLM2 model directory: it has no config.json.")
        return path
    text = str(name_or_path)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1 or os.sep in text.replace("/", "", 1)
    if looks_like_path:
        raise BackendError(f"no model directory at {text}; pass --model with a ChatGLM2 directory or a hub id such as THUDM/chatglm2-6b.")
    return None


def check_adapter_paths(checkpoints: Iterable[Union[str, os.PathLike]], directories: Iterable[Union[str, os.PathLike]]) -> None:
    """Each ``--adapter`` exists and each ``--adapters`` is a directory (their contents are read at load)."""
    for checkpoint in checkpoints:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise BackendError(f"no adapter checkpoint at {path}; pass a checkpoint-N directory written by P-Tuning v2 training.")
    for directory in directories:
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise BackendError(f"no directory at {path} to scan for checkpoint-* adapters.")
