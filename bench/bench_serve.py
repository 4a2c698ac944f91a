"""Load on ``glmchat serve``: 1, 8 and 64 concurrent streaming chat requests; aggregate tok/s, p50/p99 TTFT.

Bounded on purpose: the server is started here on 127.0.0.1 (never another address), each level
sends a fixed number of requests (``--rounds`` x the concurrency, at least 8) and the script stops the server
(SIGTERM, which drains) and exits by itself.

    python bench/bench_serve.py --model DIR --quantization 8bit --out bench/serve.json
    python bench/bench_serve.py --random-6b /tmp/glm6b --quantization 8bit      # full-size random weights
    python bench/bench_serve.py --model tests-tiny-dir --concurrency 1,2 --max-tokens 8   # a CPU smoke run

``--trace FILE`` runs the server through ``bench/serve_traced.py``: its decoder's steps (prompt rounds
included) are written to FILE with wall-clock times, which ``--out``'s per-request send times share.

``--random-6b DIR`` writes full-size ChatGLM2-6B random weights there first (bench_load.make, with the
release's config.json and tokenizer.model from ../shared/reference/chatglm2 when present), unless DIR
already holds them. Random weights rarely emit eos, so every reply runs to ``--max-tokens``.

Per level: aggregate tok/s = completion tokens of all requests / wall time of the level; TTFT = time
from sending a request to its first content chunk (queueing included), also apart for the burst (the
level's first `concurrency` requests, sent together) and the requests that join running ones (each sent as
an earlier reply ends), and per request in ``--out``; per-stream tok/s = a request's tokens after the
first / the time after the first. A level's streams are spread over client processes (``--clients``, by default
one per 16 streams), so that the client's own event loop does not hold requests back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "chatglm2"
STREAMS_PER_CLIENT = 16
PROMPTS = ["类型#上衣*材质#牛仔布*颜色#白色*风格#简约", "类型#裙*颜色#红色*风格#复古", "介绍一下你自己",
           "写一段关于秋天的短文", "Hello, who are you?", "类型#裤*材质#棉*风格#休闲"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_6b(directory: Path) -> Path:
    """Full-size random weights in the release layout (skipped when DIR already has them)."""
    if (directory / "pytorch_model.bin.index.json").is_file():
        return directory
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_load import make

    tokenizer = REFERENCE / "tokenizer.model"
    make(directory, tokenizer if tokenizer.is_file() else None)
    if (REFERENCE / "config.json").is_file():  # the release's own file, as users have it
        (directory / "config.json").write_bytes((REFERENCE / "config.json").read_bytes())
    return directory


def start_server(args, port: int) -> subprocess.Popen:
    # with --trace, through bench/serve_traced.py: the same server, its decoder's steps timed
    launcher = [str(ROOT / "bench" / "serve_traced.py"), "--trace-out", str(args.trace)] if args.trace else ["-m", "tui"]
    command = [sys.executable, *launcher, "serve", "--model", str(args.model), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(max(args.levels)), "--max-queue", str(max(args.levels) * 2),
               "--model-name", "bench"]
    if args.quantization:
        command += ["--quantization", args.quantization]
    if args.engine:
        command += ["--engine", args.engine]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})


def wait_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited with {process.returncode} before it was up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # polling a process that is loading a model: nothing to wait on but the port
    raise SystemExit(f"bench_serve: the server was not up after {timeout:.0f} s")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "top_p": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    sent, sent_wall = time.perf_counter(), time.time()  # (perf_counter: durations; time: across processes)
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    done = time.perf_counter()
    first = first or done
    return {"sent_wall": sent_wall, "ttft_s": first - sent, "tokens": tokens, "seconds": done - sent,
            "stream_tok_s": (tokens - 1) / (done - first) if tokens > 1 and done > first else 0.0}


async def _client(url: str, concurrency: int, indices: list, max_tokens: int, start_at: float) -> list:
    """One client process's share of a level: ``indices`` requests, ``concurrency`` at a time, from ``start_at``
    (wall clock, shared by the level's processes). Each result says whether it was in the burst."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def gated(k: int, i: int) -> dict:
            async with gate:
                result = await one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens, seed=i)
            return {**result, "burst": k < concurrency, "done_wall": time.time()}

        return await asyncio.gather(*(gated(k, i) for k, i in enumerate(indices)))


