"""Where an int8 linear should widen its weight for cuBLAS (``int8_linear.WIDEN_MIN_ROWS``): the Triton
kernels that widen int8 in registers against ``widened_linear`` / ``widened_grad_input``, forward and input
gradient, at ChatGLM2-6B's four layer shapes and a range of rows (GPU). Also the packed-weight kernels of the
batched decoder (``quant_linear``) against the Triton matmul for the decode rows 4..256.

    PYTHONPATH=. python bench/bench_linears.py > linears.jsonl
    PYTHONPATH=. python bench/bench_linears.py --decode-graphs > decode_graphs.jsonl  # decode rows, in CUDA graphs
    PYTHONPATH=. python bench/bench_linears.py --few-rows > few_rows.jsonl  # 1, 2 and 4 rows: the GEMVs, the matmul
    PYTHONPATH=. python bench/bench_linears.py --swapped > swapped.jsonl  # 8-256 rows: the matmul, unswapped and swapped

One JSON line per (shape, rows): microseconds of each path and the TFLOP/s it reaches. A kernel timed alone
(back to back with itself) is a guide for the threshold, not a user figure: the recipe and evaluation runs
through ``train_cli.py`` are those.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.int8_linear import LinearWeights, quantize_per_channel, widened_grad_input, widened_linear  # noqa: E402
from backend.kernels.int8_matmul import matmul  # noqa: E402
from backend.int8_layer import grad_input_triton  # noqa: E402
from check_grad_kernel import SHAPES, replay_ms, timed  # noqa: E402

TRAIN_ROWS = (192, 512, 768, 1024, 1536, 2048, 3088)
DECODE_ROWS = (4, 8, 16, 32, 64, 128, 256)


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return round(2 * m * n * k / (ms * 1e-3) / 1e12, 1)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(f"{((a.float() - ref).norm() / ref.norm()).item():.1e}")


def training_rows(lws: dict) -> None:
    for name, N, K in SHAPES:
        lw = lws[name]
        for m in TRAIN_ROWS:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, N, device="cuda", dtype=torch.bfloat16) * 1e-3
            fwd_triton = timed(lambda: matmul(x, lw))  # the Triton kernel at any rows (linear_rows would widen)
            fwd_wide = timed(lambda: widened_linear(x, lw))
            ref = x.float() @ (lw.weight.float() * lw.scale[:, None]).T
            err = {"fwd_widened": rel(widened_linear(x, lw), ref), "bwd_widened": rel(widened_grad_input(dy, lw.weight, lw.scale),
                                                                                        dy.float() @ (lw.weight.float() * lw.scale[:, None]))}
            bwd_triton = timed(lambda: grad_input_triton(dy, lw.weight, lw.scale))
            bwd_wide = timed(lambda: widened_grad_input(dy, lw.weight, lw.scale))
            print(json.dumps({"what": "train_linear", "shape": name, "rows": m,
                              "fwd_us": {"triton": round(fwd_triton * 1e3, 1), "widened": round(fwd_wide * 1e3, 1)},
                              "bwd_us": {"triton": round(bwd_triton * 1e3, 1), "widened": round(bwd_wide * 1e3, 1)},
                              "fwd_tflops": {"triton": tflops(m, N, K, fwd_triton), "widened": tflops(m, N, K, fwd_wide)},
                              "bwd_tflops": {"triton": tflops(m, N, K, bwd_triton), "widened": tflops(m, N, K, bwd_wide)},
                              "relative_error": err}),
                  flush=True)


def decode_rows(lws: dict) -> None:
    """Each decode row count: quant_linear (int8, up to 64 rows), the matmul at its chosen config, and the best of
    a small grid of matmul configs (to choose ``matmul_config``)."""
    from backend.kernels.int8_matmul import matmul_config
    from backend.kernels.gemv_4bit import QuantizedWeight, quant_linear

    for name, N, K in SHAPES:
        lw = lws[name]
        q = QuantizedWeight(fmt="int8", data=lw.weight, scale=lw.scale, n=N, k=K)
        for m in DECODE_ROWS + (192,):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            row = {"what": "decode_linear", "shape": name, "rows": m, "config": matmul_config(m, N, K),
                   "matmul_us": round(timed(lambda: matmul(x, lw, swap=False)) * 1e3, 1)}
            if m <= 64:
                row["quant_linear_us"] = round(timed(lambda: quant_linear(x, q, None)) * 1e3, 1)
            grid = {}
            for bm in sorted({max(16, min(64, triton.next_power_of_2(m))), min(128, max(16, triton.next_power_of_2(m)))}):
                for bn in (32, 64, 128):
                    for bk in (128, 256):
                        for warps, stages in ((4, 4), (8, 3)):
                            config = (bm, bn, bk, warps, stages, 1)
                            try:
                                grid[config] = round(timed(lambda: matmul(x, lw, config), reps=10) * 1e3, 1)
                            except Exception as err:  # noqa: BLE001 - a config that does not fit shared memory
                                grid[config] = str(err)[:40]
            timings = {c: t for c, t in grid.items() if isinstance(t, float)}
            best = min(timings, key=timings.get)
            row.update(best_config=best, best_us=timings[best], matmul_tb_s=round(N * K / 1e9 / (row["matmul_us"] * 1e-6) / 1e3, 2),
                       best_tb_s=round(N * K / 1e9 / (timings[best] * 1e-6) / 1e3, 2))
            print(json.dumps(row), flush=True)


def graph_us(calls: list, reps: int = 20) -> float:
    """Microseconds a call of ``calls`` (closures over different weights, so each reads its weight from memory as a
    decode step's linears do) takes inside one CUDA graph: no Python launch in the figure."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return 1e3 * replay_ms(graph, reps) / len(calls)


def decode_rows_in_graphs(rows=(2, 8, 64)) -> None:
    """The decode rows' matmul configs timed inside CUDA graphs over 8 copies of each weight (more than the L2
    holds): ``matmul_config``'s choice against a grid with K splits (to choose the K splits of ``matmul_config``)."""
    from backend.kernels.int8_matmul import matmul_config

    for name, N, K in SHAPES:
        copies = [LinearWeights(*quantize_per_channel(torch.randn(N, K, device="cuda") * 0.02), None) for _ in range(8)]
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            chosen = matmul_config(m, N, K)
            grid = {}
            bm = max(16, triton.next_power_of_2(m))
            for bn in (32, 64):
                for bk in (128, 256):
                    for warps, stages in ((4, 4), (8, 3)):
                        for split in (1, 2, 4, 8):
                            config = (bm, bn, bk, warps, stages, split)
                            try:
                                grid[config] = round(graph_us([lambda lw=lw: matmul(x, lw, config, swap=False)
                                                               for lw in copies]), 1)
                            except Exception as err:  # noqa: BLE001 - a config that does not fit shared memory
                                grid[config] = str(err)[:40]
            timings = {c: t for c, t in grid.items() if isinstance(t, float)}
            best = min(timings, key=timings.get)
            now = timings.get(chosen) or round(graph_us([lambda lw=lw: matmul(x, lw, swap=False) for lw in copies]), 1)
            unsplit = min(t for c, t in timings.items() if c[-1] == 1)
            print(json.dumps({"what": "decode_linear_graph", "shape": name, "rows": m, "config": chosen, "us": now,
                              "best_config": best, "best_us": timings[best], "best_unsplit_us": unsplit,
                              "tb_s": round(N * K / now / 1e6, 2), "best_tb_s": round(N * K / timings[best] / 1e6, 2)}),
                  flush=True)


def swapped_in_graphs(rows=(8, 16, 64, 128, 256)) -> None:
    """The int8 matmul against its swapped form (the weight as wgmma's register operand), both at ``matmul_config``'s
    tiles, K split as a decode step and unsplit as a prompt, inside CUDA graphs over 8 weight copies: what each card
    decides on first use (``matmul_swapped.prefers_swapped``), here for every shape and row bucket at once."""
    for name, N, K in SHAPES:
        copies = [LinearWeights(*quantize_per_channel(torch.randn(N, K, device="cuda") * 0.02), None) for _ in range(8)]
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.float16)
            row = {"what": "swapped_graph", "shape": name, "rows": m}
            for split_k in (True, False):
                plain = graph_us([lambda lw=lw: matmul(x, lw, split_k=split_k, swap=False) for lw in copies])
                swapped = graph_us([lambda lw=lw: matmul(x, lw, split_k=split_k, swap=True) for lw in copies])
                tag = "split" if split_k else "one_launch"
                row.update({f"{tag}_us": round(plain, 1), f"{tag}_swapped_us": round(swapped, 1),
                            f"{tag}_swapped_tb_s": round(N * K / swapped / 1e6, 2),
                            f"{tag}_swapped_tflops": round(2 * m * N * K / swapped / 1e6, 1)})
            print(json.dumps(row), flush=True)


