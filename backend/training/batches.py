"""Which examples an optimizer step sees, how they are weighted, and how they go through the model.

The original trainer's step: ``gradient_accumulation_steps`` (A) groups of ``per_device_train_batch_size``
(B) examples, each group's loss the mean over its labelled tokens, the step's loss the mean of the groups'.
Group ``m`` (counted over the run) is the next slice of the epoch's shuffled order, so a resumed or
data-parallel run sees what a straight single-process run sees. Here a token of an example in group j
weighs 1 / (A * labelled tokens of group j): the examples of a step can then go through the model
``micro_batch_size`` at a time, in any cut, and add up to the same loss and gradient.

Several training files blend as ``mix`` says: each slot of an epoch's order draws its file with those
probabilities (keyed by seed and epoch), then takes that file's next example in its own shuffled order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..data import IGNORE_INDEX, collate_train


@dataclass
class MicroBatch:
    batch: dict  # input_ids, labels [n, s], trailing all-padding columns cut
    slots: list[int]  # each row's slot in the run: keys its dropout mask
    row_weights: torch.Tensor  # [n] float32: 1 / (A * labelled tokens of the row's group)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch, the same on every rank and after a resume."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def blended_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> list[int]:
    """An epoch of ``sum(sizes)`` slots over the concatenated sources, each slot's source drawn with
    probability proportional to ``weights``; each source walks its own shuffled order, reshuffled when used up."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    draws = torch.multinomial(torch.tensor(weights, dtype=torch.float64), sum(sizes), replacement=True, generator=g)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    cursors = [0] * len(sizes)
    orders: dict[tuple[int, int], list[int]] = {}
    out = []
    for k in draws.tolist():
        lap, pos = divmod(cursors[k], sizes[k])
        if (k, lap) not in orders:
            orders[(k, lap)] = epoch_order(sizes[k], seed + 7919 * (k + 1) + 104_729 * lap, epoch)
        out.append(offsets[k] + orders[(k, lap)][pos])
        cursors[k] += 1
    return out


@dataclass
class StepPlan:
    """Features (the sources concatenated) cut into optimizer steps and micro-batches."""

    features: list[dict]
    batch_size: int  # B
    accumulation: int  # A, global
    seed: int
    sizes: Sequence[int] = ()  # examples per source, for blending; () = one source
    mix: Optional[Sequence[float]] = None
    trim_multiple: int = 1  # cut trailing padding down to a multiple of this (CUDA graphs: fewer shapes)
    _orders: dict = field(default_factory=dict, repr=False)

    @property
    def per_epoch(self) -> int:
        """Groups of B per epoch."""
        return math.ceil(len(self.features) / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if self.mix is not None and len(self.sizes) > 1:
                order = blended_order(self.sizes, self.mix, self.seed, epoch)
            else:
                order = epoch_order(len(self.features), self.seed, epoch)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def group(self, m: int) -> list[int]:
        """Feature indices of group ``m`` (0-based over the run)."""
        epoch, k = divmod(m, self.per_epoch)
        return self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def rows(self, step: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, float]]:
        """(feature index, slot, weight) of this rank's examples of optimizer step ``step`` (0-based)."""
        out = []
        for j in range(rank, self.accumulation, world):
            m = step * self.accumulation + j
            members = self.group(m)
            tokens = sum(_labelled(self.features[i]) for i in members)
            weight = 1.0 / (self.accumulation * max(1, tokens))
            out += [(i, m * self.batch_size + k, weight) for k, i in enumerate(members)]
        return out

    def micro_batches(self, step: int, size: int, rank: int = 0, world: int = 1) -> list[MicroBatch]:
        rows = self.rows(step, rank, world)
        return [self._collate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def _collate(self, rows) -> MicroBatch:
        batch = collate_train([self.features[i] for i, _, _ in rows])
        # Cut columns that are padding in every row (after the last label): causal attention makes them inert.
        width = batch["input_ids"].shape[1]
        labelled = (batch["labels"] != IGNORE_INDEX).any(0).nonzero()
        keep = int(labelled.max()) + 1 if len(labelled) else width
        keep = min(width, -(-keep // self.trim_multiple) * self.trim_multiple)
        batch = {k: v[:, :keep] for k, v in batch.items()}
        return MicroBatch(batch, [s for _, s, _ in rows], torch.tensor([w for _, _, w in rows], dtype=torch.float32))


def _labelled(feature: dict) -> int:
    """Tokens the loss counts: labels[1:] that are not ignored (the first position predicts nothing)."""
    return sum(1 for t in feature["labels"][1:] if t != IGNORE_INDEX)
