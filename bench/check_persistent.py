"""Each tile of the persistent 4-bit GEMV (backend/kernels/quant_persistent.py) against bitsandbytes' dequantized
weight on the GPU, at ChatGLM2-6B's qkv, fc1 (the norm and SwiGLU) and fc2 shapes, one and two activation rows, both
table kinds. Run first in a device call that tunes with it: a kernel that faults there (a misaligned load, say)
would otherwise take the tuning process's CUDA context with it (bench/NOTES.md run 55).

    python bench/check_persistent.py [--rows 1,2]

Prints one line a tile and "ok" at the end; exits 1 at the first tile off by more than 2e-2 relative."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.kernels import gemv_4bit as Q  # noqa: E402

SHAPES = ((4608, 4096, False), (27392, 4096, True), (4096, 13696, False))  # qkv, fc1 (SwiGLU), fc2


def reference(x, ref_w, g, swiglu: bool) -> torch.Tensor:
    xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    y = xn @ ref_w.T
    if swiglu:
        a, b = y.chunk(2, -1)
        y = torch.nn.functional.silu(a) * b
    return y


def main() -> int:
    import bitsandbytes.functional as F

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2")
    args = ap.parse_args()
    torch.manual_seed(0)
    for n, k, swiglu in SHAPES:
        data, state = F.quantize_4bit((torch.randn(n, k, device="cuda") * 0.02).bfloat16(), blocksize=64,
                                      quant_type="nf4", compress_statistics=True)
        w, ref_w = Q.nf4_weight(data, state), F.dequantize_4bit(data, state).float()
        g = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, device="cuda").bfloat16()
            want = reference(x, ref_w, g, swiglu)
            for cfg in Q.candidate_configs("nf4", rows, swiglu):
                if cfg.kernel != "persistent":
                    continue
                out = Q.quant_linear(x, w, norm_weight=g, swiglu=swiglu, config=cfg)
                torch.cuda.synchronize()
                err = max(((out[m].float() - want[m]).norm() / want[m].norm()).item() for m in range(rows))
                print(f"N {n} K {k} rows {rows} lut {cfg.lut} block_n {cfg.block_n} warps {cfg.num_warps} "
                      f"programs/SM {cfg.programs_per_sm}: {err:.2e}", flush=True)
                if not err < 2e-2:
                    print("FAIL")
                    return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
