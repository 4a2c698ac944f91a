"""Kernel tile configs tuned on first use per GPU model and shape, cached on disk.

A kernel wrapper asks ``pick(kernel, key, candidates, run, device)``: the cached winner for this GPU
model and key (if it was picked from the same candidates), else (outside CUDA-graph capture, with tuning on) each candidate timed on
scratch buffers (``cuda_timer``: GPU time, in a CUDA graph, L2 flushed) and the fastest one stored, else the first candidate
(the hand-picked default). A candidate whose output on the scratch buffers is not the default's, rounding
apart, is never picked and is reported: speed is measured on the card, but correctness was only checked by
Triton's interpreter and our tests, and a kernel a compiler version or card gets wrong must not win. The cache is one JSON file per GPU model under
``<user cache dir>/kernel-tuning/`` (``backend.user_cache.cache_root``: $GLMCHAT_CACHE_DIR overrides), so a
card is tuned once, not on every start, and configs come from the card at hand instead of H100 constants.
``GLMCHAT_KERNEL_TUNING=0`` turns tuning off (defaults or what is cached are used).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch

from ..cuda_streams import warm_and_capture
from ..user_cache import cache_root

C = TypeVar("C")

# bump when a kernel changes in a way that makes old timings meaningless, or old picks untrustworthy (3: picks are
# checked against the default's output; 4: timed on the GPU alone, where before small kernels were timed with their
# Python launch)
TUNING_VERSION = 4
# a candidate's output may differ from the default's by this share (norm of the difference over the default's
# norm): different summation orders rounded to 16 bits differ by ~1e-3, a kernel that computes something else by ~1
AGREEMENT = 2e-2

_lock = threading.Lock()
_loaded: dict[Path, dict] = {}  # cache file -> {key: config fields}


def tuning_enabled() -> bool:
    return os.environ.get("GLMCHAT_KERNEL_TUNING", "1") != "0"


def cache_file(device: torch.device) -> Path:
    """The JSON file holding the tuned configs of this device's GPU model."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "gpu"
    return cache_root() / "kernel-tuning" / f"{slug}.json"


def _table(path: Path) -> dict:
    if path not in _loaded:
        try:
            data = json.loads(path.read_text())
            ok = data.get("version") == TUNING_VERSION
            _loaded[path] = data.get("configs", {}) if ok else {}
        except (OSError, ValueError):  # absent or damaged: tune again
            _loaded[path] = {}
    return _loaded[path]


def lookup(path: Path, key: str) -> Optional[dict]:
    with _lock:
        return _table(path).get(key)


def store(path: Path, key: str, fields: dict) -> None:
    """Record a winner and rewrite the file atomically (other processes may read it meanwhile)."""
    with _lock:
        table = _table(path)
        table[key] = fields
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": TUNING_VERSION, "configs": table}, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:  # a read-only cache dir: keep the winner for this process only
            pass


TIMED_REPLAYS, WARM_REPLAYS = 25, 3


