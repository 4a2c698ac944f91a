"""Messages that more than one screen sends to the app."""

from __future__ import annotations

from typing import Optional

from textual.message import Message

from backend.service import AdapterInfo


class AdaptersChanged(Message):
    """From adapter workers (switch, register, scan): the backend's adapters and the active one."""

    def __init__(self, adapters: list[AdapterInfo], active: Optional[str], error: Optional[str] = None) -> None:
        super().__init__()
        self.adapters, self.active, self.error = adapters, active, error


class AdaptersRestored(Message):
    """The adapters remembered from the last run are registered again: those gone, those that failed."""

    def __init__(self, missing: list[str], failed: list[str]) -> None:
        super().__init__()
        self.missing, self.failed = missing, failed
