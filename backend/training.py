"""P-Tuning v2 training of a ChatGLM2 prefix over a frozen, shared base model: the original recipe.

What ``ptuning/main.py`` + the transformers Trainer of its time do, step for step:

* data: :mod:`backend.data` (the original preprocessing, label masking and truncation);
* only a float32 ``PrefixEncoder`` trains (dropout 0.1 on its output, after the cast to the base's dtype);
  the base stays frozen in 8/4-bit or 16-bit and is never modified: the encoder is owned here and its
  output reaches the model as ``prefix_kv=``;
* AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), linear decay to 0 without warmup, gradients
  clipped to norm 1.0, ``gradient_accumulation_steps`` micro-batches per optimizer step; the logged loss
  is the mean micro-batch loss since the previous log, the logged lr the one the next step will use;
* checkpoints as the original trainer writes them: ``output_dir/checkpoint-{step}/pytorch_model.bin``
  holding only ``transformer.prefix_encoder.*`` plus ``config.json`` (the base config with
  ``pre_seq_len``/``prefix_projection``), and beside them ``optimizer.pt``, ``scheduler.pt``,
  ``rng_state.pth`` and ``trainer_state.json`` so a resumed run continues the same loss curve.
  Each checkpoint is written to a hidden temporary directory and renamed into place.

Differences that change no result: the shuffling order and each micro-batch's dropout mask are keyed
by (seed, epoch) and (seed, micro-batch index), so a resumed or data-parallel run sees exactly the
examples and masks a straight single-process run sees; trailing columns that are padding in every row
of a micro-batch are cut (causal attention: they change nothing before them, and their labels are
ignored). AdamW is torch's; the transformers AdamW of the original's time applied the bias correction
to the step size rather than to the second moment, which moves eps by a factor under 1 (a difference of
order 1e-8 in the update).

Data parallel: under ``torchrun`` (torch.distributed initialized) each rank takes its share of every
optimizer step's micro-batches; ``gradient_accumulation_steps`` is the global count and is divided by
the world size, so per-device batch x accumulation x world = the global batch of the single-GPU run.
Gradients are averaged with one all-reduce per step; only rank 0 writes checkpoints and progress.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch

from .configuration import ChatGLMConfig
from .cuda_streams import warmup_stream
from .data import DataError, Example, collate_train, preprocess_train, read_examples
from .int8_training import use_weight_only_int8
from .modeling import PrefixEncoder, split_prefix
from .progress import ProgressLog, fan_out
from .service import BackendError, SamplingParams, TrainProgress, TrainRequest, TrainResult

log = logging.getLogger(__name__)

PREFIX_KEY = "transformer.prefix_encoder."
WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pth"
STATE_NAME = "trainer_state.json"
EVAL_DIR = "eval"  # OUTPUT_DIR/eval/step-N: each evaluation during training, kept
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# The transformers Trainer defaults the original scripts ran with.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
PREFIX_DROPOUT = 0.1

OOM_HINT = (
    "try --quantization 4bit, smaller --max-source-length/--max-target-length or --pre-seq-len, "
    "--per-device-train-batch-size 1 with more --gradient-accumulation-steps, or --gradient-checkpointing"
)


# ================================================================================ distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Dist":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=device)).item() > 0)

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ================================================================================ request checks


def _path(value) -> Optional[Path]:
    return None if value in (None, "") else Path(value).expanduser()


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
    return all((path / name).is_file() for name in (WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME))


def resolve_resume(request: TrainRequest) -> Optional[Path]:
    """The checkpoint ``request.resume`` names ("latest" or a path), None for a fresh run."""
    resume = request.resume
    if resume in (None, "", False):
        return None
    output_dir = Path(request.output_dir).expanduser()
    if resume in ("latest", True):
        found = [p for p in list_checkpoints(output_dir) if is_resumable(p)]
        if not found:
            log.info("no checkpoint in %s yet: starting a new run", output_dir)
            return None
        return found[-1]
    path = Path(resume).expanduser()
    if not path.exists() and (output_dir / str(resume)).exists():
        path = output_dir / str(resume)
    if not path.is_dir():
        raise BackendError(f"--resume {resume}: no checkpoint directory there; pass a checkpoint-N directory or --resume alone for the latest.")
    if not is_resumable(path):
        missing = [n for n in (WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME) if not (path / n).is_file()]
        raise BackendError(f"{path} cannot be resumed: it lacks {', '.join(missing)} (only complete training checkpoints can); start a new run instead.")
    return path


def check_request(request: TrainRequest, world: int = 1) -> None:
    """Refuse a request that cannot run, with one sentence naming the flag to change. Reads no data."""
    r = request
    if r.pre_seq_len is None or r.pre_seq_len < 1:
        raise BackendError(f"--pre-seq-len must be at least 1 (got {r.pre_seq_len}): P-Tuning v2 trains that many prefix tokens; the original uses 128.")
    for flag, value in (("--max-source-length", r.max_source_length), ("--max-target-length", r.max_target_length),
                        ("--per-device-train-batch-size", r.per_device_train_batch_size),
                        ("--gradient-accumulation-steps", r.gradient_accumulation_steps), ("--logging-steps", r.logging_steps)):
        if value is None or value < 1:
            raise BackendError(f"{flag} must be at least 1 (got {value}).")
    if not (r.learning_rate and r.learning_rate > 0 and math.isfinite(r.learning_rate)):
        raise BackendError(f"--learning-rate must be a positive number (got {r.learning_rate}); the original uses 2e-2.")
    if r.save_steps is None or r.save_steps < 0:
        raise BackendError(f"--save-steps must be 0 (only at the end) or more (got {r.save_steps}).")
    if not (r.max_steps and r.max_steps > 0) and not (r.num_train_epochs and r.num_train_epochs > 0):
        raise BackendError("give --max-steps or --num-train-epochs a positive value: there is nothing to train otherwise.")
    if r.gradient_accumulation_steps % world:
        raise BackendError(
            f"--gradient-accumulation-steps {r.gradient_accumulation_steps} is the global count and must divide by the "
            f"{world} processes (each does {r.gradient_accumulation_steps}/{world}); pick a multiple of {world}."
        )
    if r.eval_steps is not None and r.eval_steps < 1:
        raise BackendError(f"--eval-steps must be at least 1 (got {r.eval_steps}).")
    if r.eval_steps and not r.validation_file:
        raise BackendError("evaluation during training needs --validation-file.")
    for flag, file in (("--train-file", r.train_file), ("--validation-file", r.validation_file)):
        path = _path(file)
        if path is None:
            if flag == "--train-file":
                raise BackendError("no --train-file given: pass a JSON lines file with the prompt and response columns.")
            continue
        if not path.exists():
            raise BackendError(f"{flag} {path}: no such file; check the path.")
        if path.is_dir():
            raise BackendError(f"{flag} {path} is a directory; pass a JSON lines file.")
    output_dir = _path(r.output_dir)
    if output_dir is None:
        raise BackendError("no --output-dir given: pass the directory to write checkpoints to.")
    if output_dir.exists() and not output_dir.is_dir():
        raise BackendError(f"--output-dir {output_dir} is a file; pass a directory.")
    resume = resolve_resume(r)
    existing = list_checkpoints(output_dir)
    if resume is None and existing and not r.overwrite_output_dir:
        names = ", ".join(p.name for p in existing[-3:])
        if r.resume:
            raise BackendError(
                f"{output_dir} holds checkpoints ({names}) but none can be resumed (they lack {OPTIMIZER_NAME} or "
                f"{STATE_NAME}); pass --overwrite-output-dir to start over there, or choose another --output-dir."
            )
        raise BackendError(
            f"{output_dir} already holds checkpoints of another run ({names}); pass --resume to continue it, "
            "--overwrite-output-dir to start over there, or choose another --output-dir."
        )
    if resume is not None:
        _check_resume_fits(resume, r)
    elif r.init_checkpoint is not None:
        _check_init_fits(r)


def _check_init_fits(request: TrainRequest) -> None:
    """--ptuning-checkpoint must be a prefix of the requested length and kind (its weights are read later)."""
    from .adapters import read_prefix_checkpoint

    ckpt = read_prefix_checkpoint(request.init_checkpoint)
    for key, flag, have in (("pre_seq_len", "--pre-seq-len", ckpt.pre_seq_len),
                            ("prefix_projection", "--prefix-projection", ckpt.prefix_projection)):
        if have != getattr(request, key):
            raise BackendError(
                f"--ptuning-checkpoint {ckpt.path} has {key} {have}, this run asks for {getattr(request, key)}; "
                f"pass {flag} {have} to start from it."
            )


def _check_resume_fits(checkpoint: Path, request: TrainRequest) -> None:
    config = _read_json(checkpoint / CONFIG_NAME) if (checkpoint / CONFIG_NAME).is_file() else {}
    for key, flag in (("pre_seq_len", "--pre-seq-len"), ("prefix_projection", "--prefix-projection")):
        if key in config and config[key] != getattr(request, key):
            raise BackendError(
                f"{checkpoint} was trained with {key} {config[key]}, this run asks for {getattr(request, key)}; "
                f"pass {flag} {config[key]} to resume it, or start a new run."
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackendError(f"{path} is unreadable ({err}); the checkpoint is damaged.") from None


# ================================================================================ data


@dataclass
class TrainingData:
    train: list[Example]
    validation: Optional[list[Example]] = None
    skipped: list[str] = field(default_factory=list)  # messages for bad lines skipped (--skip-bad-lines)


def read_training_data(
    request: TrainRequest, max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None
) -> TrainingData:
    """Read the training (and validation) files; needs no tokenizer, so a CLI can check data before loading."""
    train = read_examples(request.train_file, request.prompt_column, request.response_column,
                          request.history_column, request.skip_bad_lines)
    skipped = list(train.skipped)
    train = list(train)[:max_train_samples] if max_train_samples else list(train)
    validation = None
    if request.validation_file:
        val = read_examples(request.validation_file, request.prompt_column, request.response_column,
                            request.history_column, request.skip_bad_lines)
        skipped += list(val.skipped)
        validation = list(val)[:max_eval_samples] if max_eval_samples else list(val)
    return TrainingData(train, validation, skipped)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch, the same on every rank and after a resume."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class Batches:
    """Micro-batch ``m`` (0-based, counted over the whole run) = the next slice of the epoch's shuffled order."""

    def __init__(self, features: list[dict], batch_size: int, seed: int, trim: bool = True):
        self.features, self.batch_size, self.seed, self.trim = features, batch_size, seed, trim
        self.per_epoch = math.ceil(len(features) / batch_size)
        self._orders: dict[int, list[int]] = {}

    def indices(self, m: int) -> list[int]:
        epoch, k = divmod(m, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.features), self.seed, epoch)}
        return self._orders[epoch][k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, m: int) -> dict:
        batch = collate_train([self.features[i] for i in self.indices(m)])
        if not self.trim:  # one shape for every batch, as CUDA graphs want
            return batch
        # Cut columns that are padding in every row (after the last label): causal attention makes them inert.
        keep = int((batch["labels"] != -100).any(0).nonzero().max()) + 1
        return {k: v[:, :keep] for k, v in batch.items()}


