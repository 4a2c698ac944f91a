"""glmchat-train: P-Tuning v2 training, evaluation and before/after comparison for ChatGLM2-6B.

    python train_cli.py train --model THUDM/chatglm2-6b --train-file train.json --output-dir out
    python train_cli.py eval --model THUDM/chatglm2-6b --checkpoint out/checkpoint-600 --validation-file dev.json
    python train_cli.py compare --model THUDM/chatglm2-6b --checkpoint out/checkpoint-600 --prompt "类型#上衣*材质#牛仔布"

The original ptuning/main.py spellings work too (``--pre_seq_len 128``, ``--train_file``, ``--quantization_bit 8``,
``--model_name_or_path`` ...), so an original train.sh line runs with ``python train_cli.py train`` in front.
Several GPUs: ``torchrun --nproc-per-node N train_cli.py train ...`` or ``accelerate launch --multi_gpu --num_processes N
train_cli.py train ...`` (data parallel, same global batch).
A mistake in the input prints one line on stderr and exits with status 2; Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _micro_batch(value: str) -> Optional[int]:
    """--micro-batch-size: a count, or auto (None)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


def _mix(values: Optional[Sequence[str]]) -> Optional[tuple[float, ...]]:
    """--mix 0.7 0.3 or --mix 0.7,0.3."""
    if values is None:
        return None
    parts = [part for value in values for part in value.replace(",", " ").split()]
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise UsageError(f"--mix takes numbers, one weight per --train-file (got {' '.join(values)}).") from None


# TrainRequest fields whose flag is not simply --field-name.
FIELD_FLAGS = {"init_checkpoint": "--ptuning-checkpoint", "train_file": "--train-file", "resume": "--resume"}


