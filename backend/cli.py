"""``glmchat --prompt``: one reply on stdout, like ``ollama run MODEL "prompt"``.

User mistakes (a missing path, a directory that is not ChatGLM2, corrupt weights, a
mismatched adapter, running out of GPU memory) print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import warnings
from argparse import Namespace

EXIT_USAGE = 2


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


def _load_engine(args: Namespace):
    """The engine for ``args`` with ``args.adapter[-1]`` (else the last adapter found) active."""
    from .engine import ChatEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        if not torch.cuda.is_available() and getattr(args, "device", None) in (None, "auto"):
            print("glmchat: no GPU found, running on the CPU (slow for a 6B model).", file=sys.stderr)
        engine = ChatEngine.load(
            model=getattr(args, "model", None),
            quantization=getattr(args, "quantization", None),
            adapters=getattr(args, "adapter", None) or [],
            adapter_dirs=_as_list(getattr(args, "adapters", None)),
            demo=getattr(args, "demo", False),
            engine=getattr(args, "engine", None) or "auto",
        )
    adapters = engine.adapters()
    if adapters:
        explicit = getattr(args, "adapter", None) or []
        engine.switch_adapter(adapters[len(explicit) - 1].name if explicit else adapters[-1].name)
    return engine


def show_info(args: Namespace) -> int:
    """``glmchat --model X --info``: print the model structure page (see backend/structure.py)."""
    try:
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
