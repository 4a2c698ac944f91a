"""Turn an exception from the backend into what went wrong and how to fix it, never a traceback."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

from backend.service import BackendError

log = logging.getLogger("glmchat")


@dataclass(frozen=True)
class Problem:
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.reason} {self.fix}".strip()


def explain(err: BaseException) -> Problem:
    if isinstance(err, BackendError) and hasattr(err, "worded"):  # a training request: name the form's fields
        from .widgets.train_form import field_label

        return Problem(err.worded(field_label))
    if isinstance(err, BackendError):
        return Problem(str(err))  # already one sentence: what and how
    text = str(err)
    name = type(err).__name__
    if isinstance(err, ModuleNotFoundError):
        missing = err.name or text
        if missing.startswith("backend"):
            return Problem(f"The model engine is not available ({missing} is missing).",
                           "Update glmchat (pip install -e .), or try the app with --demo.")
        return Problem(f"The Python package '{missing}' is not installed.",
                       "Install glmchat with its dependencies: pip install -e .")
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return Problem("The GPU ran out of memory.",
                       "Load a smaller precision (--quantization 8bit or 4bit), or free the GPU.")
    if isinstance(err, FileNotFoundError):
        return Problem(f"File not found: {err.filename or text}.", "Check the path you gave (--model, --adapter).")
    if isinstance(err, PermissionError):
        return Problem(f"Permission denied: {err.filename or text}.", "Check the file's permissions.")
    return Problem(f"Unexpected error: {name}: {text}".rstrip(": ") + ".",
                   f"The traceback is in {log_file()}.")


_LOG_FILE: Path | None = None


def setup_log(directory: Path) -> Path:
    """Unexpected errors go to glmchat.log in the data dir, so the screen shows a sentence instead."""
    global _LOG_FILE
    _LOG_FILE = directory / "glmchat.log"
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    handler = logging.FileHandler(_LOG_FILE, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return _LOG_FILE


def log_file() -> str:
    return str(_LOG_FILE) if _LOG_FILE else "the log"


def report(err: BaseException, context: str) -> Problem:
    """Log the traceback of an unexpected error and return the user-facing explanation."""
    if not isinstance(err, BackendError):
        log.error("%s\n%s", context, "".join(traceback.format_exception(err)))
    return explain(err)
