"""``glmchat serve`` with every ``decoder.step()`` timed (``trace_engine.StepTrace``, no stack sampler), the
steps written as JSON lines to ``--trace-out FILE`` when the server stops. ``bench_serve.py --trace FILE`` runs
the server through this, so a level's TTFT tail can be laid against the prompt rounds that made it.

    python bench/serve_traced.py --trace-out FILE serve-args...   (the arguments of ``glmchat serve``)

Each line: the step's start and end as wall-clock seconds (``time.time()``, comparable with the client's), the
rows it decoded, the prompts it prefilled and their tokens; then one line per Triton compile, then when each
request reached the decoder (``submitted``: the server's thread) and became a row (``admitted``: the decoding
thread).
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def write_trace(trace, path: Path) -> None:
    wall = time.time() - time.perf_counter()  # perf_counter -> wall clock, taken once
    with path.open("w", encoding="utf-8") as out:
        for start, end, running, prompts, tokens in trace.steps:
            out.write(json.dumps({"step_start": round(wall + start, 6), "step_end": round(wall + end, 6),
                                  "running": running, "prompts": prompts, "prompt_tokens": tokens}) + "\n")
        for start, seconds, kernel in trace.compiles:
            out.write(json.dumps({"compile_start": round(wall + start, 6), "seconds": round(seconds, 4),
                                  "kernel": kernel}) + "\n")
        for what in ("submitted", "admitted"):
            for at in getattr(trace, what):
                out.write(json.dumps({what: round(wall + at, 6)}) + "\n")


def main(argv: list[str]) -> int:
    from backend.server import cli
    from trace_engine import StepTrace

    at = argv.index("--trace-out")
    path = Path(argv[at + 1])
    argv = argv[:at] + argv[at + 2:]
    if argv[:1] == ["serve"]:  # as `glmchat serve ...` is written; the server's own parser starts after it
        argv = argv[1:]

    def load(args, progress):
        backend = cli.load_engine(args, progress)
        trace = StepTrace(backend.decoder, sample=False)
        atexit.register(write_trace, trace, path)
        return backend

    return cli.main(argv, load=load)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
