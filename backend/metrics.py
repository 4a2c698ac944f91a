"""Generation metrics as ChatGLM2-6B's ``ptuning/main.py`` computes them, and its predictions file.

Per example: ROUGE-1/2/L F-scores of jieba-segmented words (rouge_chinese) and character BLEU-4 with
smoothing method3 (nltk), each x100 and rounded to 4 decimals as the original does, then averaged.
One deliberate change: an empty prediction or label scores 0 where the original crashed with
rouge's "Hypothesis is empty." / "Reference is empty.".
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Sequence, Union

from .atomic import atomic_write

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

_jieba = None


def _segment(text: str) -> list[str]:
    global _jieba
    if _jieba is None:
        with warnings.catch_warnings():  # jieba 0.42's own SyntaxWarnings and pkg_resources notice on Python 3.12
            warnings.simplefilter("ignore")
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
    return mean_scores([score_pair(prediction, label) for prediction, label in zip(predictions, labels)])


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of per-pair scores, summed in the order given (the original's order: the same float sums)."""
    if not scores:
        return {key: 0.0 for key in METRIC_KEYS}
    totals = {key: 0.0 for key in METRIC_KEYS}
    for pair in scores:
        for key, value in pair.items():
            totals[key] += value
    return {key: round(totals[key] / len(scores), 4) for key in METRIC_KEYS}


def score_pairs(pairs: Sequence[tuple[int, str, str]]) -> list[tuple[int, dict[str, float]]]:
    """(index, scores) of each (index, prediction, label): the work of one ``BackgroundScorer`` task."""
    return [(index, score_pair(prediction, label)) for index, prediction, label in pairs]


class BackgroundScorer:
    """Scores prediction/label pairs in worker processes while the GPU generates the next ones.

    jieba, rouge and nltk are pure Python: in the generating process they would hold the interpreter lock the
    decoding thread needs, and after generation they add ~3 s to a 1070-example evaluation. Workers are
    spawned (a forked CUDA process is unsafe); ``mean`` sums the per-pair scores in the order asked, so the
    metrics equal ``compute_metrics``'s.
    """

    def __init__(self, workers: int = 2, chunk: int = 64):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self._chunk = chunk
        self._waiting: list[tuple[int, str, str]] = []
        self._futures = []

    def add(self, index: int, prediction: str, label: str) -> None:
        self._waiting.append((index, prediction, label))
        if len(self._waiting) >= self._chunk:
            self._submit()

    def _submit(self) -> None:
        if self._waiting:
            self._futures.append(self._pool.submit(score_pairs, self._waiting))
            self._waiting = []

    def mean(self, order: Sequence[int]) -> dict[str, float]:
        """The metrics of the pairs added, summed in ``order`` (their indices); every index must have been added."""
        self._submit()
        scores = dict(pair for future in self._futures for pair in future.result())
        self.close()
        return mean_scores([scores[i] for i in order])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
