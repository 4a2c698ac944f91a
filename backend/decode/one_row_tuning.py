"""The one-row step's GEMV tiles, tuned on the card at hand inside the captured step, cached per GPU model.

A GEMV timed alone ranks tiles differently from the same GEMV inside the step, where each launch overlaps the tail
of the kernel before it and the prologues and epilogues do more: on the H100, coordinate descent over the captured
step found a step 12% faster than the tiles that won one kernel at a time (bench/NOTES.md run 5,
bench/explore_gemv.py). ``int8_gemv.DEFAULT_GEMV`` holds that H100 descent's result; this runs the same descent
on any card at its first warm-up (the app's, in the background; the server's, before it listens): for each linear
kind in turn, each candidate tile's step graph is timed
against the best so far's, interleaved, and kept when faster by more than ``KEEP_GAIN`` and when its logits are the
default tiles' (``tuning.agrees``: a tile a compiler or card gets wrong never wins). The winners go to
``kernels.tuning``'s file for this GPU model, so later starts (and ``glmchat --prompt``, which does not warm up)
read them. ``GLMCHAT_KERNEL_TUNING=0`` keeps the defaults.

4-bit layers (NF4, the int4 release) are tuned the same way among ``quant_linear``'s one-row tiles (its words
kernel), starting from the tile its own tuner picked timing each linear alone: on an H100 that tuner took a
two-warp tile for NF4's fc1 that made the step 0.19 ms slower than the tile before it (bench/NOTES.md run 39).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, replace
from typing import Callable, Optional, Union

import torch

from ..kernels.gemv_4bit import QuantLinearConfig, candidate_configs
from ..kernels.int8_gemv import GemvConfig, default_gemv_config
from ..kernels import packed_products, tuning, untested_persistent_tiles, weight_prefetch

# a kind's tile: the one-row GEMV's (int8, 16-bit), quant_linear's (4-bit), or None (4-bit: quant_linear's own pick)
Tile = Optional[Union[GemvConfig, QuantLinearConfig]]

log = logging.getLogger("glmchat.tuning")

KEEP_GAIN = 0.003  # a candidate must beat the best step by this share (run 5: timing noise in graphs ~0.1%)
ROUNDS, REPLAYS = 3, 20  # a comparison: medians of ROUNDS alternating timings of REPLAYS replays each
KINDS = ("output", "fc1", "fc2", "qkv", "dense")  # the biggest weights first
# a whole step's logits may differ from the default tiles' by this share: every linear's summation order changes,
# and random weights amplify it (bench/NOTES.md run 4: rounding order alone, 1.3e-2); wrong tiles give ~1
STEP_AGREEMENT = 0.1


def _c(bp, bk, w=4, cvt=2, rs=False, pf=False, xt=False) -> GemvConfig:
    return GemvConfig(block_p=bp, block_k=bk, num_warps=w, cvt=cvt, row_sum=rs, prefetch=pf, x_tile=xt)


# around the H100 descent's winners, and a few further away (bench/explore_gemv.py's sets); each kind's default is
# timed first and is the one to beat. Last, tiles that load x in the weight tile's layout (x_tile: no barrier in
# the K loop, sm_90 PTX; x read once a thread row instead of once a program)
CANDIDATES = {
    "int8": {
        "output": [_c(16, 1024, 8, rs=True), _c(8, 512, rs=True), _c(4, 1024, rs=True), _c(4, 512, xt=True)],
        "fc1": [_c(8, 2048, rs=True), _c(4, 4096, 8, rs=True), _c(4, 1024, rs=True), _c(2, 2048, cvt=0, rs=True),
                _c(4, 1024, xt=True), _c(2, 1024, xt=True)],
        "fc2": [_c(4, 1024, cvt=0, pf=True), _c(2, 1024, cvt=2, pf=True), _c(2, 512, cvt=0, pf=True), _c(4, 1024, rs=True),
                _c(2, 1024, cvt=0, pf=True, xt=True), _c(4, 1024, cvt=0, pf=True, xt=True)],
        "qkv": [_c(8, 512, rs=True), _c(2, 1024, rs=True), _c(4, 1024, cvt=0, rs=True), _c(2, 1024, xt=True),
                _c(4, 512, xt=True)],
        "dense": [_c(4, 512, rs=True), _c(2, 1024, cvt=2, pf=True), _c(1, 1024), _c(2, 1024, cvt=1, xt=True),
                  _c(2, 512, cvt=1, xt=True)],
    },
    "float": {
        "output": [_c(4, 1024, rs=True), _c(16, 1024, 8, rs=True), _c(8, 512, rs=True), _c(2, 1024, xt=True)],
        "fc1": [_c(2, 1024, rs=True), _c(4, 1024, rs=True), _c(2, 2048, rs=True), _c(2, 1024, xt=True)],
        "fc2": [_c(2, 1024, rs=True), _c(1, 1024, pf=True), _c(1, 512), _c(1, 1024, pf=True, xt=True)],
        "qkv": [_c(2, 1024, rs=True), _c(4, 512, rs=True), _c(1, 1024, pf=True), _c(2, 1024, xt=True)],
        "dense": [_c(4, 1024, rs=True), _c(1, 512), _c(1, 1024, pf=True), _c(1, 1024, pf=True, xt=True)],
    },
}


def linears_by_kind(decoder) -> dict[str, list]:
    """The decoder's BatchLinears by the kind whose tile they share: output, qkv, dense, fc1, fc2."""
    by_kind = {"output": [decoder.output]}
    for lw in decoder.layers:
        for kind, lin in (("qkv", lw.qkv), ("dense", lw.dense), ("fc1", lw.up), ("fc2", lw.down)):
            by_kind.setdefault(kind, []).append(lin)
    return by_kind


