"""P-Tuning v2 at full ChatGLM2-6B size (random weights in the release layout, see bench_load.py make):
the original train.sh recipe through ``train_cli.py train`` itself, step time of the step alone, and
batched evaluation throughput.

    python bench/bench_load.py make /tmp/glm6b
    python bench/bench_train.py /tmp/glm6b 8bit                 # prints one JSON line per measurement
    python bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 40

Recipe: train.sh's flags (batch 1 x accumulation 16, prefix 128, lengths 64 + 128, lr 2e-2) on our sample
data, as a subprocess: the defaults (``--micro-batch-size auto``, MLP recompute auto), then for comparison
micro-batches of 16 recomputing the MLP (the defaults before run 9), and the defaults with the int8 linears
kept on the Triton kernels at every size (GLMCHAT_WIDEN_MIN_ROWS): ms per optimizer step (from
progress.jsonl, after the first steps' CUDA graph captures), peak GPU memory, the micro-batch and recompute
auto chose, and the time the whole recipe (3000 steps) would take. Then auto again with the process limited
to 7.5 GB (torch.cuda.set_per_process_memory_fraction), as on a small card: its peak must stay within 7.5 GB.
``--variants`` picks some of them; ``--max-steps 3000`` runs the whole recipe.
Step: batch 1 x 192 tokens (the figure the original stack was measured at). Evaluation: 1070 prompts
(AdvertiseGen's dev split size), 128 new tokens each; random weights never emit eos.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE_STEPS = 3000  # train.sh's --max_steps
SMALL_CARD_GB = 7.5
TRAIN_SH = ["--pre_seq_len", "128", "--learning_rate", "2e-2", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "16", "--max_source_length", "64", "--max_target_length", "128",
            "--quantization_bit", "8", "--prompt_column", "content", "--response_column", "summary"]
# Runs the CLI in a process whose CUDA allocations are capped, as on a card of that size.
_LIMITED = ("import sys, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]) * 1e9 / "
            "torch.cuda.get_device_properties(0).total_memory); sys.argv = sys.argv[1:]; sys.path.insert(0, '.'); "
            "import train_cli; sys.exit(train_cli.main(sys.argv[1:]))")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


# name -> (extra train_cli flags, extra environment, memory cap in GB)
VARIANTS = {
    "default": ([], {}, None),
    "16-recompute": (["--micro-batch-size", "16", "--recompute-mlp"], {}, None),
    "default-triton-only": ([], {"GLMCHAT_WIDEN_MIN_ROWS": str(1 << 30)}, None),
    "default-7.5gb": ([], {}, SMALL_CARD_GB),
    "1-recompute": (["--micro-batch-size", "1", "--recompute-mlp"], {}, None),
}


def recipe_run(model_dir: str, variant: str, max_steps: int) -> dict:
    """train.sh's recipe through ``train_cli.py train`` in a subprocess; its figures from progress.jsonl."""
    flags, env, limit_gb = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", "--model", model_dir, "--train_file", str(ROOT / "assets/sample/train.json"), "--output_dir", out,
                *TRAIN_SH, "--max_steps", str(max_steps), "--logging_steps", "1", "--save_steps", str(max_steps), *flags]
        command = [sys.executable, "-c", _LIMITED, str(limit_gb)] if limit_gb else [sys.executable, str(ROOT / "train_cli.py")]
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        start = time.perf_counter()
        done = subprocess.run(command + argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env, "PYTHONPATH": path})
        wall = time.perf_counter() - start
        row = {"what": "recipe", "variant": variant, "command": "train_cli.py " + " ".join(argv[:1] + argv[7:]),
               "env": env, "limit_gb": limit_gb, "max_steps": max_steps, "exit": done.returncode, "wall_s": round(wall, 1)}
        if done.returncode != 0:
            return {**row, "error": done.stderr.strip().splitlines()[-1:]}
        events = [json.loads(line) for line in (Path(out) / "progress.jsonl").read_text().splitlines() if line.strip()]
        state = json.loads((Path(out) / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    logs = [e for e in events if e["event"] == "log"]
    skip = min(len(logs) - 2, max(2, len(logs) // 5))  # the first steps capture CUDA graphs
    ms = (logs[-1]["elapsed_s"] - logs[skip]["elapsed_s"]) * 1000 / (logs[-1]["step"] - logs[skip]["step"])
    peak = max((e["gpu_mem_gb"] or 0) for e in events)
    start = next(e for e in events if e["event"] == "start")
    return {**row, "chosen_micro_batch": state["micro_batch_size"], "recompute_mlp": state.get("recompute_mlp"),
            "ms_per_step": round(ms, 1), "first_step_at_s": start["elapsed_s"],
            "peak_gpu_gb": round(peak, 2), "projected_recipe_min": round(ms * RECIPE_STEPS / 60000, 1),
            "first_losses": [round(e["loss"], 3) for e in logs[:3]], "last_losses": [round(e["loss"], 3) for e in logs[-3:]],
            "within_limit": None if limit_gb is None else peak <= limit_gb}


def recipe(model_dir: str, max_steps: int, variants=("default", "16-recompute", "default-triton-only", "default-7.5gb")) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for variant in variants:
        emit(**recipe_run(model_dir, variant, max_steps), device=device)


def bitsandbytes_8bit(model_dir: str):
    """The 8-bit model of the original stack: transformers' BitsAndBytesConfig (LLM.int8, threshold 6.0)."""
    import torch
    from transformers import AutoModel, BitsAndBytesConfig

    import backend

    backend.register()
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return AutoModel.from_pretrained(model_dir, quantization_config=config, dtype=torch.float16, device_map="cuda")


def main(model_dir: str, quantization: str, eval_batch: int = 128, eval_examples: int = 1070, step_only: bool = False,
         no_eval: bool = False, max_steps: int = 40) -> None:
    if quantization == "8bit" and not step_only:
        recipe(model_dir, max_steps)
    import torch

    import backend  # noqa: F401
    from backend.data import read_examples
    from backend.evaluation import evaluate
    from backend.loading import load_model
    from step_timer import benchmark_step

    loaded = load_model(model_dir, quantization=quantization)
    cuda = torch.cuda.is_available()
    model, device = loaded.model, torch.cuda.get_device_name() if cuda else "cpu"

    def peak_gb():
        return round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    # bitsandbytes' own 8-bit matmuls first (the model as transformers' BitsAndBytesConfig loads it; eager,
    # keeping every activation, as the original), then our weight-only int8 (what `load_model` builds): CUDA
    # graphs, with and without recomputing the MLP up-projection in the backward (the default), and with
    # whole-layer gradient checkpointing.
    configs = [  # (weight-only int8, CUDA graphs, gradient checkpointing, MLP recompute)
        (False, False, False, False),
        (True, True, False, False),
        (True, True, False, True),
        (True, True, True, False),
    ]
    if quantization != "8bit":  # weight-only int8 applies to 8-bit bases only
        configs = [(False, True, False, False), (False, True, False, True), (False, True, True, False)]
    for weight_only, graphs, checkpointing, recompute in configs:
        baseline = quantization == "8bit" and not weight_only
        bench = benchmark_step(bitsandbytes_8bit(model_dir) if baseline else model, batch_size=1, seq_len=192,
                               pre_seq_len=128, steps=10, gradient_checkpointing=checkpointing,
                               weight_only_int8=weight_only, cuda_graphs=graphs, recompute_mlp=recompute)
        emit(what="ptuning_step", quantization=quantization,
             note="peak includes glmchat's 8-bit model, loaded beside it" if baseline else None,
             int8_kernels=("weight-only" if weight_only else "bitsandbytes") if quantization == "8bit" else None,
             cuda_graphs=graphs, gradient_checkpointing=checkpointing, recompute_mlp=recompute,
             ms_per_step=round(bench.ms_per_step, 1), peak_gpu_gb=bench.peak_gpu_gb and round(bench.peak_gpu_gb, 2),
             peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None, device=device)

    if step_only:
        return
    if no_eval:
        return
    # Evaluation throughput: 1070 examples, 128 new tokens each, batched with left padding.
    try:
        import jieba, nltk, rouge_chinese  # noqa: F401,E401
    except ImportError:  # not on the GPU machine: time the generation, score nothing
        import backend.evaluation

        backend.evaluation.compute_metrics = lambda preds, golds: {"skipped": "jieba/nltk/rouge-chinese not installed"}
    examples = list(read_examples(ROOT / "assets/sample/dev.json", "content", "summary"))
    examples = (examples * (eval_examples // len(examples) + 1))[:eval_examples]
    reset_peak()
    start = time.perf_counter()
    result = evaluate(model, loaded.tokenizer, examples, max_source_length=64, max_target_length=128, batch_size=eval_batch)
    seconds = time.perf_counter() - start
    emit(what="eval", quantization=quantization, examples=len(examples), batch_size=eval_batch, seconds=round(seconds, 1),
         examples_per_s=round(len(examples) / seconds, 2), new_tokens_each=128,
         peak_gpu_gb=peak_gb(), device=device)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("quantization", choices=["8bit", "4bit", "none"])
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=1070)
    parser.add_argument("--step-only", action="store_true", help="only the step benchmark")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation throughput")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps of each recipe run (default: 40, a few minutes)")
    parser.add_argument("--recipe-only", action="store_true", help="only the train.sh recipe runs")
    parser.add_argument("--variants", default="default,16-recompute,default-triton-only,default-7.5gb",
                        help=f"recipe runs, comma-separated, of {', '.join(VARIANTS)}")
    a = parser.parse_args()
    if a.recipe_only:
        recipe(a.model_dir, a.max_steps, a.variants.split(","))
    else:
        main(a.model_dir, a.quantization, a.eval_batch, a.eval_examples, a.step_only, a.no_eval, a.max_steps)
