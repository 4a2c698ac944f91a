"""Where a cold long prompt's first token goes: a pasted 1600-token document that no cached row begins with.

    python bench/profile_long_prompt.py --model DIR --quantization 8bit [--tokens 1600]

Through ``ChatEngine.stream_reply`` as the app runs it, after the engine's warm-up: cold prompts (each begins
with text no earlier prompt began with, so every token is computed) timed three after a second with the GPU idle
and three right after GPU work (clocks up), the garbage collector's pauses inside each summed; three driven on
this thread (``host_profile``: no batcher thread, wall against GPU time, the last under cProfile). Then one more
under torch.profiler: its CUDA kernels summed by name (ms per prompt) and the GPU's idle gaps. The linears'
floating-point work (2 x weights x tokens) over the wall time is the prompt's achieved TFLOP/s.

Each cold prompt's line also says what it did for the first time in the process (``first_uses``): Triton kernels
compiled or loaded for a new specialization, and memory segments the caching allocator asked CUDA for. With
``--profile-first N`` the first N cold prompts (the slow ones of a process: ~47 ms against ~40 after) each run
under torch.profiler instead, their GPU busy and idle time and the CUDA runtime calls of every thread reported.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# distinct openings: no prompt shares more than the chat template with an earlier one
OPENINGS = "甲乙丙丁戊己庚辛壬癸"
EXTRA_OPENINGS = "子丑寅卯辰巳午未申酉戌亥"


def linear_weights(decoder) -> int:
    """Weights (elements) of every linear one token passes through, the output layer included."""
    def size(lin):
        return lin.q.n * lin.q.k if lin.q is not None else lin.w.numel()

    per_layer = sum(size(getattr(lw, k)) for lw in decoder.layers[:1] for k in ("qkv", "dense", "up", "down"))
    return per_layer * len(decoder.layers) + size(decoder.output)


def kernel_sums(prof, top: int = 16) -> list:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t, e.count, e.key[:80]))
    rows.sort(reverse=True)
    return [{"ms": round(t / 1e3, 2), "calls": c, "kernel": k} for t, c, k in rows[:top]]


class CollectorPauses:
    """The garbage collector's pauses (start, end, generation), from gc.callbacks."""

    def __init__(self):
        import gc

        self.spans, self._start = [], None
        gc.callbacks.append(self._on)

    def _on(self, phase, info) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.spans.append((self._start, time.perf_counter(), info["generation"]))

    def since(self, mark: int) -> dict:
        spans = self.spans[mark:]
        return {"gc_ms": round(1e3 * sum(e - s for s, e, _ in spans), 1), "gc_gen2": sum(g == 2 for *_, g in spans)}


def triton_variants() -> dict:
    """Compiled specializations of every Triton kernel in the process, by kernel name."""
    import gc

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts = {}
    for obj in gc.get_objects():
        if isinstance(obj, JITFunction):
            caches = getattr(obj, "device_caches", None) or {}
            n = sum(len(entry[0]) for entry in caches.values())
            if n:
                counts[obj.__name__] = counts.get(obj.__name__, 0) + n
    return counts


class FirstUses:
    """What a prompt did for the first time in the process: new Triton specializations (by kernel) and new memory
    segments from cudaMalloc (``torch.cuda.memory_stats``)."""

    def __init__(self):
        self.mark()

    def mark(self) -> None:
        import torch

        self._variants, self._segments = triton_variants(), torch.cuda.memory_stats().get("segment.all.allocated", 0)

    def since(self) -> dict:
        import torch

        variants = triton_variants()
        new = {k: v - self._variants.get(k, 0) for k, v in variants.items() if v > self._variants.get(k, 0)}
        out = {"new_triton_variants": new,
               "new_segments": torch.cuda.memory_stats().get("segment.all.allocated", 0) - self._segments}
        self.mark()
        return out


def runtime_calls(prof, top: int = 10) -> list:
    """The CUDA runtime and driver calls under ``prof`` (every thread's), by total host time."""
    rows = [(e.cpu_time_total, e.count, e.key) for e in prof.key_averages() if e.key.startswith(("cuda", "cu"))]
    return [{"ms": round(t / 1e3, 2), "calls": c, "call": k[:60]} for t, c, k in sorted(rows, reverse=True)[:top]]


def gap_sources(prof, longer_than_ms: float = 1.0, top: int = 4) -> list:
    """For each GPU idle gap longer than ``longer_than_ms``: the kernels on either side and the host events (every
    thread's operators and CUDA calls) that overlap it most, by overlap."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    out, end, last = [], kernels[0][1] if kernels else 0, kernels[0][2] if kernels else ""
    for start, stop, name in kernels[1:]:
        if start - end > longer_than_ms * 1e3:
            overlap = sorted(((min(stop_h, start) - max(start_h, end), e.name, e.thread)
                              for e in host for start_h, stop_h in [(e.time_range.start, e.time_range.end)]
                              if min(stop_h, start) > max(start_h, end)), reverse=True)[:top]
            out.append({"gap_ms": round((start - end) / 1e3, 2), "after": last[:50], "before": name[:50],
                        "host": [{"ms": round(o / 1e3, 2), "op": n[:60], "thread": t} for o, n, t in overlap]})
        if stop > end:
            end, last = stop, name
    return out


def gpu_gaps(prof, top: int = 6) -> dict:
    """The GPU's busy and idle time between the profiled prompt's first and last kernels, and its longest idle gaps
    (the host's side of them is ``host_profile``'s: torch.profiler records no host operations of the batcher's
    thread)."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    gaps, end = [], kernels[0][1] if kernels else 0
    for start, stop in kernels[1:]:
        if start > end:
            gaps.append(start - end)
        end = max(end, stop)
    return {"gpu_busy_ms": round(sum(b - a for a, b in kernels) / 1e3, 1), "gpu_idle_ms": round(sum(gaps) / 1e3, 1),
            "longest_gaps_ms": [round(g / 1e3, 2) for g in sorted(gaps, reverse=True)[:top]]}


