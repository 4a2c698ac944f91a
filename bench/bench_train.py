"""P-Tuning v2 at full ChatGLM2-6B size (random weights): step time, peak GPU memory, a short
real training run (no nan/inf), and batched evaluation throughput.

    python bench/bench_load.py make /tmp/glm6b
    python bench/bench_train.py /tmp/glm6b 8bit      # prints one JSON line per measurement

Step: batch 1 x 192 tokens, pre_seq_len 128 (the figure the original stack was measured at).
Evaluation: 1070 prompts (the size of AdvertiseGen's dev split) built from our sample data,
128 new tokens each; random weights never emit eos, so every example runs the full 128.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main(model_dir: str, quantization: str, eval_batch: int = 128, eval_examples: int = 1070, step_only: bool = False,
         no_eval: bool = False) -> None:
    import torch

    import backend  # noqa: F401
    from backend.data import read_examples
    from backend.evaluation import evaluate
    from backend.loading import load_model
    from backend.service import TrainRequest
    from backend.training import benchmark_step, train_prefix

    loaded = load_model(model_dir, quantization=quantization)
    cuda = torch.cuda.is_available()
    model, device = loaded.model, torch.cuda.get_device_name() if cuda else "cpu"

    def peak_gb():
        return round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    # bitsandbytes' own 8-bit matmuls first (eager, keeping every activation, as the original), then
    # our weight-only int8 (which training then keeps): CUDA graphs, with and without recomputing the
    # MLP up-projection in the backward (the default), and with whole-layer gradient checkpointing.
    configs = [  # (weight-only int8, CUDA graphs, gradient checkpointing, MLP recompute)
        (False, False, False, False),
        (True, True, False, False),
        (True, True, False, True),
        (True, True, True, False),
    ]
    if quantization != "8bit":  # weight-only int8 applies to 8-bit bases only
        configs = [(False, True, False, False), (False, True, False, True), (False, True, True, False)]
    for weight_only, graphs, checkpointing, recompute in configs:
        bench = benchmark_step(model, batch_size=1, seq_len=192, pre_seq_len=128, steps=10,
                               gradient_checkpointing=checkpointing, weight_only_int8=weight_only, cuda_graphs=graphs,
                               recompute_mlp=recompute)
        emit(what="ptuning_step", quantization=quantization,
             int8_kernels=("weight-only" if weight_only else "bitsandbytes") if quantization == "8bit" else None,
             cuda_graphs=graphs, gradient_checkpointing=checkpointing, recompute_mlp=recompute,
             ms_per_step=round(bench.ms_per_step, 1), peak_gpu_gb=bench.peak_gpu_gb and round(bench.peak_gpu_gb, 2),
             peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None, device=device)

    if step_only:
        return
    reset_peak()
    # A short real run through the same code train_cli.py uses: every loss must be finite.
    losses = []
    with tempfile.TemporaryDirectory() as out:
        request = TrainRequest(train_file=ROOT / "assets/sample/train.json", output_dir=Path(out), pre_seq_len=128,
                               max_source_length=64, max_target_length=128, gradient_accumulation_steps=1,
                               max_steps=30, logging_steps=1, save_steps=30, learning_rate=2e-2)
        start = time.perf_counter()
        result = train_prefix(model, loaded.tokenizer, request, progress=lambda e: e.loss is not None and losses.append(e.loss))
        seconds = time.perf_counter() - start
    emit(what="ptuning_run", quantization=quantization, steps=result.steps_done, seconds=round(seconds, 1),
         first_losses=[round(x, 3) for x in losses[:3]], last_losses=[round(x, 3) for x in losses[-3:]],
         all_finite=all(math.isfinite(x) for x in losses), peak_gpu_gb=peak_gb(),
         device=device)

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
    a = parser.parse_args()
    main(a.model_dir, a.quantization, a.eval_batch, a.eval_examples, a.step_only, a.no_eval)
