"""P-Tuning's attention on CUDA (prefix keys + causal, nothing padded): the lower-right causal bias
(flash attention) against the boolean mask it replaces, on a 2-layer model of ChatGLM2-6B width in
fp16: loss, prefix gradient, and the memory autograd keeps.

    PYTHONPATH=. python bench/check_train_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backend.modeling as modeling  # noqa: E402
from backend import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402
from backend.modeling import split_prefix  # noqa: E402
from bench_decode import CHATGLM2_6B  # noqa: E402


def run(model, config, ids, kv) -> tuple[float, torch.Tensor, float]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kv = kv.detach().requires_grad_()
    loss = model(ids, labels=ids, prefix_kv=split_prefix(kv, config), use_cache=False).loss
    kept = (torch.cuda.memory_allocated() - base) / 1e6  # what the forward leaves for the backward
    (grad,) = torch.autograd.grad(loss, kv)
    return float(loss), grad, kept


def main() -> int:
    torch.manual_seed(0)
    config = ChatGLMConfig(**dict(CHATGLM2_6B, num_layers=2))
    model = ChatGLMForConditionalGeneration(config).to("cuda", torch.float16).requires_grad_(False)
    ids = torch.randint(3, 65000, (1, 192), device="cuda")
    kv = torch.randn(1, 128, config.prefix_kv_size, device="cuda", dtype=torch.float16)
    lean = run(model, config, ids, kv)
    original = modeling.causal_lower_right
    modeling.causal_lower_right = lambda s, t: original(s, t)._materialize("cuda")  # the boolean mask
    try:
        masked = run(model, config, ids, kv)
    finally:
        modeling.causal_lower_right = original
    err = ((lean[1].float() - masked[1].float()).norm() / masked[1].float().norm()).item()
    ok = abs(lean[0] - masked[0]) < 1e-3 and err < 1e-2
    print(f"{'ok  ' if ok else 'FAIL'} loss {lean[0]:.5f} (bias) vs {masked[0]:.5f} (mask); prefix grad rel err {err:.1e}; "
          f"kept for the backward, 2 layers: {lean[2]:.1f} MB (bias) vs {masked[2]:.1f} MB (mask)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
