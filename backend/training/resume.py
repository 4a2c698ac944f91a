"""Continue a run from a checkpoint: weights, optimizer, schedule, random generators and counters."""

from __future__ import annotations

import warnings
from pathlib import Path

from .requests import RequestError
from .checkpoints import (OPTIMIZER_NAME, RNG_NAME, SCHEDULER_NAME, STATE_NAME, WEIGHTS_NAME, load_torch, read_json,
                          set_rng_state, strip_prefix_key)
from .dist import Dist
from .optim import continue_schedule
from .state import TrainState


def restore(path: Path, trainer, state: TrainState, dist: Dist) -> None:
    from ..loading import load_pickled_state_dict

    saved = read_json(path / STATE_NAME)
    encoder_state = strip_prefix_key(load_pickled_state_dict(path / WEIGHTS_NAME))
    try:
        trainer.encoder.load_state_dict({k: v.float() for k, v in encoder_state.items()})
    except RuntimeError as err:
        raise RequestError(f"{path} does not fit this run's prefix encoder ({str(err).splitlines()[-1].strip()}); check `pre_seq_len` and `prefix_projection`.") from None
    try:
        trainer.optimizer.load_state_dict(load_torch(path / OPTIMIZER_NAME, trainer.device))
    except (ValueError, KeyError) as err:
        raise RequestError(f"{path}/{OPTIMIZER_NAME} does not match this run's optimizer ({err}); resume with the `optim` it was trained with.") from None
    if (path / SCHEDULER_NAME).is_file():
        trainer.scheduler.load_state_dict(load_torch(path / SCHEDULER_NAME, "cpu"))
    if (path / RNG_NAME).is_file():
        rng = load_torch(path / RNG_NAME, "cpu")
        if isinstance(rng, list):
            rng = rng[dist.rank] if dist.rank < len(rng) else rng[0]
        set_rng_state(rng)
    state.restore(saved, path)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        continue_schedule(trainer.scheduler, state.global_step)
