"""Training progress events: one JSON line each in ``output_dir/progress.jsonl``, and a rich bar.

The same :class:`~backend.service.TrainProgress` events feed the terminal bar, the JSON lines file
(which the TUI's training panel tails) and any in-process callback, so every view shows the same numbers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .atomic import atomic_write_text
from .service import TrainProgress

PROGRESS_FILE = "progress.jsonl"
_FIELDS = {f.name for f in fields(TrainProgress)}


def progress_to_json(event: TrainProgress) -> str:
    """One line of JSON with every field of the event (None written as null)."""
    return json.dumps(asdict(event), ensure_ascii=False, default=str)


def progress_from_json(line: str) -> TrainProgress:
    """Parse one line written by :func:`progress_to_json`; unknown keys (from newer writers) are ignored."""
    data = json.loads(line)
    return TrainProgress(**{k: v for k, v in data.items() if k in _FIELDS})


def read_progress(path: Union[str, Path]) -> list[TrainProgress]:
    """Every complete event in a progress file (a half-written last line, from a live run, is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROGRESS_FILE
    events = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            events.append(progress_from_json(line))
        except (json.JSONDecodeError, TypeError):
            continue
    return events


class ProgressLog:
    """Appends events to ``progress.jsonl``, one flushed line per event (safe to tail while training)."""

    def __init__(self, output_dir: Union[str, Path], resume_step: Optional[int] = None):
        """A fresh run empties the file; a resumed one keeps the events up to ``resume_step`` and drops
        the rest, which the resumed run is about to redo, so the file tells one continuous story."""
        self.path = Path(output_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [e for e in read_progress(self.path) if e.step <= resume_step and e.event not in ("done", "stopped")]
            atomic_write_text(self.path, "".join(progress_to_json(e) + "\n" for e in kept))

    def __call__(self, event: TrainProgress) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(progress_to_json(event) + "\n")


def fan_out(callbacks: Iterable[Optional[Callable[[TrainProgress], None]]]) -> Callable[[TrainProgress], None]:
    """One callback calling each of ``callbacks`` (None entries skipped) in order."""
    live = [c for c in callbacks if c is not None]

    def call(event: TrainProgress) -> None:
        for callback in live:
            callback(event)

    return call


# ------------------------------------------------------------------------------------ formatting


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in metrics.items())


def format_event(event: TrainProgress) -> str:
    """One line for a terminal log, like the original trainer's {'loss': ..., 'learning_rate': ...} lines."""
    width = len(str(event.total_steps))
    head = f"step {event.step:>{width}}/{event.total_steps}"
    if event.event == "eval" and event.eval_metrics:
        return f"{head}  eval  {format_metrics(event.eval_metrics)}"
    if event.event == "save":
        return f"{head}  saved {event.checkpoint}"
    if event.event == "start" and event.micro_batch_size:
        n = event.micro_batch_size
        kept = "recomputed in the backward" if event.recompute_mlp else "kept"
        return f"{head}  {n} example{'s' if n > 1 else ''} through the model at once, MLP activations {kept}"
    parts = [head]
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if event.learning_rate is not None:
        parts.append(f"lr {event.learning_rate:.3e}")
    if event.epoch is not None:
        parts.append(f"epoch {event.epoch:.2f}")
    if event.samples_per_s:
        parts.append(f"{event.samples_per_s:.2f} samples/s")
    if event.tokens_per_s:
        parts.append(f"{event.tokens_per_s:.0f} tokens/s")
    if event.gpu_mem_gb is not None:
        parts.append(f"GPU {event.gpu_mem_gb:.2f} GB")
    if event.event in ("done", "stopped"):
        parts.append(event.event)
    return "  ".join(parts)


class RichProgress:
    """A rich progress bar on stderr (step/total, loss, lr, it/s, ETA) plus one printed line per log,
    eval and save event, so the history stays in the scrollback (and in a log file when not a terminal)."""

    def __init__(self, description: str = "P-Tuning v2", console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = console or Console(stderr=True)
        self.description = description
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} it/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.task = None
        self._start_step = 0
        self._start_elapsed = 0.0
        self._start_time = time.perf_counter()

    def __enter__(self) -> "RichProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def tick(self, step: int, total: int) -> None:
        """Move the bar between log events: one call per optimizer step."""
        if self.task is None:
            return
        update = {"completed": step, "total": total}
        steps, seconds = step - self._start_step, time.perf_counter() - self._start_time
        if steps > 0 and seconds > 0:
            rate = steps / seconds
            update.update(speed=f"{rate:.2f}", eta=format_duration((total - step) / rate))
        self.progress.update(self.task, **update)

    def __call__(self, event: TrainProgress) -> None:
        if self.task is None:
            self.task = self.progress.add_task(
                self.description, total=event.total_steps, completed=event.step, loss="-", lr="-", speed="-", eta="-"
            )
            self._start_step, self._start_elapsed = event.step, event.elapsed_s
            self._start_time = time.perf_counter()
        update = {"completed": event.step, "total": event.total_steps}
        if event.loss is not None:
            update["loss"] = f"{event.loss:.4f}"
        if event.learning_rate is not None:
            update["lr"] = f"{event.learning_rate:.2e}"
        steps, seconds = event.step - self._start_step, event.elapsed_s - self._start_elapsed
        if steps > 0 and seconds > 0:
            update["speed"] = f"{steps / seconds:.2f}"
        if event.eta_s is not None:
            update["eta"] = format_duration(event.eta_s)
        self.progress.update(self.task, **update)
        if is_logged(event):
            self.progress.console.print(format_event(event), highlight=False, markup=False)


def is_logged(event: TrainProgress) -> bool:
    """Whether ``event`` gets a log line (``format_event``): a log, eval or save, and a start that says how the
    steps go through the model."""
    return event.event in ("log", "eval", "save") or (event.event == "start" and bool(event.micro_batch_size))


def plain_printer(stream=None) -> Callable[[TrainProgress], None]:
    """Log lines only (no bar): for non-interactive runs and ranks other than 0."""
    stream = stream or sys.stderr

    def show(event: TrainProgress) -> None:
        if is_logged(event):
            print(format_event(event), file=stream, flush=True)

    return show