def _label_and_shape(lin) -> tuple[str, tuple]:
    """A linear's weights, "int8" or "float" when read through the one-row GEMV, else the 4-bit format; its shape."""
    if lin.one_row is not None:
        return ("int8" if lin.q is not None else "float"), tuple(lin.one_row.weight.shape)
    return lin.q.fmt, (lin.q.n, lin.q.k)


def _weights(decoder) -> dict[str, str]:
    """Each tuned kind's weights, "int8" or "float" (an 8-bit model keeps its output layer in 16 bits)."""
    return {kind: _label_and_shape(lins[0])[0] for kind, lins in linears_by_kind(decoder).items()}


def tuning_key(decoder) -> str:
    """The step's shapes and weights: tiles tuned for one model size and precision hold for those only."""
    lw = decoder.layers[0]
    (qkv_label, qkv_shape), (_, down_shape) = _label_and_shape(lw.qkv), _label_and_shape(lw.down)
    out_label, out_shape = _label_and_shape(decoder.output)
    shape = "x".join(str(s) for s in (len(decoder.layers), *qkv_shape, *down_shape, out_shape[0]))
    return f"one_row_step:{qkv_label}-{out_label}:{str(decoder.dtype).replace('torch.', '')}:{shape}"


def apply(decoder, configs: dict[str, Tile]) -> None:
    """Every linear of each kind in ``configs`` runs that tile from the next capture on."""
    for kind, lins in linears_by_kind(decoder).items():
        if kind in configs:
            for lin in lins:
                lin.row_config = configs[kind]


def defaults(decoder) -> dict[str, Tile]:
    """Each kind's starting tile: the one-row GEMV's default, or None for 4-bit weights (quant_linear's own pick)."""
    return {kind: default_gemv_config(kind, w == "int8") if w in ("int8", "float") else None
            for kind, w in _weights(decoder).items()}


# int8 against fp16 x (the 8-bit default), products two at a time (int8_gemv's CVT 3), last: (row pairs, K tile,
# warps, prefetch); programs of one or two warps reduce their rows within a warp (no shared memory, no barrier).
# With prefetch a program asks for its first K tile before waiting on the kernel ahead (PDL), so its loads fill
# that kernel's tail; at 4096 a row's whole K (qkv, dense, fc1) comes before the wait
PACKED_INT8 = ((4, 1024, 4, False), (2, 1024, 4, False), (8, 1024, 4, False), (4, 2048, 4, False),
               (2, 1024, 2, False), (2, 2048, 2, False), (1, 1024, 1, False),
               (2, 1024, 4, True), (2, 2048, 2, True), (4, 1024, 4, True), (2, 4096, 4, True))
