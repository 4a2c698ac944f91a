"""What a run knows about itself between steps: saved in ``trainer_state.json``, restored on resume."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..service import TrainRequest


@dataclass
class TrainState:
    total_steps: int
    per_epoch: int  # groups of per_device_train_batch_size per epoch
    accumulation: int
    global_step: int = 0
    log_history: list = field(default_factory=list)
    prior_elapsed: float = 0.0  # seconds spent by the runs this one resumes
    started: float = field(default_factory=time.perf_counter)
    session_steps: int = 0
    session_samples: int = 0
    session_tokens: int = 0
    window_loss: float = 0.0  # loss summed since the last log event
    window_steps: int = 0
    last_saved: Optional[int] = None
    last_checkpoint: Optional[Path] = None
    checkpoints: list = field(default_factory=list)  # saved by this run

    @property
    def epoch(self) -> float:
        return self.global_step * self.accumulation / self.per_epoch

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish_step(self, loss: float, samples: int, tokens: int) -> None:
        self.global_step += 1
        self.session_steps += 1
        self.session_samples += samples
        self.session_tokens += tokens
        self.window_loss += loss
        self.window_steps += 1

    def take_window_loss(self) -> float:
        """The mean loss since the previous log, as the original trainer logs it."""
        loss = self.window_loss / max(1, self.window_steps)
        self.window_loss, self.window_steps = 0.0, 0
        return loss

    def restore(self, saved: dict, checkpoint: Path) -> None:
        self.global_step = int(saved.get("global_step", 0))
        self.log_history = list(saved.get("log_history", []))
        self.prior_elapsed = float(saved.get("elapsed_s", 0.0))
        self.last_saved, self.last_checkpoint = self.global_step, checkpoint

    def to_json(self, request: TrainRequest, num_examples: int, world: int, micro_batch_size: int,
                recompute_mlp: bool) -> dict:
        """``trainer_state.json``, with the original trainer's key names where it has them."""
        return {
            "global_step": self.global_step, "max_steps": self.total_steps, "epoch": self.epoch,
            "num_examples": num_examples, "train_batch_size": request.per_device_train_batch_size,
            "gradient_accumulation_steps": self.accumulation, "micro_batch_size": micro_batch_size,
            "recompute_mlp": recompute_mlp, "world_size": world, "seed": request.seed, "elapsed_s": self.prior_elapsed + self.elapsed,
            "log_history": self.log_history, "is_world_process_zero": True,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()},
        }
