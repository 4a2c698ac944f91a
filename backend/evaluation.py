"""Evaluating a P-Tuning v2 prefix as ChatGLM2-6B's ``ptuning/main.py`` does with --predict_with_generate.

Every example's prompt is a row of the batched decoder (``backend.decode``: each row decodes as it would
alone, so the batch size does not change a prediction), decoded with special tokens skipped, scored
with ROUGE-1/2/L and BLEU-4 by :mod:`backend.metrics`, and written to ``generated_predictions.txt``
and ``metrics.json``. Greedy decoding is the default; :data:`ORIGINAL_SAMPLING` reproduces the
original script's sampled predictions (temperature 0.95, top_p 0.7, and transformers' default top_k 50).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .atomic import atomic_write_text
from .data import Example, preprocess_eval
from .decode import make_batch_decoder
from .decode.batcher import Batcher
from .decode.protocol import DecodeRequest
from .metrics import BackgroundScorer, compute_metrics, write_predictions
from .service import SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0)
# The original evaluate/predict calls: do_sample=True, top_p=0.7, temperature=0.95; generate's top_k default 50.
ORIGINAL_SAMPLING = SamplingParams(temperature=0.95, top_p=0.7, top_k=50)
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "generated_predictions.txt"


@dataclass
class EvalResult:
    metrics: dict[str, float]  # rouge-1, rouge-2, rouge-l, bleu-4 (x100, averaged)
    predictions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    seconds: float = 0.0  # generation and scoring
    output_dir: Optional[Path] = None
    stopped: bool = False


EVAL_ADAPTER = "evaluated prefix"  # the decoder's name for the prefix under evaluation
CUDA_EVAL_MAX_BATCH = 256  # rows at most; the decoder's memory budget (free GPU memory) may admit fewer
BACKGROUND_SCORING_MIN = 200  # examples from which scoring runs in worker processes beside the generation


def generate_all(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: Union[int, Sequence[int]],
    max_length: int,
    prefix_kv: Optional[list[torch.Tensor]] = None,
    params: SamplingParams = GREEDY,
    seeds: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    cancel: Optional[threading.Event] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    on_output: Optional[Callable[[int, list[int]], None]] = None,
) -> list[list[int]]:
    """New token ids (eos excluded) for each prompt, all submitted to one batched decoder; ``on_output(i, ids)``
    is called as prompt i's are complete (in the order of the prompts).
    ``eos_token_id`` may list several stop ids (ChatGLM3 also stops at <|user|> and <|observation|>).

    ``max_length`` bounds prompt + new tokens per prompt, like the original's ``max_length`` at batch 1;
    each row is decoded as it would be alone (``backend.decode``), so predictions do not depend on the
    batch size. ``seeds[i]`` seeds prompt i's sampling. ``batch_size`` None: 8 rows on the CPU, on CUDA
    as many as the free memory holds (up to 256). ``prefix_kv``: ``split_prefix`` layout, batch 1; None = base.
    """
    on_cuda = model.get_input_embeddings().weight.is_cuda
    max_batch = batch_size or (CUDA_EVAL_MAX_BATCH if on_cuda else None)
    stops = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    decoder = make_batch_decoder(model, "auto", lambda name: prefix_kv if name == EVAL_ADAPTER else None, max_batch=max_batch,
                                 context_length=max_length)
    batcher = Batcher(decoder, max_queue=len(prompts) + 1, name="evaluation")
    adapter = EVAL_ADAPTER if prefix_kv is not None else None
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        streams = {}
        for i, prompt in enumerate(prompts):
            budget = max_length - len(prompt)
            if budget > 0:
                request = DecodeRequest(list(prompt), dataclasses.replace(params, max_new_tokens=budget), adapter,
                                        seeds[i] if seeds is not None else None, stops)
                streams[i] = batcher.submit(request, cancel)
        for done, (i, stream) in enumerate(streams.items(), 1):
            outputs[i] = [t for t in stream if t not in stops]
            if on_output is not None and not (cancel is not None and cancel.is_set()):
                on_output(i, outputs[i])
            if progress is not None:
                progress(done, len(streams))
    finally:
        batcher.close()
    return outputs


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_source_length: int = 64,
    max_target_length: int = 128,
    source_prefix: str = "",
    prefix_kv: Optional[list[torch.Tensor]] = None,
    batch_size: Optional[int] = None,
    params: SamplingParams = GREEDY,
    seed: int = 42,
    output_dir: Optional[Union[str, Path]] = None,
    cancel: Optional[threading.Event] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    extra_metrics: Optional[dict] = None,
    shard: tuple[int, int] = (0, 1),
) -> EvalResult:
    """Generate for every example, score like the original ``compute_metrics``, and (when ``output_dir``
    is given) write ``generated_predictions.txt`` and ``metrics.json`` there.

    ``shard=(rank, world)`` generates only every world-th example (data-parallel evaluation); the caller
    gathers the shards with :func:`merge_shards` and scores them. ``progress(done, total)`` is called as
    predictions complete. ``batch_size``: rows decoded together (None: chosen from free memory on CUDA).
    """
    start = time.perf_counter()
    features = preprocess_eval(examples, tokenizer, max_source_length, max_target_length, source_prefix)
    rank, world = shard
    mine = list(range(rank, len(features), world))
    max_length = max_source_length + max_target_length + 1  # the original's max_seq_length
    # Similar lengths together waste less padding; results do not depend on the batching.
    order = sorted(mine, key=lambda i: len(features[i]["input_ids"]))
    labels = {i: tokenizer.decode([t for t in features[i]["labels"] if t >= 0], skip_special_tokens=True) for i in mine}
    predictions: dict[int, str] = {}
    # a large evaluation is scored in worker processes while the GPU generates (identical metrics)
    scorer = BackgroundScorer() if world == 1 and len(mine) >= BACKGROUND_SCORING_MIN else None

    def take(k: int, ids: list[int]) -> None:
        i = order[k]
        predictions[i] = tokenizer.decode(ids, skip_special_tokens=True)
        if scorer is not None:
            scorer.add(i, predictions[i], labels[i])

    try:
        new_ids = generate_all(
            model, [features[i]["input_ids"] for i in order], eos_token_id=tokenizer.chat_stop_ids(), max_length=max_length,
            prefix_kv=prefix_kv, params=params, seeds=[seed + i for i in order], batch_size=batch_size, cancel=cancel,
            progress=progress, on_output=take,
        )
        for k, ids in enumerate(new_ids):  # what a stop cut short
            if order[k] not in predictions:
                take(k, ids)
        stopped = cancel is not None and cancel.is_set()
        preds = [predictions.get(i, "") for i in mine]
        golds = [labels[i] for i in mine]
        result = EvalResult({}, preds, golds, time.perf_counter() - start, stopped=stopped)
        if world == 1 and not result.stopped:
            result.metrics = scorer.mean(mine) if scorer is not None else compute_metrics(preds, golds)
            result.seconds = time.perf_counter() - start
    finally:
        if scorer is not None:
            scorer.close()
    if world == 1 and not result.stopped and output_dir is not None:
        write_eval_outputs(output_dir, result, extra_metrics)
    return result


def merge_shards(shards: Sequence[EvalResult]) -> EvalResult:
    """Put the per-rank results of ``evaluate(shard=(r, world))`` back in the data's order and score them."""
    world = len(shards)
    n = sum(len(s.predictions) for s in shards)
    preds, golds = [""] * n, [""] * n
    for rank, part in enumerate(shards):
        for j, (p, g) in enumerate(zip(part.predictions, part.labels)):
            preds[rank + j * world], golds[rank + j * world] = p, g
    stopped = any(s.stopped for s in shards)
    metrics = {} if stopped else compute_metrics(preds, golds)
    return EvalResult(metrics, preds, golds, max((s.seconds for s in shards), default=0.0), stopped=stopped)


def write_eval_outputs(output_dir: Union[str, Path], result: EvalResult, extra: Optional[dict] = None) -> Path:
    """``generated_predictions.txt`` (stripped, as the original writes it) and ``metrics.json``."""
    output_dir = Path(output_dir)
    write_predictions(output_dir / PREDICTIONS_FILE, [p.strip() for p in result.predictions], [g.strip() for g in result.labels])
    body = {**result.metrics, "num_examples": len(result.predictions), "runtime_s": round(result.seconds, 3)}
    body.update(extra or {})
    atomic_write_text(output_dir / METRICS_FILE, json.dumps(body, ensure_ascii=False, indent=2) + "\n")
    result.output_dir = output_dir
    return output_dir
