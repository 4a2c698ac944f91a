"""A timeline of the batcher's steps while ChatEngine replies run concurrently: where a reply waits.

    python bench/trace_engine.py --model DIR --quantization 8bit [--rows 1,2,8,64] [--repeat 2]

For each row count, the replies of ``bench_engine.concurrent`` (one thread each, as a user's program
would run them) with every ``decoder.step()`` timed (its rows, the prompts it prefilled and their
tokens), the time the batcher thread spends between steps, Triton compiles as they happen, and a
sampler that records the batcher thread's Python stack every 2 ms: the frames seen most during the
slowest steps say what they waited on. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


class StepTrace:
    """Every ``decoder.step()`` of one decoder, timed, with a stack sampler on the thread that calls it."""

    def __init__(self, decoder, interval_s: float = 0.002, sample: bool = True):
        """``sample`` False: steps and compiles only (no sampler thread taking the GIL every ``interval_s``)."""
        self.decoder, self.interval = decoder, interval_s
        self.steps: list = []  # (start, end, running rows, prompts, prompt tokens)
        self.samples: list = []  # (time, frames top-down as "file:line func")
        self.compiles: list = []  # (start, seconds, kernel)
        self.submitted: list = []  # when each request reached the decoder's check (the submitting thread)
        self.admitted: list = []  # when each request became a decoder row (the decoding thread, before its step)
        self._thread_id = None
        self._stop = threading.Event()
        self._original = decoder.step
        decoder.step = self._step
        self._check, self._add = decoder.check, decoder.add
        decoder.check = lambda request: self.submitted.append(time.perf_counter()) or self._check(request)
        decoder.add = lambda row, request: self.admitted.append(time.perf_counter()) or self._add(row, request)
        if sample:
            threading.Thread(target=self._sample, daemon=True).start()
        self._hook_compiles()

    def close(self) -> None:
        self._stop.set()
        self.decoder.step, self.decoder.check, self.decoder.add = self._original, self._check, self._add

    def clear(self) -> None:
        for log in (self.steps, self.samples, self.compiles, self.submitted, self.admitted):
            log.clear()

    def _step(self):
        self._thread_id = threading.get_ident()
        d = self.decoder
        running, pending = len(getattr(d, "_rows", None) or getattr(d, "_running", ())), len(d._pending)
        prompt_tokens = sum(len(r.tokens) - getattr(r, "cached", 0) for r in d._pending)
        t0 = time.perf_counter()
        out = self._original()
        self.steps.append((t0, time.perf_counter(), running, pending, prompt_tokens))
        return out

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            if self._thread_id is None:
                continue
            frame = sys._current_frames().get(self._thread_id)
            stack = []
            while frame is not None and len(stack) < 12:
                code = frame.f_code
                stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            self.samples.append((time.perf_counter(), stack))

    def _hook_compiles(self) -> None:
        """Time triton.compile calls (a kernel's first use with new constants or argument specialisations)."""
        try:
            import triton.compiler.compiler as tc
            import triton.runtime.jit as tj
        except ImportError:
            return
        original = tc.compile

        def timed(src, *a, **kw):
            t0 = time.perf_counter()
            try:
                return original(src, *a, **kw)
            finally:
                name = getattr(getattr(src, "fn", None), "__name__", None) or type(src).__name__
                self.compiles.append((t0, time.perf_counter() - t0, name))

        tc.compile = timed
        if getattr(tj, "compile", None) is original:
            tj.compile = timed

    def summary(self, t0: float) -> dict:
        steps = [s for s in self.steps if s[1] >= t0]
        if not steps:
            return {}
        decode = [1e3 * (e - s) for s, e, r, p, _ in steps if p == 0]
        gaps = [1e3 * (b[0] - a[1]) for a, b in zip(steps, steps[1:])]
        prefills = [{"at_ms": round(1e3 * (s - t0), 1), "ms": round(1e3 * (e - s), 1), "running": r, "prompts": p,
                     "prompt_tokens": n} for s, e, r, p, n in steps if p]
        slow = sorted(steps, key=lambda s: s[0] - s[1])[:3]
        return {"steps": len(steps), "decode_step_ms_p50": round(statistics.median(decode), 2) if decode else None,
                "decode_step_ms_max": round(max(decode), 2) if decode else None,
                "gap_ms_p50": round(statistics.median(gaps), 3) if gaps else None,
                "gap_ms_sum": round(sum(gaps), 1), "first_step_at_ms": round(1e3 * (steps[0][0] - t0), 1),
                "prefills": prefills[:8],
                "compiles": [{"at_ms": round(1e3 * (s - t0), 1), "ms": round(1e3 * d, 1), "kernel": k}
                             for s, d, k in self.compiles if s >= t0],
                "slowest": [{"at_ms": round(1e3 * (s - t0), 1), "ms": round(1e3 * (e - s), 1), "running": r, "prompts": p,
                             "top_frames": self._frames_between(s, e)} for s, e, r, p, _ in slow]}

    def _frames_between(self, start: float, end: float, top: int = 4) -> list:
        """The innermost project frames seen most often while the thread was in [start, end]."""
        counts = collections.Counter()
        for t, stack in self.samples:
            if start <= t <= end and stack:
                counts[" < ".join(stack[:3])] += 1
        return [f"{n}x {k}" for k, n in counts.most_common(top)]


def main() -> None:
    from backend.engine import ChatEngine
    from backend.service import SamplingParams
    from bench_engine import concurrent, json_lines, query_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--rows", default="1,2,8,64")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    emit = json_lines()
    rows = [int(r) for r in args.rows.split(",")]
    engine = ChatEngine.load(args.model, quantization=args.quantization, max_batch=max(rows))
    t0 = time.perf_counter()
    engine.warm_up()  # as the app (in the background) and the server do
    emit(what="warm_up", seconds=round(time.perf_counter() - t0, 1))
    trace = StepTrace(engine.decoder)
    q64 = query_of(engine.tokenizer, 64)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    for n in rows:
        for k in range(args.repeat):
            queries = [q64[: len(q64) - (i % 7)] + str(i + 100 * k) for i in range(n)]
            t0 = time.perf_counter()
            result = concurrent(engine, queries, greedy)
            emit(what="engine", repeat=k, **result, **trace.summary(t0))
    trace.close()
    engine.close()


if __name__ == "__main__":
    main()
