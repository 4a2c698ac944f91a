"""Correctness of the fast decoder's Triton kernels against float64 torch references.

On a GPU: ``python bench/check_kernels.py`` (6B shapes for the linears, a 2-layer model of
6B width for the whole step). On a CPU, through Triton's interpreter (small shapes):
``TRITON_INTERPRET=1 python bench/check_kernels.py --small`` (``--quick``: the decode step's kernels
only, as the test suite runs them).
Every output is poisoned with NaN first, so an unwritten element fails the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from backend import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402
from backend.fast_decode import FastDecoder  # noqa: E402
from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.int8_gemv import GemvConfig, gemv, new_argmax_state, pick_token  # noqa: E402
from backend.kernels.int8_matmul import matmul  # noqa: E402
from backend.generation import logits_processors  # noqa: E402
from backend.modeling import apply_rotary, rotary_cos_sin  # noqa: E402
from backend.kernels.attention_batch import rotary_inv_freq  # noqa: E402

FAILS: list[str] = []


def _interpreter_numpy_compat() -> None:
    """Triton's CPU interpreter holds a scalar argument as a 1-element array and takes int() of it for a
    loop bound; NumPy >= 2.3 refuses int() of a 1-D array. Take .item() instead."""
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def report(name: str, err: float, tol: float) -> None:
    ok = err == err and err < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} rel err {err:.2e} (tol {tol:.0e})")
    if not ok:
        FAILS.append(name)


def make_lw(N, K, int8, dtype, device, bias=False):
    w = torch.randn(N, K, device=device) * 0.02
    b = (torch.randn(N, device=device) * 0.1).to(dtype) if bias else None
    if int8:
        q, s = quantize_per_channel(w)
        return LinearWeights(q, s, b), q.double() * s.double()[:, None]
    w = w.to(dtype)
    return LinearWeights(w, None, b), w.double()


def check_gemv(device, dtype, N, K, int8, cfg=None, tol=None):
    tol = tol or (2e-3 if dtype != torch.float32 else 1e-5)
    tag = f"{'int8' if int8 else str(dtype).split('.')[-1]} N={N} K={K} {cfg or ''}"
    x = torch.randn(K, device=device).to(dtype)
    g = (1 + 0.1 * torch.randn(K, device=device)).to(dtype)
    lw, wref = make_lw(N, K, int8, dtype, device, bias=True)
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * g.double()
    # plain with norm and bias, float32 out: the kernel's own precision (each int8 widening)
    for cvt in ((0, 1, 2) if int8 else (None,)):
        for prefetch in (False, True):
            c = cfg or GemvConfig()
            c = dataclasses.replace(c, cvt=cvt if cvt is not None else c.cvt, prefetch=prefetch)
            out = torch.full((N,), float("nan"), device=device, dtype=torch.float32)
            gemv(x, lw, out, norm_weight=g, eps=1e-5, config=c)
            report(f"gemv norm+bias fp32-out cvt={cvt} prefetch={prefetch} {tag}",
                   rel(out, wref @ xn + lw.bias.double()), 1e-5)
    # residual in place, no norm
    lw2 = LinearWeights(lw.weight, lw.scale, None)
    res = torch.randn(N, device=device).to(dtype)
    ref = res.double() + wref @ xd
    gemv(x, lw2, res, residual=res, config=cfg)
    report(f"gemv residual {tag}", rel(res, ref), tol)
    # swiglu
    out = torch.full((N // 2,), float("nan"), device=device, dtype=dtype)
    gemv(x, lw2, out, norm_weight=g, eps=1e-5, swiglu=True, config=cfg)
    y = wref @ xn
    a, b = y[: N // 2], y[N // 2 :]
    report(f"gemv swiglu {tag}", rel(out, torch.nn.functional.silu(a) * b), tol)


def check_rope(device, dtype, heads, groups, d, K, int8, pos=37, P=5):
    tol = 2e-3 if dtype != torch.float32 else 1e-5
    N = (heads + 2 * groups) * d
    x = torch.randn(K, device=device).to(dtype)
    g = (1 + 0.1 * torch.randn(K, device=device)).to(dtype)
    lw, wref = make_lw(N, K, int8, dtype, device, bias=True)
    S = 128
    kc = torch.full((groups, S, d), float("nan"), device=device, dtype=dtype)
    vc = torch.full((groups, S, d), float("nan"), device=device, dtype=dtype)
    q = torch.full((heads * d,), float("nan"), device=device, dtype=dtype)
    posd = torch.tensor([pos, P + pos], device=device)
    gemv(x, lw, q, norm_weight=g, eps=1e-5, rope=dict(q_rows=heads * d, kv_rows=groups * d, head_dim=d,
                                                      inv_freq=rotary_inv_freq(d // 2, device), pos=posd, k_cache=kc,
                                                      v_cache=vc))
    xd = x.double()
    y = wref @ (xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * g.double()) + lw.bias.double()
    qr, kr, vr = y.split([heads * d, groups * d, groups * d])
    cos, sin = rotary_cos_sin(torch.tensor([[pos]], device=device), d // 2, torch.float64)
    qr = apply_rotary(qr.view(1, 1, heads, d), cos.double(), sin.double()).flatten()
    kr = apply_rotary(kr.view(1, 1, groups, d), cos.double(), sin.double()).view(groups, d)
    tag = f"{'int8' if int8 else str(dtype).split('.')[-1]} h={heads} g={groups} d={d}"
    report(f"gemv rope q {tag}", rel(q, qr), tol)
    report(f"gemv rope k->cache {tag}", rel(kc[:, P + pos], kr), tol)
    report(f"gemv rope v->cache {tag}", rel(vc[:, P + pos], vr.view(groups, d)), tol)
    others = torch.cat((kc[:, : P + pos], kc[:, P + pos + 1 :]), dim=1)
    if not torch.isnan(others).all():
        print("FAIL rope wrote outside its slot")
        FAILS.append("rope slot")


def check_argmax(device, N, K, int8, cfg=None):
    """The output GEMV's folded greedy pick and pick_token against torch.argmax (first index on ties),
    with all-negative logits, a tie, and nan / -inf logits (token 5, as the original's guard)."""
    x = torch.randn(K, device=device)
    lw, _ = make_lw(N, K, int8, torch.float32, device, bias=True)
    lw.weight[N - 3] = lw.weight[7]  # rows 7 and N - 3 tie; make them the largest
    if lw.scale is not None:
        lw.scale[N - 3] = lw.scale[7]
    cases = {"tie": (7, 50.0), "negative": (None, -1000.0), "nan": (11, float("nan")), "-inf": (11, float("-inf"))}
    for name, (row, value) in cases.items():
        bias = lw.bias.clone()
        if name == "tie":
            bias[7] = bias[N - 3] = value
        elif name == "negative":
            bias -= 1000.0
        else:
            bias[row] = value
        lwc = LinearWeights(lw.weight, lw.scale, bias)
        state = new_argmax_state(device)
        out = torch.full((N,), float("nan"), device=device)
        nxt = torch.zeros((), dtype=torch.int64, device=device)
        step_in = torch.tensor([123, 40, 45], device=device)
        gemv(x, lwc, out, config=cfg, argmax=state)
        pick_token(state, nxt, step_in, bad_token=5)
        want = 5 if not torch.isfinite(out).all() else int(out.argmax())
        ok = (int(nxt) == want and step_in.tolist() == [want, 41, 46]
              and state.tolist() == new_argmax_state(device).tolist() and (name != "tie" or want == 7))
        print(f"{'ok  ' if ok else 'FAIL'} argmax {name} {'int8' if int8 else 'fp32'} N={N} K={K}: {int(nxt)} vs {want}")
        if not ok:
            FAILS.append(f"argmax {name}")
    # no bias, RMSNorm first, 16-bit input: the output layer as the step runs it
    xs = x.to(torch.bfloat16 if device.type == "cuda" else torch.float16)
    g = (1 + 0.1 * torch.randn(K, device=device)).to(xs.dtype)
    state = new_argmax_state(device)
    out = torch.empty(N, device=device)
    nxt = torch.zeros((), dtype=torch.int64, device=device)
    gemv(xs, LinearWeights(lw.weight, lw.scale, None), out, norm_weight=g, config=cfg, argmax=state)
    pick_token(state, nxt, torch.zeros(3, dtype=torch.int64, device=device), bad_token=5)
    ok = int(nxt) == int(out.argmax())
    print(f"{'ok  ' if ok else 'FAIL'} argmax norm, no bias {'int8' if int8 else 'fp32'} N={N} K={K}: {int(nxt)} vs {int(out.argmax())}")
    if not ok:
        FAILS.append("argmax norm, no bias")


def frequency_test(counts: torch.Tensor, want: torch.Tensor, draws: int) -> tuple[bool, str]:
    """Token counts of ``draws`` draws against the probabilities ``want``: no draw outside the kept tokens
    (want > 0), and chi-square over the kept ones within 5 sigma of its degrees of freedom."""
    kept = want > 0
    chi2 = (((counts - draws * want) ** 2)[kept] / (draws * want[kept])).sum().item()
    dof = int(kept.sum()) - 1
    outside = int(counts[~kept].sum())
    ok = outside == 0 and chi2 < dof + 5 * (2 * dof) ** 0.5
    return ok, (f"chi2 {chi2:.1f} for {dof} degrees of freedom, {int(kept.sum())} tokens kept, "
                f"{outside} draws outside them")


def check_sampling(device, V: int = 512, draws: int = 3000):
    """The device sampler: Exp(1) noise, then token frequencies against the warped softmax (chi-square),
    nothing outside top-p, one token per (seed, position), nan logits -> 5."""
    from backend import device_sampling as ds
    from backend.service import SamplingParams

    seed = torch.tensor(123, device=device)
    pos = torch.tensor(7, device=device)
    e = ds.exponential_noise(torch.empty(V * 64, device=device), seed, pos)
    big = ds.exponential_noise(torch.empty(2**24 if device.type == "cuda" else 2**16, device=device), seed, pos)
    ok = bool((big > 0).all() and torch.isfinite(big).all())
    print(f"{'ok  ' if ok else 'FAIL'} sampling noise over {big.numel()} draws: min {big.min().item():.2e} > 0")
    if not ok:
        FAILS.append("sampling noise positive")
    again = ds.exponential_noise(torch.empty(V * 64, device=device), seed, pos)
    other = ds.exponential_noise(torch.empty(V * 64, device=device), seed, pos + 1)
    ok = bool((e > 0).all() and (e < 17).all() and abs(e.mean().item() - 1) < 0.02 and torch.equal(e, again)
              and not torch.equal(e, other))
    print(f"{'ok  ' if ok else 'FAIL'} sampling noise: mean {e.mean().item():.4f}, min {e.min().item():.2e}, "
          f"max {e.max().item():.2f}, repeatable and keyed by position")
    if not ok:
        FAILS.append("sampling noise")
    logits = torch.randn(1, V, device=device) * 3
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=40)
    procs = logits_processors(params)
    want = torch.softmax(procs(None, logits.clone()), dim=-1)[0].double().cpu()
    counts = torch.zeros(V, dtype=torch.float64)
    noise = torch.empty(V, device=device)
    for i in range(draws):
        counts[int(ds.sample(logits, procs, noise, seed, torch.tensor(i, device=device)))] += 1
    ok, stats = frequency_test(counts, want, draws)
    print(f"{'ok  ' if ok else 'FAIL'} sampling frequencies: {stats}")
    if not ok:
        FAILS.append("sampling frequencies")
    bad = logits.clone()
    bad[0, 3] = float("nan")
    tok = int(ds.sample(bad, procs, noise, seed, pos))
    print(f"{'ok  ' if tok == 5 else 'FAIL'} sampling nan logits -> {tok}")
    if tok != 5:
        FAILS.append("sampling nan")


