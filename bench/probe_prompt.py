"""Where ``glmchat --prompt`` spends its wall time: the seconds from the shell's start (env T0, ``date +%s.%N``) to
each stage (imports, weights loaded, decoder ready, first text, reply done), printed to stderr as ``mark`` lines.

    T0=$(date +%s.%N) python3 bench/probe_prompt.py --model DIR --quantization 8bit --prompt "..." 2>&1 >/dev/null

It runs the app's own ``main`` with the engine's loading and reply wrapped, so the stages are those a user waits
through, not a benchmark's path.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T0 = float(os.environ.get("T0", time.time()))


def mark(name: str) -> None:
    print(f"mark {time.time() - T0:6.2f} s  {name}", file=sys.stderr, flush=True)


def synced(fn, name: str):
    import torch

    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        mark(name)
        return result

    return wrapped


def timed_replies(load_engine):
    def wrapped(args):
        engine = load_engine(args)
        stream = engine.stream_reply

        def timed(*a, **k):
            first = True
            for event in stream(*a, **k):
                if first and getattr(event, "text", None):
                    first = False
                    mark("first text")
                yield event
            mark("reply done")

        engine.stream_reply = timed
        return engine

    return wrapped


def main() -> int:
    mark("python started")
    import torch  # noqa: F401

    mark("imported torch")
    import backend.engine as engine

    mark("imported backend.engine")
    import backend.cli as cli
    import tui.__main__ as app

    engine.load_model = synced(engine.load_model, "weights loaded")
    engine.ChatEngine.__init__ = synced(engine.ChatEngine.__init__, "engine made (decoder ready)")
    cli._load_engine = timed_replies(cli._load_engine)
    rc = app.main(sys.argv[1:])
    mark("main returned")
    return rc


if __name__ == "__main__":
    sys.exit(main())
