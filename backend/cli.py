"""``glmchat --prompt``: one reply on stdout, like ``ollama run MODEL "prompt"``.

User mistakes (a missing path, a directory that is not ChatGLM2, corrupt weights, a
mismatched adapter, running out of GPU memory) print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import warnings
from argparse import Namespace

EXIT_USAGE = 2
DEFAULT_MODEL = "THUDM/chatglm2-6b"  # what --model means when it is left out (and --demo is not given)


def error_line(err: BaseException) -> str:
    """One sentence for a failure a user can fix (backend/errors.py); our own bugs are re-raised, not hidden."""
    from .errors import explain

    problem = explain(err, oom_fix="try --quantization 4bit, a shorter prompt or fewer --max-new-tokens")
    if problem is None:
        raise err
    return problem.line()


def _as_list(value) -> list:
    if not value:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_inputs(args: Namespace) -> None:
    """Path checks that need no torch (BackendError): run before the seconds-long import of torch."""
    from .local_files import check_adapter_paths, local_model_dir

    if getattr(args, "model", None):
        local_model_dir(args.model)
    check_adapter_paths(getattr(args, "adapter", None) or [], _as_list(getattr(args, "adapters", None)))


CPU_NOTICE = "no GPU found, running on the CPU (slow for a 6B model)."


def large_on_cpu(model, device) -> bool:
    """Whether the CPU notice applies: it is for a 6B model; the demo and other small models are quick on a CPU."""
    weights = [*model.parameters(), *model.buffers()]  # int8 and packed 4-bit weights are buffers
    return str(device) == "cpu" and sum(t.numel() for t in weights) > 500_000_000


class LoadBar:
    """Load progress as a transient rich bar on stderr; use only when stderr is a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task("loading", total=None)

    def __enter__(self) -> "LoadBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event) -> None:
        self.progress.update(self.task, description=event.message, completed=event.current, total=event.total or None)


def _load_engine(args: Namespace):
    """The engine for ``args`` with ``args.adapter[-1]`` (else the last adapter found) active."""
    from contextlib import nullcontext

    from .engine import ChatEngine

    bar = LoadBar() if sys.stderr.isatty() else nullcontext()
    with bar, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = getattr(args, "demo", False)
        engine = ChatEngine.load(
            model=getattr(args, "model", None) or (None if demo else DEFAULT_MODEL),
            quantization=getattr(args, "quantization", None),
            adapters=getattr(args, "adapter", None) or [],
            adapter_dirs=_as_list(getattr(args, "adapters", None)),
            demo=demo,
            engine=getattr(args, "engine", None) or "auto",
            dtype=getattr(args, "dtype", None),
            progress=bar if isinstance(bar, LoadBar) else None,
        )
    if large_on_cpu(engine.model, engine.info.device):
        print(f"glmchat: {CPU_NOTICE}", file=sys.stderr)
    for notice in engine.info.notices:
        print(f"glmchat: {notice}", file=sys.stderr)
    adapters = engine.adapters()
    if adapters:
        explicit = getattr(args, "adapter", None) or []
        engine.switch_adapter(adapters[len(explicit) - 1].name if explicit else adapters[-1].name)
    return engine


def show_info(args: Namespace) -> int:
    """``glmchat --model X --info``: print the model structure page (see backend/structure.py)."""
    try:
        check_inputs(args)
        print(_load_engine(args).model_structure())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - error_line re-raises what is not a user mistake
        print(f"glmchat: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def run_once(args: Namespace) -> int:
    """Load, answer ``args.prompt`` once with ``args.adapter[-1]`` active (if any), print the reply."""
    try:
        check_inputs(args)
        from .service import SamplingParams

        engine = _load_engine(args)
        params = SamplingParams(
            temperature=args.temperature if getattr(args, "temperature", None) is not None else 0.8,
            top_p=args.top_p if getattr(args, "top_p", None) is not None else 0.8,
            max_new_tokens=getattr(args, "max_new_tokens", None) or 512,
        )
        for event in engine.stream_reply(args.prompt, [], params, system=getattr(args, "system", None)):
            text = getattr(event, "text", None)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except Exception as err:  # noqa: BLE001 - error_line re-raises what is not a user mistake
        print(f"glmchat: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE
