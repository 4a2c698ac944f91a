"""Small cards: load, fast chat, 20 training steps, chat again, under a GPU memory cap.

    python bench/bench_small_cards.py --model DIR --quantization 4bit --cap-gib 6 [--dtype fp16]

Everything goes through the entry points users run (``ChatEngine.load``, the app's background
``warm_up``, ``stream_reply``, ``train``, ``register_adapter``), in one process whose CUDA allocator is capped with
``torch.cuda.set_per_process_memory_fraction``, as a 6/8/12/16 GiB card would cap it. Prints one
JSON line: whether every stage fitted, the engine chosen, tokens/s before and after training,
the peak memory and the notices the engine gave. ``bench/run_device.sh`` runs one process per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "类型#裙*颜色#红色*风格#复古"


def reply_stats(engine, params) -> dict:
    from backend.service import ReplyDone

    start = time.perf_counter()
    first = None
    for event in engine.stream_reply(PROMPT, [], params):
        if first is None:
            first = time.perf_counter() - start
        if isinstance(event, ReplyDone):
            reply = event.reply
    return {"tok_s": round(reply.tokens_per_s, 1), "new_tokens": reply.new_tokens, "ttft_ms": round(1e3 * first, 1)}


def run(args) -> dict:
    import torch

    from backend.engine import ChatEngine
    from backend.service import SamplingParams, TrainRequest

    total = torch.cuda.get_device_properties(0).total_memory
    cap = args.cap_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    notices: list[str] = []
    out: dict = {"card": torch.cuda.get_device_name(), "cap_gib": args.cap_gib, "quantization": args.quantization,
                 "dtype": args.dtype, "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stage = "load"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            load_kw = {"dtype": args.dtype} if args.dtype else {}
            engine = ChatEngine.load(args.model, quantization=args.quantization, **load_kw)
            out["load_s"] = round(time.perf_counter() - start, 1)
            out["engine"] = engine.info.engine
            out["gpu_after_load_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            stage = "warm-up"  # as the app starts it after loading (tui.app.load_backend); its first chat waits for it
            start = time.perf_counter()
            warming = engine.warm_up(wait=False)
            # a user types the first message meanwhile: its time is the warm-up's, not the first reply's
            failed = warming.exception() if warming is not None else None  # the app logs it and goes on: so do we
            out["warm_up"] = {"ran": warming is not None, "s": round(time.perf_counter() - start, 1),
                              "error": None if failed is None else f"{type(failed).__name__}: {str(failed)[:200]}"}
            params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
            stage = "chat"
            out["chat_before"] = reply_stats(engine, params)
            stage = "train"
            with tempfile.TemporaryDirectory() as tmp:
                request = TrainRequest(
                    train_file=ROOT / "assets/sample/train.json", output_dir=Path(tmp) / "run",
                    pre_seq_len=args.pre_seq_len, max_steps=args.train_steps, save_steps=args.train_steps,
                    per_device_train_batch_size=1, gradient_accumulation_steps=1, logging_steps=5,
                )
                start = time.perf_counter()
                result = engine.train(request, progress=lambda p: None)
                out["train_s"] = round(time.perf_counter() - start, 1)
                stage = "chat after training"
                info = engine.register_adapter(result.last_checkpoint, "trained")
                engine.switch_adapter(info.name)
                out["chat_after"] = reply_stats(engine, params)
                out["chat_again"] = reply_stats(engine, params)  # the adapter's second reply: nothing first-use left
            notices = sorted({str(w.message) for w in caught} | set(engine.info.notices))
        out["ok"] = True
    except torch.cuda.OutOfMemoryError as err:
        out.update(ok=False, failed_at=stage, error=f"OOM: {str(err).splitlines()[0]}")
    except Exception as err:  # noqa: BLE001 - the row records any failure and the next row still runs
        out.update(ok=False, failed_at=stage, error=f"{type(err).__name__}: {err}")
    out["notices"] = notices
    out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    out["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    out["within_cap"] = out["gpu_peak_reserved_gb"] <= cap / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None, help="8bit | 4bit | none (default: the model's own, e.g. int4)")
    parser.add_argument("--cap-gib", type=float, required=True)
    parser.add_argument("--dtype", default=None, help="fp16 to check cards without bf16")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--pre-seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
