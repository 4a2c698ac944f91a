"""The batched decode kernels (backend/kernels/) at ChatGLM2-6B sizes: correct against torch, and how fast.

On a GPU: ``python bench/check_kernels_batch.py`` (about 2-3 minutes on a cold tuning cache). For each
linear of the model (qkv 4608x4096, dense 4096x4096, fc1 27392x4096, fc2 4096x13696, output 65024x4096),
each weight format (bitsandbytes NF4 with double-quantised absmax, the chatglm2-6b-int4 release's int4,
per-row int8) and M = 1, 2, 8, 64 activation rows (bf16):
- checks ``quant_linear`` with what the decoder fuses into each linear (RMSNorm before qkv, fc1 and the
  output layer, qkv's bias, SwiGLU after fc1, the residual after dense and fc2) against float32 torch math
  (W unpacked by torch; NF4 also against bitsandbytes' own ``dequantize_4bit``), outputs poisoned first;
- tunes the tile config on first use (cached per GPU model in the user cache dir, see
  ``backend/kernels/tuning.py``; a second run reads the cache), then times it with
  ``kernels.tuning.cuda_timer`` (median GPU time, as the tuner measures) and prints GB/s over the bytes moved (packed weight + scales +
  activations in + out) and the % of ``--peak-tbs`` (4.3 TB/s: H200 HBM3e as measured by copies);
- baselines in the same run (the plain linear, nothing fused): bitsandbytes' ``matmul_4bit`` (NF4),
  ``int8_gemv.gemv`` (int8, M = 1) and ``int8_matmul.matmul`` (int8, M >= 2);
then the batched rotary + cache write and decode attention (32 heads, 2 groups, head_dim 128) for 1, 8 and
64 rows of mixed lengths and prefixes, checked against torch and timed over the K/V bytes they read.
A short table comes last. ``--candidates`` also times every config the tuner chooses among (4-bit, M = 1
and 2: the GEMV kernels side by side). ``--small`` runs tiny shapes without timing (under ``TRITON_INTERPRET=1`` on a
CPU: the script's own check).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.kernels import attention_batch as A  # noqa: E402
from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.kernels import tuning  # noqa: E402
from bench_engine import copy_bandwidth  # noqa: E402

SHAPES_6B = {"qkv": (4608, 4096), "dense": (4096, 4096), "fc1": (27392, 4096), "fc2": (4096, 13696),
             "output": (65024, 4096)}
SHAPES_SMALL = {"qkv": (48, 64), "fc1": (40, 128), "fc2": (40, 200), "output": (130, 64)}
FAILS: list[str] = []
CANDIDATES = False  # --candidates
ROWS: list[tuple] = []  # the table


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(name: str, err: float, tol: float) -> bool:
    ok = err == err and err < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:60s} rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILS.append(name)
    return ok


def bench_ms(fn, timing: bool) -> float:
    """GPU milliseconds as the tuner times them (one call captured in a graph, L2 flushed before each replay)."""
    if not timing:
        return float("nan")
    from backend.kernels.tuning import cuda_timer

    return cuda_timer(fn)


# -- weights -------------------------------------------------------------------------------------


def make_weight(fmt: str, n: int, k: int, device, dtype):
    """(QuantizedWeight, float32 reference [N, K], baseline callable-maker or None)."""
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    if fmt == "nf4":
        import bitsandbytes.functional as bnbf

        data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        qw = Q.nf4_weight(data, state)
        ref = qw.dequantize(torch.float32)
        bnb_ref = bnbf.dequantize_4bit(data, state)
        check(f"nf4 unpack = bitsandbytes dequantize_4bit {n}x{k}", rel(ref.to(dtype), bnb_ref), 1e-6)
        del bnb_ref
        return qw, ref, ("bnb matmul_4bit", lambda x: _bnb_matmul_4bit(x, data, state))
    if fmt == "int4":  # the release's rule: scale = max|w| / 7, q = round(w / scale) in [-8, 7], even column high
        scale = (w.float().abs().amax(dim=1) / 7).half()
        q = torch.round(w.float() / scale.float()[:, None]).clamp(-8, 7).to(torch.int32)
        packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8).view(torch.int8)
        qw = Q.int4_release_weight(packed, scale)
        ref = q.float() * scale.float()[:, None]
        check(f"int4 unpack = the packing rule {n}x{k}", rel(qw.dequantize(torch.float32), ref), 1e-7)
        return qw, ref, None
    from backend.int8_linear import LinearWeights, quantize_per_channel

    q, s = quantize_per_channel(w)
    lw = LinearWeights(q, s, None)
    return Q.int8_weight(q, s), q.float() * s[:, None], ("int8_linear", lambda x: _int8_baseline(x, lw))


def _bnb_matmul_4bit(x, data, state):
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, data.t(), quant_state=state)


def _int8_baseline(x, lw):
    from backend.kernels.int8_gemv import gemv
    from backend.kernels.int8_matmul import matmul

    if x.shape[0] == 1:
        out = torch.empty(lw.weight.shape[0], device=x.device, dtype=x.dtype)
        return gemv(x[0], lw, out)
    return matmul(x, lw)


def weight_bytes(qw: Q.QuantizedWeight) -> int:
    parts = [qw.data, qw.scale, qw.absmax, qw.absmax2]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


# -- linears -------------------------------------------------------------------------------------


# what each linear of a ChatGLM2 layer fuses in the batched decoder (qkv has a bias; the norms precede)
VARIANTS = {"qkv": dict(norm=True, bias=True), "dense": dict(residual=True), "fc1": dict(norm=True, swiglu=True),
            "fc2": dict(residual=True), "output": dict(norm=True)}


def reference(x, ref_w, g, bias, res, swiglu):
    """float32 torch: RMSNorm (if g), x @ W.T, bias, SwiGLU, residual, each when given."""
    x = x.float()
    if g is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    y = x @ ref_w.T
    if bias is not None:
        y = y + bias.float()
    if swiglu:
        a, b = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(a) * b
    return y if res is None else y + res.float()


def guarded(what: str, fn, *args):
    """Run one section; an exception is a FAIL with its traceback, and the other sections still run."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a device check reports every failure, then goes on
        import traceback

        traceback.print_exc()
        print(f"FAIL {what}: raised (traceback above)", flush=True)
        FAILS.append(what)
        return None