# the persistent kernel (kernels/persistent_gemv.py): (row pairs a block, warps, programs an SM), within the register
# file at that many programs (sm_90, ptxas -v). int8 (fp16 products): 1 pair at 4 warps 48-64 registers, fc2's 167;
# 2 pairs 95-110, fc2's 255 with spills; at 8 warps 32-80 and 58-182. 16-bit weights: 1 pair at 4 warps 124-131,
# fc2's spills; 2 pairs 162-168; at 8 warps 62-63 (fc2's 174) and 93-102
PERSISTENT_TILES = {
    "int8": ((1, 4, 4), (2, 4, 4), (1, 8, 2), (2, 8, 2), (2, 8, 1), (4, 4, 2)),
    "float": ((1, 4, 3), (2, 4, 2), (1, 8, 2), (1, 8, 4), (2, 8, 2), (1, 8, 1)),
}
# those also tried with blocks asked of L2 ahead (kernels/weight_prefetch.py): tiles that spill at none of the four
# linears (registers as above: prefetches hold none)
PREFETCHING_TILES = {"int8": ((1, 4, 4), (1, 8, 2)), "float": ((1, 8, 2), (1, 8, 4))}


def persistent_candidates(weights: str) -> list[GemvConfig]:
    """The persistent kernel's tiles for "int8" (fp16 products, CVT 3) or "float" weights, where offered
    (``kernels.untested_persistent_tiles``: not yet by default); then, on a GPU, ``PREFETCHING_TILES`` with blocks
    asked of L2 2 or 4 blocks ahead."""
    if not untested_persistent_tiles():
        return []
    cvt = 3 if weights == "int8" else 2
    tiles = [GemvConfig(block_p=bp, block_k=0, num_warps=w, cvt=cvt, programs_per_sm=p)
             for bp, w, p in PERSISTENT_TILES[weights]]
    if weight_prefetch.tried():
        tiles += [GemvConfig(block_p=bp, block_k=0, num_warps=w, cvt=cvt, programs_per_sm=p, l2_ahead=ahead)
                  for bp, w, p in PREFETCHING_TILES[weights] for ahead in weight_prefetch.BLOCKS_AHEAD]
    return tiles


def candidates_for(decoder) -> dict[str, list]:
    """Each kind's candidate tiles for this decoder's weights (int8, 16-bit or 4-bit), in descent order."""
    weights, by_kind = _weights(decoder), linears_by_kind(decoder)
    packed = decoder.dtype == torch.float16 and packed_products.tried()
    out = {}
    for k in KINDS:
        if weights[k] in CANDIDATES:
            out[k] = CANDIDATES[weights[k]][k]
            if weights[k] == "float":
                out[k] = out[k] + persistent_candidates("float")
            elif packed:  # int8 weights against fp16 rows: the products two at a time (CVT 3)
                out[k] = out[k] + [_c(bp, bk, w, cvt=3, pf=pf) for bp, bk, w, pf in PACKED_INT8]
                out[k] = out[k] + persistent_candidates("int8")
        else:
            out[k] = four_bit_candidates(by_kind[k][0].q, decoder.dtype, swiglu=k == "fc1")
    return out


# (block_n, block_k, warps) of the words tiles that won a 4-bit one-row step on the H100 and H200
EARLY_4BIT = {(2, 1024, 4), (4, 1024, 4), (2, 2048, 4), (4, 2048, 4)}


def four_bit_candidates(q, dtype: torch.dtype, swiglu: bool) -> list[QuantLinearConfig]:
    """quant_linear's words and persistent tiles at one row, those with the register or shared table where these rows
    have one (16-bit rows on a GPU), else the others: the tiles its own tuner tries, less the older GEMV's (slower at one row on
    every card measured, bench/NOTES.md runs 18-20); then the likeliest words tiles with their first K step early."""
    table = dtype in q.table_registers and packed_products.tried()
    tiles = [c for c in candidate_configs(q.fmt, 1, swiglu)
             if c.kernel in ("words", "persistent") and (c.lut >= 3) == table]
    return tiles + early_first_step(tiles)


