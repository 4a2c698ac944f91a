"""Where a cold long prompt's first token goes: a pasted 1600-token document that no cached row begins with.

    python bench/profile_long_prompt.py --model DIR --quantization 8bit [--tokens 1600]

Through ``ChatEngine.stream_reply`` as the app runs it, after the engine's warm-up: three cold prompts timed
(each begins with text no earlier prompt began with, so every token is computed), then one more under
torch.profiler, whose CUDA kernels are summed by name (ms per prompt) next to the reply's wall time. The
linears' floating-point work (2 x weights x tokens) over that time is the prompt's achieved TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# distinct openings: no prompt shares more than the chat template with an earlier one
OPENINGS = ("北京的秋天", "请总结下文", "一段说明书", "会议的记录", "旅行的日记", "天气预报员")


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


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from backend.engine import ChatEngine
    from backend.service import SamplingParams
    from bench_engine import QUERY, query_of, timed_reply

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--tokens", type=int, default=1600)
    args = parser.parse_args()
    common = {"card": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quantization": args.quantization}
    emit = lambda **kw: print(json.dumps({**common, **kw}), flush=True)  # noqa: E731
    engine = ChatEngine.load(args.model, quantization=args.quantization, max_batch=2)
    engine.warm_up()
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    flops = 2 * linear_weights(engine.decoder) * args.tokens
    queries = [query_of(engine.tokenizer, args.tokens, opening + QUERY) for opening in OPENINGS]
    for n, q in enumerate(queries[:-1]):
        r = timed_reply(engine, q, params)
        emit(what="cold_prompt", run=n + 1, first_token_ms=r["first_token_ms"], prompt_tokens=r["prompt_tokens"],
             linears_tflops=round(flops / (r["first_token_ms"] / 1e3) / 1e12, 1))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = timed_reply(engine, queries[-1], params)
        torch.cuda.synchronize()
    emit(what="cold_prompt_profiled", first_token_ms=r["first_token_ms"], kernels=kernel_sums(prof))
    engine.close()


if __name__ == "__main__":
    main()