def check_sampler_graph(device, dtype=torch.bfloat16, draws: int = 2000):
    """The fast decoder's sampler graph, replayed on fixed logits: frequencies against the warped softmax,
    and a seeded reply that repeats."""
    from backend import device_sampling as ds
    from backend.service import SamplingParams

    cfg = ChatGLMConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, kv_channels=64, num_attention_heads=4,
                        multi_query_group_num=2, padded_vocab_size=1024)
    model = make_model(device, dtype, cfg, seed=2)
    dec = FastDecoder(model, max_seq_len=512, weights="int8")
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=40)
    graph = dec._sampler_graph(params)
    logits = torch.randn(cfg.padded_vocab_size, device=device) * 3
    procs, noise = logits_processors(params), torch.empty_like(dec._noise)
    want = torch.softmax(procs(None, logits[None].clone()), dim=-1)[0].double().cpu()
    dec._logits.copy_(logits)
    dec._seed.fill_(99)
    tokens, same = [], 0
    for i in range(draws):
        dec._in[1] = i
        graph.replay()
        tokens.append(dec._next_token.clone())
        same += int(ds.sample(logits[None], procs, noise, dec._seed, dec._in[1:2])[0] == tokens[-1])
    counts = torch.bincount(torch.stack(tokens).cpu(), minlength=len(want)).double()
    ok, stats = frequency_test(counts, want, draws)
    ok = ok and same == draws
    print(f"{'ok  ' if ok else 'FAIL'} sampler graph frequencies: {stats}, graph = eager for {same}/{draws} draws")
    if not ok:
        kept = want > 0
        bad = sorted(set(torch.nonzero(counts * (~kept)).flatten().tolist()))[:8]
        print(f"     outside tokens {bad}, their logits {logits[bad].tolist()}, kept logits >= "
              f"{logits[kept.to(logits.device)].min().item():.3f}, first draws {torch.stack(tokens[:12]).tolist()}")
        FAILS.append("sampler graph frequencies")
    ids = list(range(100, 130))
    runs = [list(dec.generate(ids, params, eos_token_ids=[], generator=torch.Generator(device=device).manual_seed(s)))
            for s in (1, 1, 2)]
    ok = runs[0] == runs[1] and runs[0] != runs[2] and len(runs[0]) == 40 and dec._sampler_graphs.get(
        (0.7, 0, 0.9)) is graph
    print(f"{'ok  ' if ok else 'FAIL'} seeded sampled reply repeats (seed 1 twice, seed 2 differs), graph reused")
    if not ok:
        FAILS.append("sampler graph seeded reply")


