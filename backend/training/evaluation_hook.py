"""Evaluation during training: generate for the validation examples with the current prefix through
:func:`backend.evaluation.evaluate` (its public signature only), keep each result under ``eval/step-N``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..service import TrainRequest
from .checkpoints import EVAL_DIR
from .dist import Dist


class EvalHook:
    def __init__(self, trainer, tokenizer, examples, request: TrainRequest, output_dir: Path, dist: Dist,
                 batch_size: int, params, cancel):
        self.trainer, self.tokenizer, self.examples, self.request = trainer, tokenizer, examples, request
        self.output_dir, self.dist, self.batch_size, self.params, self.cancel = output_dir, dist, batch_size, params, cancel

    def __call__(self, step: int, written: set) -> Optional[dict]:
        """Evaluate at ``step``; the merged metrics on rank 0 (None elsewhere or when cancelled)."""
        from ..evaluation import GREEDY, evaluate, merge_shards, write_eval_outputs

        r, encoder = self.request, self.trainer.encoder
        encoder.eval()
        with torch.no_grad():
            kv = self.trainer.prefix_kv(1, None)
        result = evaluate(self.trainer.model, self.tokenizer, self.examples, max_source_length=r.max_source_length,
                          max_target_length=r.max_target_length, source_prefix=r.source_prefix, prefix_kv=kv,
                          batch_size=self.batch_size, params=self.params or GREEDY, seed=r.seed, cancel=self.cancel,
                          shard=(self.dist.rank, self.dist.world))
        encoder.train()
        shards = self.dist.gather(result)
        if not self.dist.main:
            return None
        merged = merge_shards(shards) if self.dist.world > 1 else result
        if merged.stopped:
            return None
        # the latest where the original puts them, and each evaluation kept under eval/step-N
        write_eval_outputs(self.output_dir, merged, {"step": step})
        written.add(write_eval_outputs(self.output_dir / EVAL_DIR / f"step-{step}", merged, {"step": step}))
        return merged.metrics
