"""The training loop: steps, logs, evaluations and saves over a :class:`TrainState`."""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from ..progress import ProgressLog, fan_out
from ..service import BackendError, SamplingParams, TrainProgress, TrainRequest, TrainResult
from .batches import StepPlan
from .checkpoints import EVAL_DIR, CheckpointStore, disk_full_message, is_disk_full, prefix_config, rng_state
from .dist import Dist
from .evaluation_hook import EvalHook
from .inputs import TrainingData, read_training_data, training_features
from .memory import OOM_HINT, fit_step, memory_gb, not_even_one, release, smaller_micro_batch
from .requests import check_request, resolve_resume
from .resume import restore
from .state import TrainState
from .step import PrefixStep, compute_dtype, is_oom, model_device, new_prefix_encoder
from .trackers import check_tracker, open_tracker

CUDA_TRIM_MULTIPLE = 64  # trailing padding cut in steps of 64 on the GPU: a few graph shapes, not dozens


class _Run:
    """One call of :func:`train_prefix`: the collaborators and the state they share."""

    def __init__(self, trainer: PrefixStep, plan: StepPlan, state: TrainState, request: TrainRequest, store: CheckpointStore,
                 dist: Dist, emit: Callable[[TrainProgress], None], evaluation: Optional[EvalHook], stale: list[Path],
                 micro_batch: Optional[int]):
        self.trainer, self.plan, self.state, self.request, self.store = trainer, plan, state, request, store
        self.dist, self.emit, self.evaluation, self.stale = dist, emit, evaluation, stale
        self.rows = request.per_device_train_batch_size * request.gradient_accumulation_steps // dist.world
        self.auto = micro_batch is None
        self.micro_batch = micro_batch  # auto: chosen when the loop starts, with the run's checkpointing set
        self.written: set[Path] = set()
        self.last_eval: Optional[int] = None

    def event(self, kind: str, **kw) -> TrainProgress:
        s, elapsed = self.state, self.state.elapsed
        rate = s.session_steps / elapsed if elapsed > 0 and s.session_steps else None
        e = TrainProgress(
            step=s.global_step, total_steps=s.total_steps, epoch=round(s.epoch, 4),
            learning_rate=self.trainer.learning_rate, elapsed_s=round(s.prior_elapsed + elapsed, 3),
            eta_s=round((s.total_steps - s.global_step) / rate, 1) if rate else None,
            samples_per_s=round(s.session_samples / elapsed, 3) if elapsed > 0 and s.session_samples else None,
            tokens_per_s=round(s.session_tokens / elapsed, 1) if elapsed > 0 and s.session_tokens else None,
            gpu_mem_gb=memory_gb(self.trainer.device), event=kind, **kw,
        )
        self.emit(e)
        return e

    def step_once(self) -> tuple[float, int, int]:
        """Forward/backward every micro-batch of this rank's share of the next step; (loss, samples, tokens)."""
        loss, samples, tokens = 0.0, 0, 0
        for mb in self.plan.micro_batches(self.state.global_step, self.micro_batch, self.dist.rank, self.dist.world):
            loss += self.trainer.backward(mb.batch, mb.slots, mb.row_weights)
            samples += mb.batch["input_ids"].shape[0]
            tokens += mb.batch["input_ids"].numel()
        return loss, samples, tokens

    def step(self) -> tuple[float, int, int]:
        """One optimizer step's gradients; with ``auto`` an out-of-memory halves the micro-batch and redoes it."""
        while True:
            try:
                return self.step_once()
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
                if not (self.auto and is_oom(err) and self.trainer.device.type == "cuda"):
                    raise
                self.trainer.zero_grad()
                self.trainer.drop_graphs()
                self.trainer.cuda_graphs = False  # memory is tight: graph pools and capture warm-ups cost extra
                release(self.trainer.device)
                smaller = smaller_micro_batch(self.micro_batch, self.rows)
                if smaller is None:
                    raise not_even_one(self.trainer.device, len(self.plan.features[0]["input_ids"])) from None
                self.micro_batch = smaller

    def save(self) -> None:
        s = self.state
        rngs = self.dist.gather(rng_state())
        if self.dist.main:
            trainer_state = s.to_json(self.request, len(self.plan.features), self.dist.world, self.micro_batch,
                                      self.trainer.recompute_mlp)
            try:
                config = prefix_config(self.trainer.config, self.trainer.encoder.pre_seq_len, self.request.prefix_projection)
                if self.request.source_prefix:  # chat puts it in front of each prompt, as the training data had it
                    config.source_prefix = self.request.source_prefix
                path = self.store.save(s.global_step, self.trainer.encoder, config,
                    self.trainer.optimizer, self.trainer.scheduler, trainer_state,
                    rngs if self.dist.world > 1 else rngs[0])
            except (OSError, RuntimeError) as err:
                self._refuse_save(err)
            s.checkpoints.append(path)
            s.last_checkpoint = path
            self.written.add(path)
            for old in self.stale:  # --overwrite-output-dir: the old run goes once this one has a checkpoint
                if old not in self.written and old.exists():
                    shutil.rmtree(old, ignore_errors=True)
            self.stale.clear()
            self.event("save", checkpoint=str(path))
        s.last_saved = s.global_step

    def _refuse_save(self, err: BaseException):
        s, where = self.state, self.store.output_dir
        if is_disk_full(err):
            raise BackendError(disk_full_message(where, self.store.size_estimate(self.trainer.encoder),
                                                 f"saving checkpoint-{s.global_step}", s.last_checkpoint)) from None
        if isinstance(err, RuntimeError):
            raise err
        kept = f"; {s.last_checkpoint.name} is intact" if s.last_checkpoint is not None else ""
        raise BackendError(f"could not save checkpoint-{s.global_step} in {where} ({err.strerror or err}){kept}.") from None

    def evaluate(self) -> None:
        self.last_eval = self.state.global_step
        metrics = self.evaluation(self.state.global_step, self.written)
        if metrics is not None:
            self.state.log_history.append({"step": self.state.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})
            self.event("eval", eval_metrics=metrics)

    def after_step(self, on_step) -> None:
        s, r = self.state, self.request
        if on_step is not None and self.dist.main:
            on_step(s.global_step, s.total_steps)
        if s.global_step % r.logging_steps == 0 or s.global_step == s.total_steps:
            loss = s.take_window_loss()
            s.log_history.append({"step": s.global_step, "loss": loss, "learning_rate": self.trainer.learning_rate,
                                  "epoch": s.epoch})
            self.event("log", loss=loss)
        if self.evaluation is not None and r.eval_steps and s.global_step % r.eval_steps == 0:
            self.evaluate()
        if r.save_steps and s.global_step % r.save_steps == 0:
            self.save()

    def loop(self, cancel: Optional[threading.Event], on_step) -> bool:
        """Train to the end or the cancel; returns whether it was cancelled."""
        s, device = self.state, self.trainer.device
        self.micro_batch, _ = fit_step(self.trainer, self.plan, self.rows, self.micro_batch, self.request.recompute_mlp)
        self.event("start", micro_batch_size=self.micro_batch, recompute_mlp=self.trainer.recompute_mlp)
        while s.global_step < s.total_steps:
            if self.dist.any(cancel is not None and cancel.is_set(), device):
                return True
            loss, samples, tokens = self.step()
            # Each rank's loss is its weighted share of the global step: the sum is the step's loss.
            totals = self.dist.sum_(torch.tensor([loss, samples, tokens], dtype=torch.float64, device=device))
            loss = float(totals[0])
            if not math.isfinite(loss):  # before the update: the weights and checkpoints stay sound
                raise BackendError(
                    f"the loss became {loss} at step {s.global_step + 1}; lower --learning-rate, or use --dtype bf16 "
                    f"or --quantization none (the base computes in {str(compute_dtype(self.trainer.model)).replace('torch.', '')}). "
                    "Checkpoints saved so far are intact."
                )
            self.trainer.step()
            s.finish_step(loss, int(totals[1]), int(totals[2]))
            self.after_step(on_step)
        return False


