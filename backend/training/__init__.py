"""P-Tuning v2 training of a ChatGLM2 prefix over a frozen, shared base model: the original recipe.

What ``ptuning/main.py`` + the transformers 4.30 Trainer of its time do, step for step:

* data: :mod:`backend.data` (the original preprocessing, label masking and truncation), read through
  ``datasets`` (:mod:`backend.datasource`); several sources blend by ``mix`` weights (:mod:`.batches`);
* only a float32 ``PrefixEncoder`` trains (dropout 0.1 on its output, after the cast to the base's dtype);
  the base stays frozen in 8/4-bit or 16-bit and is never modified (:mod:`.step`);
* each accumulation step's loss is the token mean over ``per_device_train_batch_size`` examples, the
  optimizer step's loss their mean over ``gradient_accumulation_steps``; the examples of a step go through
  the model ``micro_batch_size`` at a time (default: as many as fit) with the same result (:mod:`.batches`);
* transformers 4.30's AdamW by default (``optim="adamw_hf"``: eps added to sqrt(v), bias correction folded
  into the step size; its effective eps is eps / sqrt(1 - beta2^t), 31.6x at step 1, and it moves the
  prefix by ~1e-2 after 30 steps against torch's AdamW, offered as ``adamw_torch``), betas 0.9/0.999,
  eps 1e-8, weight decay 0, the schedule from transformers' ``get_scheduler`` (linear decay to 0, no
  warmup, by default), gradients clipped to norm 1.0 (:mod:`.optim`); the logged loss is the mean step
  loss since the previous log, the logged lr the one the next step will use;
* checkpoints in the original trainer's layout, atomically, resumable on the same loss curve (:mod:`.checkpoints`).

Differences that change no result: the shuffling order and each example's dropout mask are keyed by
(seed, epoch) and (seed, the example's slot in the run), so a resumed, data-parallel or differently
micro-batched run sees exactly the examples and masks of a straight single-process run; trailing
columns that are padding in every row of a micro-batch are cut (causal attention: they change nothing
before them, and their labels are ignored).

Data parallel (torchrun or ``accelerate launch``): each rank takes its share of every optimizer step's
accumulation groups; ``gradient_accumulation_steps`` is the global count; gradients are summed with one
all-reduce per step; only rank 0 writes checkpoints and progress (:mod:`.dist`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train_prefix": "loop", "PrefixStep": "step", "new_prefix_encoder": "step", "StepPlan": "batches",
    "epoch_order": "batches", "TrainingData": "inputs", "read_training_data": "inputs", "check_request": "requests",
    "resolve_resume": "requests", "RequestError": "requests", "OOM_HINT": "memory", "Dist": "dist",
    "TrainState": "state", "CheckpointStore": "checkpoints", "PREFIX_KEY": "checkpoints",
    "list_checkpoints": "checkpoints", "checkpoint_step": "checkpoints", "prefix_config": "checkpoints",
    "AdamWHF": "optim",
}


def __getattr__(name: str):
    """Names load their module on first use: ``backend.adapters`` imports the checkpoint layout from
    here without pulling in the loop."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