def baseline_ms(baseline, x, timing: bool) -> float:
    if not (baseline and timing):
        return float("nan")
    try:
        return bench_ms(lambda: baseline[1](x), timing)
    except Exception as exc:  # noqa: BLE001 - a baseline that does not run here is a missing row, not a failure
        print(f"     (baseline {baseline[0]} failed: {type(exc).__name__}: {str(exc)[:200]})")
        return float("nan")


def run_linears(device, dtype, shapes, ms, timing: bool, peak: float, formats=("nf4", "int4", "int8")) -> None:
    for fmt in formats:
        for name, (n, k) in shapes.items():
            guarded(f"{fmt} {name}", run_linear, device, dtype, fmt, name, n, k, ms, timing, peak)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_linear(device, dtype, fmt, name, n, k, ms, timing: bool, peak: float) -> None:
        qw, ref_w, baseline = make_weight(fmt, n, k, device, dtype)
        var = VARIANTS[name]
        n_out = n // 2 if var.get("swiglu") else n
        g = (1 + 0.1 * torch.randn(k, device=device)).to(dtype) if var.get("norm") else None
        bias = (0.1 * torch.randn(n, device=device)).to(dtype) if var.get("bias") else None
        tag = "+".join(v for v in ("norm", "bias", "swiglu", "residual") if var.get(v))
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            by_io = x.numel() * x.element_size() + m * n_out * x.element_size() * (2 if var.get("residual") else 1)
            if fmt == "int8" and m == 1:  # M = 1 int8 stays int8_gemv.gemv's (fused epilogues): its time only
                t = baseline_ms(baseline, x, timing)
                ROWS.append((fmt, name, m, "int8_gemv.gemv, plain", t, weight_bytes(qw) + by_io,
                             float("nan"), None, None))
                continue
            res = torch.randn(m, n_out, device=device, dtype=dtype) if var.get("residual") else None
            fused = dict(residual=res, norm_weight=g, swiglu=bool(var.get("swiglu")))
            cfg = Q.tuned_config(qw, m, dtype, device, swiglu=fused["swiglu"])  # tuned on first use
            out = torch.full((m, n_out), float("nan"), device=device, dtype=dtype)
            Q.quant_linear(x, qw, bias, out=out, config=cfg, **fused)
            err = rel(out, reference(x, ref_w, g, bias, res, fused["swiglu"]))
            check(f"{fmt} {name} {n}x{k} {tag} M={m} {cfg.kernel} bn={cfg.block_n} bk={cfg.block_k}", err, 1e-2)
            t = bench_ms(lambda: Q.quant_linear(x, qw, bias, out=out, config=cfg, **fused), timing)
            by = weight_bytes(qw) + by_io
            base_t = baseline_ms(baseline, x, timing)
            desc = f"{cfg.kernel} bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            if fmt == "nf4":
                desc += f" lut{cfg.lut}"
            ROWS.append((fmt, name, m, desc, t, by, err, baseline[0] + " (plain)" if baseline else None, base_t))
            if timing:
                print(f"     {t * 1e3:8.1f} us  {by / (t * 1e-3) / 1e9:7.0f} GB/s  "
                      f"{100 * by / (t * 1e-3) / peak:5.1f}% of peak", flush=True)
            if CANDIDATES and timing and fmt != "int8" and m <= 2:
                time_candidates(x, qw, bias, fused, f"{fmt} {name} M={m}", by, peak)


