"""glmchat-train: P-Tuning v2 training, evaluation and before/after comparison for ChatGLM2-6B.

    python train_cli.py train --model THUDM/chatglm2-6b --train-file train.json --output-dir out
    python train_cli.py eval --model THUDM/chatglm2-6b --checkpoint out/checkpoint-600 --validation-file dev.json
    python train_cli.py compare --model THUDM/chatglm2-6b --checkpoint out/checkpoint-600 --prompt "类型#上衣*材质#牛仔布"

The original ptuning/main.py spellings work too (``--pre_seq_len 128``, ``--train_file``, ``--quantization_bit 8``,
``--model_name_or_path`` ...), so an original train.sh line runs with ``python train_cli.py train`` in front.
Several GPUs: ``torchrun --nproc-per-node N train_cli.py train ...`` (data parallel, same global batch).
A mistake in the input prints one line on stderr and exits with status 2; Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

PROG = "glmchat-train"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line that cannot run; the message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2; no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(f"{message} (see {self.prog} --help)")


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """The original scripts' ``--pre_seq_len 128`` / ``--train_file=x`` spellings as ``--pre-seq-len``."""
    out = []
    for arg in argv:
        if arg == "--":
            out.extend(argv[len(out):])
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name[2:].replace("_", "").isalnum():
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _add(parser, name: str, *aliases: str, **kw):
    return parser.add_argument(name, *aliases, **kw)


# ----------------------------------------------------------------------------- the parsers


# Flags of the original scripts that change nothing here: accepted, reported once as ignored.
IGNORED_SWITCHES = {
    "do_train": "the train command trains",
    "do_predict": "use the eval command to predict",
    "overwrite_cache": "nothing is cached",
    "predict_with_generate": "evaluation always generates",
    "use_fast_tokenizer": "ChatGLM2 has one tokenizer",
    "ddp_find_unused_parameters": "no DistributedDataParallel wrapper is used",
}
IGNORED_VALUES = {
    "preprocessing_num_workers": "preprocessing is fast enough in one process",
    "dataloader_num_workers": "batches are built in the training loop",
    "report_to": "progress goes to progress.jsonl",
    "logging_dir": "progress goes to OUTPUT_DIR/progress.jsonl",
    "cache_dir": "models come from --model or the hub cache",
    "save_total_limit": "every checkpoint is kept",
    "local_rank": "torchrun's environment says the rank",
    "evaluation_strategy": "use --do-eval / --eval-steps",
}


def _add_ignored(parser, switches: Sequence[str], values: Sequence[str]) -> None:
    group = parser.add_argument_group("accepted for compatibility with ptuning/main.py and ignored")
    for name in switches:
        group.add_argument("--" + name.replace("_", "-"), dest=f"ignored_{name}", action="store_true",
                           help=argparse.SUPPRESS)
    for name in values:
        group.add_argument("--" + name.replace("_", "-"), dest=f"ignored_{name}", metavar="X",
                           help=argparse.SUPPRESS)


def _add_model_args(parser, default_quantization_help: str) -> None:
    _add(parser, "--model", "--model-name-or-path", required=True,
         help="ChatGLM2 model directory or hub id (e.g. THUDM/chatglm2-6b)")
    _add(parser, "--quantization", choices=["8bit", "4bit", "none", "auto"], default=None,
         help=f"base model precision: 8bit, 4bit or none (16-bit on a GPU, float32 on the CPU); {default_quantization_help}")
    _add(parser, "--quantization-bit", type=int, choices=[4, 8], default=None,
         help="the original spelling: --quantization_bit 8 is --quantization 8bit")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the GPU when there is one)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="16-bit compute type of the base (default: bf16 where supported, else fp16; fp32 on the CPU)")
    parser.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="same as --dtype fp16")
    parser.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="same as --dtype bf16")


