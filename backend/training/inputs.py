"""A run's data: the training sources (one, or several to blend) and the validation file, read before
the model loads so a CLI can refuse bad data early, then turned into features by the tokenizer."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..data import DataError, Example, preprocess_train, read_examples
from ..service import TrainRequest
from .requests import train_files

log = logging.getLogger(__name__)


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


CACHE_MIN_EXAMPLES = 2000  # below this, tokenizing takes less than reading a cache back


def training_features(data: TrainingData, tokenizer, request: TrainRequest):
    """Features of every training example (a list, or for large data an Arrow-backed ``datasets.Dataset``
    read from the cache of an earlier run with the same examples, tokenizer and lengths) and how many each
    source kept (an example preprocessing drops is dropped from its source's count)."""
    cached = _features_cache(data, tokenizer, request) if len(data.train) >= CACHE_MIN_EXAMPLES else None
    if cached is not None and (cached / "sizes.json").is_file():
        from datasets import load_from_disk

        features, sizes = load_from_disk(str(cached / "table")), json.loads((cached / "sizes.json").read_text())
    else:
        features, sizes = _tokenize(data, tokenizer, request)
        if cached is not None:
            _store(cached, features, sizes)
    if not len(features):
        raise DataError(f"{train_files(request)[0]}: no usable examples after preprocessing.")
    if request.mix is not None and any(n == 0 for n in sizes):
        empty = train_files(request)[sizes.index(0)]
        raise DataError(f"{empty}: no usable examples after preprocessing, so it cannot take a share of the blend.")
    return features, sizes


def _tokenize(data: TrainingData, tokenizer, request: TrainRequest) -> tuple[list[dict], list[int]]:
    features, sizes, start = [], [], 0
    for size in data.sizes or [len(data.train)]:
        part = preprocess_train(data.train[start:start + size], tokenizer, request.max_source_length,
                                request.max_target_length, request.source_prefix)
        features += part
        sizes.append(len(part))
        start += size
    return features, sizes


def _features_cache(data: TrainingData, tokenizer, request: TrainRequest) -> Path:
    """The cache directory of these examples tokenized this way (keyed by their text, the tokenizer's
    vocabulary and the lengths)."""
    from ..datasource import default_cache_dir

    h = hashlib.blake2b(digest_size=16)
    vocab = getattr(tokenizer, "vocab_file", None)
    h.update(Path(vocab).read_bytes() if vocab and Path(vocab).is_file() else repr(type(tokenizer)).encode())
    h.update(repr((request.max_source_length, request.max_target_length, request.source_prefix, data.sizes)).encode())
    for ex in data.train:
        h.update("\x1e".join((ex.prompt, ex.response, *(t for turn in ex.history for t in turn))).encode() + b"\x1d")
    if default_cache_dir():
        root = Path(default_cache_dir())
    else:
        import datasets

        root = Path(datasets.config.HF_DATASETS_CACHE)
    return root / "glmchat-features" / h.hexdigest()


def _store(directory: Path, features: list[dict], sizes: list[int]) -> None:
    """Write the cache beside, then rename into place: a killed run leaves no half cache."""
    from datasets import Dataset

    from ..atomic import atomic_write_text, publish_directory

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        Dataset.from_dict({"input_ids": [f["input_ids"] for f in features],
                           "labels": [f["labels"] for f in features]}).save_to_disk(str(tmp / "table"))
        atomic_write_text(tmp / "sizes.json", json.dumps(sizes))
        publish_directory(tmp, directory)
    except OSError as err:  # a full or read-only cache only costs the next run the tokenizing
        log.warning("could not cache the tokenized data in %s (%s)", directory, err)
        shutil.rmtree(tmp, ignore_errors=True)
