"""Decoding through ChatEngine, as the app and the server drive it: chat, compare, many rows, switches.

    python bench/bench_engine.py --model DIR --quantization 8bit [--engine fast] [--rows 1,8,64]

On full-size random weights in the release layout (``bench/bench_load.py make DIR``; the int4
release's layout with ``make-int4``). Prints one JSON line per measurement, each with the card,
the command, the date and, for decode speed, the % of the bound: the bytes one step must read
(every linear weight as stored, the output layer) over the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞"


def json_lines(**fields):
    """``emit(**figure)``: prints one JSON line with the card, the command, the date, ``fields`` and the figure (the
    record every bench/ script writes)."""
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    common = {"card": card, "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **fields}
    return lambda **kw: print(json.dumps({**common, **kw}), flush=True)


def copy_bandwidth(device="cuda") -> float:
    """Bytes read + written per second by a large device-to-device copy (the memory-bound ceiling; every bench/
    script's bound comes from this one)."""
    import torch

    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)


def step_bytes(decoder) -> int:
    """Weight bytes one decode step reads (as stored: packed, with scales)."""
    total = 0
    for lw in decoder.layers:
        for lin in (lw.qkv, lw.dense, lw.up, lw.down):
            total += linear_bytes(lin)
    return total + linear_bytes(decoder.output)


def linear_bytes(lin) -> int:
    if lin.q is None:
        return lin.w.numel() * lin.w.element_size()
    q = lin.q
    parts = [q.data, q.scale, q.absmax, q.absmax2]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def timed_reply(engine, query: str, params, **kw) -> dict:
    from backend.service import ReplyDone, TextDelta

    start = time.perf_counter()
    first = None
    for event in engine.stream_reply(query, [], params, **kw):
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter()
        if isinstance(event, ReplyDone):
            reply = event.reply
    end = time.perf_counter()
    first = first or end
    decode_s = max(end - first, 1e-9)
    # ttft_ms: to the first text; first_token_ms: to the first token (random weights often begin a reply with pieces
    # that end inside a character or are blank, which show no text until later tokens complete them)
    return {"ttft_ms": round(1e3 * (first - start), 1), "first_token_ms": round(1e3 * (reply.first_token_seconds or 0), 1),
            "new_tokens": reply.new_tokens,
            "prompt_tokens": reply.prompt_tokens, "decode_tok_s": round((reply.new_tokens - 1) / decode_s, 1)}


def query_of(tokenizer, tokens: int, base: str = QUERY) -> str:
    """A query whose chat prompt is about ``tokens`` long, ``base`` repeated."""
    text = base
    while len(tokenizer.encode(tokenizer.build_prompt(text, []))) < tokens:
        text += base
    while len(tokenizer.encode(tokenizer.build_prompt(text, []))) > tokens and len(text) > 1:
        text = text[:-1]
    return text


def concurrent(engine, queries: list, params) -> dict:
    """Each query from its own thread at once: aggregate tokens/s and TTFT percentiles."""
    results = [None] * len(queries)

    def one(i):
        results[i] = timed_reply(engine, queries[i], params)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(queries))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ttfts = sorted(r["ttft_ms"] for r in results)
    firsts = sorted(r["first_token_ms"] for r in results)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"rows": len(queries), "aggregate_tok_s": round(sum(r["new_tokens"] for r in results) / seconds, 1),
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
            "first_token_p50_ms": pct(firsts, 0.5), "first_token_p99_ms": pct(firsts, 0.99), "seconds": round(seconds, 2)}


