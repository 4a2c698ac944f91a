"""Evaluating a P-Tuning v2 prefix as ChatGLM2-6B's ``ptuning/main.py`` does with --predict_with_generate.

Every example's prompt is generated for in left-padded batches (positions come from the attention
mask, so a batch gives the same tokens as one-by-one), decoded with special tokens skipped, scored
with ROUGE-1/2/L and BLEU-4 by :mod:`backend.metrics`, and written to ``generated_predictions.txt``
and ``metrics.json``. Greedy decoding is the default; :data:`ORIGINAL_SAMPLING` reproduces the
original script's sampled predictions (temperature 0.95, top_p 0.7, and transformers' default top_k 50).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .atomic import atomic_write_text
from .data import Example, preprocess_eval
from .generation import logits_processors
from .kv_cache import KVCache
from .metrics import compute_metrics, write_predictions
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
    seconds: float = 0.0
    output_dir: Optional[Path] = None
    stopped: bool = False


@torch.inference_mode()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_length: int,
    prefix_kv: Optional[list[torch.Tensor]] = None,
    params: SamplingParams = GREEDY,
    generator: Optional[torch.Generator] = None,
    cancel: Optional[threading.Event] = None,
) -> list[list[int]]:
    """New token ids (eos excluded) for each prompt, decoded together in one left-padded batch.

    ``max_length`` bounds prompt + new tokens per prompt, like the original's ``max_length`` at batch 1,
    so a prompt's output does not depend on what it is batched with. ``prefix_kv`` is a prefix in
    ``split_prefix`` layout with batch 1 (e.g. ``AdapterRegistry.prefix_kv``); None = the base model.
    """
    device = model.get_input_embeddings().weight.device
    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # [b, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [b, width]
    budget = torch.tensor([max(0, max_length - len(p)) for p in prompts], device=device)  # new tokens allowed
    cache = KVCache.with_prefix([t.expand(b, *t.shape[1:]) for t in prefix_kv] if prefix_kv else None)
    procs = None if params.greedy else logits_processors(params)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = budget <= 0  # [b]
    feed, all_ids, produced = ids, ids, 0
    while not bool(done.all()):
        if cancel is not None and cancel.is_set():
            break
        logits = model(feed, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if procs is None:
            token = logits.argmax(-1)  # [b]
        else:
            scores = procs(all_ids, logits)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        produced += 1
        for i in (~done).nonzero()[:, 0].tolist():
            if int(token[i]) != eos_token_id:
                outputs[i].append(int(token[i]))
        done = done | (token == eos_token_id) | (produced >= budget)
        feed = token[:, None]
        all_ids = torch.cat((all_ids, feed), dim=1)
        mask = torch.cat((mask, mask.new_ones(b, 1)), dim=1)
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
    batch_size: int = 8,
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
    gathers the shards with :func:`merge_shards` and scores them. ``progress(done, total)`` is called per batch.
    """
    start = time.perf_counter()
    features = preprocess_eval(examples, tokenizer, max_source_length, max_target_length, source_prefix)
    rank, world = shard
    mine = list(range(rank, len(features), world))
    max_length = max_source_length + max_target_length + 1  # the original's max_seq_length
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=model.get_input_embeddings().weight.device)
        generator.manual_seed(seed + rank)
    # Similar lengths together wastes less padding; results do not depend on the batching.
    order = sorted(mine, key=lambda i: len(features[i]["input_ids"]))
    predictions: dict[int, str] = {}
    stopped = False
    for first in range(0, len(order), batch_size):
        if cancel is not None and cancel.is_set():
            stopped = True
            break
        chunk = order[first:first + batch_size]
        new_ids = generate_batch(
            model, [features[i]["input_ids"] for i in chunk], eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, max_length=max_length, prefix_kv=prefix_kv, params=params,
            generator=generator, cancel=cancel,
        )
        for i, ids in zip(chunk, new_ids):
            predictions[i] = tokenizer.decode(ids, skip_special_tokens=True)
        if progress is not None:
            progress(min(first + batch_size, len(order)), len(order))
    labels = {i: tokenizer.decode([t for t in features[i]["labels"] if t >= 0], skip_special_tokens=True) for i in mine}
    preds = [predictions.get(i, "") for i in mine]
    golds = [labels[i] for i in mine]
    result = EvalResult({}, preds, golds, time.perf_counter() - start, stopped=stopped or (cancel is not None and cancel.is_set()))
    if world == 1 and not result.stopped:
        result.metrics = compute_metrics(preds, golds)
        if output_dir is not None:
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