def few_rows_in_graphs(rows=(1, 2, 4)) -> None:
    """For compare's two rows and a server's first streams: ``gemv_rows`` with each config it may be tuned to,
    the one-row GEMV once a row, and the matmul (``matmul_config``), inside CUDA graphs over 8 weight copies;
    fc1 with SwiGLU as the decoder calls it. The % is of the copy bandwidth measured here."""
    from backend.kernels.int8_gemv import default_gemv_config, gemv
    from backend.kernels.int8_matmul import matmul_config
    from backend.kernels.gemv_rows import candidate_configs, gemv_rows
    from bench_engine import copy_bandwidth

    bandwidth = copy_bandwidth()  # bytes read + written a second by a large copy, as bench_engine's bound
    for name, N, K in SHAPES:
        swiglu = name == "fc1"
        copies = [LinearWeights(*quantize_per_channel(torch.randn(N, K, device="cuda") * 0.02), None) for _ in range(8)]
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.float16)
            out = torch.empty(m, N // 2 if swiglu else N, device="cuda", dtype=torch.float16)
            one = default_gemv_config(name, True)
            paths = {"gemv_once_a_row": lambda lw: [gemv(x[i], lw, out[i], swiglu=swiglu, config=one) for i in range(m)]}
            if m > 1:
                paths["matmul " + str(matmul_config(m, N, K))] = lambda lw: matmul(x, lw, swap=False)
                paths["matmul_swapped"] = lambda lw: matmul(x, lw, swap=True)
            for cfg in candidate_configs(swiglu) if m > 1 else ():
                paths[f"gemv_rows {cfg.block_n}x{cfg.block_k}"] = lambda lw, cfg=cfg: gemv_rows(
                    x, lw, swiglu=swiglu, out=out, config=cfg)
            us = {}
            for path, call in paths.items():
                try:
                    us[path] = round(graph_us([lambda lw=lw: call(lw) for lw in copies]), 1)
                except Exception as err:  # noqa: BLE001 - a config this card cannot run
                    us[path] = str(err)[:60]
            timed_ok = {p: t for p, t in us.items() if isinstance(t, float)}
            best = min(timed_ok, key=timed_ok.get)
            pct = round(100 * N * K / (timed_ok[best] * 1e-6) / bandwidth, 1)
            print(json.dumps({"what": "few_rows_graph", "shape": name, "rows": m, "us": us, "best": best,
                              "best_pct_of_copy_bound": pct}), flush=True)


def main() -> None:
    torch.manual_seed(0)
    lws = {}
    for name, N, K in SHAPES:
        q, s = quantize_per_channel(torch.randn(N, K, device="cuda") * 0.02)
        lws[name] = LinearWeights(q, s, None)
    print(json.dumps({"what": "device", "name": torch.cuda.get_device_name()}), flush=True)
    if "--decode-graphs" in sys.argv:  # only the decode rows, timed inside CUDA graphs
        decode_rows_in_graphs()
        return
    if "--few-rows" in sys.argv:
        few_rows_in_graphs()
        return
    if "--swapped" in sys.argv:
        swapped_in_graphs()
        return
    training_rows(lws)
    decode_rows(lws)


if __name__ == "__main__":
    main()