def field_flag(name: str) -> str:
    return FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))


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
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_compare_command(commands)
    return parser


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train", help="train a P-Tuning v2 prefix (the original recipe)",
        description="Train a P-Tuning v2 prefix on a frozen ChatGLM2 base, as the original ptuning/main.py does. "
        "Checkpoints go to OUTPUT_DIR/checkpoint-STEP (the original layout), progress to OUTPUT_DIR/progress.jsonl. "
        "Ctrl-C saves a checkpoint and stops; --resume continues the same loss curve. Under torchrun the run is "
        "data parallel: --gradient-accumulation-steps is the global count, divided among the processes.",
    )
    _add_model_args(train, "default 8bit on a GPU")
    _add(train, "--train-file", required=True, action="append",
         help="training data: a JSON lines, JSON, CSV or Parquet file, a directory of them, or a dataset id in the "
         "local Hugging Face cache; repeat it to blend several (see --mix)")
    _add(train, "--mix", nargs="+", default=None, metavar="WEIGHT",
         help="one weight per --train-file, e.g. --mix 0.7 0.3: each example is drawn from a file with these "
         "probabilities (default: all files' examples shuffled together)")
    _add(train, "--validation-file", default=None, help="data for --do-eval (same kinds as --train-file)")
    _add_data_args(train)
    _add(train, "--pre-seq-len", type=int, default=128, help="prefix length in tokens (default: 128)")
    _add(train, "--prefix-projection", action="store_true", help="encode the prefix through a two-layer MLP (default: off, as the original)")
    _add(train, "--learning-rate", type=float, default=2e-2, help="AdamW peak learning rate, linear decay to 0 (default: 2e-2)")
    _add(train, "--per-device-train-batch-size", type=int, default=1,
         help="examples whose token-mean loss is one accumulation step, as the original trainer (default: 1)")
    _add(train, "--gradient-accumulation-steps", type=int, default=16,
         help="accumulation steps averaged into one optimizer step, in total over all GPUs (default: 16)")
    _add(train, "--micro-batch-size", type=_micro_batch, default=None, metavar="N|auto",
         help="examples of an optimizer step that go through the model at once; changes speed and memory, never "
         "the result (default: auto, the most that fit in free GPU memory)")
    _add(train, "--optim", choices=["adamw_hf", "adamw_torch"], default="adamw_hf",
         help="adamw_hf: transformers 4.30's AdamW, as the original trainer (default); adamw_torch: torch.optim.AdamW")
    _add(train, "--lr-scheduler-type", default="linear",
         help="learning-rate schedule by transformers' name: linear (default), cosine, constant, constant_with_warmup ...")
    _add(train, "--warmup-steps", type=int, default=0, help="steps of linear warm-up (default: 0)")
    _add(train, "--warmup-ratio", type=float, default=0.0, help="warm-up as a share of the steps, when --warmup-steps is 0")
    _add(train, "--report-to", choices=["none", "tensorboard", "wandb"], default="none",
         help="also log to TensorBoard (OUTPUT_DIR/runs) or Weights & Biases (default: none; progress.jsonl is always written)")
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
    _add(train, "--recompute-mlp", action=argparse.BooleanOptionalAction, default=None,
         help="recompute each MLP's up-projection in the backward instead of keeping it: 0.4 GB less an example at 6B, "
         "192 tokens, ~13%% slower (default: only when that lets a larger micro-batch fit)")
    _add(train, "--do-eval", action="store_true", help="generate for --validation-file and score ROUGE/BLEU every --eval-steps and at the end "
         "(files: OUTPUT_DIR for the latest, OUTPUT_DIR/eval/step-N for each)")
    _add(train, "--eval-steps", type=int, default=None, help="evaluate every N steps (default: --save-steps)")
    _add(train, "--max-train-samples", type=int, default=None, help="use only the first N training examples")
    _add(train, "--max-eval-samples", type=int, default=None, help="evaluate on the first N validation examples")
    _add(train, "--eval-batch-size", "--per-device-eval-batch-size", type=int, default=None, help="prompts generated together when evaluating (default: as many as free GPU memory holds; 8 on the CPU)")
    _add(train, "--sample", action="store_true", help="evaluate with the original sampling (temperature 0.95, top_p 0.7, top_k 50) instead of greedy")
    _add_ignored(train, list(IGNORED_SWITCHES), list(IGNORED_VALUES))


def _add_eval_command(commands) -> None:
    ev = commands.add_parser(
        "eval", help="generate for a data file and score ROUGE-1/2/L and BLEU-4",
        description="Generate a reply for every example (batched, greedy unless --sample), score it as the original "
        "compute_metrics does, and write generated_predictions.txt and metrics.json.",
    )
    _add_model_args(ev, "default 8bit on a GPU")
    _add(ev, "--checkpoint", "--ptuning-checkpoint", default=None, help="P-Tuning v2 checkpoint directory (default: the base model alone)")
    _add(ev, "--validation-file", "--test-file", required=True, action="append",
         help="data to evaluate on (a file, a directory or a cached dataset id); repeat it to score several side by side, "
         "each file's results then going to OUTPUT_DIR/<file name>")
    _add_data_args(ev)
    _add(ev, "--pre-seq-len", type=int, default=None, help="checked against the checkpoint when given (it knows its own)")
    _add(ev, "--batch-size", "--per-device-eval-batch-size", type=int, default=None, help="prompts generated together (default: as many as free GPU memory holds; 8 on the CPU)")
    _add(ev, "--max-eval-samples", "--max-predict-samples", type=int, default=None, help="evaluate on the first N examples")
    _add(ev, "--sample", action="store_true", help="sample like the original script (temperature 0.95, top_p 0.7, top_k 50) instead of greedy")
    ev.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    _add(ev, "--output-dir", default=None, help="where the two files go (default: the checkpoint directory)")
    _add_ignored(ev, ["do_eval", *IGNORED_SWITCHES], ["preprocessing_num_workers", "report_to", "cache_dir", "local_rank"])


