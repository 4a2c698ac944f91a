"""The P-Tuning backward's int8 kernel at ChatGLM2-6B shapes (GPU): error against float64 and time
against widening the weight rows for a cuBLAS matmul (the previous path).

    PYTHONPATH=. python bench/check_grad_kernel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.int8_linear import quantize_per_channel  # noqa: E402
from backend.int8_layer import grad_input_torch, grad_input_triton  # noqa: E402

# (name, N = out_features, K = in_features) of the four linears of a layer
SHAPES = [("qkv", 4608, 4096), ("dense", 4096, 4096), ("fc1", 27392, 4096), ("fc2", 4096, 13696)]


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def replay_ms(graph, reps: int = 20) -> float:
    """Milliseconds one replay of a captured CUDA graph takes (CUDA events around ``reps`` replays)."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    torch.manual_seed(0)
    failed = False
    print(f"{torch.cuda.get_device_name()}: dx = dy @ (q * scale), M = 192 tokens")
    for dtype in (torch.float16, torch.bfloat16):
        total_new = total_old = 0.0
        for name, N, K in SHAPES:
            q, s = quantize_per_channel(torch.randn(N, K, device="cuda") * 0.02)
            dy = (torch.randn(192, N, device="cuda") * 1e-3).to(dtype)
            ref = dy.double() @ (q.double() * s.double()[:, None])
            new = grad_input_triton(dy, q, s)
            old = grad_input_torch(dy, q, s)
            err_new = ((new.double() - ref).norm() / ref.norm()).item()
            err_old = ((old.double() - ref).norm() / ref.norm()).item()
            ms_new = timed(lambda: grad_input_triton(dy, q, s))
            ms_old = timed(lambda: grad_input_torch(dy, q, s))
            total_new, total_old = total_new + ms_new, total_old + ms_old
            ok = err_new < 1e-2 and err_new < 3 * err_old + 1e-4
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} {name:5s} N={N:5d} K={K:5d}  rel err kernel {err_new:.1e} "
                  f"(widen + matmul {err_old:.1e})  {ms_new * 1000:7.1f} us vs {ms_old * 1000:7.1f} us")
        print(f"     {str(dtype)[6:]}: one layer's backward linears {total_new * 1000:.0f} us vs {total_old * 1000:.0f} us; "
              f"x 28 layers: {28 * total_new:.1f} ms vs {28 * total_old:.1f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