def make_adapter(directory: Path, config, pre_seq_len: int = 128) -> Path:
    """A random P-Tuning v2 checkpoint in the original layout (pytorch_model.bin + config.json)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    width = config.num_layers * 2 * config.multi_query_group_num * config.kv_channels
    weight = torch.randn(pre_seq_len, width) * 0.02
    torch.save({"transformer.prefix_encoder.embedding.weight": weight.half()}, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({"pre_seq_len": pre_seq_len, "prefix_projection": False}))
    return directory


def main() -> None:
    import torch

    from backend.engine import ChatEngine
    from backend.service import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--rows", default="1,2,8,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each --rows level (a 64-row level takes ~1.5 s: one run is within run-to-run noise of an A/B)")
    args = parser.parse_args()
    # the one-row descent's time for each candidate step, on stderr (what a tile won or lost by)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("glmchat.tuning").setLevel(logging.DEBUG)
    emit = json_lines(quantization=args.quantization)
    bandwidth = copy_bandwidth()
    rows = [int(r) for r in args.rows.split(",")]
    start = time.perf_counter()
    # (at least the compare's two rows: with one, its columns run one after the other and its ratios mean nothing)
    engine = ChatEngine.load(args.model, quantization=args.quantization, engine=args.engine, max_batch=max(rows + [2]))
    torch.cuda.synchronize()
    loaded_gb = torch.cuda.memory_allocated() / 1e9
    emit(what="load", seconds=round(time.perf_counter() - start, 1), gpu_after_load_gb=round(loaded_gb, 2),
         engine=engine.info.engine, decoder=type(engine.decoder).__name__, max_batch=engine.info.max_batch)
    start = time.perf_counter()
    engine.warm_up()  # as the app (in the background) and the server do
    emit(what="first_run_tuning", seconds=round(time.perf_counter() - start, 1), one_row_step=one_row_step(engine.decoder))
    adapter = engine.register_adapter(make_adapter(Path("/tmp/bench_adapter/checkpoint-1"), engine.model.config), "ad")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    q64, q1600 = query_of(engine.tokenizer, 64), query_of(engine.tokenizer, 1600)
    timed_reply(engine, q64, greedy)  # warm-up: captures, tuning
    bound = bandwidth / step_bytes(engine.decoder) if hasattr(engine.decoder, "layers") else None
    torch.cuda.reset_peak_memory_stats()
    for sampling in (greedy, SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=args.new_tokens)):
        r = timed_reply(engine, q64, sampling, seed=1)
        emit(what="chat", greedy=sampling.greedy, **r, bound_tok_s=round(bound or 0, 1),
             pct_of_bound=round(100 * r["decode_tok_s"] / bound, 1) if bound else None)
    emit(what="memory", gpu_peak_above_load_gb=round(torch.cuda.max_memory_allocated() / 1e9 - loaded_gb, 2))
    timed_reply(engine, q1600, SamplingParams(temperature=0.0, max_new_tokens=4))
    # the next turn of that conversation: all but a few tokens found in the finished row's cache
    emit(what="ttft_1600", **timed_reply(engine, q1600 + "。", SamplingParams(temperature=0.0, max_new_tokens=4)))
    # a pasted document: 1600 tokens that no cached row begins with (past the chat template), every one computed
    for n, base in enumerate((QUERY[::-1], QUERY[1:] + QUERY[0])):
        emit(what="ttft_1600_cold", run=n + 1,
             **timed_reply(engine, query_of(engine.tokenizer, 1600, base), SamplingParams(temperature=0.0, max_new_tokens=4)))
    timed_reply(engine, q64, greedy, adapter=adapter.name)  # first use of the adapter
    emit(what="adapter_switch", **timed_reply(engine, q64 + "！", greedy, adapter=adapter.name))
    emit(what="compare", **compare_rate(engine, q64, greedy, adapter.name))
    for n in rows:
        queries = [q64[: len(q64) - (i % 7)] + str(i) for i in range(n)]
        for run in range(1, args.repeat + 1):
            emit(what="batch", run=run, **concurrent(engine, queries, greedy))
    engine.close()


def one_row_step(decoder) -> Optional[dict]:
    """How the decoder runs one row: the fused step (decode/one_row_step.py) with or without PDL and the tiles this
    card tuned for it, or the general step (None: not the batched fast decoder)."""
    if not hasattr(decoder, "_one_row_step"):
        return None
    step = decoder._one_row_step
    if step is None:
        return {"fused": False}
    from backend.decode import one_row_tuning

    tiles = {kind: dataclasses.asdict(lins[0].row_config) if lins[0].row_config is not None else None  # (None: 4-bit
             for kind, lins in one_row_tuning.linears_by_kind(decoder).items()}  # weights on quant_linear's own pick)
    return {"fused": True, "pdl": step.pdl, "tiles": tiles}


def compare_rate(engine, query: str, params, adapter: str) -> dict:
    """A compare's two columns (base and ``adapter``, one batch) against one reply, measured alike both ways:
    ``ratio`` from the first tokens on (decode rates: tokens after each reply's first over the time after its
    first; for the compare, after the later column's first token), ``ratio_wall`` over whole replies (prompts
    included: tokens over the time from the call). ``first_token_ms``: the compare's later column."""
    from backend.service import ReplyDone

    start = time.perf_counter()
    replies = [e.reply for e in engine.compare(query, [], params, adapters=[None, adapter]) if isinstance(e, ReplyDone)]
    seconds = time.perf_counter() - start
    tokens = sum(r.new_tokens for r in replies)
    first = max(r.first_token_seconds or 0.0 for r in replies)
    single = timed_reply(engine, query + "？", params)
    single_seconds = single["first_token_ms"] / 1e3 + (single["new_tokens"] - 1) / single["decode_tok_s"]
    decode = (tokens - len(replies)) / (seconds - first)
    return {"aggregate_tok_s": round(decode, 1), "one_stream_tok_s": single["decode_tok_s"],
            "ratio": round(decode / single["decode_tok_s"], 2), "first_token_ms": round(1e3 * first, 1),
            "aggregate_wall_tok_s": round(tokens / seconds, 1),
            "ratio_wall": round(tokens / seconds / (single["new_tokens"] / single_seconds), 2)}


if __name__ == "__main__":
    main()
