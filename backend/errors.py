"""What went wrong and how to fix it, in one sentence: the error mapper of ``glmchat``, ``glmchat --prompt``
and ``glmchat-train``.

Torch-free on purpose: torch's and bitsandbytes' errors are recognised by class name and message, so the
app's first screen and the command lines' argument checks can import this without paying for torch.
``explain`` returns None for an error that is not the user's to fix (a bug): the command lines let its
traceback show, the app logs it.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from typing import Optional

from .service import BackendError

DEFAULT_OOM_FIX = "Load a smaller precision (--quantization 8bit or 4bit), or free the GPU."


@dataclass(frozen=True)
class Problem:
    reason: str  # what went wrong, a sentence
    fix: str = ""  # what to do about it, a sentence (empty when the reason already says)

    def __str__(self) -> str:
        """Reason and fix as one sentence: ``The GPU ran out of memory; load a smaller precision...``."""
        if not self.fix:
            return self.reason
        return f"{self.reason.rstrip('.')}; {_lower_first(self.fix)}"

    def line(self) -> str:
        """The sentence after a ``prog: `` prefix on the command line (lower case first word)."""
        return _lower_first(str(self))


def explain(err: BaseException, *, oom_fix: str = DEFAULT_OOM_FIX) -> Optional[Problem]:
    """The user-facing explanation of ``err``, or None when it is a bug rather than something to fix."""
    if isinstance(err, BackendError):
        return Problem(str(err))  # already one sentence: what and how
    if is_out_of_memory(err):
        return Problem("The GPU ran out of memory.", _sentence(oom_fix))
    if isinstance(err, MemoryError):
        return Problem("The computer ran out of memory (RAM).",
                       "Load a smaller precision (--quantization 8bit or 4bit), or close other programs.")
    if isinstance(err, ImportError):
        return _missing_package(err)
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        return _unreadable_text(err)
    if isinstance(err, OSError) or _says_disk_full(err):
        return _os_problem(err)
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) or a CUDA out-of-memory RuntimeError."""
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(err).__mro__):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _missing_package(err: ImportError) -> Optional[Problem]:
    missing = err.name or ""
    if "bitsandbytes" in f"{missing} {err}":
        return Problem("4-bit (NF4) loading needs bitsandbytes, which is not installed.",
                       "Install it (pip install bitsandbytes), or pass --quantization 8bit or none.")
    if not isinstance(err, ModuleNotFoundError) or not missing:
        return None  # a broken import inside an installed package: a bug
    if missing.split(".")[0] in ("backend", "tui"):
        return Problem(f"The model engine is not available ({missing} is missing).",
                       "Reinstall glmchat (pip install -e .), or try the app with --demo.")
    return Problem(f"The Python package '{missing.split('.')[0]}' is not installed.",
                   "Install glmchat with its dependencies: pip install -e .")


def _unreadable_text(err: ValueError) -> Problem:
    if isinstance(err, json.JSONDecodeError):
        return Problem(f"A JSON file is not valid ({err.msg} at line {err.lineno}, column {err.colno}).",
                       "Fix the file or replace it with a fresh copy.")
    return Problem(f"A text file is not UTF-8 ({err.reason} at byte {err.start}).", "Save it as UTF-8.")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _says_disk_full(err: BaseException) -> bool:
    """torch.save reports a full disk as a RuntimeError whose message carries the OS text."""
    return isinstance(err, RuntimeError) and "no space left on device" in str(err).lower()


def _os_problem(err: BaseException) -> Problem:
    where = getattr(err, "filename", None)
    if _says_disk_full(err) or getattr(err, "errno", None) in _DISK_FULL:
        disk = f"The disk holding {where}" if where else "The disk"
        return Problem(f"{disk} is full.", "Free some space (or choose another directory) and try again.")
    if isinstance(err, PermissionError) or getattr(err, "errno", None) == errno.EROFS:
        return Problem(f"Permission denied: {where or err}.",
                       "Check the file's permissions, or choose a directory you can write to.")
    if isinstance(err, FileNotFoundError):
        return Problem(f"File not found: {where or err}.", "Check the path you gave.")
    if isinstance(err, IsADirectoryError):
        return Problem(f"{where} is a directory where a file was expected.", "Check the path you gave.")
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return Problem(f"Could not use {where}: {reason}." if where else f"A file operation failed: {reason}.",
                   "Check the path and the disk.")


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _lower_first(text: str) -> str:
    """``The GPU`` -> ``the GPU``; ``GPU``, ``/path`` and ``'name'`` stay as they are."""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text