def early_first_step(tiles: list[QuantLinearConfig]) -> list[QuantLinearConfig]:
    """Those of ``tiles`` that won a 4-bit step on the H100 and H200, with their first K step's words asked for
    before the wait on the kernel ahead (the step launches its kernels as programmatic dependents)."""
    return [replace(c, prefetch=True) for c in tiles if (c.block_n, c.block_k, c.num_warps) in EARLY_4BIT]


def cached(decoder) -> Optional[dict[str, Tile]]:
    """This card's winners for this step, if they were picked from today's candidates (else: tune again)."""
    fields = dict(tuning.lookup(tuning.cache_file(decoder.device), tuning_key(decoder)) or {})
    if fields.pop("_among", None) != tuning.candidates_digest(candidates_for(decoder).items()):
        return None
    try:
        return {kind: QuantLinearConfig(**f) if "kernel" in f else GemvConfig(**f)
                for kind, f in fields.items()} if fields else None
    except TypeError:  # written by an older config class: tune again
        return None


class WrongResult(RuntimeError):
    """A candidate's step gives other logits than the default tiles' step."""


def descend(start: dict[str, Tile], candidates: dict[str, list], measure: Callable[[dict], Callable[[], float]],
            keep_gain: float = KEEP_GAIN, rounds: int = ROUNDS) -> dict[str, Tile]:
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
                log.warning("one-row tuning: %s %s computes a different step on this card, not used: %s", kind,
                            tuning.describe(cand), exc)
                continue
            except Exception as exc:  # noqa: BLE001 - out of resources on this card: not a candidate here
                log.info("one-row tuning: %s %s failed: %s", kind, tuning.describe(cand), exc)
                continue
            t_cand, t_best = (statistics.median(t) for t in zip(*times))
            log.debug("one-row tuning: %s %s: %.4f ms, the best so far %.4f", kind, tuning.describe(cand), t_cand,
                      t_best)
            if t_cand < t_best * (1 - keep_gain):
                best, best_run = trial, run
    return best


def check_step(reference: list, logits: torch.Tensor) -> None:
    """The first step's logits become ``reference``; a later step's off them raises ``WrongResult``."""
    if not reference:
        reference.append(logits.detach().clone())
    elif not tuning.agrees(logits, reference[0], STEP_AGREEMENT):
        raise WrongResult(f"logits off the default tiles' by {tuning.difference(logits, reference[0]):.2g}")


def graph_timer(decoder, step: Callable) -> Callable[[dict], Callable[[], float]]:
    """``descend``'s ``measure`` on CUDA: the step captured with those tiles, timed over REPLAYS replays by CUDA
    events (no host time in it). Each step's logits are checked against the first one measured (the defaults):
    every replay writes the same cache slot, so steps differ only by their tiles' rounding."""
    from ..cuda_streams import warm_and_capture

    reference: list[torch.Tensor] = []

    def measure(configs: dict) -> Callable[[], float]:
        apply(decoder, configs)
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


def tune(decoder, measure: Callable[[dict], Callable[[], float]]) -> dict[str, Tile]:
    """The descent for this decoder's weights, the winners applied and stored for later starts on this GPU model."""
    start, candidates = defaults(decoder), candidates_for(decoder)
    best = descend(start, candidates, measure)
    apply(decoder, best)
    winners = {k: asdict(c) for k, c in best.items() if c is not None}  # (None: quant_linear's own pick)
    tuning.store(tuning.cache_file(decoder.device), tuning_key(decoder),
                 {**winners, "_among": tuning.candidates_digest(candidates.items())})
    changed = {k: tuning.describe(c) for k, c in best.items() if c != start[k] and c is not None}
    log.info("one-row step tuned on %s: %s", decoder.device, changed or "the defaults")
    return best
