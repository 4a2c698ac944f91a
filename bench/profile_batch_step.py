"""Where the batched fast decoder's time goes, layer by layer of the stack a user's request crosses.

    python bench/profile_batch_step.py --model DIR --quantization 8bit [--rows 1,8,64]

For each row count: the captured step alone (CUDA events over graph replays), ``decoder.step()``
(the step plus the decoder's host work), the ``Batcher`` with raw token readers, and ``ChatEngine``
replies (text included); the GPU kernels of one step (torch.profiler, top kernels by time); the
prompt (prefill) of 64-token rows and of one 1600-token prompt. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timing_graph(decoder, bucket: int):
    """The bucket's step captured as the decoder captures it, but not feeding itself from its last picks (so every
    replay runs the same positions: the decoder's own graph would move each running row on by one a replay)."""
    from backend.cuda_streams import warm_and_capture

    graph, _ = warm_and_capture(lambda: decoder._step_math(bucket, feed=False), decoder.device, decoder._pool)
    return graph


def captured_step_ms(decoder, bucket: int, n: int = 50) -> float:
    from check_grad_kernel import replay_ms

    return replay_ms(timing_graph(decoder, bucket), n)


def kernel_table(decoder, bucket: int, top: int = 14) -> list:
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph = timing_graph(decoder, bucket)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t / 3, e.count // 3, e.key[:70]))
    rows.sort(reverse=True)
    return [{"us_per_step": round(t, 1), "calls": c, "kernel": k} for t, c, k in rows[:top]]


def linear_figures(decoder, m: int, emit) -> None:
    """Each linear kind called across all layers back to back (weights cold in L2, as in the step): us a call
    and the weight bytes read a second. Launched from Python, not a graph: below ~40 us a call these figures
    are the launch, not the kernel (the captured step's kernel table is the one to read)."""
    import torch
    from bench_engine import linear_bytes

    h = decoder.embedding.shape[1]
    x = torch.randn(m, h, device=decoder.device, dtype=decoder.dtype)
    mlp = torch.randn(m, decoder.layers[0].down.module.weight.shape[-1] if decoder.layers[0].down.q is None
                      else decoder.layers[0].down.q.k, device=decoder.device, dtype=decoder.dtype)
    calls = {
        "qkv": lambda lw: lw.qkv(x, norm=lw.ln1, eps=decoder.eps),
        "dense": lambda lw: lw.dense(x, residual=x),
        "fc1": lambda lw: lw.up(x, norm=lw.ln2, eps=decoder.eps, swiglu=True),
        "fc2": lambda lw: lw.down(mlp, residual=x),
    }
    out = {}
    for kind, call in calls.items():
        for lw in decoder.layers:
            call(lw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            for lw in decoder.layers:
                call(lw)
        end.record()
        torch.cuda.synchronize()
        us = 1e3 * start.elapsed_time(end) / (3 * len(decoder.layers))
        lin = {"qkv": decoder.layers[0].qkv, "dense": decoder.layers[0].dense, "fc1": decoder.layers[0].up,
               "fc2": decoder.layers[0].down}[kind]
        out[kind] = {"us": round(us, 1), "GB_s": round(linear_bytes(lin) / us / 1e3)}
    emit(what="linears", rows=m, **out)


def requests(tokenizer, n: int, prompt_tokens: int, new_tokens: int):
    from backend.decode.protocol import DecodeRequest
    from backend.service import SamplingParams
    from bench_engine import query_of

    q = query_of(tokenizer, prompt_tokens)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    return [DecodeRequest(tokenizer.encode(tokenizer.build_prompt(q[: len(q) - (i % 7)] + str(i), [])), greedy)
            for i in range(n)]


def decoder_figures(decoder, tokenizer, n: int, emit) -> None:
    """Rows added straight to the decoder (no batcher thread): prefill time, step time, graph time."""
    import torch

    reqs = requests(tokenizer, n, 64, 400)
    for i, r in enumerate(reqs):
        decoder.add(10_000 + i, r)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decoder.step()  # the prompts
    torch.cuda.synchronize()
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    for _ in range(3):
        decoder.step()
    t0 = time.perf_counter()
    steps = 40
    for _ in range(steps):
        decoder.step()
    step_ms = 1e3 * (time.perf_counter() - t0) / steps
    top = max(r.slot for r in decoder._rows.values()) + 1
    from backend.decode.fast_batch import BUCKETS, MAX_ROWS

    bucket = min(next((b for b in BUCKETS if b >= top), MAX_ROWS), decoder.max_batch)
    graph_ms = captured_step_ms(decoder, bucket)
    emit(what="decoder", rows=n, bucket=bucket, prefill_ms=round(prefill_ms, 1), step_ms=round(step_ms, 3),
         graph_ms=round(graph_ms, 3), host_ms=round(step_ms - graph_ms, 3), tok_s=round(n / step_ms * 1e3, 1))
    emit(what="kernels", rows=n, table=kernel_table(decoder, bucket))
    for i in range(n):
        decoder.drop(10_000 + i)


def batcher_figures(batcher, tokenizer, n: int, emit) -> None:
    """Raw token streams through the batcher thread, one reader thread each (no text)."""
    reqs = requests(tokenizer, n, 64, 128)
    counts = [0] * n
    firsts = [None] * n

    def read(i, stream, t0):
        for _ in stream:
            if firsts[i] is None:
                firsts[i] = time.perf_counter() - t0
            counts[i] += 1

    t0 = time.perf_counter()
    threads = []
    for i, r in enumerate(reqs):
        th = threading.Thread(target=read, args=(i, batcher.submit(r), t0))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    secs = time.perf_counter() - t0
    f = sorted(firsts)
    emit(what="batcher", rows=n, tok_s=round(sum(counts) / secs, 1), ttft_p50_ms=round(1e3 * f[n // 2], 1),
         ttft_max_ms=round(1e3 * f[-1], 1))


def long_prompt(engine, emit) -> None:
    from backend.service import SamplingParams
    from bench_engine import query_of, timed_reply

    q = query_of(engine.tokenizer, 1600)
    p = SamplingParams(temperature=0.0, max_new_tokens=4)
    for label, query in (("cold", q), ("cold2", "x" + q), ("reuse", q + "。")):
        emit(what="ttft_1600", case=label, **timed_reply(engine, query, p))


def main() -> None:
    import torch

    from backend.engine import ChatEngine
    from bench_engine import concurrent, json_lines, query_of
    from backend.service import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--rows", default="1,8,64")
    args = parser.parse_args()
    emit = json_lines()
    rows = [int(r) for r in args.rows.split(",")]
    engine = ChatEngine.load(args.model, quantization=args.quantization, engine="fast", max_batch=max(rows))
    t0 = time.perf_counter()
    engine.warm_up()
    emit(what="warm_up", seconds=round(time.perf_counter() - t0, 1), decoder=type(engine.decoder).__name__)
    with engine.batcher.step_lock:  # the batcher thread idles; the decoder is driven from here
        with torch.inference_mode():
            for m in (1, 2, 8, 16, 64):
                linear_figures(engine.decoder, m, emit)
            for n in rows:
                decoder_figures(engine.decoder, engine.tokenizer, n, emit)
    for n in rows:
        batcher_figures(engine.batcher, engine.tokenizer, n, emit)
    q64 = query_of(engine.tokenizer, 64)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=128)
    for n in rows:
        emit(what="engine", **concurrent(engine, [q64[: len(q64) - (i % 7)] + str(i) for i in range(n)], greedy))
    long_prompt(engine, emit)
    engine.close()


if __name__ == "__main__":
    main()
