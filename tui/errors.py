"""Turn an exception from the backend into what went wrong and how to fix it, never a traceback."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from backend.errors import Problem
from backend.errors import explain as _explain_user_error
from backend.service import BackendError

log = logging.getLogger("glmchat")

__all__ = ["Problem", "explain", "report", "setup_log", "log_file"]


def explain(err: BaseException) -> Problem:
    """The shared explanation (backend/errors.py); a training request's error names the form's fields; an
    error that is not the user's points to the log."""
    if isinstance(err, BackendError) and hasattr(err, "worded"):  # a training request: name the form's fields
        from .widgets.train_form import field_label

        return Problem(err.worded(field_label, verb="set"))
    problem = _explain_user_error(err)
    if problem is not None:
        return problem
    text = str(err)
    return Problem(f"Unexpected error: {type(err).__name__}: {text}".rstrip(": ") + ".",
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
