"""A training run as it goes: step/total, ETA, loss curve, learning rate, speed, memory, eval, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from backend.service import TrainProgress


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class TrainMonitor(Vertical):
    """Fed TrainProgress events (from the in-process run or from progress.jsonl), draws them once per batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.output_dir: Optional[Path] = None
        self.reset_state()

    def reset_state(self) -> None:
        self.step, self.total = 0, 0
        self.losses: list[tuple[int, float]] = []
        self.latest: Optional[TrainProgress] = None  # last event with figures
        self.eval_metrics: Optional[dict] = None
        self.micro_batch: Optional[tuple[int, bool]] = None  # (examples at once, MLP recomputed), from "start"
        self.checkpoints: list[Path] = []
        self.finished: Optional[str] = None  # "done" | "stopped" | an error

    def compose(self) -> ComposeResult:
        yield Static(Content.styled("No run yet: start one (New run) or follow one (Follow a run).", "$text-muted"),
                     id="run-title")
        with Horizontal(id="train-progress-row"):
            yield ProgressBar(id="train-progress", show_eta=False)
            yield Static(id="train-steps")
            yield Button("Stop", id="stop-run", variant="error", disabled=True, compact=True)
        yield Static(id="train-stats")
        yield Static(id="train-error", classes="error")  # wraps: a failure's whole sentence, never cut off
        with Horizontal(id="train-body"):
            yield PlotextPlot(id="loss-plot")
            with Vertical(id="checkpoints-box"):
                yield Static(Content.styled("Checkpoints", "bold"))
                yield OptionList(id="checkpoints")
                yield Button("Chat with this checkpoint", id="chat-with", variant="primary", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#stop-run").display = False  # shown while a run goes
        self._draw_plot()

    def start(self, title: str, output_dir: Path) -> None:
        self.reset_state()
        self.output_dir = output_dir
        self.query_one("#run-title", Static).update(title)
        self.query_one("#checkpoints", OptionList).clear_options()
        self.query_one("#chat-with", Button).disabled = True
        self.query_one("#train-progress", ProgressBar).update(total=None, progress=0)
        self._draw()

    def add_events(self, events: Iterable[TrainProgress]) -> None:
        listing = self.query_one("#checkpoints", OptionList)
        for event in events:
            self.step, self.total = event.step, event.total_steps or self.total
            if event.loss is not None:
                self.losses.append((event.step, event.loss))
            if event.event == "log" or event.loss is not None:
                self.latest = event
            if event.eval_metrics:
                self.eval_metrics = event.eval_metrics
            if event.event == "start" and event.micro_batch_size:
                self.micro_batch = (event.micro_batch_size, bool(event.recompute_mlp))
            if event.checkpoint:
                path = self._resolve(event.checkpoint)
                if path not in self.checkpoints:
                    self.checkpoints.append(path)
                    listing.add_option(Option(Content.assemble(path.name, (f"  {path.parent}", "$text-muted")), id=str(path)))
                    listing.highlighted = len(self.checkpoints) - 1
                    self.query_one("#chat-with", Button).disabled = False
            if event.event in ("done", "stopped"):
                self.finished = event.event
        self._draw()

    def finish(self, how: str) -> None:
        self.finished = how
        self._draw()

    def selected_checkpoint(self) -> Optional[Path]:
        listing = self.query_one("#checkpoints", OptionList)
        if listing.highlighted is None:
            return None
        return Path(listing.get_option_at_index(listing.highlighted).id)

    def _resolve(self, checkpoint: str) -> Path:
        path = Path(checkpoint)
        if not path.is_absolute() and not path.exists() and self.output_dir is not None:
            return self.output_dir / path
        return path

    def _draw(self) -> None:
        bar = self.query_one("#train-progress", ProgressBar)
        if self.total:
            bar.update(total=self.total, progress=self.step)
        latest = self.latest
        eta = None
        if self.finished is None and latest is not None:
            eta = latest.eta_s
            if eta is None and latest.step and latest.elapsed_s:
                eta = latest.elapsed_s / latest.step * (self.total - latest.step)
        steps: list = [(f"step {self.step}/{self.total or '?'}", "bold")]
        if self.finished == "done":
            steps.append(("  ✓ done", "$text-success"))
        elif self.finished == "stopped":
            steps.append(("  ■ stopped", "$text-warning"))
        elif self.finished:
            steps.append(("  ✗ failed", "$text-error"))
        elif latest is not None:
            steps += [("  ETA ", "$text-muted"), format_duration(eta)]
        self.query_one("#train-steps", Static).update(Content.assemble(*steps))
        self.query_one("#train-stats", Static).update(self._stats())
        failed = self.finished not in (None, "done", "stopped")
        error = self.query_one("#train-error", Static)
        error.update(Content.styled(self.finished, "$text-error") if failed else "")
        error.display = failed  # takes no line unless there is something to say
        self._draw_plot()

    def _stats(self) -> Content:
        latest = self.latest
        if latest is None:
            return Content("")
        parts: list = []

        def add(label: str, value: Optional[str]) -> None:
            if value is not None:
                parts.extend([(label, "$text-muted"), (value, "bold"), "   "])

        add("loss ", f"{latest.loss:.4f}" if latest.loss is not None else None)
        add("lr ", f"{latest.learning_rate:.2e}" if latest.learning_rate is not None else None)
        add("epoch ", f"{latest.epoch:.2f}" if latest.epoch is not None else None)
        add("samples/s ", f"{latest.samples_per_s:.1f}" if latest.samples_per_s is not None else None)
        add("tokens/s ", f"{latest.tokens_per_s:.0f}" if latest.tokens_per_s is not None else None)
        add("GPU ", f"{latest.gpu_mem_gb:.1f} GB" if latest.gpu_mem_gb is not None else None)
        if self.micro_batch:  # (no-break spaces: a narrow panel wraps between the figures, not inside one)
            n, recomputed = self.micro_batch
            add("micro-batch ", f"{n}{', MLP recomputed' if recomputed else ''}".replace(" ", "\u00a0"))
        add("elapsed ", format_duration(latest.elapsed_s))
        if self.eval_metrics:
            metrics = " · ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                 for k, v in self.eval_metrics.items())
            parts += ["\n", ("eval ", "$text-muted"), (metrics, "bold")]
        return Content.assemble(*parts)

    def _draw_plot(self) -> None:
        plot = self.query_one("#loss-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss")
        if self.losses:
            steps, losses = zip(*self.losses)
            plt.plot(list(steps), list(losses), marker="braille")
        plot.refresh()
