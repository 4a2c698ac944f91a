"""Each tile of the persistent GEMVs on the GPU: the 4-bit one (backend/kernels/quant_persistent.py) against
bitsandbytes' dequantized weight at ChatGLM2-6B's qkv, fc1 (the norm and SwiGLU) and fc2 shapes, one and two
activation rows, both table kinds; the int8 one (backend/kernels/int8_persistent.py, fp16 rows) against the int8
weight times its scale at qkv (the norm, the bias), dense (the residual in place), fc1 and fc2. Run first in a device
call that tunes with them: a kernel that faults there (a misaligned load, say) would otherwise take the tuning
process's CUDA context with it (bench/NOTES.md run 55).

    python bench/check_persistent.py [--rows 1,2] [--only 4bit|int8]

Prints one line a tile and "ok" at the end; exits 1 at the first tile off by more than 2e-2 relative."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.decode.one_row_tuning import PERSISTENT_INT8  # noqa: E402
from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.int8_gemv import GemvConfig, gemv  # noqa: E402

SHAPES = ((4608, 4096, False), (27392, 4096, True), (4096, 13696, False))  # qkv, fc1 (SwiGLU), fc2


def reference(x, ref_w, g, swiglu: bool) -> torch.Tensor:
    xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    y = xn @ ref_w.T
    if swiglu:
        a, b = y.chunk(2, -1)
        y = torch.nn.functional.silu(a) * b
    return y


def report(what: str, err: float) -> bool:
    print(f"{what}: {err:.2e}", flush=True)
    if not err < 2e-2:
        print("FAIL")
    return err < 2e-2


def check_4bit(rows_list: list[int]) -> bool:
    import bitsandbytes.functional as F

    for n, k, swiglu in SHAPES:
        data, state = F.quantize_4bit((torch.randn(n, k, device="cuda") * 0.02).bfloat16(), blocksize=64,
                                      quant_type="nf4", compress_statistics=True)
        w, ref_w = Q.nf4_weight(data, state), F.dequantize_4bit(data, state).float()
        g = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda").bfloat16()
            want = reference(x, ref_w, g, swiglu)
            for cfg in Q.candidate_configs("nf4", rows, swiglu):
                if cfg.kernel != "persistent":
                    continue
                out = Q.quant_linear(x, w, norm_weight=g, swiglu=swiglu, config=cfg)
                torch.cuda.synchronize()
                err = max(((out[m].float() - want[m]).norm() / want[m].norm()).item() for m in range(rows))
                if not report(f"N {n} K {k} rows {rows} lut {cfg.lut} block_n {cfg.block_n} warps {cfg.num_warps} "
                              f"programs/SM {cfg.programs_per_sm}", err):
                    return False
    return True


def check_int8() -> bool:
    rel = lambda got, want: ((got.float() - want).norm() / want.norm()).item()  # noqa: E731
    for name, n, k in (("qkv", 4608, 4096), ("dense", 4096, 4096), ("fc1", 27392, 4096), ("fc2", 4096, 13696)):
        q, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.02)
        bias = (0.1 * torch.randn(n, device="cuda")).half() if name == "qkv" else None
        lw, ref_w = LinearWeights(q, scale, bias), q.float() * scale[:, None]
        x, g = torch.randn(k, device="cuda").half(), (1 + 0.1 * torch.randn(k, device="cuda")).half()
        for bp, warps, per_sm in PERSISTENT_INT8:
            cfg = GemvConfig(block_p=bp, block_k=0, num_warps=warps, cvt=3, programs_per_sm=per_sm)
            what = f"int8 {name} block_p {bp} warps {warps} programs/SM {per_sm}"
            if name in ("qkv", "fc1"):
                out = torch.empty(n // 2 if name == "fc1" else n, device="cuda", dtype=torch.float16)
                gemv(x, lw, out, norm_weight=g, swiglu=name == "fc1", config=cfg)
                want = reference(x[None], ref_w, g, name == "fc1")[0] + (bias.float() if bias is not None else 0)
            else:
                out = torch.randn(n, device="cuda").half()
                want = out.float() + x.float() @ ref_w.T
                gemv(x, lw, out, residual=out, config=cfg)
            torch.cuda.synchronize()
            if not report(what, rel(out, want)):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2")
    ap.add_argument("--only", choices=("4bit", "int8"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only != "int8" and not check_4bit([int(r) for r in args.rows.split(",")]):
        return 1
    if args.only != "4bit" and not check_int8():
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