def time_candidates(x, qw, bias, fused, what: str, by: int, peak: float) -> None:
    """--candidates: every config the tuner chooses among for this linear, each checked and timed."""
    candidates = Q.candidate_configs(qw.fmt, Q.m_bucket(x.shape[0]), fused["swiglu"])
    ref = Q.quant_linear(x, qw, bias, config=candidates[0], **fused)  # the default, to compare each against
    for cfg in candidates:
        desc = f"{cfg.kernel} bn{cfg.block_n} bk{cfg.block_k} bm{cfg.block_m} w{cfg.num_warps} lut{cfg.lut}"
        try:
            out = Q.quant_linear(x, qw, bias, config=cfg, **fused)
            t = bench_ms(lambda: Q.quant_linear(x, qw, bias, out=out, config=cfg, **fused), True)
        except Exception as exc:  # noqa: BLE001 - a config this card cannot run is a row, not a failure
            print(f"cand {what:22s} {desc:40s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        print(f"cand {what:22s} {desc:40s} {t * 1e3:8.1f} us {by / (t * 1e-3) / 1e9:6.0f} GB/s "
              f"{100 * by / (t * 1e-3) / peak:5.1f}%  vs default {rel(out, ref.float()):.1e}", flush=True)


# -- attention -----------------------------------------------------------------------------------


def run_attention(device, dtype, heads, groups, d, slots, batches, timing: bool) -> None:
    for B in batches:
        guarded(f"attention B={B}", run_attention_batch, device, dtype, heads, groups, d, slots, B, timing)


