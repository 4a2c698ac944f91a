"""Fold the training bench's JSON lines into the decode bench's results (one results.json and
results.md per device run): the P-Tuning step and evaluation figures the issue asks for.

    python bench/collect_results.py OUT    # OUT holds results.json, results.md, train_8bit.jsonl [, train_4bit.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def is_default_8bit(row: dict) -> bool:
    """The step training runs by default on an 8-bit base: weight-only int8, CUDA graphs, MLP recompute."""
    return (row.get("what") == "ptuning_step" and row.get("quantization") == "8bit"
            and row.get("int8_kernels") == "weight-only" and row.get("cuda_graphs")
            and not row.get("gradient_checkpointing") and row.get("recompute_mlp"))


def step_table(rows: list[dict]) -> list[str]:
    lines = ["| base | linears | CUDA graphs | MLP recompute | gradient checkpointing | ms / step | peak allocated (GB) | peak reserved (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("what") != "ptuning_step":
            continue
        linears = {"bitsandbytes": "bitsandbytes LLM.int8 (t=6.0)", "weight-only": "weight-only int8"}.get(
            r.get("int8_kernels"), "bitsandbytes NF4" if r.get("quantization") == "4bit" else "16-bit")
        yes = lambda v: "yes" if v else "no"  # noqa: E731
        lines.append(f"| {r['quantization']} | {linears} | {yes(r.get('cuda_graphs'))} | {yes(r.get('recompute_mlp'))} | "
                     f"{yes(r.get('gradient_checkpointing'))} | {r['ms_per_step']} | {r['peak_gpu_gb']} | {r.get('peak_reserved_gb')} |")
    return lines


def main(out: Path) -> int:
    results_path = out / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8"))
    rows = read_rows(out / "train_8bit.jsonl") + read_rows(out / "train_4bit.jsonl")
    default = next((r for r in rows if is_default_8bit(r)), None)
    if default is not None:
        results["ptuning_step_ms"] = default["ms_per_step"]
        results["ptuning_peak_gpu_gb"] = default["peak_gpu_gb"]
    evaluation = next((r for r in rows if r.get("what") == "eval"), None)
    if evaluation is not None:
        results["eval_examples_per_s"] = evaluation["examples_per_s"]
    results.setdefault("details", {})["training_rows"] = rows
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    md = [
        "", "P-Tuning v2 step, batch 1 x 192 tokens, pre_seq_len 128 (`bench/bench_train.py`; peak includes warm-up and capture):",
        "", *step_table(rows),
    ]
    for r in rows:
        if r.get("what") == "ptuning_run":
            md += ["", f"30-step run through train_prefix ({r['quantization']}): {r['seconds']} s, losses {r['first_losses']} ... "
                       f"{r['last_losses']}, all finite: {r['all_finite']}, peak {r['peak_gpu_gb']} GB."]
    if evaluation is not None:
        md += ["", f"Evaluation: {evaluation['examples']} examples x {evaluation['new_tokens_each']} new tokens, batches of "
                   f"{evaluation['batch_size']}, {evaluation['quantization']}: {evaluation['seconds']} s "
                   f"({evaluation['examples_per_s']} examples/s), peak {evaluation['peak_gpu_gb']} GB."]
    with open(out / "results.md", "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print(f"training figures folded into {results_path}: step {results.get('ptuning_step_ms')} ms, "
          f"peak {results.get('ptuning_peak_gpu_gb')} GB, eval {results.get('eval_examples_per_s')} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out")))
