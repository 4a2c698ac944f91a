"""``glmchat serve``: load the engine once and serve it over the OpenAI HTTP API.

User mistakes (a taken port, a bad model path or adapter) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from ..service import DTYPE_HELP, ChatBackend, LoadProgress
from .runner import DRAIN_S, bind, is_loopback, run

EXIT_USAGE = 2
DEFAULT_MAX_BATCH = 16  # a server decodes its concurrent requests together (the engine alone defaults to one row on CUDA)
API_KEY_ENV = "GLMCHAT_API_KEY"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="glmchat serve",
        description="Serve ChatGLM2/ChatGLM3 and its P-Tuning v2 adapters over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models). Each adapter is a model named BASE:ADAPTER.",
        epilog=f"The API key may also come from ${API_KEY_ENV} (keeps it out of the process list). "
        "Ctrl-C or SIGTERM lets running replies finish for a few seconds, then exits.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_ID", help="model directory or hub id (e.g. THUDM/chatglm2-6b)")
    model.add_argument("--quantization", choices=["8bit", "4bit", "none"], default=None,
                       help="load the weights quantized (default: the engine's choice)")
    model.add_argument("--adapter", action="append", metavar="CKPT", default=[],
                       help="register a P-Tuning v2 checkpoint directory (repeatable)")
    model.add_argument("--adapters", action="append", metavar="DIR", default=[],
                       help="register every checkpoint-* found under DIR (repeatable)")
    model.add_argument("--demo", action="store_true", help="serve the small demo model (no download, CPU)")
    model.add_argument("--engine", choices=["fast", "eager"], default=None, help="decoding engine (default: the engine's choice)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help=DTYPE_HELP)
    model.add_argument("--model-name", metavar="NAME",
                       help="the model id clients use (default: the last part of --model, e.g. chatglm2-6b)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    http.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
                      help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    http.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                      help=f"replies decoded together, one batch row each (default {DEFAULT_MAX_BATCH})")
    http.add_argument("--max-queue", type=int, default=64, metavar="N",
                      help="requests that may wait for a decoding row; more get HTTP 429 (default 64)")
    http.add_argument("--drain-seconds", type=float, default=DRAIN_S, metavar="S",
                      help=f"on Ctrl-C/SIGTERM, let running replies finish this long (default {DRAIN_S:g})")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("give the model to serve: --model PATH_OR_ID (or --demo)")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.max_batch < 1:
        parser.error("--max-batch must be 1 or more")
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    return args


def load_engine(args: argparse.Namespace, progress: Callable[[LoadProgress], None]) -> ChatBackend:
    from ..engine import ChatEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ChatEngine.load(model=args.model, quantization=args.quantization, adapters=args.adapter,
                                 adapter_dirs=args.adapters, demo=args.demo, engine=args.engine or "auto", progress=progress,
                                 dtype=args.dtype, max_batch=args.max_batch, max_queue=args.max_queue)
    if hasattr(engine.decoder, "warm_up"):  # before the first client: no request waits for a tuning or a capture
        progress(LoadProgress("warm-up", 0, 1, "tuning the GPU kernels and capturing the decode graphs "
                                                "(the first start on a card tunes; later starts read the cache)"))
        engine.warm_up()
    return engine


def _print_progress(event: LoadProgress) -> None:
    if event.message:
        print(f"glmchat serve: {event.message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None,
         load: Callable[[argparse.Namespace, Callable[[LoadProgress], None]], ChatBackend] = load_engine) -> int:
    """``load`` builds the backend from the parsed flags (tests pass their own)."""
    args = parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        print(f"glmchat serve: WARNING: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model and register adapters from this machine's disk.", file=sys.stderr)
    try:
        sock = bind(args.host, args.port)  # before the model loads: a taken port fails in a second, not a minute
        backend = load(args, _print_progress)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - error_line re-raises what is not a user mistake
        from ..cli import error_line

        print(f"glmchat serve: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    from .app import create_app

    app = create_app(backend, args.api_key, model_name=args.model_name)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    names = ", ".join(card.id for card in app.state.server.cards())
    for notice in backend.info.notices:
        print(f"glmchat serve: {notice}", file=sys.stderr, flush=True)
    print(f"glmchat serve: http://{host}:{port}/v1 serving {names}", file=sys.stderr, flush=True)
    return run(app, sock, drain_s=args.drain_seconds)
