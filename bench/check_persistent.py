"""Each tile of the persistent GEMVs on the GPU: the 4-bit one (backend/kernels/quant_persistent.py) against
bitsandbytes' dequantized weight at ChatGLM2-6B's qkv, fc1 (the norm and SwiGLU) and fc2 shapes, one and two
activation rows, both table kinds; the one-row one (backend/kernels/persistent_gemv.py) on int8 weights against
fp16 rows (against the weight times its scale) and on bf16 weights, at qkv (the norm, the bias), dense (the
residual in place), fc1 and fc2, and the output layer with the greedy pick (bf16); and at two rows (gemv_rows'
persistent tiles, compare's) at qkv, fc1 and fc2; tiles that ask L2 for blocks ahead (kernels/weight_prefetch.py) too.
Run first in a device
call that tunes with them: a kernel that faults there (a misaligned load, say) would otherwise take the tuning
process's CUDA context with it (bench/NOTES.md run 55).

    python bench/check_persistent.py [--rows 1,2] [--only 4bit|int8|float]

Prints one line a tile and "ok" at the end; exits 1 at the first tile off by more than 2e-2 relative."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["GLMCHAT_PERSISTENT_GEMV"] = "all"  # every persistent tile, those not yet among the defaults too

from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.decode.one_row_tuning import persistent_candidates  # noqa: E402
from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.int8_gemv import gemv, new_argmax_state  # noqa: E402

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
                              f"programs/SM {cfg.programs_per_sm} L2 ahead {cfg.l2_ahead}", err):
                    return False
    return True


def check_one_row(weights: str) -> bool:
    """int8_gemv.gemv's persistent tiles: "int8" weights against fp16 rows, or "float" (bf16) weights."""
    rel = lambda got, want: ((got.float() - want).norm() / want.norm()).item()  # noqa: E731
    dtype = torch.float16 if weights == "int8" else torch.bfloat16
    shapes = (("qkv", 4608, 4096), ("dense", 4096, 4096), ("fc1", 27392, 4096), ("fc2", 4096, 13696))
    for name, n, k in shapes + ((("output", 65024, 4096),) if weights == "float" else ()):
        w = torch.randn(n, k, device="cuda") * 0.02
        q, scale = quantize_per_channel(w) if weights == "int8" else (w.to(dtype), None)
        bias = (0.1 * torch.randn(n, device="cuda")).to(dtype) if name == "qkv" else None
        lw, ref_w = LinearWeights(q, scale, bias), q.float() * (scale[:, None] if scale is not None else 1)
        x, g = torch.randn(k, device="cuda").to(dtype), (1 + 0.1 * torch.randn(k, device="cuda")).to(dtype)
        for cfg in persistent_candidates(weights):
            what = (f"{weights} {name} block_p {cfg.block_p} warps {cfg.num_warps} programs/SM {cfg.programs_per_sm} "
                    f"L2 ahead {cfg.l2_ahead}")
            if name in ("qkv", "fc1", "output"):
                out = torch.empty(n // 2 if name == "fc1" else n, device="cuda", dtype=dtype)
                state = new_argmax_state("cuda") if name == "output" else None
                gemv(x, lw, out, norm_weight=g, swiglu=name == "fc1", config=cfg, argmax=state)
                want = reference(x[None], ref_w, g, name == "fc1")[0] + (bias.float() if bias is not None else 0)
                if state is not None and int(state[0] & 0xFFFFFFFF) != 2**32 - 1 - int(out.float().argmax()):
                    print(f"{what}: the greedy pick is not the argmax\nFAIL")
                    return False
            else:
                out = torch.randn(n, device="cuda").to(dtype)
                want = out.float() + x.float() @ ref_w.T
                gemv(x, lw, out, residual=out, config=cfg)
            torch.cuda.synchronize()
            if not report(what, rel(out, want)):
                return False
    return True


def check_two_rows(weights: str) -> bool:
    """gemv_rows' persistent tiles (compare's two rows): "int8" weights against fp16 rows, or "float" (bf16)."""
    from backend.kernels.gemv_rows import gemv_rows, persistent_configs

    dtype = torch.float16 if weights == "int8" else torch.bfloat16
    for name, n, k in (("qkv", 4608, 4096), ("fc1", 27392, 4096), ("fc2", 4096, 13696)):
        w = torch.randn(n, k, device="cuda") * 0.02
        q, scale = quantize_per_channel(w) if weights == "int8" else (w.to(dtype), None)
        lw, ref_w = LinearWeights(q, scale, None), q.float() * (scale[:, None] if scale is not None else 1)
        x, g = torch.randn(2, k, device="cuda").to(dtype), (1 + 0.1 * torch.randn(k, device="cuda")).to(dtype)
        for cfg in persistent_configs(weights == "int8", 2, dtype):
            what = (f"{weights} two rows {name} block_p {cfg.block_n} warps {cfg.num_warps} "
                    f"programs/SM {cfg.programs_per_sm} L2 ahead {cfg.l2_ahead}")
            if name == "fc2":
                out = torch.randn(2, n, device="cuda").to(dtype)
                want = out.float() + x.float() @ ref_w.T
                gemv_rows(x, lw, residual=out, out=out, config=cfg)
            else:
                out = gemv_rows(x, lw, norm_weight=g, swiglu=name == "fc1", config=cfg)
                want = reference(x, ref_w, g, name == "fc1")
            torch.cuda.synchronize()
            err = max(((out[m].float() - want[m]).norm() / want[m].norm()).item() for m in range(2))
            if not report(what, err):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2")
    ap.add_argument("--only", choices=("4bit", "int8", "float"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only != "int8" and not check_4bit([int(r) for r in args.rows.split(",")]):
        return 1
    for weights in ("int8", "float"):
        if args.only in (None, weights) and not (check_one_row(weights) and check_two_rows(weights)):
            return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