def host_profile(engine, queries: list, emit) -> None:
    """Cold prompts driven on this thread (the batcher idle): the decoder's steps that run each, wall time against
    GPU time (CUDA events on the stream they launch on), and for the last one cProfile's functions by own time
    (where the host spends a prompt the GPU waits for)."""
    import cProfile
    import pstats

    import torch

    from backend.decode.protocol import DecodeRequest
    from backend.service import SamplingParams

    decoder, params = engine.decoder, SamplingParams(temperature=0.0, max_new_tokens=1)
    profiler = cProfile.Profile()
    with engine.batcher.step_lock, torch.inference_mode():
        for n, query in enumerate(queries):
            last = n == len(queries) - 1
            decoder.add(50_000 + n, DecodeRequest(engine.prompt_ids(query, []), params))
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            if last:
                profiler.enable()
            while decoder.rows:
                decoder.step()
            if last:
                profiler.disable()
            end.record()
            end.synchronize()
            emit(what="host_prompt", run=n + 1, cprofiled=last, wall_ms=round(1e3 * (time.perf_counter() - t0), 1),
                 gpu_ms=round(start.elapsed_time(end), 1))
    stats = pstats.Stats(profiler).stats
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:22]
    emit(what="host_functions", top=[{"fn": f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}", "calls": v[1],
                                      "own_ms": round(1e3 * v[2], 2), "cum_ms": round(1e3 * v[3], 2)} for k, v in top])


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from backend.engine import ChatEngine
    from backend.service import SamplingParams
    from bench_engine import QUERY, json_lines, query_of, timed_reply

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--tokens", type=int, default=1600)
    parser.add_argument("--profile-first", type=int, default=0,
                        help="run this many of the first cold prompts under torch.profiler (CUDA runtime calls, GPU gaps)")
    parser.add_argument("--lengths", type=lambda v: [int(t) for t in v.split(",") if t], default=[],
                        help="cold prompts of these token counts after the first six (e.g. 1200,1200,2000,2000)")
    parser.add_argument("--extra-warm", type=int, default=0,
                        help="cold prompts run (and reported) after the warm-up, before the measured ones: do the first "
                             "measured ones then take as long as the later ones?")
    args = parser.parse_args()
    emit = json_lines(quantization=args.quantization)
    engine = ChatEngine.load(args.model, quantization=args.quantization, max_batch=2)
    start = time.perf_counter()
    engine.warm_up()  # as the app (in the background) and the server do; it ends with a long prompt
    emit(what="warm_up", seconds=round(time.perf_counter() - start, 1))
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    flops = 2 * linear_weights(engine.decoder) * args.tokens
    queries = [query_of(engine.tokenizer, args.tokens, opening + QUERY) for opening in OPENINGS]
    for k in range(args.extra_warm):
        r = timed_reply(engine, query_of(engine.tokenizer, args.tokens, EXTRA_OPENINGS[k % len(EXTRA_OPENINGS)] + QUERY), params)
        emit(what="extra_warm", run=k + 1, first_token_ms=r["first_token_ms"])
    pauses, first_uses = CollectorPauses(), FirstUses()
    spin = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    spin_out = torch.empty_like(spin)
    before = {"idle": lambda: time.sleep(1.0),  # clocks down, as when a user pastes after reading
              "busy": lambda: [torch.mm(spin, spin, out=spin_out) for _ in range(1000)] and torch.cuda.synchronize()}
    for n, q in enumerate(queries[:6]):
        condition = ("idle", "busy")[n // 3]
        before[condition]()
        mark, profiled = len(pauses.spans), n < args.profile_first
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if profiled else contextlib.nullcontext() as prof:
            r = timed_reply(engine, q, params)
            torch.cuda.synchronize()
        seen = {"runtime_calls": runtime_calls(prof), **gpu_gaps(prof), "gaps": gap_sources(prof)} if profiled else {}
        emit(what="cold_prompt", condition=condition, first_token_ms=r["first_token_ms"], prompt_tokens=r["prompt_tokens"],
             linears_tflops=round(flops / (r["first_token_ms"] / 1e3) / 1e12, 1), profiled=profiled,
             **pauses.since(mark), **first_uses.since(), **seen)
    for n, tokens in enumerate(args.lengths):  # other lengths than the warm-up's: each twice, GPU idle before
        time.sleep(1.0)
        r = timed_reply(engine, query_of(engine.tokenizer, tokens, EXTRA_OPENINGS[-1 - n] + QUERY), params)
        emit(what="cold_prompt_length", first_token_ms=r["first_token_ms"], prompt_tokens=r["prompt_tokens"],
             **first_uses.since())
    host_profile(engine, queries[6:9], emit)
    before["busy"]()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = timed_reply(engine, queries[9], params)
        torch.cuda.synchronize()
    emit(what="cold_prompt_profiled", first_token_ms=r["first_token_ms"], **gpu_gaps(prof), kernels=kernel_sums(prof))
    engine.close()


if __name__ == "__main__":
    main()
