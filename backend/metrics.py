"""Generation metrics as ChatGLM2-6B's ``ptuning/main.py`` computes them, and its predictions file.

Per example: ROUGE-1/2/L F-scores of jieba-segmented words (rouge_chinese) and character BLEU-4 with
smoothing method3 (nltk), each x100 and rounded to 4 decimals as the original does, then averaged.
One deliberate change: an empty prediction or label scores 0 where the original crashed with
rouge's "Hypothesis is empty." / "Reference is empty.".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence, Union

from .atomic import atomic_write

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

_jieba = None


def _segment(text: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." lines on stderr
        _jieba = jieba
    return list(_jieba.cut(text))


def score_pair(prediction: str, label: str) -> dict[str, float]:
    """The four scores (x100, rounded to 4 decimals) of one prediction against its label."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis = _segment(prediction)
    reference = _segment(label)
    scores: dict[str, float] = {}
    try:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key] = round(result[key]["f"] * 100, 4)
    except ValueError:  # "Hypothesis is empty." / "Reference is empty.": nothing matches
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L and BLEU-4 (x100) over prediction/label pairs, keys as the original."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        return {key: 0.0 for key in METRIC_KEYS}
    totals = {key: 0.0 for key in METRIC_KEYS}
    for prediction, label in zip(predictions, labels):
        for key, value in score_pair(prediction, label).items():
            totals[key] += value
    return {key: round(totals[key] / len(predictions), 4) for key in METRIC_KEYS}


def write_predictions(path: Union[str, Path], predictions: Sequence[str], labels: Sequence[str]) -> Path:
    """Write generated_predictions.txt: one ``{"labels": ..., "predict": ...}`` JSON line per example.

    Written to a temporary file beside ``path`` and moved into place, so a crash never leaves half a file.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")

    def write(out) -> None:
        for prediction, label in zip(predictions, labels):
            out.write(json.dumps({"labels": label, "predict": prediction}, ensure_ascii=False) + "\n")

    return atomic_write(path, write)
