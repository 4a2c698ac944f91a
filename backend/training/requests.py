"""Refuse a TrainRequest that cannot run, before any work, with one sentence.

The sentences name :class:`~backend.service.TrainRequest` fields in backticks (`` `pre_seq_len` ``); each
front end words them for its users with :meth:`RequestError.worded` (the CLI as ``--pre-seq-len``, the
app as its form's labels).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Callable, Optional

from ..service import BackendError, TrainRequest
from .checkpoints import (CONFIG_NAME, OPTIMIZER_NAME, RESUME_FILES, STATE_NAME, CheckpointStore, is_resumable,
                          read_json)

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw_hf", "adamw_torch")
TRACKERS = ("none", "tensorboard", "wandb")
_FIELD = re.compile(r"(?:(pass) )?`([a-z_][a-z0-9_]*)`")  # "pass `resume`": the verb goes with the front end


class RequestError(BackendError):
    """A request field the user must change; ``str()`` names fields as `field`."""

    def worded(self, name: Callable[[str], str], verb: str = "pass") -> str:
        """The message with each `field` replaced by ``name(field)``, and the "pass" before one by ``verb``
        (the command line passes a flag, the app's form sets a field)."""
        return _FIELD.sub(lambda m: (f"{verb} " if m.group(1) else "") + name(m.group(2)), str(self))


def train_files(request: TrainRequest) -> list:
    files = request.train_file
    if files is None or isinstance(files, (str, Path)):
        return [] if files in (None, "") else [files]
    return list(files)


def _path(value) -> Optional[Path]:
    return None if value in (None, "") else Path(value).expanduser()


def resolve_resume(request: TrainRequest) -> Optional[Path]:
    """The checkpoint ``request.resume`` names ("latest" or a path), None for a fresh run."""
    resume = request.resume
    if resume in (None, "", False):
        return None
    output_dir = Path(request.output_dir).expanduser()
    if resume in ("latest", True):
        found = CheckpointStore(output_dir).latest_resumable()
        if found is None:
            log.info("no checkpoint in %s yet: starting a new run", output_dir)
        return found
    path = Path(resume).expanduser()
    if not path.exists() and (output_dir / str(resume)).exists():
        path = output_dir / str(resume)
    if not path.is_dir():
        raise RequestError(f"`resume` {resume}: no checkpoint directory there; pass a checkpoint-N directory, or 'latest'.")
    if not is_resumable(path):
        missing = [n for n in RESUME_FILES if not (path / n).is_file()]
        raise RequestError(f"{path} cannot be resumed: it lacks {', '.join(missing)} (only complete training checkpoints can); start a new run instead.")
    return path


def _check_numbers(r: TrainRequest, world: int) -> None:
    if r.pre_seq_len is None or r.pre_seq_len < 1:
        raise RequestError(f"`pre_seq_len` must be at least 1 (got {r.pre_seq_len}): P-Tuning v2 trains that many prefix tokens; the original uses 128.")
    for name in ("max_source_length", "max_target_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        value = getattr(r, name)
        if value is None or value < 1:
            raise RequestError(f"`{name}` must be at least 1 (got {value}).")
    if r.micro_batch_size is not None and r.micro_batch_size < 1:
        raise RequestError(f"`micro_batch_size` must be at least 1 or auto (got {r.micro_batch_size}).")
    if not (r.learning_rate and r.learning_rate > 0 and math.isfinite(r.learning_rate)):
        raise RequestError(f"`learning_rate` must be a positive number (got {r.learning_rate}); the original uses 2e-2.")
    if r.save_steps is None or r.save_steps < 0:
        raise RequestError(f"`save_steps` must be 0 (only at the end) or more (got {r.save_steps}).")
    if not (r.max_steps and r.max_steps > 0) and not (r.num_train_epochs and r.num_train_epochs > 0):
        raise RequestError("give `max_steps` or `num_train_epochs` a positive value: there is nothing to train otherwise.")
    if r.gradient_accumulation_steps % world:
        raise RequestError(
            f"`gradient_accumulation_steps` {r.gradient_accumulation_steps} is the global count and must divide by the "
            f"{world} processes (each does {r.gradient_accumulation_steps}/{world}); pick a multiple of {world}."
        )
    if r.eval_steps is not None and r.eval_steps < 1:
        raise RequestError(f"`eval_steps` must be at least 1 (got {r.eval_steps}).")
    if r.warmup_steps is None or r.warmup_steps < 0 or not (0.0 <= (r.warmup_ratio or 0.0) < 1.0):
        raise RequestError(f"`warmup_steps` must be 0 or more and `warmup_ratio` in [0, 1) (got {r.warmup_steps} and {r.warmup_ratio}).")
    if r.optim not in OPTIMIZERS:
        raise RequestError(f"`optim` {r.optim!r} is not one of {', '.join(OPTIMIZERS)}.")
    if r.report_to not in TRACKERS:
        raise RequestError(f"`report_to` {r.report_to!r} is not one of {', '.join(TRACKERS)}.")
    _check_scheduler(r.lr_scheduler_type)


def _check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    known = [s.value for s in SchedulerType]
    if name not in known:
        raise RequestError(f"`lr_scheduler_type` {name!r} is not a schedule transformers knows; pick one of {', '.join(known)}.")


def _check_files(r: TrainRequest) -> None:
    from ..data import DataError
    from ..datasource import check_source

    def check(source, field: str) -> None:
        try:
            check_source(source, field)
        except DataError as err:
            raise RequestError(str(err)) from None

    files = train_files(r)
    if not files:
        raise RequestError("no `train_file` given: pass a JSON lines, JSON, CSV or Parquet file, a directory of them, or a cached dataset id.")
    if r.mix is not None:
        if len(r.mix) != len(files):
            raise RequestError(f"`mix` gives {len(r.mix)} weights for {len(files)} `train_file`s; give one weight per file.")
        bad = [w for w in r.mix if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
        if bad:
            raise RequestError(f"`mix` weights must be positive numbers (got {bad[0]}); e.g. 0.7 for the task data, 0.3 for general chat.")
    for file in files:
        check(file, "`train_file`")
    if r.validation_file:
        check(r.validation_file, "`validation_file`")
    if r.eval_steps and not r.validation_file:
        raise RequestError("evaluation during training needs `validation_file`.")


def check_request(request: TrainRequest, world: int = 1) -> None:
    """Refuse a request that cannot run, with one sentence naming the field to change. Reads no data."""
    r = request
    _check_numbers(r, world)
    _check_files(r)
    output_dir = _path(r.output_dir)
    if output_dir is None:
        raise RequestError("no `output_dir` given: pass the directory to write checkpoints to.")
    if output_dir.exists() and not output_dir.is_dir():
        raise RequestError(f"`output_dir` {output_dir} is a file; pass a directory.")
    resume = resolve_resume(r)
    existing = CheckpointStore(output_dir).checkpoints()
    if resume is None and existing and not r.overwrite_output_dir:
        names = ", ".join(p.name for p in existing[-3:])
        if r.resume:
            raise RequestError(
                f"{output_dir} holds checkpoints ({names}) but none can be resumed (they lack {OPTIMIZER_NAME} or "
                f"{STATE_NAME}); pass `overwrite_output_dir` to start over there, or choose another `output_dir`."
            )
        raise RequestError(
            f"{output_dir} already holds checkpoints of another run ({names}); pass `resume` to continue it, "
            "`overwrite_output_dir` to start over there, or choose another `output_dir`."
        )
    if resume is not None:
        _check_fits(resume, r, "resume it, or start a new run")
    elif r.init_checkpoint is not None:
        _check_init_fits(r)


def _check_init_fits(request: TrainRequest) -> None:
    """`init_checkpoint` must be a prefix of the requested length and kind (its weights are read later)."""
    from ..adapters import read_prefix_checkpoint

    ckpt = read_prefix_checkpoint(request.init_checkpoint)
    for key, have in (("pre_seq_len", ckpt.pre_seq_len), ("prefix_projection", ckpt.prefix_projection)):
        if have != getattr(request, key):
            raise RequestError(
                f"`init_checkpoint` {ckpt.path} has {key} {have}, this run asks for {getattr(request, key)}; "
                f"pass `{key}` {have} to start from it."
            )


def _check_fits(checkpoint: Path, request: TrainRequest, fix: str) -> None:
    config = read_json(checkpoint / CONFIG_NAME) if (checkpoint / CONFIG_NAME).is_file() else {}
    for key in ("pre_seq_len", "prefix_projection"):
        if key in config and config[key] != getattr(request, key):
            raise RequestError(
                f"{checkpoint} was trained with {key} {config[key]}, this run asks for {getattr(request, key)}; "
                f"pass `{key}` {config[key]} to {fix}."
            )
