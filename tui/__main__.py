"""glmchat: chat with ChatGLM2-6B and its P-Tuning v2 adapters in the terminal (or answer one --prompt)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from backend.service import DTYPE_HELP


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, no usage dump
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _alias(flag: str) -> list[str]:
    """--top-p also as --top_p, the spelling of the original scripts."""
    return [flag, "--" + flag[2:].replace("-", "_")]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="glmchat",
        description="A terminal workbench for ChatGLM2 and ChatGLM3: streamed chat, live switching between P-Tuning v2 "
        "adapters, before/after comparison, and a training panel. With --prompt, answers once and exits.",
        epilog="Conversations are kept in the user data dir; keys can be remapped in config.toml "
        "(see the help screen, F1).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_ID",
                       help="model directory or hub id (default: THUDM/chatglm2-6b from the hub cache, downloaded "
                       "on first use; with --demo, the demo model)")
    model.add_argument("--quantization", choices=["8bit", "4bit", "none"], default=None,
                       help="load the weights quantized (default: 8bit on a GPU; none, in float32, on the CPU "
                       "and with --demo)")
    model.add_argument("--adapter", action="append", metavar="CKPT", default=[],
                       help="register a P-Tuning v2 checkpoint directory (repeatable)")
    model.add_argument("--adapters", action="append", metavar="DIR", default=[],
                       help="register every checkpoint-* found under DIR (repeatable)")
    model.add_argument("--demo", action="store_true",
                       help="use the small demo model (no download, runs on the CPU)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help=DTYPE_HELP)
    model.add_argument("--engine", choices=["fast", "eager"], default=None,
                       help="decoding engine (default: the engine's choice)")
    model.add_argument("--info", action="store_true",
                       help="print the model structure (family, layers, heads, rotary settings, parameters and "
                       "memory per part, quantization, the active adapter's prefix) and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompt", metavar="TEXT",
                          help="answer TEXT once, print the reply and exit; - reads TEXT from stdin")
    sampling.add_argument("--system", metavar="TEXT",
                          help="a system prompt for --prompt (ChatGLM3: its system role; ChatGLM2: put before the "
                          "query, as the original openai_api.py does)")
    sampling.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 0.8)")
    sampling.add_argument(*_alias("--top-p"), dest="top_p", type=float, help="nucleus sampling p (default 0.8)")
    sampling.add_argument(*_alias("--max-new-tokens"), dest="max_new_tokens", type=int,
                          help="longest reply in tokens (default 512)")
    remote = parser.add_argument_group("remote (glmchat serve --help starts a server)")
    remote.add_argument("--server", metavar="URL", help="chat with the model of a running `glmchat serve` at URL "
                        "(e.g. http://gpu-box:8000) instead of loading one here")
    remote.add_argument("--api-key", metavar="KEY", default=os.environ.get("GLMCHAT_API_KEY") or None,
                        help="the server's API key (default: $GLMCHAT_API_KEY)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glmchat")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server and (args.prompt is not None or args.model or args.demo or args.adapter or args.adapters):
        parser.error("--server uses the server's model and adapters; drop --model/--demo/--adapter/--prompt "
                     "(add adapters from the app's picker)")
    if args.prompt == "-":  # like `ollama run`: the prompt comes from a pipe or a file
        args.prompt = sys.stdin.read().rstrip("\n")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; give --prompt some text (or --prompt - to read it from stdin)")
    if args.temperature is not None and args.temperature < 0:
        parser.error("--temperature must be 0 or more")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must be above 0 and at most 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # `glmchat serve ...`: the HTTP server has its own flags
        from backend.server.cli import main as serve

        return serve(argv[1:])
    args = parse_args(argv)
    if args.info:
        from backend.cli import show_info

        return show_info(args)
    if args.prompt is not None:
        from backend.cli import run_once  # the one-shot mode lives with the backend

        return run_once(args) or 0
    from backend.cli import EXIT_USAGE, check_inputs
    from backend.service import BackendError

    try:
        if not args.server:  # with --server the model and adapters are the server's
            check_inputs(args)  # a mistyped path fails here, before the app starts and torch is imported
    except BackendError as err:
        print(f"glmchat: {err}", file=sys.stderr)
        return EXIT_USAGE
    from .app import GLMChatApp

    app = GLMChatApp(args)
    app.run()
    if app.loading:
        # The model load (a daemon thread) cannot be interrupted; the terminal is restored, so leave now.
        sys.stdout.flush()
        os._exit(app.return_code or 0)
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