# ================================================================================ the training step


def _compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def prefix_config(base: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool) -> ChatGLMConfig:
    return ChatGLMConfig(**{**base.to_dict(), "pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection})


def new_prefix_encoder(base: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool, device, seed: int) -> PrefixEncoder:
    """A float32 encoder initialized as the original leaves it (torch's default init: embedding N(0, 1),
    linears Kaiming-uniform), drawn from its own generator: the global RNG, which a chat running on
    another thread may be sampling from, is not touched."""
    with torch.device("meta"):
        encoder = PrefixEncoder(prefix_config(base, pre_seq_len, prefix_projection))
    encoder = encoder.to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=g)
                bound = 1 / math.sqrt(module.in_features)
                module.bias.uniform_(-bound, bound, generator=g)
    return encoder.to(device)


def linear_schedule(total_steps: int) -> Callable[[int], float]:
    """transformers' get_linear_schedule_with_warmup with 0 warmup steps."""

    def factor(step: int) -> float:
        return max(0.0, float(total_steps - step) / float(max(1, total_steps)))

    return factor


def _dropout_seed(seed: int, micro_batch: int) -> int:
    return (seed * 6_364_136_223_846_793_005 + micro_batch * 1_442_695_040_888_963_407 + 1) % (2**63)


class PrefixStep:
    """One owned prefix encoder, its optimizer and schedule, over a frozen base it never modifies."""

    def __init__(self, model, encoder: PrefixEncoder, learning_rate: float, total_steps: int,
                 dropout: float = PREFIX_DROPOUT, seed: int = 0, dist: Dist = Dist(), weight_only_int8: bool = True,
                 cuda_graphs: bool = True, capture_lock=None, recompute_mlp: bool = True):
        if weight_only_int8 and _device(model).type == "cuda":
            use_weight_only_int8(model)  # several times faster than bitsandbytes' LLM.int8 here (BENCHMARKS.md)
        self.model, self.encoder, self.dist = model, encoder, dist
        self.config = model.config
        self.device, self.dtype = _device(model), _compute_dtype(model)
        self.dropout, self.seed = dropout, seed
        # Recompute each MLP's up-projection in the backward: 0.42 GB less at 6B x 192 tokens, +6 ms (BENCHMARKS.md).
        self.recompute_mlp = recompute_mlp
        self.params = [p for p in encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS,
                                           weight_decay=WEIGHT_DECAY, foreach=self.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(total_steps))
        self._tokens = torch.arange(encoder.pre_seq_len, device=self.device)
        # The base's forward and backward as CUDA graphs, one pair per batch shape: at batch 1 a step is
        # thousands of small kernels, and launching them from Python costs more than running them.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphed: dict = {}
        self._capture_lock = capture_lock if capture_lock is not None else contextlib.nullcontext()

    def prefix_flat(self, batch_size: int, micro_batch: Optional[int]) -> torch.Tensor:
        """``dropout(encoder(tokens).to(dtype))`` [b, P, kv_size]; the mask is keyed by the micro-batch index."""
        kv = self.encoder(self._tokens.expand(batch_size, -1)).to(self.dtype)  # [b, P, kv_size]
        if self.dropout and micro_batch is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(_dropout_seed(self.seed, micro_batch))
            keep = torch.rand(kv.shape, generator=g, device=self.device) >= self.dropout
            kv = kv * keep.to(kv.dtype) * (1.0 / (1.0 - self.dropout))
        return kv

    def prefix_kv(self, batch_size: int, micro_batch: Optional[int]) -> list[torch.Tensor]:
        return split_prefix(self.prefix_flat(batch_size, micro_batch), self.config)

    def _base_loss(self, kv: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.transformer.encoder
        restore, encoder.recompute_mlp = encoder.recompute_mlp, self.recompute_mlp
        try:
            return self.model(input_ids, labels=labels, prefix_kv=split_prefix(kv, self.config), use_cache=False).loss
        finally:
            encoder.recompute_mlp = restore

    def _capture(self, kv: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        """Warm up once with gradient checkpointing (a lower memory peak than a plain eager step), then
        capture the base's forward and backward; no other thread may launch work meanwhile."""
        encoder = self.model.transformer.encoder
        sample = kv.detach().requires_grad_()
        with self._capture_lock:
            checkpointing, encoder.gradient_checkpointing = encoder.gradient_checkpointing, True
            side = warmup_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):
                    torch.autograd.grad(self._base_loss(sample, input_ids, labels), sample)
            finally:
                encoder.gradient_checkpointing = checkpointing
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            return torch.cuda.make_graphed_callables(self._base_loss, (sample, input_ids, labels), num_warmup_iters=0)

    def loss(self, batch: dict, micro_batch: Optional[int]) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        kv = self.prefix_flat(input_ids.shape[0], micro_batch)
        if not (self.cuda_graphs and torch.is_grad_enabled()):
            return self._base_loss(kv, input_ids, labels)
        key = (tuple(input_ids.shape), self.model.transformer.encoder.gradient_checkpointing)
        if key not in self._graphed:
            try:
                self._graphed[key] = self._capture(kv, input_ids, labels)
            except RuntimeError as err:
                if _is_oom(err):
                    raise
                log.warning("CUDA graph capture failed (%s); training continues without graphs", str(err).splitlines()[0])
                self.cuda_graphs = False
                return self._base_loss(kv, input_ids, labels)
        return self._graphed[key](kv, input_ids, labels)

    def backward(self, batch: dict, micro_batch: int, scale: float) -> float:
        """Add d(loss * scale)/d(encoder) to the encoder's grads: autograd.grad touches no base parameter."""
        loss = self.loss(batch, micro_batch)
        grads = torch.autograd.grad(loss * scale, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)
        return float(loss.detach())

    def step(self) -> float:
        """Average grads over ranks, clip to MAX_GRAD_NORM, AdamW step, schedule step; returns the grad norm."""
        if self.dist.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.sum_(p.grad).div_(self.dist.world)
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]


# ================================================================================ checkpoints


def prefix_state_dict(encoder: PrefixEncoder) -> dict[str, torch.Tensor]:
    """The encoder's tensors under the original trainer's key names."""
    return {PREFIX_KEY + k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    try:
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another version's layout: not fatal
        log.warning("could not restore the random number generators (%s); continuing", err)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    _fsync(path)


def save_checkpoint(output_dir: Path, step: int, encoder: PrefixEncoder, config: ChatGLMConfig,
                    optimizer=None, scheduler=None, trainer_state: Optional[dict] = None,
                    rng_states: Optional[list] = None) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically: everything goes to a hidden temporary directory
    that is renamed into place, so a crash mid-save leaves the earlier checkpoints as they were."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=output_dir))
    try:
        _save_torch(prefix_state_dict(encoder), tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(config.to_json_string(use_diff=False), encoding="utf-8")
        _fsync(tmp / CONFIG_NAME)
        if optimizer is not None:
            _save_torch(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if scheduler is not None:
            _save_torch(scheduler.state_dict(), tmp / SCHEDULER_NAME)
        if rng_states is not None:
            _save_torch(rng_states, tmp / RNG_NAME)
        if trainer_state is not None:
            _write_json(tmp / STATE_NAME, trainer_state)  # last: its presence marks a complete checkpoint
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
        _fsync(tmp)
        if final.exists():  # the same step again (e.g. an overwritten run): swap, then drop the old one
            old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clean_incomplete_saves(output_dir: Path) -> None:
    """Remove what a killed save left behind; put back a checkpoint caught between its two renames."""
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        if p.name.startswith(".old-checkpoint-"):
            step = p.name[len(".old-checkpoint-"):].rsplit("-", 1)[0]
            final = output_dir / f"checkpoint-{step}"
            if not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
    for p in output_dir.iterdir():
        if p.name.startswith(".tmp-checkpoint-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _load_torch(path: Path, device) -> object:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
        raise BackendError(f"{path} is unreadable ({str(err).splitlines()[0][:120]}); the checkpoint is damaged, resume from an earlier one.") from None


# ================================================================================ training


def _memory_gb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def train_prefix(
    model,
    tokenizer,
    request: TrainRequest,
    progress: Optional[Callable[[TrainProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    *,
    data: Optional[TrainingData] = None,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    eval_batch_size: int = 8,
    eval_params: Optional[SamplingParams] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
    capture_lock=None,
) -> TrainResult:
    """Train a P-Tuning v2 prefix for ``model`` (already loaded, frozen, shared) as ``request`` says.

    ``progress`` gets every event (also appended to ``output_dir/progress.jsonl`` on rank 0); ``on_step(step,
    total)`` is called after every optimizer step on rank 0 (for a progress bar between log events). Setting
    ``cancel`` stops at the next micro-batch boundary: a checkpoint of the last finished step is saved
    and the result says ``stopped=True``. Problems a user can fix raise :class:`BackendError`; nothing
    already saved is removed by a failure. The base model's weights, mode and prefix are left as they
    were (only its gradient-checkpointing flag is set for the run, which matters only with grad enabled).
    """
    dist = Dist.current()
    check_request(request, dist.world)
    output_dir = Path(request.output_dir).expanduser()
    if dist.main:
        clean_incomplete_saves(output_dir)
    resume_from = resolve_resume(request)
    if data is None:
        data = read_training_data(request, max_train_samples, max_eval_samples)
    features = preprocess_train(data.train, tokenizer, request.max_source_length, request.max_target_length, request.source_prefix)
    if not features:
        raise DataError(f"{request.train_file}: no usable examples after preprocessing.")

    device = _device(model)
    batches = Batches(features, request.per_device_train_batch_size, request.seed, trim=device.type != "cuda")
    accumulation = request.gradient_accumulation_steps  # global micro-batches per optimizer step
    if request.max_steps and request.max_steps > 0:
        total_steps = request.max_steps
    else:
        total_steps = max(1, math.ceil(request.num_train_epochs * batches.per_epoch / accumulation))

    encoder = new_prefix_encoder(model.config, request.pre_seq_len, request.prefix_projection, device, request.seed)
    if request.init_checkpoint is not None and resume_from is None:  # a resumed run restores its own weights
        from .adapters import build_prefix_encoder, read_prefix_checkpoint

        start = build_prefix_encoder(read_prefix_checkpoint(request.init_checkpoint), model.config, device)
        encoder.load_state_dict(start.state_dict())
    trainer = PrefixStep(model, encoder, request.learning_rate, total_steps, seed=request.seed, dist=dist,
                         capture_lock=capture_lock, recompute_mlp=request.recompute_mlp)
    ckpt_config = prefix_config(model.config, request.pre_seq_len, request.prefix_projection)
    if request.source_prefix:  # chat puts it in front of each prompt, as the training data had it
        ckpt_config.source_prefix = request.source_prefix
    global_step, log_history, prior_elapsed = 0, [], 0.0
    if resume_from is not None:
        global_step, log_history, prior_elapsed = _restore(resume_from, trainer, dist)
    # --overwrite-output-dir: the old run's checkpoints and kept evaluations go once this run has saved its
    # first checkpoint (what this run wrote under the same names stays).
    stale: list[Path] = []
    if resume_from is None and request.overwrite_output_dir:
        stale = list_checkpoints(output_dir) + sorted((output_dir / EVAL_DIR).glob("step-*"))
    written: set[Path] = set()

    plog = ProgressLog(output_dir, resume_step=global_step if resume_from is not None else None) if dist.main else None
    emit = fan_out([plog, progress]) if dist.main else (lambda e: None)
    start = time.perf_counter()
    session = {"steps": 0, "samples": 0, "tokens": 0}
    window = {"loss": 0.0, "count": 0}
    checkpoints: list[Path] = []
    last_saved = global_step if resume_from is not None else None
    last_checkpoint = resume_from

    def event(kind: str, **kw) -> TrainProgress:
        elapsed = time.perf_counter() - start
        rate = session["steps"] / elapsed if elapsed > 0 and session["steps"] else None
        e = TrainProgress(
            step=global_step, total_steps=total_steps, epoch=round(global_step * accumulation / batches.per_epoch, 4),
            learning_rate=trainer.learning_rate, elapsed_s=round(prior_elapsed + elapsed, 3),
            eta_s=round((total_steps - global_step) / rate, 1) if rate else None,
            samples_per_s=round(session["samples"] / elapsed, 3) if elapsed > 0 and session["samples"] else None,
            tokens_per_s=round(session["tokens"] / elapsed, 1) if elapsed > 0 and session["tokens"] else None,
            gpu_mem_gb=_memory_gb(device), event=kind, **kw,
        )
        emit(e)
        return e

    def trainer_state() -> dict:
        return {
            "global_step": global_step, "max_steps": total_steps, "epoch": global_step * accumulation / batches.per_epoch,
            "num_examples": len(features), "train_batch_size": request.per_device_train_batch_size,
            "gradient_accumulation_steps": accumulation, "world_size": dist.world, "seed": request.seed,
            "elapsed_s": prior_elapsed + time.perf_counter() - start, "log_history": log_history,
            "is_world_process_zero": True,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()},
        }

    def save() -> None:
        nonlocal last_saved, last_checkpoint
        rngs = dist.gather(_rng_state())
        if dist.main:
            try:
                path = save_checkpoint(output_dir, global_step, encoder, ckpt_config, trainer.optimizer,
                                       trainer.scheduler, trainer_state(), rngs if dist.world > 1 else rngs[0])
            except OSError as err:
                kept = f"; {last_checkpoint.name} is intact" if last_checkpoint is not None else ""
                raise BackendError(f"could not save checkpoint-{global_step} in {output_dir} ({err.strerror or err}){kept}.") from None
            checkpoints.append(path)
            last_checkpoint = path
            written.add(path)
            for old in stale:
                if old not in written and old.exists():
                    shutil.rmtree(old, ignore_errors=True)
            stale.clear()
            event("save", checkpoint=str(path))
        last_saved = global_step

    def run_eval() -> None:
        from .evaluation import GREEDY, evaluate, merge_shards, write_eval_outputs

        encoder.eval()
        with torch.no_grad():
            kv = trainer.prefix_kv(1, None)
        result = evaluate(model, tokenizer, data.validation, max_source_length=request.max_source_length,
                          max_target_length=request.max_target_length, source_prefix=request.source_prefix,
                          prefix_kv=kv, batch_size=eval_batch_size, params=eval_params or GREEDY, seed=request.seed,
                          cancel=cancel, shard=(dist.rank, dist.world))
        encoder.train()
        shards = dist.gather(result)
        if not dist.main:
            return
        merged = merge_shards(shards) if dist.world > 1 else result
        if merged.stopped:
            return
        # the latest where the original puts them, and each evaluation kept under eval/step-N
        write_eval_outputs(output_dir, merged, {"step": global_step})
        written.add(write_eval_outputs(output_dir / EVAL_DIR / f"step-{global_step}", merged, {"step": global_step}))
        log_history.append({"step": global_step, **{f"eval_{k}": v for k, v in merged.metrics.items()}})
        event("eval", eval_metrics=merged.metrics)

    restore_checkpointing = model.transformer.encoder.gradient_checkpointing
    model.transformer.encoder.gradient_checkpointing = bool(request.gradient_checkpointing)
    encoder.train()
    stopped = False
    last_eval = None
    local_slots = [j for j in range(accumulation) if j % dist.world == dist.rank]
    try:
        if dist.main:
            output_dir.mkdir(parents=True, exist_ok=True)
        event("start")
        while global_step < total_steps:
            if dist.any(cancel is not None and cancel.is_set(), device):
                stopped = True
                break
            step_loss, samples, tokens = 0.0, 0, 0
            for j in local_slots:
                m = global_step * accumulation + j
                batch = batches.batch(m)
                step_loss += trainer.backward(batch, m, 1.0 / accumulation * dist.world) / accumulation
                samples += batch["input_ids"].shape[0]
                tokens += batch["input_ids"].numel()
            # Each rank's share is already divided by the global accumulation: the sum is the step's mean loss.
            totals = dist.sum_(torch.tensor([step_loss, samples, tokens], dtype=torch.float64, device=device))
            step_loss = float(totals[0])
            if not math.isfinite(step_loss):  # before the update: the weights and checkpoints stay sound
                raise BackendError(
                    f"the loss became {step_loss} at step {global_step + 1}; lower --learning-rate, or use --dtype bf16 "
                    f"or --quantization none (the base computes in {str(_compute_dtype(model)).replace('torch.', '')}). "
                    "Checkpoints saved so far are intact."
                )
            trainer.step()
            global_step += 1
            session["steps"] += 1
            session["samples"] += int(totals[1])
            session["tokens"] += int(totals[2])
            window["loss"] += step_loss
            window["count"] += 1
            if on_step is not None and dist.main:
                on_step(global_step, total_steps)
            if global_step % request.logging_steps == 0 or global_step == total_steps:
                loss = window["loss"] / window["count"]
                window.update(loss=0.0, count=0)
                log_history.append({"step": global_step, "loss": loss, "learning_rate": trainer.learning_rate,
                                    "epoch": global_step * accumulation / batches.per_epoch})
                event("log", loss=loss)
            if request.eval_steps and data.validation and global_step % request.eval_steps == 0:
                run_eval()
                last_eval = global_step
            if request.save_steps and global_step % request.save_steps == 0:
                save()
        if not stopped and request.eval_steps and data.validation and last_eval != global_step:
            run_eval()
        if global_step != last_saved and global_step > 0:
            save()
        event("stopped" if stopped else "done")
    except BackendError:
        raise
    except Exception as err:
        if _is_oom(err):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            where = "GPU" if device.type == "cuda" else "machine"
            raise BackendError(f"the {where} ran out of memory at step {global_step + 1}; {OOM_HINT}. Checkpoints saved so far are intact.") from None
        raise
    finally:
        model.transformer.encoder.gradient_checkpointing = restore_checkpointing
        encoder.eval()
    return TrainResult(output_dir, last_checkpoint, global_step, stopped, checkpoints)


def _restore(path: Path, trainer: PrefixStep, dist: Dist) -> tuple[int, list, float]:
    """Load weights, optimizer, schedule, RNG and step from a checkpoint; returns (step, log history, elapsed)."""
    from .loading import load_pickled_state_dict

    state = _read_json(path / STATE_NAME)
    weights = load_pickled_state_dict(path / WEIGHTS_NAME)
    encoder_state = {k[len(PREFIX_KEY):]: v for k, v in weights.items() if k.startswith(PREFIX_KEY)}
    try:
        trainer.encoder.load_state_dict({k: v.float() for k, v in encoder_state.items()})
    except RuntimeError as err:
        raise BackendError(f"{path} does not fit this run's prefix encoder ({str(err).splitlines()[-1].strip()}); check --pre-seq-len and --prefix-projection.") from None
    try:
        trainer.optimizer.load_state_dict(_load_torch(path / OPTIMIZER_NAME, trainer.device))
    except (ValueError, KeyError) as err:
        raise BackendError(f"{path}/{OPTIMIZER_NAME} does not match this run's optimizer ({err}).") from None
    if (path / SCHEDULER_NAME).is_file():
        trainer.scheduler.load_state_dict(_load_torch(path / SCHEDULER_NAME, "cpu"))
    else:
        trainer.scheduler.last_epoch = int(state.get("global_step", 0))
    if (path / RNG_NAME).is_file():
        rng = _load_torch(path / RNG_NAME, "cpu")
        if isinstance(rng, list):
            rng = rng[dist.rank] if dist.rank < len(rng) else rng[0]
        _set_rng_state(rng)
    step = int(state.get("global_step", 0))
    # The schedule's end comes from this run's total, as transformers does on resume.
    for group, base_lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
        group["lr"] = base_lr * trainer.scheduler.lr_lambdas[0](step)
    trainer.scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    return step, list(state.get("log_history", [])), float(state.get("elapsed_s", 0.0))


# ================================================================================ benchmark


class StepBenchmark(NamedTuple):
    ms_per_step: float
    peak_gpu_gb: Optional[float]


def benchmark_step(model, batch_size: int = 1, seq_len: int = 192, pre_seq_len: int = 128, steps: int = 10,
                   warmup: int = 2, gradient_checkpointing: bool = False, prefix_projection: bool = False,
                   weight_only_int8: bool = True, cuda_graphs: bool = True, recompute_mlp: bool = True) -> StepBenchmark:
    """Time one P-Tuning v2 optimizer step (forward, backward, clip, AdamW) on random tokens, as training
    runs it: milliseconds per step and peak GPU memory in GB (None on the CPU). For ``bench/``."""
    device = _device(model)
    encoder = new_prefix_encoder(model.config, pre_seq_len, prefix_projection, device, seed=0)
    trainer = PrefixStep(model, encoder, 2e-2, total_steps=warmup + steps, seed=0, weight_only_int8=weight_only_int8,
                         cuda_graphs=cuda_graphs, recompute_mlp=recompute_mlp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.padded_vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    restore = model.transformer.encoder.gradient_checkpointing
    model.transformer.encoder.gradient_checkpointing = gradient_checkpointing
    encoder.train()
    cuda = device.type == "cuda"
    if cuda:  # the peak includes warm-up and graph capture: a real run goes through them too
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(warmup):
            trainer.backward(batch, i, 1.0)
            trainer.step()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            trainer.backward(batch, warmup + i, 1.0)
            trainer.step()
        if cuda:
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) * 1000 / max(1, steps)
        peak = _memory_gb(device)
    finally:
        model.transformer.encoder.gradient_checkpointing = restore
        trainer._graphed.clear()  # give the graphs' memory back before whatever runs next
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
    return StepBenchmark(ms, peak)
