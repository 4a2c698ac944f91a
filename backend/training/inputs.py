"""A run's data: the training sources (one, or several to blend) and the validation file, read before
the model loads so a CLI can refuse bad data early, then turned into features by the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data import DataError, Example, preprocess_train, read_examples
from ..service import TrainRequest
from .requests import train_files


@dataclass
class TrainingData:
    train: list[Example]
    validation: Optional[list[Example]] = None
    skipped: list[str] = field(default_factory=list)  # one message per bad line skipped (skip_bad_lines)
    sizes: list[int] = field(default_factory=list)  # examples per training source, in order (blending)


def _read(source, request: TrainRequest):
    return read_examples(source, request.prompt_column, request.response_column, request.history_column,
                         request.skip_bad_lines)


def read_training_data(request: TrainRequest, max_train_samples: Optional[int] = None,
                       max_eval_samples: Optional[int] = None) -> TrainingData:
    """Read the training sources (and the validation file); needs no tokenizer."""
    train, skipped, sizes, first = [], [], [], None
    for source in train_files(request):
        examples = _read(source, request)
        if first is not None and set(examples.columns) != set(first[1].columns):
            raise DataError(
                f"{source} has the columns {', '.join(examples.columns)} but {first[0]} has "
                f"{', '.join(first[1].columns)}; blend files of one layout (convert one of them first)"
            )
        first = first or (source, examples)
        skipped += examples.skipped
        kept = list(examples)[:max_train_samples] if max_train_samples else list(examples)
        train += kept
        sizes.append(len(kept))
    validation = None
    if request.validation_file:
        val = _read(request.validation_file, request)
        skipped += val.skipped
        validation = list(val)[:max_eval_samples] if max_eval_samples else list(val)
    return TrainingData(train, validation, skipped, sizes)


def training_features(data: TrainingData, tokenizer, request: TrainRequest) -> tuple[list[dict], list[int]]:
    """Features of every training example and how many each source kept (an example preprocessing drops
    is dropped from its source's count)."""
    features, sizes, start = [], [], 0
    for size in data.sizes or [len(data.train)]:
        part = preprocess_train(data.train[start:start + size], tokenizer, request.max_source_length,
                                request.max_target_length, request.source_prefix)
        features += part
        sizes.append(len(part))
        start += size
    if not features:
        raise DataError(f"{train_files(request)[0]}: no usable examples after preprocessing.")
    if request.mix is not None and any(n == 0 for n in sizes):
        empty = train_files(request)[sizes.index(0)]
        raise DataError(f"{empty}: no usable examples after preprocessing, so it cannot take a share of the blend.")
    return features, sizes
