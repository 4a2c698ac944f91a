"""Where `glmchat --prompt` spends its wall time: marks from the shell's start (T0) to each stage, printed to stderr."""
import os
import sys
import time

T0 = float(os.environ["T0"])


def mark(name):
    print(f"mark {time.time() - T0:6.2f} s  {name}", file=sys.stderr, flush=True)


mark("python started")
import torch  # noqa: E402
mark("imported torch")
import backend.engine as E  # noqa: E402
mark("imported backend.engine")
import backend.cli as cli  # noqa: E402
import tui.__main__ as m  # noqa: E402

orig_load, orig_init, orig_engine = E.load_model, E.ChatEngine.__init__, cli._load_engine


def load_model(*a, **k):
    r = orig_load(*a, **k)
    torch.cuda.is_available() and torch.cuda.synchronize()
    mark("weights loaded")
    return r


def init(self, *a, **k):
    orig_init(self, *a, **k)
    torch.cuda.is_available() and torch.cuda.synchronize()
    mark("engine made (decoder ready)")


def load_engine(args):
    e = orig_engine(args)
    stream = e.stream_reply

    def timed(*a, **k):
        first = True
        for ev in stream(*a, **k):
            if first and getattr(ev, "text", None):
                first = False
                mark("first text")
            yield ev
        mark("reply done")
    e.stream_reply = timed
    return e


E.load_model, E.ChatEngine.__init__, cli._load_engine = load_model, init, load_engine
rc = m.main(sys.argv[1:])
mark("main returned")
sys.exit(rc)
