"""The checkpoint layout and store: the one place that knows how a P-Tuning v2 checkpoint is laid out.

``output_dir/checkpoint-{step}/`` as the original trainer writes it: ``pytorch_model.bin`` holding only
``transformer.prefix_encoder.*`` and ``config.json`` (the base config with ``pre_seq_len`` /
``prefix_projection``), and for resuming ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and
``trainer_state.json`` (written last: its presence marks a complete checkpoint). Each save is built in a
hidden temporary directory and renamed into place (:mod:`backend.atomic`). :mod:`backend.adapters`
reads the same names from here.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from ..atomic import fsync_path, publish_directory, recover_swaps
from ..configuration import ChatGLMConfig
from ..service import BackendError

log = logging.getLogger(__name__)

PREFIX_KEY = "transformer.prefix_encoder."
WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pth"
STATE_NAME = "trainer_state.json"
EVAL_DIR = "eval"  # OUTPUT_DIR/eval/step-N: each evaluation during training, kept
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RESUME_FILES = (WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME)


def checkpoint_step(path: Path) -> Optional[int]:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: Union[str, Path]) -> list[Path]:
    """``checkpoint-{step}`` directories in ``output_dir``, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_resumable(path: Path) -> bool:
    return all((path / name).is_file() for name in RESUME_FILES)


def prefix_config(base: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool) -> ChatGLMConfig:
    """The checkpoint's config.json: the base's config with the prefix's length and kind."""
    return ChatGLMConfig(**{**base.to_dict(), "pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection})


def prefix_state_dict(encoder) -> dict:
    """The encoder's tensors under the original trainer's key names."""
    return {PREFIX_KEY + k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}


def strip_prefix_key(state: dict) -> dict:
    """``transformer.prefix_encoder.X`` -> ``X``, other keys dropped."""
    return {k[len(PREFIX_KEY):]: v for k, v in state.items() if k.startswith(PREFIX_KEY)}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackendError(f"{path} is unreadable ({err}); the checkpoint is damaged.") from None
    if not isinstance(data, dict):
        raise BackendError(f"{path} holds a JSON {type(data).__name__}, not an object; the checkpoint is damaged.")
    return data


def load_torch(path: Path, device) -> object:
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
        raise BackendError(f"{path} is unreadable ({str(err).splitlines()[0][:120]}); the checkpoint is damaged, resume from an earlier one.") from None


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as the RuntimeError torch.save's zip writer raises for it."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("no space left" in text or "file write failed" in text
                                              or "failed writing" in text or "disk quota" in text)


def disk_full_message(directory: Path, needed_bytes: int, what: str, kept: Optional[Path] = None) -> str:
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    intact = f"; {kept.name} is intact" if kept is not None else ""
    return (f"the disk holding {directory} is full ({free / 1e6:.0f} MB free) while {what}; free at least "
            f"{needed_bytes / 1e6:.0f} MB there (or choose another --output-dir) and run again with --resume{intact}.")


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    try:
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another version's layout: not fatal
        log.warning("could not restore the random number generators (%s); continuing", err)


# ---------------------------------------------------------------------------------------------- store


class CheckpointStore:
    """Save, find, restore and clean the checkpoints of one output directory."""

    def __init__(self, output_dir: Union[str, Path]):
        self.output_dir = Path(output_dir).expanduser()

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.output_dir)

    def latest_resumable(self) -> Optional[Path]:
        found = [p for p in self.checkpoints() if is_resumable(p)]
        return found[-1] if found else None

    def recover(self) -> None:
        """Put back a checkpoint caught between the two renames of a re-save and drop half-written saves.
        Call before looking for the latest checkpoint, so the one named is the one resumed."""
        if not self.output_dir.is_dir():
            return
        recover_swaps(self.output_dir, CHECKPOINT_PREFIX)
        for p in self.output_dir.iterdir():
            if p.name.startswith(f".tmp-{CHECKPOINT_PREFIX}") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, encoder, config: ChatGLMConfig, optimizer=None, scheduler=None,
             trainer_state: Optional[dict] = None, rng_states=None) -> Path:
        """Write ``checkpoint-{step}`` atomically; a crash or a full disk mid-save leaves the earlier ones as
        they were (the partial directory is removed). Raises OSError/RuntimeError as torch.save does."""
        import torch

        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{CHECKPOINT_PREFIX}{step}-", dir=self.output_dir))
        try:
            def save_torch(obj, name: str) -> None:
                torch.save(obj, tmp / name)
                fsync_path(tmp / name)

            save_torch(prefix_state_dict(encoder), WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(config.to_json_string(use_diff=False), encoding="utf-8")
            if optimizer is not None:
                save_torch(optimizer.state_dict(), OPTIMIZER_NAME)
            if scheduler is not None:
                save_torch(scheduler.state_dict(), SCHEDULER_NAME)
            if rng_states is not None:
                save_torch(rng_states, RNG_NAME)
            if trainer_state is not None:  # last: its presence marks a complete checkpoint
                write_json(tmp / STATE_NAME, trainer_state)
            publish_directory(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @staticmethod
    def size_estimate(encoder) -> int:
        """Bytes a checkpoint of ``encoder`` takes: weights + AdamW's two moments, float32, plus slack."""
        return sum(p.numel() for p in encoder.parameters()) * 4 * 3 + (1 << 20)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    fsync_path(path)
