"""NF4 linears of ChatGLM2-6B at 16-256 rows: quant_linear's tiles against the weight widened for cuBLAS.

On a GPU: ``python bench/ab_4bit_rows.py`` (JSON lines). Each linear is a bitsandbytes ``Linear4bit`` as the
loader builds it (NF4, double-quantised absmax, random weights) taken by the batched decoder's ``BatchLinear``
as a decode step or a prompt calls it (RMSNorm before qkv and fc1, SwiGLU after fc1, the residual after dense
and fc2), with ``GLMCHAT_4BIT_ROWS`` fixing the path: ``kernel`` (quant_linear, its tiles tuned) and
``widened`` (``kernels.widen_4bit``); and bitsandbytes' ``dequantize_4bit`` of the whole weight with
``F.linear`` (the path long prompts took before), nothing fused. Times are ``tuning.cuda_timer``'s (GPU time,
L2 flushed); ``agree`` is the widened output's relative difference from the kernel's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.decode.batch_linear import BatchLinear  # noqa: E402
from backend.kernels.tuning import cuda_timer, difference  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "fc1": (27392, 4096), "fc2": (4096, 13696)}


def nf4_linear(n: int, k: int, dtype: torch.dtype):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
    with torch.no_grad():
        layer.weight = bnb.nn.Params4bit(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False, quant_type="nf4")
    return layer.cuda()


def time_path(lin: BatchLinear, path: str, x, kw) -> tuple[float, torch.Tensor]:
    os.environ["GLMCHAT_4BIT_ROWS"] = path
    out = lin(x, **kw)  # compiles and tunes outside the timing
    return cuda_timer(lambda: lin(x, **kw)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="16,32,64,256")
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    dtype, card = torch.bfloat16, torch.cuda.get_device_name()
    for kind, (n, k) in SHAPES.items():
        layer = nf4_linear(n, k, dtype)
        lin = BatchLinear(layer, dtype, kind)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            kw = {"qkv": dict(norm=torch.ones(k, device="cuda", dtype=dtype)),
                  "fc1": dict(norm=torch.ones(k, device="cuda", dtype=dtype), swiglu=True),
                  "dense": dict(residual=torch.randn(m, n, device="cuda", dtype=dtype)),
                  "fc2": dict(residual=torch.randn(m, n, device="cuda", dtype=dtype))}[kind]
            row = {"card": card, "linear": kind, "n": n, "k": k, "rows": m}
            widened_ms, widened = time_path(lin, "widened", x, kw)
            if m <= 64:
                kernel_ms, kernel = time_path(lin, "kernel", x, kw)
                row.update(kernel_ms=round(kernel_ms, 4), agree=float(f"{difference(widened, kernel):.2g}"))
            w = layer.weight
            bnb_ms = cuda_timer(lambda: F.linear(x, bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)))
            row.update(widened_ms=round(widened_ms, 4), bnb_dequant_ms=round(bnb_ms, 4),
                       widened_gbs=round(n * k * 4.5 / widened_ms / 1e6, 1))  # packed in, 16 bits out and back
            print(json.dumps(row), flush=True)
        del layer, lin
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
