"""The chat engine on CUDA while it trains (what the app does when you chat during a run): a small
ChatGLM2 in 8-bit, a P-Tuning run in a thread, replies and a comparison meanwhile (their decoders and
prompt graphs are captured while the training thread replays its own graphs), then the new adapter.

    PYTHONPATH=. python bench/check_engine_gpu.py
"""

from __future__ import annotations

import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from backend.engine import ChatEngine  # noqa: E402
from backend.service import ReplyDone, SamplingParams, TrainRequest  # noqa: E402
from helpers_tiny import make_tiny_model_dir  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model_dir(work / "model", num_layers=4, hidden_size=512, ffn_hidden_size=1024,
                                    num_attention_heads=8, kv_channels=64, multi_query_group_num=2)
    engine = ChatEngine.load(str(model_dir), quantization="8bit", device="cuda")
    request = TrainRequest(train_file=ROOT / "assets/sample/train.json", output_dir=work / "run", pre_seq_len=16,
                           max_source_length=64, max_target_length=64, gradient_accumulation_steps=1, max_steps=300,
                           logging_steps=10, save_steps=300, learning_rate=2e-2)
    losses, outcome = [], {}

    def train():
        try:
            outcome["result"] = engine.train(request, progress=lambda e: e.loss is not None and losses.append(e.loss))
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    replies = 0
    start = time.perf_counter()
    prompts = ["类型#上衣*材质#牛仔布", "你好", "类型#裙*颜色#红色*风格#复古" * 3, "问：介绍一下你自己"]
    while thread.is_alive() and replies < 40:
        engine.reply(prompts[replies % len(prompts)], [], greedy)
        if replies % 5 == 0:
            done = [e for e in engine.compare(prompts[0], [], greedy) if isinstance(e, ReplyDone)]
            assert len(done) == 2, done
        replies += 1
    thread.join()
    if "error" in outcome:
        print(f"FAIL training raised {outcome['error']!r}")
        return 1
    result = outcome["result"]
    finite = all(math.isfinite(x) for x in losses)
    print(f"{replies} replies (+ comparisons) during {result.steps_done} training steps in "
          f"{time.perf_counter() - start:.1f} s; losses {losses[0]:.3f} -> {losses[-1]:.3f}, all finite {finite}")
    engine.register_adapter(result.last_checkpoint, name="tuned")
    engine.switch_adapter("tuned")
    tuned = engine.reply(prompts[0], [], greedy)
    print(f"reply with the new adapter: {tuned.text[:40]!r}")
    ok = finite and result.steps_done == request.max_steps and replies > 0
    print("ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
