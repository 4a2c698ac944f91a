"""Kernel tiles tuned inside a captured decode step, by coordinate descent over the step's graph, cached per GPU model.

A kernel timed alone ranks tiles differently from the same kernel inside the step, where each launch overlaps the
tail of the kernel before it and the prologues and epilogues do more: on the H100, the descent over the captured
one-row step found a step 12% faster than the tiles that won one kernel at a time (bench/NOTES.md run 5), and a
4-bit tile picked alone made that step 0.19 ms slower (run 39). So a step whose tiles matter is described by a
``StepTiles`` (one_row_tuning: one row's step) and tuned here: for each linear
kind in turn, each candidate tile's step graph is timed against the best so far's, interleaved, and kept when
faster by more than ``KEEP_GAIN`` and when its logits are the starting tiles' (``tuning.agrees``: a tile a
compiler or card gets wrong never wins). The winners go to ``kernels.tuning``'s file for this GPU model, tagged
with a digest of the candidates, so later starts read them and new candidates tune again.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..kernels import tuning

log = logging.getLogger("glmchat.tuning")

KEEP_GAIN = 0.003  # a candidate must beat the best step by this share (run 5: timing noise in graphs ~0.1%)
ROUNDS, REPLAYS = 3, 20  # a comparison: medians of ROUNDS alternating timings of REPLAYS replays each
# a whole step's logits may differ from the starting tiles' by this share: every linear's summation order changes,
# and random weights amplify it (bench/NOTES.md run 4: rounding order alone, 1.3e-2); wrong tiles give ~1
STEP_AGREEMENT = 0.1


@dataclass
class StepTiles:
    """What the descent needs to know about one step's tiles."""

    name: str  # for the log: "one-row"
    key: str  # the tuning file's key: the step's shapes and weights (tiles hold for those only)
    start: dict  # each kind's starting tile; None: the kernel's own pick, tuned alone
    candidates: dict  # each kind's candidate tiles, in descent order
    apply: Callable[[dict], None]  # the decoder's linears run these tiles from the next capture on
    parse: Callable[[str, dict], object]  # a stored tile's fields (by kind) -> its config


def cached(tiles: StepTiles, device: torch.device) -> Optional[dict]:
    """This card's winners for this step, if they were picked from today's candidates (else None: tune again); {}
    where every kind kept its starting tile."""
    fields = dict(tuning.lookup(tuning.cache_file(device), tiles.key) or {})
    if fields.pop("_among", None) != tuning.candidates_digest(tiles.candidates.items()):
        return None
    try:
        return {kind: tiles.parse(kind, f) for kind, f in fields.items()}
    except TypeError:  # written by an older config class: tune again
        return None


def tune(tiles: StepTiles, device: torch.device, measure: Callable[[dict], Callable[[], float]]) -> dict:
    """The descent from ``tiles.start``, the winners applied and stored for later starts on this GPU model."""
    best = descend(tiles.start, tiles.candidates, measure)
    tiles.apply(best)
    winners = {k: asdict(c) for k, c in best.items() if c is not None}  # (None: the kernel's own pick)
    tuning.store(tuning.cache_file(device), tiles.key,
                 {**winners, "_among": tuning.candidates_digest(tiles.candidates.items())})
    changed = {k: c for k, c in best.items() if c != tiles.start.get(k)}
    log.info("%s step tuned on %s: %s", tiles.name, device, changed or "the starting tiles")
    return best


class WrongResult(RuntimeError):
    """A candidate's step gives other logits than the starting tiles' step."""


def descend(start: dict, candidates: dict, measure: Callable[[dict], Callable[[], float]],
            keep_gain: float = KEEP_GAIN, rounds: int = ROUNDS) -> dict:
    """Coordinate descent from ``start``: ``measure(configs)`` builds that step (a graph) and returns a function
    timing it once (ms). Each candidate of each kind against the best so far, alternately ``rounds`` times, kept when
    its median is faster by more than ``keep_gain``. A candidate that fails to build, or whose step ``measure``
    finds wrong (``WrongResult``), is skipped."""
    best, best_run = dict(start), measure(start)
    for kind, cands in candidates.items():
        for cand in cands:
            if cand == best.get(kind):
                continue
            trial = dict(best, **{kind: cand})
            try:
                run = measure(trial)
                times = [(run(), best_run()) for _ in range(rounds)]
            except WrongResult as exc:
                log.warning("step tuning: %s %s computes a different step on this card, not used: %s", kind, cand, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - out of resources on this card: not a candidate here
                log.info("step tuning: %s %s failed: %s", kind, cand, exc)
                continue
            t_cand, t_best = (statistics.median(t) for t in zip(*times))
            if t_cand < t_best * (1 - keep_gain):
                best, best_run = trial, run
    return best


def check_step(reference: list, logits: torch.Tensor) -> None:
    """The first step's logits become ``reference``; a later step's off them raises ``WrongResult``."""
    if not reference:
        reference.append(logits.detach().clone())
    elif not tuning.agrees(logits, reference[0], STEP_AGREEMENT):
        raise WrongResult(f"logits off the default tiles' by {tuning.difference(logits, reference[0]):.2g}")


def graph_timer(decoder, step: Callable, apply: Callable[[dict], None]) -> Callable[[dict], Callable[[], float]]:
    """``descend``'s ``measure`` on CUDA: ``step`` captured with those tiles (``apply``), timed over REPLAYS
    replays by CUDA events (no host time in it). Each step's logits are checked against the first one measured
    (the starting tiles): every replay writes the same cache slots, so steps differ only by their tiles' rounding."""
    from ..cuda_streams import warm_and_capture

    reference: list[torch.Tensor] = []

    def measure(configs: dict) -> Callable[[], float]:
        apply(configs)
        graph, outputs = warm_and_capture(step, decoder.device, decoder._pool)
        graph.replay()
        check_step(reference, outputs[0])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def time_once() -> float:
            start.record()
            for _ in range(REPLAYS):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / REPLAYS

        return time_once

    return measure
