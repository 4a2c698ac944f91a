"""NF4 linears of ChatGLM2-6B at 1-4 rows: our tuned words/GEMV kernels against bitsandbytes' own fused kernel.

On a GPU: ``python bench/ab_nf4_one_row.py`` (JSON lines). bitsandbytes 0.50 ships fused 4-bit dequantize +
GEMM kernels for inference (``torch.ops.bitsandbytes.gemm_4bit``: a SIMT kernel below 8 rows, the nested absmax
decoded inside it), tuned by its authors on the H100 and H200. If it reads NF4 at one row faster than our
``quant_linear`` (tiles tuned per card), the one-row step should take it; this measures that before any
wiring. Each linear is a ``Linear4bit`` as the loader builds it (NF4, double-quantised absmax, random
weights), called as a decode step calls it:

- ``ours``: ``BatchLinear`` with its fused RMSNorm (qkv, fc1), SwiGLU (fc1) and residual (dense, fc2);
- ``bnb``: ``bitsandbytes.matmul_4bit`` with the same norm, SwiGLU and residual as launches of their own;
- ``bnb_bare``: the bitsandbytes kernel alone, nothing around it.

``--chain L`` also times L layers' four linears back to back in one graph (distinct weights, so L2 does not
hold them), as inside the step: a kernel timed alone pays a cold start the step's neighbours hide. Times are
``tuning.cuda_timer``'s (GPU time, L2 flushed); GB/s counts the packed weight and its absmax bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ab_4bit_rows import SHAPES, nf4_linear  # noqa: E402
from bench_engine import copy_bandwidth  # noqa: E402

from backend.decode.batch_linear import BatchLinear  # noqa: E402
from backend.kernels.decode_kernels import rms_norm_rows, swiglu_rows  # noqa: E402
from backend.kernels.tuning import cuda_timer, difference  # noqa: E402


def packed_bytes(n: int, k: int) -> int:
    """The NF4 weight (two codes a byte) and its nested absmax (a byte per 64 weights) as a step reads them."""
    return n * k // 2 + n * k // 64


def call_kwargs(kind: str, m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    ones = torch.ones(k, device="cuda", dtype=dtype)
    return {"qkv": dict(norm=ones), "fc1": dict(norm=ones, swiglu=True),
            "dense": dict(residual=torch.randn(m, n, device="cuda", dtype=dtype)),
            "fc2": dict(residual=torch.randn(m, n, device="cuda", dtype=dtype))}[kind]


def bnb_call(layer, x, *, norm=None, swiglu=False, residual=None):
    """The same linear through bitsandbytes' kernel, what sits around it as launches of their own."""
    if norm is not None:
        x = rms_norm_rows(x, norm, 1e-5)
    y = bnb_bare(layer, x)
    if swiglu:
        y = swiglu_rows(y)
    if residual is not None:
        y = y + residual
    return y


def bnb_bare(layer, x):
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, layer.weight.t(), layer.weight.quant_state)


def each_linear(dtype: torch.dtype):
    """(kind, n, k, the bitsandbytes layer, our BatchLinear of it) for each of a layer's four linears."""
    for kind, (n, k) in SHAPES.items():
        layer = nf4_linear(n, k, dtype)
        yield kind, n, k, layer, BatchLinear(layer, dtype, kind)


def per_linear(rows: list[int], dtype: torch.dtype, bandwidth: float, card: str) -> None:
    for kind, n, k, layer, lin in each_linear(dtype):
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            kw = call_kwargs(kind, m, n, k, dtype)
            ours = lin(x, **kw)  # tunes outside the timing
            theirs = bnb_call(layer, x, **kw)
            times = {"ours": cuda_timer(lambda: lin(x, **kw)), "bnb": cuda_timer(lambda: bnb_call(layer, x, **kw)),
                     "bnb_bare": cuda_timer(lambda: bnb_bare(layer, x))}
            row = {"card": card, "linear": kind, "n": n, "k": k, "rows": m,
                   "agree": float(f"{difference(ours, theirs):.2g}")}
            for name, ms in times.items():
                gbs = packed_bytes(n, k) / ms / 1e6
                row.update({f"{name}_us": round(ms * 1e3, 1), f"{name}_pct": round(100 * gbs * 1e9 / bandwidth, 1)})
            print(json.dumps(row), flush=True)


def chained(layers: int, m: int, dtype: torch.dtype, bandwidth: float, card: str) -> None:
    """``layers`` x (qkv, dense, fc1, fc2) back to back in one graph, ours and bitsandbytes', as a step runs them."""
    stack = []
    for _ in range(layers):
        for kind, n, k, layer, lin in each_linear(dtype):
            stack.append((kind, layer, lin, call_kwargs(kind, m, n, k, dtype)))
    xs = {k: torch.randn(m, k, device="cuda", dtype=dtype) for k in {lin.q.k for _, _, lin, _ in stack}}
    for _, _, lin, kw in stack:
        lin(xs[lin.q.k], **kw)  # tune every shape first

    def ours():
        for _, _, lin, kw in stack:
            lin(xs[lin.q.k], **kw)

    def theirs():
        for _, layer, lin, kw in stack:
            bnb_call(layer, xs[lin.q.k], **kw)

    total = sum(packed_bytes(*SHAPES[kind]) for kind, *_ in stack)
    for name, fn in (("ours", ours), ("bnb", theirs)):
        ms = cuda_timer(fn)
        print(json.dumps({"card": card, "what": "chain", "path": name, "layers": layers, "rows": m,
                          "ms": round(ms, 3), "pct_of_copy": round(100 * total / (ms / 1e3) / bandwidth, 1),
                          "per_layer_us": round(ms * 1e3 / layers, 1)}), flush=True)


def profiled(dtype: torch.dtype) -> None:
    """Each linear tuned first, then called once by each path inside cudaProfilerStart/Stop, so that ncu
    (``--profile-from-start off``) sees only the kernels a step runs, not the tuner's candidates."""
    for kind, n, k, layer, lin in each_linear(dtype):
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        kw = call_kwargs(kind, 1, n, k, dtype)
        lin(x, **kw)
        bnb_bare(layer, x)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        lin(x, **kw)
        bnb_bare(layer, x)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--chain", type=int, default=8, help="layers in the back-to-back timing (0: none)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--profile", action="store_true",
                        help="for ncu --profile-from-start off: each linear once at one row, ours then bitsandbytes'")
    args = parser.parse_args()
    import bitsandbytes

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.profile:
        return profiled(dtype)
    card, bandwidth = torch.cuda.get_device_name(), copy_bandwidth()  # as bench_engine's bound counts it
    print(json.dumps({"card": card, "bitsandbytes": bitsandbytes.__version__, "copy_gbs": round(bandwidth / 1e9)}))
    per_linear([int(r) for r in args.rows.split(",")], dtype, bandwidth, card)
    if args.chain:
        for m in (1, 2):
            chained(args.chain, m, dtype, bandwidth, card)


if __name__ == "__main__":
    main()