def _add_data_args(parser) -> None:
    _add(parser, "--prompt-column", default="content", help="JSON key of the prompt (default: content)")
    _add(parser, "--response-column", default="summary", help="JSON key of the response (default: summary)")
    _add(parser, "--history-column", default=None, help="JSON key of [query, response] pairs before the prompt (optional)")
    _add(parser, "--source-prefix", default="", help="text put in front of every prompt (default: none)")
    _add(parser, "--max-source-length", type=int, default=64, help="prompt tokens kept (default: 64)")
    _add(parser, "--max-target-length", type=int, default=128, help="response tokens kept (default: 128)")
    _add(parser, "--skip-bad-lines", action="store_true",
         help="skip data lines that are not JSON or lack a column (each is reported) instead of stopping")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="P-Tuning v2 for ChatGLM2-6B: train a prefix, evaluate it, compare it with the base model.",
        epilog="Every flag may also be spelled as in the original ptuning/main.py (--pre_seq_len for --pre-seq-len).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,eval,compare}", parser_class=Parser)

    # ------------------------------------------------------------------ train
    train = commands.add_parser(
        "train", help="train a P-Tuning v2 prefix (the original recipe)",
        description="Train a P-Tuning v2 prefix on a frozen ChatGLM2 base, as the original ptuning/main.py does. "
        "Checkpoints go to OUTPUT_DIR/checkpoint-STEP (the original layout), progress to OUTPUT_DIR/progress.jsonl. "
        "Ctrl-C saves a checkpoint and stops; --resume continues the same loss curve. Under torchrun the run is "
        "data parallel: --gradient-accumulation-steps is the global count, divided among the processes.",
    )
    _add_model_args(train, "default 8bit on a GPU")
    _add(train, "--train-file", required=True, help="JSON lines training data")
    _add(train, "--validation-file", default=None, help="JSON lines data for --do-eval")
    _add_data_args(train)
    _add(train, "--pre-seq-len", type=int, default=128, help="prefix length in tokens (default: 128)")
    _add(train, "--prefix-projection", action="store_true", help="encode the prefix through a two-layer MLP (default: off, as the original)")
    _add(train, "--learning-rate", type=float, default=2e-2, help="AdamW peak learning rate, linear decay to 0 (default: 2e-2)")
    _add(train, "--per-device-train-batch-size", type=int, default=1, help="examples per micro-batch per GPU (default: 1)")
    _add(train, "--gradient-accumulation-steps", type=int, default=16,
         help="micro-batches per optimizer step, in total over all GPUs (default: 16)")
    _add(train, "--max-steps", type=int, default=None, help="optimizer steps (default: 3000, or as many as --num-train-epochs needs)")
    _add(train, "--num-train-epochs", type=float, default=None, help="epochs, used when --max-steps is not given")
    _add(train, "--logging-steps", type=int, default=10, help="log the mean loss every N steps (default: 10)")
    _add(train, "--save-steps", type=int, default=1000, help="save a checkpoint every N steps; 0 = only at the end (default: 1000)")
    _add(train, "--output-dir", required=True, help="where checkpoints and progress.jsonl go")
    _add(train, "--overwrite-output-dir", action="store_true", help="start a new run in an output dir that holds checkpoints (they are replaced)")
    _add(train, "--resume", "--resume-from-checkpoint", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
         help="continue the latest checkpoint in --output-dir, or the given checkpoint directory")
    _add(train, "--ptuning-checkpoint", default=None, metavar="CHECKPOINT",
         help="start from this P-Tuning v2 checkpoint's prefix (a new optimizer and schedule; --resume continues a run instead)")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    _add(train, "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
         help="recompute activations in the backward pass: less GPU memory, about a third slower (default: off)")
    _add(train, "--recompute-mlp", action=argparse.BooleanOptionalAction, default=True,
         help="recompute each MLP's up-projection in the backward instead of keeping it: 0.4 GB less at 6B, "
         "192 tokens, ~13%% slower (default: on)")
    _add(train, "--do-eval", action="store_true", help="generate for --validation-file and score ROUGE/BLEU every --eval-steps and at the end "
         "(files: OUTPUT_DIR for the latest, OUTPUT_DIR/eval/step-N for each)")
    _add(train, "--eval-steps", type=int, default=None, help="evaluate every N steps (default: --save-steps)")
    _add(train, "--max-train-samples", type=int, default=None, help="use only the first N training examples")
    _add(train, "--max-eval-samples", type=int, default=None, help="evaluate on the first N validation examples")
    _add(train, "--eval-batch-size", "--per-device-eval-batch-size", type=int, default=None, help="prompts generated together when evaluating (default: as many as free GPU memory holds; 8 on the CPU)")
    _add(train, "--sample", action="store_true", help="evaluate with the original sampling (temperature 0.95, top_p 0.7, top_k 50) instead of greedy")
    _add_ignored(train, list(IGNORED_SWITCHES), list(IGNORED_VALUES))

    # ------------------------------------------------------------------ eval
    ev = commands.add_parser(
        "eval", help="generate for a data file and score ROUGE-1/2/L and BLEU-4",
        description="Generate a reply for every example (batched, greedy unless --sample), score it as the original "
        "compute_metrics does, and write generated_predictions.txt and metrics.json.",
    )
    _add_model_args(ev, "default 8bit on a GPU")
    _add(ev, "--checkpoint", "--ptuning-checkpoint", default=None, help="P-Tuning v2 checkpoint directory (default: the base model alone)")
    _add(ev, "--validation-file", "--test-file", required=True, help="JSON lines data to evaluate on")
    _add_data_args(ev)
    _add(ev, "--pre-seq-len", type=int, default=None, help="checked against the checkpoint when given (it knows its own)")
    _add(ev, "--batch-size", "--per-device-eval-batch-size", type=int, default=None, help="prompts generated together (default: as many as free GPU memory holds; 8 on the CPU)")
    _add(ev, "--max-eval-samples", "--max-predict-samples", type=int, default=None, help="evaluate on the first N examples")
    _add(ev, "--sample", action="store_true", help="sample like the original script (temperature 0.95, top_p 0.7, top_k 50) instead of greedy")
    ev.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    _add(ev, "--output-dir", default=None, help="where the two files go (default: the checkpoint directory)")
    _add_ignored(ev, ["do_eval", *IGNORED_SWITCHES], ["preprocessing_num_workers", "report_to", "cache_dir", "local_rank"])

    # ------------------------------------------------------------------ compare
    cmp = commands.add_parser(
        "compare", help="the base model's reply and the tuned reply side by side",
        description="Answer each prompt with the base model and with the checkpoint's prefix, and print both side by side.",
    )
    _add_model_args(cmp, "default 8bit on a GPU")
    _add(cmp, "--checkpoint", "--ptuning-checkpoint", required=True, help="P-Tuning v2 checkpoint directory")
    cmp.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    cmp.add_argument("--file", default=None, help="prompts, one per line (JSON lines: the --prompt-column value)")
    _add(cmp, "--prompt-column", default="content", help="JSON key of the prompt in --file (default: content)")
    _add(cmp, "--max-new-tokens", type=int, default=256, help="reply length limit (default: 256)")
    cmp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); the original chat() uses 0.8")
    _add(cmp, "--top-p", type=float, default=0.8, help="nucleus sampling when --temperature > 0 (default: 0.8)")
    cmp.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    return parser