def _client_process(job: tuple) -> list:
    return asyncio.run(_client(*job))


def level(url: str, concurrency: int, requests: int, max_tokens: int, clients: int = 1) -> dict:
    """``concurrency`` streams at a time, ``requests`` in all, sent from ``clients`` processes: one Python client
    parses every stream's events in one event loop, and at 64 streams the server's trace suggested that loop, not
    the server, held the next requests back (bench/NOTES.md, run 13; not yet measured with several)."""
    clients = max(1, min(clients, concurrency))
    start_at = time.time() + (1.0 if clients > 1 else 0.0)  # the processes start together
    jobs = [(url, len(range(c, concurrency, clients)), list(range(c, requests, clients)), max_tokens, start_at)
            for c in range(clients)]
    if clients == 1:
        results = _client_process(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            results = [r for part in pool.map(_client_process, jobs) for r in part]
    ok = sorted((r for r in results if "error" not in r), key=lambda r: r["sent_wall"])
    wall = max((r["done_wall"] for r in ok), default=start_at) - start_at
    ttfts = [r["ttft_s"] * 1000 for r in ok]
    # the first `concurrency` requests go out together (a burst); each later one as an earlier reply ends
    burst = [r["ttft_s"] * 1000 for r in ok if r["burst"]]
    joining = [r["ttft_s"] * 1000 for r in ok if not r["burst"]]
    return {"concurrency": concurrency, "requests": requests, "clients": clients,
            "errors": [r["error"] for r in results if "error" in r],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 3),
            "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
            "burst_ttft_p50_ms": percentile(burst, 50), "burst_ttft_max_ms": percentile(burst, 100),
            "joining_ttft_p50_ms": percentile(joining, 50), "joining_ttft_max_ms": percentile(joining, 100),
            "stream_tok_s_median": round(statistics.median(r["stream_tok_s"] for r in ok), 1) if ok else 0.0,
            "per_request": [{"sent_ms": round((r["sent_wall"] - start_at) * 1000, 1), "sent_wall": round(r["sent_wall"], 6),
                             "ttft_ms": round(r["ttft_s"] * 1000, 1), "tokens": r["tokens"], "burst": r["burst"]}
                            for r in ok]}


def percentile(values: list, p: float) -> float:
    """The nearest-rank percentile of ``values`` (nan when there are none)."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))], 1) if ordered else float("nan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model directory to serve")
    source.add_argument("--random-6b", type=Path, metavar="DIR", help="build (once) and serve full-size random weights")
    parser.add_argument("--quantization", choices=["8bit", "4bit", "none"])
    parser.add_argument("--engine", choices=["fast", "eager"])
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated levels (default 1,8,64)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per level = rounds x concurrency, at least 8 (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=None, metavar="N",
                        help=f"client processes a level's streams are spread over (default: one per {STREAMS_PER_CLIENT})")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="time the server's decoder steps (bench/serve_traced.py) and write them here as JSON lines")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.concurrency.split(",")]
    if args.random_6b:
        args.model = make_random_6b(args.random_6b)
    return args


def main() -> int:
    args = parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        wait_up(url, server, args.startup_timeout)
        level(url, 1, 1, min(8, args.max_tokens))  # warm-up: first-use compilation and captures
        rows = []
        for concurrency in args.levels:
            # at least 8 requests a level: the one-stream level, which the others are compared with, is not
            # then one or two replies' luck
            clients = args.clients or -(-concurrency // STREAMS_PER_CLIENT)
            row = level(url, concurrency, max(8, concurrency * args.rounds), args.max_tokens, clients)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_request"}), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    single = rows[0]["aggregate_tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    print(f"\n| concurrent streams | requests | aggregate tok/s | x one stream | TTFT p50 ms | TTFT p99 ms | stream tok/s (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['aggregate_tok_s'] / single:.1f}x" if single else "-"
        print(f"| {r['concurrency']} | {r['requests']} | {r['aggregate_tok_s']} | {ratio} | {r['ttft_p50_ms']} | "
              f"{r['ttft_p99_ms']} | {r['stream_tok_s_median']} |")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "quantization": args.quantization, "levels": rows,
                                        "date": time.strftime("%Y-%m-%d")}, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
