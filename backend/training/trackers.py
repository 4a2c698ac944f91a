"""``report_to``: the same progress events, also sent to TensorBoard or Weights & Biases through their own
libraries (progress.jsonl stays the app's source either way)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..service import TrainProgress
from .requests import RequestError

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def check_tracker(name: str) -> None:
    """Refuse a tracker whose library is not installed, before any work."""
    if name in (None, "", "none"):
        return
    import importlib.util

    module = "torch.utils.tensorboard" if name == "tensorboard" else name
    missing = importlib.util.find_spec("tensorboard" if name == "tensorboard" else module) is None
    if missing:
        raise RequestError(f"`report_to` {name} needs the {name} package: {INSTALL[name]} (or report to none).")


def open_tracker(name: str, output_dir: Path, config: dict) -> Optional[Callable[[TrainProgress], None]]:
    """A progress callback logging loss, learning rate and evaluation metrics; None for "none"."""
    if name in (None, "", "none"):
        return None
    check_tracker(name)
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(output_dir / "runs"))

        def log(values: dict, step: int) -> None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()
    else:
        import wandb

        run = wandb.init(config=config, dir=str(output_dir))

        def log(values: dict, step: int) -> None:
            run.log(values, step=step)

    def on_event(event: TrainProgress) -> None:
        values = {}
        if event.event == "log" and event.loss is not None:
            values = {"train/loss": event.loss, "train/learning_rate": event.learning_rate, "train/epoch": event.epoch}
        elif event.event == "eval" and event.eval_metrics:
            values = {f"eval/{k}": v for k, v in event.eval_metrics.items() if isinstance(v, (int, float))}
        if values:
            log({k: v for k, v in values.items() if v is not None}, event.step)

    return on_event
