"""Crash-safe writes: a file or a directory appears complete or not at all, never half written.

The one copy of this plumbing for the whole repository (progress files, predictions, metrics, exports,
checkpoints). Torch-free, so the app can use it before torch is imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, IO, Union


def fsync_path(path: Union[str, Path]) -> None:
    """Flush a file's or a directory's entry to the disk (directories: so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(stream)`` on a temporary file beside ``path``, then move it into place (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary output files
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda out: out.write(text))


def publish_directory(tmp: Path, final: Path) -> None:
    """Move a finished directory ``tmp`` to ``final``, replacing an existing ``final`` by a swap: the old
    one is first renamed to ``.old-<name>-<pid>`` beside it (see :func:`recover_swaps`), then removed."""
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from other users
    fsync_path(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def recover_swaps(parent: Path, prefix: str) -> None:
    """Undo what a crash between the two renames of :func:`publish_directory` left in ``parent`` for names
    starting with ``prefix``: the old directory goes back in place when nothing replaced it, else it goes."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(f".old-{prefix}"):
            continue
        final = parent / p.name[len(".old-"):].rsplit("-", 1)[0]
        if not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