def cuda_timer(fn: Callable[[], None], device: Optional[torch.device] = None) -> float:
    """Median GPU milliseconds of one ``fn``: captured once into a CUDA graph, each replay timed by CUDA events
    after the L2 cache is flushed (a decode step reads each weight once, cold). Timing launches from Python, as
    ``triton.testing.do_bench`` does, measures the wrapper's host time wherever it exceeds the kernel's (a 4-bit
    GEMV of 4096 x 4096 takes a few us; bench/NOTES.md run 20), and ranks configs by noise. The flush (twice the
    L2, ~30 us) outlasts the host's graph launch, so the GPU never waits for the host inside a timed window.
    An ``fn`` that cannot be captured is timed as launched."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    try:
        graph, _ = warm_and_capture(fn, device, None)
    except Exception:  # noqa: BLE001 - e.g. a host sync inside fn: time the launches instead
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    flush = _flush_buffer(device)
    events = []
    for i in range(WARM_REPLAYS + TIMED_REPLAYS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        if i >= WARM_REPLAYS:
            events.append((start, end))
    torch.cuda.synchronize(device)
    return sorted(start.elapsed_time(end) for start, end in events)[TIMED_REPLAYS // 2]


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice this GPU's L2 cache in bytes (do_bench takes 256 MB); freed into torch's cache after the timing."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 64 << 20
    return torch.empty(2 * l2, dtype=torch.int8, device=torch.device("cuda", index))


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on this thread: a pick made then is the default, not to be kept."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick(
    key: str,
    candidates: Sequence[C],
    run: Callable[[C], Optional[torch.Tensor]],
    device: torch.device,
    timer: Optional[Callable[[Callable[[], None]], float]] = None,
) -> C:
    """The config to use for ``key`` (kernel, shape and dtype) on ``device``: cached, tuned now, or the default.

    ``candidates[0]`` is the default; ``run(config)`` launches the kernel once on scratch buffers and may return
    its output, which every other candidate's must then match (``agrees``). A candidate that fails to compile
    or launch (too many registers or shared memory on this card), or gives another result, is skipped.
    ``timer`` defaults to ``cuda_timer``; on a CPU nothing is tuned unless a timer is given (tests)."""
    if not candidates:
        raise ValueError("no candidate configs")
    cls = type(candidates[0])
    path = cache_file(device)
    among = candidates_digest(candidates)
    fields = dict(lookup(path, key) or {})
    if fields.pop("_among", None) == among:  # a winner stands for the candidates it was picked from only
        try:
            return cls(**fields)
        except TypeError:  # written by an older config class: tune again
            pass
    if timer is None and device.type != "cuda":
        return candidates[0]
    if not tuning_enabled() or capturing(device) or len(candidates) == 1:
        return candidates[0]
    best = _fastest(key, candidates, run, timer or (lambda fn: cuda_timer(fn, device)))
    if best is None:
        return candidates[0]
    store(path, key, {**asdict(best), "_among": among})
    return best


def _fastest(key: str, candidates: Sequence[C], run: Callable[[C], Optional[torch.Tensor]],
             timer: Callable[[Callable[[], None]], float]) -> Optional[C]:
    """The fastest candidate that runs and agrees with the first one that ran (None if none ran)."""
    best, best_ms, failed, wrong, reference = None, float("inf"), [], [], None
    for cfg in candidates:
        try:
            out = run(cfg)  # compile outside the timing
            if isinstance(out, torch.Tensor):
                if reference is None:
                    reference = out.detach().clone()
                elif not agrees(out, reference):
                    wrong.append(f"{cfg} (off by {difference(out, reference):.2g})")
                    continue
            ms = timer(lambda: run(cfg))
        except Exception as exc:  # noqa: BLE001 - out of resources / unsupported on this card: not a candidate here
            failed.append(f"{cfg}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if failed:
        warnings.warn(f"kernel tuning for {key}: {len(failed)} of {len(candidates)} configs failed: "
                      + "; ".join(failed))
    if wrong:
        warnings.warn(f"kernel tuning for {key}: {len(wrong)} of {len(candidates)} configs compute a different "
                      f"result from the default on this card and are not used: " + "; ".join(wrong))
    return best


def difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Norm of the difference over the reference's norm (inf where ``out`` is not finite and the reference is)."""
    a, b = out.detach().float(), reference.detach().float()
    if a.shape != b.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return 0.0 if not torch.isfinite(b).all() else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def agrees(out: torch.Tensor, reference: torch.Tensor, tolerance: float = AGREEMENT) -> bool:
    """Whether a candidate's output is the reference's, rounding apart. A reference that is not finite (scratch
    data a kernel overflows on) judges nothing: any output agrees."""
    if not torch.isfinite(reference.detach()).all():
        return True
    return difference(out, reference) <= tolerance


def describe(config) -> str:
    """A config with every field, those kept out of its repr (and so out of ``candidates_digest``) too: for logs."""
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in asdict(config).items())})"


def candidates_digest(candidates: Sequence) -> str:
    """A short hash of a candidate list: a cached pick is tuned again once a kernel gains or loses candidates."""
    return hashlib.sha1(repr(list(candidates)).encode()).hexdigest()[:12]