def run_attention_batch(device, dtype, heads, groups, d, slots, B, timing: bool) -> None:
    gen = torch.Generator().manual_seed(B)
    inv = A.rotary_inv_freq(d // 2, device)
    pre = torch.randint(0, 129, (B,), generator=gen)
    pre[0] = 0
    pos = torch.randint(0, slots - 129, (B,), generator=gen)
    if B > 2:
        pos[1] = -1  # an idle row
    kc = torch.randn(B, groups, slots, d, device=device, dtype=dtype)
    vc = torch.randn(B, groups, slots, d, device=device, dtype=dtype)
    qkv = torch.randn(B, (heads + 2 * groups) * d, device=device, dtype=dtype)
    posd, pred = pos.to(device), pre.to(device=device, dtype=torch.int32)
    q = A.rope_cache_write(qkv, kc, vc, posd, pred, num_heads=heads, num_groups=groups, inv_freq=inv,
                           position_divisor=1.0)
    # rotary reference for the first active rows (float32, as modeling.apply_rotary)
    from backend.modeling import apply_rotary, rotary_cos_sin

    errs = []
    for b in [b for b in range(B) if pos[b] >= 0][:4]:
        p, P = int(pos[b]), int(pre[b])
        qr, kr, vr = qkv[b].float().split([heads * d, groups * d, groups * d])
        cos, sin = rotary_cos_sin(torch.tensor([[p]], device=device), d // 2, torch.float32)
        errs.append(rel(q[b], apply_rotary(qr.view(1, 1, heads, d), cos, sin)[0, 0]))
        errs.append(rel(kc[b, :, P + p], apply_rotary(kr.view(1, 1, groups, d), cos, sin)[0, 0]))
        errs.append(rel(vc[b, :, P + p], vr.view(groups, d)))
    check(f"rope + cache write B={B}", max(errs), 1e-2)
    ws = A.attention_workspace(B, heads, groups, d, device)
    out = torch.full((B, heads * d), float("nan"), device=device, dtype=dtype)
    A.decode_attention(q, kc, vc, posd, pred, out=out, workspace=ws)
    errs = []
    for b in range(B):
        if pos[b] < 0:
            ok = bool((out[b] == 0).all())
            errs.append(0.0 if ok else float("nan"))
            continue
        L = int(pre[b] + pos[b] + 1)
        k = kc[b, :, :L].float().repeat_interleave(heads // groups, 0)
        v = vc[b, :, :L].float().repeat_interleave(heads // groups, 0)
        sc = (q[b].float()[:, None, :] @ k.transpose(1, 2))[:, 0] / math.sqrt(d)
        errs.append(rel(out[b], (torch.softmax(sc, -1)[:, None, :] @ v)[:, 0].reshape(-1)))
    check(f"decode attention B={B} splits={ws.num_splits}", max(errs), 1e-2)
    lengths = [(int(pre[b] + pos[b] + 1) if pos[b] >= 0 else 0) for b in range(B)]
    kv_bytes = sum(lengths) * groups * d * 2 * kc.element_size()
    t = bench_ms(lambda: A.decode_attention(q, kc, vc, posd, pred, out=out, workspace=ws), timing)
    ROWS.append(("attn", f"B={B} mean L={sum(lengths) // B}", B, f"splits {ws.num_splits}", t, kv_bytes,
                 max(errs), None, None))
    t = bench_ms(lambda: A.rope_cache_write(qkv, kc, vc, posd, pred, num_heads=heads, num_groups=groups,
                                            inv_freq=inv, q_out=q), timing)
    ROWS.append(("rope", f"B={B}", B, "", t, qkv.numel() * qkv.element_size() * 2, float("nan"), None, None))


def print_table(peak: float, timing: bool) -> None:
    print()
    print(f"{'what':6s} {'shape':18s} {'M':>3s} {'config':32s} {'us':>8s} {'GB/s':>7s} {'%peak':>6s} "
          f"{'rel err':>8s}  baseline")
    for fmt, name, m, desc, t, by, err, bname, bt in ROWS:
        gbs = by / (t * 1e-3) / 1e9 if timing and t == t else float("nan")
        base = ""
        if bname and timing and bt == bt:
            base = f"{bname} {bt * 1e3:.1f} us ({by / (bt * 1e-3) / 1e9:.0f} GB/s)"
        print(f"{fmt:6s} {name:18s} {m:3d} {desc:32s} {t * 1e3:8.1f} {gbs:7.0f} {100 * gbs * 1e9 / peak:6.1f} "
              f"{err:8.1e}  {base}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, no timing (the Triton interpreter on a CPU)")
    ap.add_argument("--peak-tbs", type=float, default=4.3, help="bandwidth for the %% column, TB/s (default 4.3)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 8, 64], help="activation rows to check and time")
    ap.add_argument("--formats", nargs="+", default=["nf4", "int4", "int8"], choices=["nf4", "int4", "int8"],
                    help="weight formats to check (default all)")
    ap.add_argument("--no-attention", action="store_true", help="skip the attention kernels")
    ap.add_argument("--candidates", action="store_true",
                    help="also time every tile config the tuner chooses among (4-bit, M = 1 and 2)")
    args = ap.parse_args()
    global CANDIDATES
    CANDIDATES = args.candidates
    started = time.time()
    peak = args.peak_tbs * 1e12
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if cuda:
        import triton

        print(f"{torch.cuda.get_device_name(device)}; triton {triton.__version__}; torch {torch.__version__}")
        print(f"tuning cache: {tuning.cache_file(device)} (tuning {'on' if tuning.tuning_enabled() else 'off'})")
        print(f"copy bandwidth (read + write) {copy_bandwidth(device) / 1e12:.2f} TB/s; % column against "
              f"{args.peak_tbs} TB/s")
        run_linears(device, torch.bfloat16, SHAPES_6B, args.m, True, peak, args.formats)
        if not args.no_attention:
            run_attention(device, torch.bfloat16, 32, 2, 128, 4096, (1, 8, 64), True)
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("no GPU: run with --small under TRITON_INTERPRET=1 (or on a CUDA machine)")
            return 2
        run_linears(device, torch.float32, SHAPES_SMALL, [1, 2, 17], False, peak)
        run_attention(device, torch.float32, 8, 2, 32, 300, (1, 4), False)
    print_table(peak, cuda)
    verdict = "" if FAILS else "; ALL BATCH KERNEL CHECKS PASSED"
    print(f"\n{len(FAILS)} failed; {time.time() - started:.0f} s{verdict}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