# ----------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _ignored_notes(args) -> list[str]:
    notes = [f"--{k[len('ignored_'):]}" for k, v in vars(args).items() if k.startswith("ignored_") and v not in (None, False)]
    return notes


def _quantization(args) -> Optional[str]:
    if args.quantization_bit is not None:
        wanted = f"{args.quantization_bit}bit"
        if args.quantization not in (None, "auto", wanted):
            raise UsageError(f"--quantization {args.quantization} and --quantization_bit {args.quantization_bit} disagree; give one.")
        return wanted
    return args.quantization


def _dtype(args, device: Optional[str]) -> Optional[str]:
    import torch

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.dtype in ("fp16", "bf16") and not on_gpu:
        _say(f"note: --{args.dtype} is for GPUs; the CPU computes in float32.")
        return None
    return args.dtype


def _distributed(args) -> tuple[int, int, Optional[str]]:
    """(rank, world, device): set up torch.distributed when torchrun started us with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, args.device
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _load(args, device: Optional[str], quiet: bool = False):
    import torch

    from backend.loading import load_model

    if not quiet and device is None and not torch.cuda.is_available():
        _say("no GPU found, running on the CPU (slow for a 6B model).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(args.model, quantization=_quantization(args), device=device, dtype=_dtype(args, device))
    if not quiet:
        _say(f"loaded {args.model} ({loaded.precision}) on {loaded.device}")
    return loaded


def _install_stop_handler(cancel: threading.Event, verb: str):
    """First Ctrl-C (or SIGTERM): finish the current step, save, stop. Second: stop at once."""

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        _say(f"stopping: {verb} (press Ctrl-C again to quit at once; saved checkpoints stay intact)")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def error_line(err: BaseException) -> str:
    """One sentence for a failure the user can fix (backend/errors.py); anything else is re-raised (a bug shows
    its traceback)."""
    from backend.errors import explain, is_out_of_memory

    if isinstance(err, UsageError):
        return str(err)
    oom_fix = ""
    if is_out_of_memory(err):  # torch is loaded by then; backend.training holds the training flags that help
        from backend.training import OOM_HINT

        oom_fix = OOM_HINT
    problem = explain(err, oom_fix=oom_fix)
    if problem is None:
        raise err
    return problem.line()


# ----------------------------------------------------------------------------- commands


def request_from_args(args):
    from backend.service import TrainRequest

    eval_steps = args.eval_steps
    if args.do_eval and not eval_steps:
        eval_steps = args.save_steps or None
    if args.do_eval and not args.validation_file:
        raise UsageError("--do-eval needs --validation-file.")
    max_steps = args.max_steps if args.max_steps is not None else (-1 if args.num_train_epochs else 3000)
    return TrainRequest(
        train_file=Path(args.train_file), output_dir=Path(args.output_dir),
        validation_file=Path(args.validation_file) if args.validation_file else None,
        prompt_column=args.prompt_column, response_column=args.response_column, history_column=args.history_column,
        source_prefix=args.source_prefix or "", max_source_length=args.max_source_length,
        max_target_length=args.max_target_length, pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=max_steps,
        num_train_epochs=args.num_train_epochs, logging_steps=args.logging_steps, save_steps=args.save_steps,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, recompute_mlp=args.recompute_mlp,
        resume=args.resume,
        overwrite_output_dir=args.overwrite_output_dir, skip_bad_lines=args.skip_bad_lines, eval_steps=eval_steps,
        init_checkpoint=Path(args.ptuning_checkpoint) if args.ptuning_checkpoint else None,
    )


def cmd_train(args) -> int:
    from backend.progress import RichProgress, plain_printer
    from backend.training import check_request, read_training_data, resolve_resume, train_prefix

    request = request_from_args(args)
    rank, world, device = _distributed(args)
    main = rank == 0
    if main and _ignored_notes(args):
        _say(f"note: ignoring {', '.join(_ignored_notes(args))} (not needed here).")
    check_request(request, world)
    resume = resolve_resume(request)
    if main and request.resume and resume is None:
        _say(f"note: no checkpoint in {request.output_dir} yet, starting a new run.")
    data = read_training_data(request, args.max_train_samples, args.max_eval_samples)
    if main and data.skipped:
        _say(f"note: skipped {len(data.skipped)} bad line(s); the first: {data.skipped[0]}")
    loaded = _load(args, device, quiet=not main)
    if main:
        per_step = request.per_device_train_batch_size * request.gradient_accumulation_steps
        where = f"resuming {resume}" if resume else f"writing to {request.output_dir}"
        if request.init_checkpoint is not None and not resume:
            where += f", starting from the prefix in {request.init_checkpoint}"
        _say(f"{len(data.train)} examples, {per_step} per step"
             + (f" over {world} processes" if world > 1 else "") + f"; {where}")
    cancel = threading.Event()
    restore = _install_stop_handler(cancel, "saving a checkpoint after this step")
    eval_params = None
    if args.sample:
        from backend.evaluation import ORIGINAL_SAMPLING

        eval_params = ORIGINAL_SAMPLING
    try:
        kw = dict(cancel=cancel, data=data, eval_batch_size=args.eval_batch_size, eval_params=eval_params)
        if main and sys.stderr.isatty():
            with RichProgress() as bar:
                result = train_prefix(loaded.model, loaded.tokenizer, request, progress=bar, on_step=bar.tick, **kw)
        else:
            result = train_prefix(loaded.model, loaded.tokenizer, request, progress=plain_printer() if main else None, **kw)
    finally:
        restore()
    if main:
        last = result.last_checkpoint
        if result.stopped and last is None:
            _say("stopped before the first step; nothing was saved.")
        elif result.stopped:
            _say(f"stopped at step {result.steps_done}; saved {last}. Continue with --resume.")
        else:
            _say(f"done: {result.steps_done} steps; last checkpoint {last}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return EXIT_INTERRUPTED if result.stopped else 0


def cmd_eval(args) -> int:
    from backend.adapters import AdapterRegistry
    from backend.data import read_examples
    from backend.evaluation import GREEDY, ORIGINAL_SAMPLING, evaluate

    if args.checkpoint is None and args.output_dir is None:
        raise UsageError("without --checkpoint (evaluating the base model) give --output-dir for the results.")
    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else None
    if checkpoint is not None:
        from backend.adapters import read_prefix_checkpoint

        ckpt = read_prefix_checkpoint(checkpoint)  # fails fast, before the model loads
        if args.pre_seq_len is not None and args.pre_seq_len != ckpt.pre_seq_len:
            raise UsageError(f"--pre-seq-len {args.pre_seq_len} but {checkpoint} was trained with {ckpt.pre_seq_len}; drop the flag.")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else checkpoint
    examples = read_examples(args.validation_file, args.prompt_column, args.response_column, args.history_column, args.skip_bad_lines)
    if examples.skipped:
        _say(f"note: skipped {len(examples.skipped)} bad line(s); the first: {examples.skipped[0]}")
    examples = list(examples)[: args.max_eval_samples] if args.max_eval_samples else list(examples)
    if _ignored_notes(args):
        _say(f"note: ignoring {', '.join(_ignored_notes(args))} (not needed here).")
    loaded = _load(args, args.device)
    prefix_kv = None
    if checkpoint is not None:
        registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
        prefix_kv = registry.prefix_kv(registry.register(checkpoint).name)
    cancel = threading.Event()
    restore = _install_stop_handler(cancel, "stopping the evaluation (nothing is written)")
    params = ORIGINAL_SAMPLING if args.sample else GREEDY
    try:
        from rich.progress import Progress

        with Progress(console=_console(), transient=True) as bar:
            task = bar.add_task("generating", total=len(examples))
            result = evaluate(
                loaded.model, loaded.tokenizer, examples, max_source_length=args.max_source_length,
                max_target_length=args.max_target_length, source_prefix=args.source_prefix or "", prefix_kv=prefix_kv,
                batch_size=args.batch_size, params=params, seed=args.seed, output_dir=output_dir, cancel=cancel,
                progress=lambda done, total: bar.update(task, completed=done),
                extra_metrics={"checkpoint": str(checkpoint) if checkpoint else None, "model": args.model,
                               "decoding": "sample" if args.sample else "greedy"},
            )
    finally:
        restore()
    if result.stopped:
        _say("evaluation stopped; nothing written.")
        return EXIT_INTERRUPTED
    _print_metrics(result, output_dir)
    return 0


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _print_metrics(result, output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(result.predictions)} examples, {result.seconds:.1f} s")
    for key in result.metrics:
        table.add_column(key, justify="right")
    table.add_row(*[f"{v:.4f}" for v in result.metrics.values()])
    Console().print(table)
    print(f"wrote {output_dir / 'generated_predictions.txt'} and {output_dir / 'metrics.json'}")


def _read_prompts(args) -> list[str]:
    import json

    prompts = list(args.prompt)
    if args.file:
        path = Path(args.file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise UsageError(f"--file {path}: no such file; check the path.") from None
        except (IsADirectoryError, UnicodeDecodeError) as err:
            raise UsageError(f"--file {path} is not a UTF-8 text file ({type(err).__name__}).") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            text = line
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict):
                    if args.prompt_column not in record:
                        raise UsageError(f"{path}:{n}: no '{args.prompt_column}' key; pass --prompt-column.")
                    text = str(record[args.prompt_column])
            prompts.append(text)
    if not prompts:
        raise UsageError("no prompt given: pass --prompt TEXT (repeatable) or --file PROMPTS.")
    return prompts


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from backend.adapters import read_prefix_checkpoint
    from backend.engine import ChatEngine
    from backend.service import SamplingParams

    prompts = _read_prompts(args)
    read_prefix_checkpoint(args.checkpoint)  # fails fast, before the model loads
    import torch

    device = args.device
    if device is None and not torch.cuda.is_available():
        _say("no GPU found, running on the CPU (slow for a 6B model).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ChatEngine.load(model=args.model, quantization=_quantization(args), adapters=[args.checkpoint],
                                 engine="eager", device=device)
    tuned = engine.adapters()[0].name
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    table = Table(title=f"{args.model}: base vs {tuned}", show_lines=True, expand=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column("base", ratio=2, overflow="fold")
    table.add_column(tuned, ratio=2, overflow="fold")
    console = Console()
    with console.status("generating...") if console.is_terminal else _nullcontext():
        for prompt in prompts:
            base = engine.reply(prompt, [], params, adapter=None, seed=args.seed)
            after = engine.reply(prompt, [], params, adapter=tuned, seed=args.seed)
            table.add_row(prompt, base.text, after.text)
    console.print(table)
    return 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- entry point


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}


def _quiet_libraries() -> None:
    """bitsandbytes logs a warning on every 8-bit matmul whose input is not float16 (bf16 on GPUs, float32 on
    the CPU) and one about optional CPU kernels at import: noise under a progress bar."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = normalize_flags(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    parser = build_parser()
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # an original main.py command line without the command name
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _say("interrupted; checkpoints saved so far are intact.")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - error_line re-raises what is not a user mistake
        _say(error_line(err))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