def check_matmul(device, dtype, M, N, K, int8):
    lw, wref = make_lw(N, K, int8, dtype, device, bias=True)
    x = torch.randn(M, K, device=device).to(dtype)
    out = matmul(x, lw)
    ref = x.double() @ wref.T + lw.bias.double()
    report(f"matmul {'int8' if int8 else dtype} M={M} N={N} K={K}", rel(out, ref), 3e-3 if dtype != torch.float32 else 1e-4)


def make_model(device, dtype, cfg: ChatGLMConfig, seed: int) -> ChatGLMForConditionalGeneration:
    """A random model built in ``dtype`` where it runs (no slow CPU init of 6B-wide layers)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return ChatGLMForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def check_step(device, dtype, cfg: ChatGLMConfig, weights: str, P: int = 0, prompt: int = 200, prefetch=None):
    """The captured step's kernels against the decoder's own torch math on the same cache."""
    model = make_model(device, dtype, cfg, seed=1)
    dec = FastDecoder(model, max_seq_len=P + prompt + 64, weights=weights, use_graph=False, prefetch=prefetch)
    if P:
        prefix = [torch.randn(1, cfg.multi_query_group_num, P, cfg.kv_channels, device=device, dtype=dtype)
                  for _ in range(2 * cfg.num_layers)]
        dec.set_prefix(prefix)
    dec._alloc_step_buffers(splits=4)  # with 200+ keys and blocks of 64, every split holds keys
    ids = torch.randint(0, cfg.padded_vocab_size, (prompt + 1,)).tolist()
    with torch.inference_mode():
        dec._forward_torch(ids[:prompt], 0)
        kc, vc = dec.k_cache.clone(), dec.v_cache.clone()
        ref = dec._forward_torch(ids[prompt:], prompt)[0]
        kref, vref = dec.k_cache.clone(), dec.v_cache.clone()
        dec.k_cache.copy_(kc)
        dec.v_cache.copy_(vc)
        dec._logits.fill_(float("nan"))
        dec._set_step_input(ids[prompt], prompt)
        dec._step()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    tag = f"{weights} {str(dtype).split('.')[-1]} P={P} L={cfg.num_layers} hidden={cfg.hidden_size} prefetch={prefetch}"
    report(f"step logits {tag}", rel(dec._logits, ref), tol)
    report(f"step k cache {tag}", rel(dec.k_cache, kref), tol)
    report(f"step v cache {tag}", rel(dec.v_cache, vref), tol)
    same = int(dec._next_token) == int(ref.argmax())
    print(f"{'ok  ' if same else 'note'} step greedy token {tag}: {int(dec._next_token)} vs {int(ref.argmax())}")
    picked = int(dec._next_token) == int(dec._logits.argmax()) and dec._in.tolist() == [
        int(dec._next_token), prompt + 1, P + prompt + 1]
    print(f"{'ok  ' if picked else 'FAIL'} step picks the argmax of its own logits and advances {tag}")
    if not picked:
        FAILS.append(f"step pick {tag}")


def check_fused_prefill(device, dtype, cfg: ChatGLMConfig, weights: str, P: int = 3):
    """The prompt's fused Triton stages (CUDA) against the model's torch math, fresh and after cached tokens."""
    model = make_model(device, dtype, cfg, seed=2)
    decs = [FastDecoder(model, max_seq_len=256, weights=weights, use_graph=False) for _ in range(2)]
    decs[0].fused_prefill, decs[1].fused_prefill = False, True
    prefix = [torch.randn(1, cfg.multi_query_group_num, P, cfg.kv_channels, device=device, dtype=dtype)
              for _ in range(2 * cfg.num_layers)]
    ids = torch.randint(0, cfg.padded_vocab_size, (60,)).tolist()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for dec in decs:
        dec.set_prefix(prefix)
    with torch.inference_mode():
        ref0, out0 = (dec._forward_torch(ids[:40], 0) for dec in decs)
        ref1, out1 = (dec._forward_torch(ids[40:], 40) for dec in decs)
    tag = f"{weights} {str(dtype).split('.')[-1]} P={P}"
    report(f"fused prompt logits {tag}", rel(out0, ref0), tol)
    report(f"fused prompt after 40 cached {tag}", rel(out1, ref1), tol)
    n = P + 60
    report(f"fused prompt k cache {tag}", rel(decs[1].k_cache[:, :, :n], decs[0].k_cache[:, :, :n]), tol)
    report(f"fused prompt v cache {tag}", rel(decs[1].v_cache[:, :, :n], decs[0].v_cache[:, :, :n]), tol)


def check_padded_prefill(device, dtype, cfg: ChatGLMConfig, weights: str, P: int = 3, graphs: bool = False):
    """The prompt padded to a bucket (``_prefill``: a CUDA graph with ``graphs``, else the padded math run directly)
    against the unpadded prompt (``_forward_torch``): logits and the real cache slots, first turn, second turn,
    with and without a prefix, and a graph replayed for another prompt of its bucket."""
    model = make_model(device, dtype, cfg, seed=3)
    ref = FastDecoder(model, max_seq_len=512, weights=weights, use_graph=False)
    dec = FastDecoder(model, max_seq_len=512, weights=weights, use_graph=graphs, prefill_graphs=True)
    if not graphs:
        dec.fused_prefill = ref.fused_prefill = True  # the Triton stages, also under the interpreter
    prefix = [torch.randn(1, cfg.multi_query_group_num, P, cfg.kv_channels, device=device, dtype=dtype)
              for _ in range(2 * cfg.num_layers)]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    tag = f"{weights} {str(dtype).split('.')[-1]} {'graph' if graphs else 'no graph'}"
    for pre in (None, prefix):
        ids = torch.randint(0, cfg.padded_vocab_size, (122,)).tolist()
        for d in (ref, dec):
            d.set_prefix(pre)
        n0 = dec.prefix_len
        # tokens lo..hi at positions lo..: a first turn of 37 (bucket 64), a second turn of 20 after it (32 rows,
        # key window 128), a full bucket of 64, one token, an edited history of 20 from position 60 (the second
        # turn's graph replayed at another start; slots after 80 are stale from then on), a first turn of 50
        # (the first graph replayed)
        for lo, hi in ((0, 37), (37, 57), (57, 121), (121, 122), (60, 80), (0, 50)):
            with torch.inference_mode():
                want = ref._forward_torch(ids[lo:hi], lo)
                got = dec._prefill(ids[lo:hi], lo)
            n = n0 + hi
            where = f"{tag} P={n0} tokens {lo}..{hi}"
            report(f"padded prompt logits {where}", rel(got, want), tol)
            report(f"padded prompt k cache {where}", rel(dec.k_cache[:, :, :n], ref.k_cache[:, :, :n]), tol)
            report(f"padded prompt v cache {where}", rel(dec.v_cache[:, :, :n], ref.v_cache[:, :, :n]), tol)
    if graphs:
        ok = dec.prefill_captures > 0 and dec.prefill_graphs  # a failed capture falls back to eager, with a warning
        print(f"{'ok  ' if ok else 'FAIL'} prompt graphs captured: {dec.prefill_captures} "
              f"(keys {sorted(dec._prefill_graph_cache)}), still on: {dec.prefill_graphs}")
        if not ok:
            FAILS.append(f"prompt graph capture {tag}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes (for the Triton interpreter on a CPU)")
    ap.add_argument("--quick", action="store_true", help="with --small: the decode step's kernels only")
    args = ap.parse_args()
    _interpreter_numpy_compat()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.small and args.quick:
        small = ChatGLMConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                              num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=512)
        for int8 in (False, True):
            check_gemv(device, torch.float32, 96, 80, int8, GemvConfig(block_p=2, block_k=32, num_warps=1))
            check_gemv(device, torch.float32, 96, 80, int8, GemvConfig(block_p=2, block_k=32, num_warps=1, row_sum=True))
            check_rope(device, torch.float32, 4, 2, 16, 64, int8)
            check_argmax(device, 97, 64, int8, GemvConfig(block_p=4, block_k=32, num_warps=1, row_sum=True))
        for weights in ("same", "int8"):
            check_step(device, torch.float32, small, weights, P=3)
        check_sampling(device, draws=2000)
    elif args.small:
        dtypes = [torch.float32, torch.float16]
        for dt in dtypes:
            for int8 in (False, True):
                check_gemv(device, dt, 96, 80, int8, GemvConfig(block_p=2, block_k=32, num_warps=1))
                check_gemv(device, dt, 128, 64, int8, GemvConfig(block_p=4, block_k=64, num_warps=1))
                check_gemv(device, dt, 96, 80, int8, GemvConfig(block_p=2, block_k=32, num_warps=1, row_sum=True))
                check_rope(device, dt, 4, 2, 16, 64, int8)
                check_matmul(device, dt, 5, 96, 80, int8)
            check_argmax(device, 97, 64, dt == torch.float16, GemvConfig(block_p=4, block_k=32, num_warps=1))
        check_sampling(device, draws=2000)
        small = ChatGLMConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                              num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=512)
        for weights in ("same", "int8"):
            check_step(device, torch.float32, small, weights)
            check_step(device, torch.float32, small, weights, P=3)
            check_step(device, torch.float32, small, weights, P=3, prefetch=True)
            check_fused_prefill(device, torch.float32, small, weights)
            check_padded_prefill(device, torch.float32, small, weights)
        check_step(device, torch.float16, small, "same", P=3)
        check_fused_prefill(device, torch.float16, small, "same")
        check_padded_prefill(device, torch.float16, small, "same")
    else:
        for int8 in (True, False):
            dt = torch.bfloat16
            for N, K in ((4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696), (65024, 4096)):
                check_gemv(device, dt, N, K, int8)
                check_gemv(device, dt, N, K, int8, GemvConfig(block_p=4, block_k=2048, row_sum=True))
            check_rope(device, dt, 32, 2, 128, 4096, int8)
            check_argmax(device, 65024, 4096, int8)
            check_argmax(device, 65024, 4096, int8, GemvConfig(block_p=8, block_k=1024, row_sum=True))
            for M in (1, 64, 1024):
                check_matmul(device, dt, M, 27392, 4096, int8)
            check_matmul(device, dt, 64, 4096, 13696, int8)
        wide = ChatGLMConfig(num_layers=2)
        for weights in ("bf16", "int8"):
            check_step(device, torch.bfloat16, wide, weights, P=0, prompt=100)
            check_step(device, torch.bfloat16, wide, weights, P=16, prompt=1000)
        for weights in ("fp32", "int8"):  # float32 activations: the kernels' own error, not bf16 rounding
            check_step(device, torch.float32, wide, weights, P=16, prompt=1000)
            check_step(device, torch.float32, wide, weights, P=16, prompt=1000, prefetch=True)
        check_sampling(device)
        check_sampler_graph(device)
        check_fused_prefill(device, torch.bfloat16, wide, "int8")
        check_fused_prefill(device, torch.float32, wide, "fp32")
        for graphs in (False, True):
            check_padded_prefill(device, torch.float32, wide, "fp32", graphs=graphs)
            check_padded_prefill(device, torch.bfloat16, wide, "int8", graphs=graphs)
    print("ALL KERNEL CHECKS PASSED" if not FAILS else f"KERNEL CHECKS FAILED: {FAILS}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