def _total_steps(request: TrainRequest, plan: StepPlan) -> int:
    if request.max_steps and request.max_steps > 0:
        return request.max_steps
    return max(1, math.ceil(request.num_train_epochs * plan.per_epoch / request.gradient_accumulation_steps))


def _trainer(model, request: TrainRequest, total_steps: int, dist: Dist, capture_lock, resuming: bool) -> PrefixStep:
    from .optim import warmup_steps

    device = model_device(model)
    encoder = new_prefix_encoder(model.config, request.pre_seq_len, request.prefix_projection, device, request.seed)
    if request.init_checkpoint is not None and not resuming:  # a resumed run restores its own weights
        from ..adapters import build_prefix_encoder, read_prefix_checkpoint

        start = build_prefix_encoder(read_prefix_checkpoint(request.init_checkpoint), model.config, device)
        encoder.load_state_dict(start.state_dict())
    return PrefixStep(model, encoder, request.learning_rate, total_steps, seed=request.seed, dist=dist,
                      capture_lock=capture_lock, recompute_mlp=request.recompute_mlp is not False, optim=request.optim,
                      lr_scheduler_type=request.lr_scheduler_type,
                      warmup_steps=warmup_steps(total_steps, request.warmup_steps, request.warmup_ratio))


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
    total)`` is called after every optimizer step on rank 0. Setting ``cancel`` stops at the next step
    boundary: a checkpoint of the last finished step is saved and the result says ``stopped=True``.
    Problems a user can fix raise :class:`BackendError`; nothing already saved is removed by a failure.
    The base model's weights, mode and prefix are left as they were.
    """
    dist = Dist.current()
    check_request(request, dist.world)
    check_tracker(request.report_to)
    store = CheckpointStore(request.output_dir)
    if dist.main:
        store.recover()
    resume_from = resolve_resume(request)
    data = data if data is not None else read_training_data(request, max_train_samples, max_eval_samples)
    features, sizes = training_features(data, tokenizer, request)
    cuda = model_device(model).type == "cuda"
    plan = StepPlan(features, request.per_device_train_batch_size, request.gradient_accumulation_steps, request.seed,
                    sizes, request.mix, CUDA_TRIM_MULTIPLE if cuda else 1)
    state = TrainState(_total_steps(request, plan), plan.per_epoch, request.gradient_accumulation_steps)
    trainer = _trainer(model, request, state.total_steps, dist, capture_lock, resume_from is not None)
    if resume_from is not None:
        restore(resume_from, trainer, state, dist)
    # --overwrite-output-dir: the old run's checkpoints and kept evaluations go once this run has saved its first.
    stale = []
    if resume_from is None and request.overwrite_output_dir:
        stale = store.checkpoints() + sorted((store.output_dir / EVAL_DIR).glob("step-*"))
    emit = lambda e: None  # noqa: E731 - ranks other than 0 report nothing
    if dist.main:
        plog = _progress_log(store, resume_from, state)
        emit = fan_out([plog, progress, open_tracker(request.report_to, store.output_dir, {"request": str(request)})])
    evaluation = None
    if request.eval_steps and data.validation:
        evaluation = EvalHook(trainer, tokenizer, data.validation, request, store.output_dir, dist, eval_batch_size,
                              eval_params, cancel)
    return _run(model, _Run(trainer, plan, state, request, store, dist, emit, evaluation, stale, request.micro_batch_size),
                cancel, on_step)


def _progress_log(store: CheckpointStore, resume_from, state: TrainState) -> ProgressLog:
    try:
        return ProgressLog(store.output_dir, resume_step=state.global_step if resume_from is not None else None)
    except OSError as err:
        if is_disk_full(err):
            raise BackendError(disk_full_message(store.output_dir, 1 << 20, "rewriting progress.jsonl", resume_from)) from None
        raise BackendError(f"cannot write progress.jsonl in {store.output_dir} ({err.strerror or err}).") from None


def _run(model, run: _Run, cancel, on_step) -> TrainResult:
    state, request = run.state, run.request
    restore_checkpointing = model.transformer.encoder.gradient_checkpointing
    model.transformer.encoder.gradient_checkpointing = bool(request.gradient_checkpointing)
    run.trainer.encoder.train()
    try:
        if run.dist.main:
            run.store.output_dir.mkdir(parents=True, exist_ok=True)
        stopped = run.loop(cancel, on_step)
        if not stopped and run.evaluation is not None and run.last_eval != state.global_step:
            run.evaluate()
        if state.global_step != state.last_saved and state.global_step > 0:
            run.save()
        run.event("stopped" if stopped else "done")
    except BackendError:
        raise
    except Exception as err:
        if is_oom(err):
            release(run.trainer.device)
            where = "GPU" if run.trainer.device.type == "cuda" else "machine"
            raise BackendError(f"the {where} ran out of memory at step {state.global_step + 1}; {OOM_HINT}. Checkpoints saved so far are intact.") from None
        if is_disk_full(err):
            raise BackendError(disk_full_message(run.store.output_dir, 1 << 20, "writing progress", state.last_checkpoint)) from None
        raise
    finally:
        model.transformer.encoder.gradient_checkpointing = restore_checkpointing
        run.trainer.encoder.eval()
        run.trainer.drop_graphs()
    return TrainResult(run.store.output_dir, state.last_checkpoint, state.global_step, stopped, state.checkpoints)