def _add_compare_command(commands) -> None:
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
    """(rank, world, device): join the process group when torchrun or ``accelerate launch`` started several
    processes (accelerate reads either's environment, picks nccl or gloo and the local GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, args.device
    import torch
    from accelerate import PartialState

    use_cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    state = PartialState(cpu=not use_cuda)
    return state.process_index, state.num_processes, str(state.device)


def _load(args, device: Optional[str], quiet: bool = False):
    from backend.cli import CPU_NOTICE, large_on_cpu
    from backend.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(args.model, quantization=_quantization(args), device=device, dtype=_dtype(args, device))
    if not quiet:
        if device is None and large_on_cpu(loaded.model, loaded.device):
            _say(CPU_NOTICE)
        _say(f"loaded {args.model} ({loaded.precision}) on {loaded.device}")
    return loaded


def _report_skipped(skipped: Sequence[str], shown: int = 20) -> None:
    """Each skipped line once (the first ``shown``), then the count."""
    for message in skipped[:shown]:
        _say(f"skipped {message}")
    if skipped:
        more = f" ({len(skipped) - shown} not shown)" if len(skipped) > shown else ""
        _say(f"note: skipped {len(skipped)} bad line(s){more}.")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


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
    if hasattr(err, "worded"):  # a training request (RequestError) names TrainRequest fields: say our flags
        return err.worded(field_flag)
    oom_fix = ""
    if is_out_of_memory(err):  # torch is loaded by then; backend.training holds the training flags that help
        from backend.training.memory import OOM_HINT

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
        train_file=[Path(f) for f in args.train_file] if len(args.train_file) > 1 else Path(args.train_file[0]),
        output_dir=Path(args.output_dir), mix=_mix(args.mix), micro_batch_size=args.micro_batch_size, optim=args.optim,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        report_to=args.report_to,
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
    from backend.training import CheckpointStore, check_request, read_training_data, resolve_resume, train_prefix
    from backend.training.trackers import check_tracker

    request = request_from_args(args)
    rank, world, device = _distributed(args)
    main = rank == 0
    if main and _ignored_notes(args):
        _say(f"note: ignoring {', '.join(_ignored_notes(args))} (not needed here).")
    check_request(request, world)
    check_tracker(request.report_to)
    if main:  # a re-save cut between its renames: put it back first, so the checkpoint named is the one resumed
        CheckpointStore(request.output_dir).recover()
    _barrier(world)
    resume = resolve_resume(request)
    if main and request.resume and resume is None:
        _say(f"note: no checkpoint in {request.output_dir} yet, starting a new run.")
    data = read_training_data(request, args.max_train_samples, args.max_eval_samples)
    if main:
        _report_skipped(data.skipped)
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
    sets = _read_eval_sets(args, output_dir)  # every file checked before the model loads
    if _ignored_notes(args):
        _say(f"note: ignoring {', '.join(_ignored_notes(args))} (not needed here).")
    loaded = _load(args, args.device)
    prefix_kv = None
    if checkpoint is not None:
        registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
        prefix_kv = registry.prefix_kv(registry.register(checkpoint).name)
    cancel = threading.Event()
    restore = _install_stop_handler(cancel, "stopping the evaluation (nothing more is written)")
    params = ORIGINAL_SAMPLING if args.sample else GREEDY
    results = []
    try:
        from rich.progress import Progress

        with Progress(console=_console(), transient=True) as bar:
            for name, examples, where in sets:
                task = bar.add_task(f"generating {name}", total=len(examples))
                result = evaluate(
                    loaded.model, loaded.tokenizer, examples, max_source_length=args.max_source_length,
                    max_target_length=args.max_target_length, source_prefix=args.source_prefix or "", prefix_kv=prefix_kv,
                    batch_size=args.batch_size, params=params, seed=args.seed, output_dir=where, cancel=cancel,
                    progress=lambda done, total, task=task: bar.update(task, completed=done),
                    extra_metrics={"checkpoint": str(checkpoint) if checkpoint else None, "model": args.model,
                                   "decoding": "sample" if args.sample else "greedy", "data": name},
                )
                if result.stopped:
                    _say("evaluation stopped; the unfinished file's results are not written.")
                    return EXIT_INTERRUPTED
                results.append((name, result, where))
    finally:
        restore()
    _print_metrics(results)
    return 0


def _read_eval_sets(args, output_dir: Path) -> list[tuple[str, list, Path]]:
    """(name, examples, where its results go) per --validation-file: OUTPUT_DIR for one file, OUTPUT_DIR/<name>
    for each of several, so their predictions do not overwrite each other."""
    from backend.data import read_examples

    files = args.validation_file
    names = [Path(f).stem or str(f) for f in files]
    if len(set(names)) < len(names):
        names = [str(f).replace("/", "_") for f in files]
    sets = []
    for file, name in zip(files, names):
        examples = read_examples(file, args.prompt_column, args.response_column, args.history_column, args.skip_bad_lines)
        _report_skipped(examples.skipped)
        examples = list(examples)[: args.max_eval_samples] if args.max_eval_samples else list(examples)
        sets.append((name, examples, output_dir if len(files) == 1 else output_dir / name))
    return sets


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _print_metrics(results: list) -> None:
    """One row per data file, metrics side by side: what a prefix gains on its task and loses elsewhere."""
    from rich.console import Console
    from rich.table import Table

    keys = list(results[0][1].metrics)
    table = Table(title=", ".join(f"{name}: {len(r.predictions)} examples, {r.seconds:.1f} s" for name, r, _ in results))
    table.add_column("data")
    for key in keys:
        table.add_column(key, justify="right")
    for name, result, _ in results:
        table.add_row(name, *[f"{result.metrics.get(k, float('nan')):.4f}" for k in keys])
    Console().print(table)
    for _, _, where in results:
        print(f"wrote {where / 'generated_predictions.txt'} and {where / 'metrics.json'}")


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
    from backend.cli import CPU_NOTICE, large_on_cpu

    device = args.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ChatEngine.load(model=args.model, quantization=_quantization(args), adapters=[args.checkpoint],
                                 device=device, max_batch=min(COMPARE_MAX_ROWS, 2 * len(prompts)))
    if device is None and large_on_cpu(engine.model, engine.info.device):
        _say(CPU_NOTICE)
    tuned = engine.adapters()[0].name
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    table = Table(title=f"{args.model}: base vs {tuned}", show_lines=True, expand=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column("base", ratio=2, overflow="fold")
    table.add_column(tuned, ratio=2, overflow="fold")
    console = Console()
    with console.status("generating...") if console.is_terminal else contextlib.nullcontext():
        replies = compare_replies(engine, prompts, params, tuned, args.seed)
    for prompt, (base, after) in zip(prompts, replies):
        table.add_row(prompt, base, after)
    console.print(table)
    engine.close()
    return 0


COMPARE_MAX_ROWS = 16  # rows decoded together by `compare`: 8 prompts' base and tuned replies


def compare_replies(engine, prompts: list[str], params, tuned: str, seed: int) -> list[tuple[str, str]]:
    """Each prompt's (base, tuned) reply texts: the two as one batch of two rows (``ChatEngine.compare``), and as
    many prompts at once as the engine holds rows for."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.service import ReplyDone

    def pair(prompt: str) -> tuple[str, str]:
        texts = ["", ""]
        for event in engine.compare(prompt, [], params, adapters=[None, tuned], seed=seed):
            if isinstance(event, ReplyDone):
                texts[event.stream] = event.reply.text
        return texts[0], texts[1]

    with ThreadPoolExecutor(max_workers=max(1, engine.info.max_batch // 2)) as pool:
        return list(pool.map(pair, prompts))


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
