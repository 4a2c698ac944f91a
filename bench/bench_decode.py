"""Decode speed, time to first token, adapter switch and memory at full ChatGLM2-6B size (random weights).

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python bench/bench_decode.py --out bench/

It builds the 6B architecture with random weights (the config values are written below, from
the release's config.json as documented in the project's notes), measures every configuration
through the chat engine's decoder interface (``generate``), and writes ``results.json`` and
``results.md`` (the table for BENCHMARKS.md) to ``--out``. bitsandbytes rows need bitsandbytes.

Measures, batch 1, greedy: decode tokens/s (64-token prompt, 128 new tokens; rate between the
first and the last token), time to first token (64- and 1024-token prompts, median of 3 after
a warm-up), peak GPU memory of each configuration (weights resident + its run), and the
fraction of the bandwidth bound (linear-weight bytes per token over the measured copy bandwidth).
Decode-only variant rows (PDL off, prefetch) with their logits checked bit for bit
against the plain decoder; the prompt through its CUDA graph against the eager prompt (TTFT, first
use of a bucket, logits and cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402
from backend.decoding import EagerDecoder, common_prefix_length  # noqa: E402
from backend.fast_decode import FastDecoder  # noqa: E402
from backend.int8_linear import LinearWeights  # noqa: E402
from backend.kernels.int8_gemv import GemvConfig, gemv  # noqa: E402
from backend.kv_cache import KVCache  # noqa: E402
from bench_engine import copy_bandwidth  # noqa: E402
from backend.service import SamplingParams  # noqa: E402

# ChatGLM2-6B's config.json (docs/chatglm2.md): the bench must not read files outside the repo.
CHATGLM2_6B = dict(
    hidden_size=4096, num_layers=28, num_attention_heads=32, kv_channels=128, multi_query_attention=True,
    multi_query_group_num=2, ffn_hidden_size=13696, padded_vocab_size=65024, seq_length=32768,
    layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True, apply_residual_connection_post_layernorm=False,
    add_bias_linear=False, add_qkv_bias=True, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
)
NEW_TOKENS = 128
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
LOG: list[str] = []
PARTIAL: dict = {}  # out folder and what was measured so far, saved after every row


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def sync() -> None:
    torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def build_model(dtype: torch.dtype, seed: int = 0) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CHATGLM2_6B))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def to_bitsandbytes(model, kind: str, threshold: float = 6.0) -> None:
    """Replace the blocks' linears with bitsandbytes layers in place (the output layer stays, as transformers does)."""
    import bitsandbytes as bnb
    from torch import nn

    for layer in model.transformer.encoder.layers:
        for parent, name in ((layer.self_attention, "query_key_value"), (layer.self_attention, "dense"),
                             (layer.mlp, "dense_h_to_4h"), (layer.mlp, "dense_4h_to_h")):
            lin = getattr(parent, name)
            n, k = lin.weight.shape
            w = lin.weight.data.to(torch.float16)
            has_bias = lin.bias is not None
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(k, n, bias=has_bias, has_fp16_weights=False, threshold=threshold, device="meta")
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)
                new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
            else:
                new = bnb.nn.Linear4bit(k, n, bias=has_bias, compute_dtype=torch.float16, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", module=new).to(w.device)
            if has_bias:
                new.bias = nn.Parameter(lin.bias.data.to(torch.float16), requires_grad=False)
            setattr(parent, name, new)
            del lin, w
    free()


def set_bnb_threshold(model, threshold: float) -> None:
    for m in model.modules():
        if type(m).__name__ == "Linear8bitLt":
            m.state.threshold = threshold
            m.state.use_pool = threshold > 0


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 60000, (n,), generator=g).tolist()


def ttft_ms(dec, ids: list[int], reps: int = 3, first: list | None = None) -> float:
    one = SamplingParams(temperature=0, max_new_tokens=1)
    times = []
    for i in range(reps + 1):
        dec.reset()
        sync()
        t0 = time.perf_counter()
        list(dec.generate(ids, one, eos_token_ids=[]))
        times.append((time.perf_counter() - t0) * 1e3)
    if first is not None:
        first.append(times[0])  # includes any kernel compilation the first prompt triggers
    return statistics.median(times[1:])


def decode_rate(dec, ids: list[int], reps: int = 1) -> tuple[float, list[int]]:
    rates, tokens = [], []
    for _ in range(reps):
        dec.reset()
        sync()
        stamps, tokens = [], []
        for tok in dec.generate(ids, GREEDY, eos_token_ids=[]):
            stamps.append(time.perf_counter())
            tokens.append(tok)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates), tokens


def sampling_rate(dec, ids: list[int]) -> float:
    """Decode rate with the chat's default sampling (temperature 0.8, top_p 0.8), after a short reply that
    captures the sampler's graph."""
    params = SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=NEW_TOKENS)
    list(dec.generate(ids, dataclasses.replace(params, max_new_tokens=4), eos_token_ids=[]))
    dec.reset()
    sync()
    stamps = [time.perf_counter() for _ in dec.generate(ids, params, eos_token_ids=[],
                                                          generator=torch.Generator(device="cuda").manual_seed(0))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def eager_greedy(model, ids: list[int], n: int, prefix=None) -> list[int]:
    """Greedy tokens from the eager model; the prompt goes in with an explicit all-ones mask (see NOTES.md)."""
    dev = model.get_input_embeddings().weight.device
    cache = KVCache.with_prefix(prefix)
    logits = model(torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids), device=dev, dtype=torch.long),
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    out = [int(logits.argmax(-1))]
    for _ in range(n - 1):
        logits = model(torch.tensor([[out[-1]]], device=dev), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        out.append(int(logits.argmax(-1)))
    return out


def weight_bytes_model(model) -> int:
    """Bytes a decode step reads: every parameter but the embedding table (one row of it is read)."""
    emb = model.transformer.embedding.word_embeddings.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    for m in model.modules():  # quantisation statistics kept beside bitsandbytes weights
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def weight_bytes_fast(dec: FastDecoder) -> int:
    def lw_bytes(lw: LinearWeights) -> int:
        return sum(t.numel() * t.element_size() for t in (lw.weight, lw.scale, lw.bias) if t is not None)

    total = lw_bytes(dec.output) + dec.final_ln.numel() * dec.final_ln.element_size()
    for lw in dec.layers:
        total += sum(lw_bytes(x) for x in (lw.qkv, lw.dense, lw.fc1, lw.fc2))
        total += (lw.ln1.numel() + lw.ln2.numel()) * lw.ln1.element_size()
    return total


def measure(name: str, make, results: dict, ids64, ids1024, bytes_fn, copy_bw, decode_reps=1, extra=None):
    free()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    dec = make()
    sync()
    build_s = time.perf_counter() - t0
    first: list = []
    t64 = ttft_ms(dec, ids64, first=first)
    t1024 = ttft_ms(dec, ids1024, first=first)
    rate, tokens = decode_rate(dec, ids64, reps=decode_reps)
    peak = torch.cuda.max_memory_allocated() / 1e9
    nbytes = bytes_fn(dec)
    bound = copy_bw / nbytes
    row = dict(decode_tok_s=round(rate, 1), ttft_ms_64=round(t64, 1), ttft_ms_1024=round(t1024, 1),
               peak_gpu_gb=round(peak, 2), weight_gb_per_token=round(nbytes / 1e9, 2),
               bound_tok_s=round(bound, 1), fraction_of_bound=round(rate / bound, 3), build_s=round(build_s, 1),
               first_reply_s=round(build_s + first[0] / 1e3, 1))
    if isinstance(dec, FastDecoder) and dec._graph is not None:
        row["step_ms"] = round(step_ms(dec), 3)
        row["decode_tok_s_sampling"] = round(sampling_rate(dec, ids64), 1)
    if extra:
        row.update(extra)
    results[name] = row
    if PARTIAL.get("out"):
        (PARTIAL["out"] / "partial.json").write_text(json.dumps(results, indent=1) + "\n")
        (PARTIAL["out"] / "bench_log.txt").write_text("\n".join(LOG) + "\n")
    say(f"{name:28s} {rate:7.1f} tok/s ({rate / bound:5.1%} of {bound:.0f})  TTFT64 {t64:7.1f} ms  "
        f"TTFT1024 {t1024:7.1f} ms  peak {peak:5.2f} GB  build {build_s:5.1f} s  first reply {row['first_reply_s']} s"
        + (f"  graph step {row['step_ms']:.3f} ms, sampling {row['decode_tok_s_sampling']} tok/s" if "step_ms" in row else ""))
    return dec, tokens


@torch.inference_mode()
def eager_logits(model, ids: list[int], forced: list[int]) -> torch.Tensor:
    cache = KVCache()
    dev = model.get_input_embeddings().weight.device
    out = [model(torch.tensor([ids], device=dev), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()]
    for t in forced:
        out.append(model(torch.tensor([[t]], device=dev), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


def replay_step(dec: FastDecoder, token: int, pos: int) -> None:
    """One decode step from the captured graph, with ``token`` fed at ``pos`` (bench only)."""
    dec._set_step_input(token, pos)
    dec._graph.replay()


@torch.inference_mode()
def fast_logits(dec: FastDecoder, ids: list[int], forced: list[int]) -> torch.Tensor:
    dec.reset()
    out = [dec._forward_torch(ids, 0)]
    for i, t in enumerate(forced):
        replay_step(dec, t, len(ids) + i)
        out.append(dec._logits.view(1, -1).clone())
    return torch.cat(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    return common_prefix_length(a, b)


# -- GEMV sweep: each config over all 28 layers' weights (more than L2 holds), inside a CUDA graph --

def sweep_gemv(dec: FastDecoder, configs: list[GemvConfig], label: str) -> dict:
    kinds = {
        "qkv": [lw.qkv for lw in dec.layers],
        "dense": [lw.dense for lw in dec.layers],
        "fc1": [lw.fc1 for lw in dec.layers],
        "fc2": [lw.fc2 for lw in dec.layers],
        "output": [dec.output] * 4,
    }
    best = {}
    say(f"\nGEMV sweep, {label} weights: microseconds per matrix (GB/s), graph of one launch per layer")
    header = f"{'(block_p, block_k, warps, stages, cvt, prefetch, row_sum)':34s}" + "".join(f"{k:>18s}" for k in kinds)
    say(header)
    for cfg in configs:
        cells = []
        for kind, lws in kinds.items():
            lws = [LinearWeights(lw.weight, lw.scale, None) for lw in lws]
            K = lws[0].weight.shape[1]
            x = torch.randn(K, device="cuda", dtype=dec.dtype)
            outs = [torch.empty(lw.weight.shape[0], device="cuda", dtype=dec.dtype) for lw in lws]
            try:
                for lw, o in zip(lws, outs):
                    gemv(x, lw, o, config=cfg)
                sync()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for lw, o in zip(lws, outs):
                        gemv(x, lw, o, config=cfg)
                g.replay()
                sync()
                times = []
                for _ in range(7):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    e.record()
                    sync()
                    times.append(s.elapsed_time(e) * 1e3 / len(lws))
                us = statistics.median(times)
                nbytes = sum(lw.weight.numel() * lw.weight.element_size() for lw in lws) / len(lws)
                cells.append(f"{us:8.1f} ({nbytes / us / 1e3:5.0f})")
                if kind not in best or us < best[kind][0]:
                    best[kind] = (us, cfg)
            except Exception as exc:  # a config that does not compile or fit: note it, go on
                cells.append(f"{'err':>17s}")
                say(f"  {cfg} {kind}: {type(exc).__name__}: {str(exc)[:120]}")
        say(f"{str(_cfg_tuple(cfg)):34s}" + "".join(f"{c:>18s}" for c in cells))
    say("best (block_p, block_k, warps, stages, cvt, prefetch, row_sum): " + ", ".join(
        f"{k}={_cfg_tuple(c)} {us:.1f}us" for k, (us, c) in best.items()))
    return {k: c for k, (us, c) in best.items()}


def _cfg_tuple(c: GemvConfig) -> tuple:
    return (c.block_p, c.block_k, c.num_warps, c.num_stages, c.cvt, int(c.prefetch), int(c.row_sum))


def int8_configs() -> list[GemvConfig]:
    cfgs = []
    for bp in (1, 2, 4, 8):
        for bk in (512, 1024, 2048):
            for w in (4, 8):
                if bp * bk <= 8192:
                    cfgs.append(GemvConfig(block_p=bp, block_k=bk, num_warps=w, cvt=2))
    cfgs += [GemvConfig(block_p=bp, block_k=1024, num_warps=4, cvt=c) for bp in (2, 4) for c in (0, 1)]
    cfgs += [GemvConfig(block_p=bp, block_k=1024, num_warps=4, num_stages=st, cvt=2) for bp in (2, 4) for st in (2, 3)]
    return cfgs + row_sum_configs()


def row_sum_configs() -> list[GemvConfig]:
    """Tiles reduced to one float32 per row as they arrive, with and without the next tile loaded ahead."""
    shapes = [(1, 2048, 4), (2, 1024, 4), (2, 2048, 4), (4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (8, 1024, 8),
              (2, 4096, 4), (4, 4096, 8), (8, 2048, 8), (16, 512, 4), (16, 1024, 8)]
    cfgs = [GemvConfig(block_p=bp, block_k=bk, num_warps=w, row_sum=True) for bp, bk, w in shapes]
    return cfgs + [GemvConfig(block_p=bp, block_k=bk, num_warps=w, row_sum=True, prefetch=True)
                   for bp, bk, w in ((1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (2, 2048, 4), (8, 512, 4))]


def float_configs() -> list[GemvConfig]:
    cfgs = [GemvConfig(block_p=bp, block_k=bk, num_warps=w) for bp in (1, 2, 4) for bk in (512, 1024) for w in (4, 8)]
    return cfgs + [GemvConfig(block_p=bp, block_k=512, num_warps=4, num_stages=3) for bp in (1, 2)]


def step_ms(dec: FastDecoder, n: int = 50) -> float:
    """Device time of one graph replay (no host work between replays)."""
    dec._set_step_input(100, 200)
    dec._graph.replay()
    sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        dec._graph.replay()
    e.record()
    sync()
    return s.elapsed_time(e) / n


def profile_step(dec: FastDecoder) -> None:
    try:
        from torch.profiler import ProfilerActivity, profile

        dec._set_step_input(100, 200)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                dec._step()
            sync()
        key = "self_device_time_total"
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=12)
        except Exception:
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
        say("\nKernels of 3 decode steps (fast int8, eager launches):\n" + table)
    except Exception as exc:
        say(f"profiler unavailable: {exc}")


def measure_decode(name: str, make, results: dict, ids64, copy_bw) -> FastDecoder:
    """A decode-only variant: tokens/s through generate, and the graph step's device time."""
    free()
    dec = make()
    sync()
    rate, _ = decode_rate(dec, ids64, reps=3)
    nbytes = weight_bytes_fast(dec)
    bound = copy_bw / nbytes
    results[name] = dict(decode_tok_s=round(rate, 1), bound_tok_s=round(bound, 1), fraction_of_bound=round(rate / bound, 3),
                         step_ms=round(step_ms(dec), 3), pdl=dec.pdl, variant=True)
    say(f"{name:34s} {rate:7.1f} tok/s ({rate / bound:5.1%} of {bound:.0f})  graph step {results[name]['step_ms']:.3f} ms"
        f"  (pdl {dec.pdl})")
    return dec


def identical(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{bool(torch.equal(a, b))} (rel {rel(a, b):.1e})"


def decode_variants(base: str, variants, make, results, ids64, copy_bw, forced, ref_logits=None):
    """Decode-only rows for each (suffix, FastDecoder kwargs); their logits (prompt + forced steps) against the
    row without kwargs (or ``ref_logits``). Each decoder is freed after its row but the plain one, returned."""
    logits, plain = {}, None
    for suffix, kw in variants:
        name = f"{base}, {suffix}" if suffix else base
        try:
            dec = measure_decode(name, lambda: make(**kw), results, ids64, copy_bw)
            logits[name] = fast_logits(dec, ids64, forced)
            if not kw:
                plain = dec
            del dec
        except Exception as exc:
            say(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
        free()
    ref = ref_logits if ref_logits is not None else logits.get(base)
    same = {n: identical(lv, ref) for n, lv in logits.items() if ref is not None and lv is not ref}
    say(f"identical logits vs {base}: {same}")
    return plain, same


def prefill_compare(dec: FastDecoder, label: str, prompts: dict, info: dict) -> None:
    """The prompt through its CUDA graph (first use: the capture included; then the median) against the eager
    prompt: TTFT, and the logits and real cache slots the two leave."""
    rows = {}
    for tag, ids in prompts.items():
        dec._prefill_graph_cache.clear()  # the next prompt of each bucket captures again
        first: list = []
        t_graph = ttft_ms(dec, ids, first=first)
        was, dec.prefill_graphs = dec.prefill_graphs, False  # (was is False only where a capture failed)
        t_eager = ttft_ms(dec, ids)
        dec.prefill_graphs = was
        with torch.inference_mode():
            dec.reset()
            n = dec.prefix_len + len(ids)
            l_eager = dec._forward_torch(ids, 0)
            kv = (dec.k_cache[:, :, :n].clone(), dec.v_cache[:, :, :n].clone())
            l_graph = dec._prefill(ids, 0)
            cache = identical(torch.cat((dec.k_cache[:, :, :n], dec.v_cache[:, :, :n])), torch.cat(kv))
        rows[tag] = dict(ttft_graph_ms=round(t_graph, 2), ttft_graph_first_use_ms=round(first[0], 1),
                         ttft_eager_ms=round(t_eager, 2), logits_graph_vs_eager=identical(l_graph, l_eager),
                         cache_graph_vs_eager=cache)
        say(f"prompt {tag:>5s} {label}: TTFT graph {t_graph:6.2f} ms (first use {first[0]:6.1f}), eager {t_eager:6.2f} ms; "
            f"graph = eager: logits {rows[tag]['logits_graph_vs_eager']}, cache {cache}")
        del kv
    rows["prefill_captures"] = dec.prefill_captures
    info.setdefault("prefill_graph", {})[label] = rows


def logits_errors(model, dec_bf16, dec_int8, ids, forced) -> dict:
    ref = eager_logits(model, ids, forced)
    l_fb = fast_logits(dec_bf16, ids, forced)
    l_fi = fast_logits(dec_int8, ids, forced)
    out = {"fast_bf16_vs_eager_bf16": rel(l_fb, ref), "fast_int8_vs_eager_bf16": rel(l_fi, ref),
           "fast_int8_vs_eager_bf16_first_position": rel(l_fi[:1], ref[:1])}
    backup = []
    with torch.no_grad():  # eager math on the int8 weights, to split quantisation from kernel error
        blocks = model.transformer.encoder.layers
        pairs = [(getattr(lw, a), getattr(getattr(b, m), n)) for lw, b in zip(dec_int8.layers, blocks)
                 for a, m, n in (("qkv", "self_attention", "query_key_value"), ("dense", "self_attention", "dense"),
                                 ("fc1", "mlp", "dense_h_to_4h"), ("fc2", "mlp", "dense_4h_to_h"))]
        pairs.append((dec_int8.output, model.transformer.output_layer))
        for lw, mod in pairs:
            backup.append(mod.weight.data.clone())
            mod.weight.data.copy_(lw.dequantize(mod.weight.dtype))
        ref_q = eager_logits(model, ids, forced)
        for (lw, mod), w in zip(pairs, backup):
            mod.weight.data.copy_(w)
    out["eager_int8_weights_vs_eager_bf16"] = rel(ref_q, ref)
    out["fast_int8_vs_eager_int8_weights"] = rel(l_fi, ref_q)
    out["argmax_agree_fast_int8_vs_eager_bf16"] = f"{int((l_fi.argmax(-1) == ref.argmax(-1)).sum())}/{len(ref)}"
    out["argmax_agree_fast_bf16_vs_eager_bf16"] = f"{int((l_fb.argmax(-1) == ref.argmax(-1)).sum())}/{len(ref)}"
    return out


def logits_errors_again(model, fb: FastDecoder, ids: list[int], info: dict, key: str, label: str) -> None:
    """``logits_errors`` after the model's weights changed in place: a new int8 decoder (its rows are a
    quantised copy; fb shares the bf16 weights), greedy tokens of the new model forced."""
    fi = FastDecoder(model, weights="int8")
    errs = logits_errors(model, fb, fi, ids, eager_greedy(model, ids, 32))
    info[key] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in errs.items()}
    say(f"logits relative error, {label}:")
    for k, v in errs.items():
        say(f"  {k:44s} {v if isinstance(v, str) else f'{v:.2e}'}")
    del fi
    free()


def profile_prefill(dec: FastDecoder, ids: list[int]) -> None:
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            dec.reset()
            dec._forward_torch(ids, 0)
            sync()
            t0 = time.perf_counter()
            dec._forward_torch(ids, 0)
            host = (time.perf_counter() - t0) * 1e3
            sync()
            total = (time.perf_counter() - t0) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                dec._forward_torch(ids, 0)
                sync()
        say(f"\nPrompt of {len(ids)} tokens ({dec.mode}, {dec.dtype}): {total:.1f} ms, of which launching {host:.1f} ms")
        say(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8))
    except Exception as exc:
        say(f"prefill profile unavailable: {exc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for results.json/.md")
    ap.add_argument("--sweep", action="store_true", help="also sweep the GEMV configs (about a minute of compiling)")
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes rows")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    PARTIAL["out"] = out
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    device = torch.cuda.get_device_name()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "PYTHONPATH=. python bench/bench_decode.py" + " ".join(sys.argv[1:] and [""] + sys.argv[1:])
    say(f"{device} | torch {torch.__version__} | triton {triton.__version__} | {date}")
    copy_bw = copy_bandwidth()
    say(f"copy bandwidth (read + write) {copy_bw / 1e12:.2f} TB/s")
    ids64, ids1024 = prompt(64, 1), prompt(1024, 2)
    results: dict = {}
    info: dict = {"copy_bandwidth_tb_s": round(copy_bw / 1e12, 3)}

    model, fb, fi = bf16_model_rows(ids64, ids1024, results, info, copy_bw)
    adapter_switch_rows(model, fb, fi, ids64, info)
    profile_step(fi)
    profile_prefill(fi, ids64)
    if args.sweep:
        best_i = sweep_gemv(fi, int8_configs(), "int8")
        best_f = sweep_gemv(fb, float_configs(), "bf16")
        info["gemv_best"] = {"int8": {k: vars(c) for k, c in best_i.items()},
                             "bf16": {k: vars(c) for k, c in best_f.items()}}
    del fi
    free()
    other_init_errors(model, fb, ids64, info)
    del fb, model
    free()
    info["resident_gb_before_8bit_rows"] = round(torch.cuda.memory_allocated() / 1e9, 2)  # should be ~0
    if not args.no_bnb:
        bitsandbytes_rows(ids64, ids1024, results, info, copy_bw)
    write_results(out, device, date, command, results, info)
    return 0


def bf16_model_rows(ids64, ids1024, results: dict, info: dict, copy_bw: float):
    """The bf16 model: eager, fast bf16, fast int8 quantised from it (variants, logits errors). Returns the model
    and the two fast decoders."""
    model = build_model(torch.bfloat16)
    mb = lambda dec: weight_bytes_model(model)  # noqa: E731
    eager_dec, eager_tokens = measure("bf16 eager", lambda: EagerDecoder(model), results, ids64, ids1024, mb, copy_bw)
    del eager_dec  # it holds the model: the 8-bit rows' peaks must not include it
    fb, fast_tokens = measure("fast bf16", lambda: FastDecoder(model, weights="bf16"), results, ids64, ids1024,
                              weight_bytes_fast, copy_bw, decode_reps=3)
    info["fast_bf16_pdl"] = fb.pdl
    info["build_s_fast_bf16_cold"] = results["fast bf16"]["build_s"]
    t0 = time.perf_counter()
    FastDecoder(model, weights="bf16", max_seq_len=1024)  # a second build: Triton's kernel cache is warm
    sync()
    info["build_s_fast_bf16_warm"] = round(time.perf_counter() - t0, 1)
    info["greedy_agree_fast_bf16_vs_eager_bf16"] = agreement(fast_tokens, eager_tokens)
    say(f"greedy tokens fast bf16 = eager bf16 for the first {info['greedy_agree_fast_bf16_vs_eager_bf16']} of {NEW_TOKENS}")

    forced = eager_tokens[:32]
    _, same_b = decode_variants(
        "fast bf16", (("PDL off", dict(pdl=False)),),
        lambda **kw: FastDecoder(model, weights="bf16", **kw), results, ids64, copy_bw, forced,
        ref_logits=fast_logits(fb, ids64, forced))
    info["bf16_pdl_logits_identical"] = same_b.get("fast bf16, PDL off")
    info["bf16_variants_logits_identical"] = same_b
    fi_name = "fast int8 (bf16 act)"
    fi, info["int8_variants_logits_identical"] = decode_variants(
        fi_name, (("PDL off", dict(pdl=False)), ("", dict()), ("prefetch", dict(prefetch=True))),
        lambda **kw: FastDecoder(model, weights="int8", **kw), results, ids64, copy_bw, forced)
    if fi is None:
        raise RuntimeError(f"the {fi_name} decoder failed")
    results[fi_name].update(ttft_ms_64=round(ttft_ms(fi, ids64), 1), ttft_ms_1024=round(ttft_ms(fi, ids1024), 1))
    prompts = {"64": ids64, "100": prompt(100, 4), "1024": ids1024}  # 100: padded to the bucket of 128
    prefill_compare(fb, "fast bf16", prompts, info)
    prefill_compare(fi, fi_name, prompts, info)

    errs = logits_errors(model, fb, fi, ids64, forced)
    info["logits_rel_err"] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in errs.items()}
    say("logits relative error (64-token prompt + 32 forced steps), init N(0, 0.02):")
    for k, v in errs.items():
        say(f"  {k:44s} {v if isinstance(v, str) else f'{v:.2e}'}")
    return model, fb, fi


def adapter_switch_rows(model, fb, fi, ids64, info: dict) -> None:
    """Two random prefixes of 128 slots switched into the int8 decoder (no recapture), then greedy with a prefix
    against the eager model."""
    P = 128
    g = torch.Generator(device="cuda").manual_seed(3)
    pa = [torch.randn(1, 2, P, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(56)]
    pb = [torch.randn(1, 2, P, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(56)]
    fi.set_prefix(pa)
    times = []
    for i in range(21):
        sync()
        t0 = time.perf_counter()
        fi.set_prefix(pb if i % 2 == 0 else pa)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    info["adapter_switch_ms"] = round(statistics.median(times), 3)
    info["ttft_ms_64_with_prefix128"] = round(ttft_ms(fi, ids64), 1)
    prefill_compare(fi, "fast int8 (bf16 act), prefix 128", {"64": ids64}, info)  # the masked key window [0, 256)
    list(fi.generate(ids64, SamplingParams(temperature=0, max_new_tokens=8), eos_token_ids=[]))
    info["graph_captures_after_switches"] = fi.graph_captures
    say(f"adapter switch (P=128, set_prefix): {info['adapter_switch_ms']:.3f} ms median; graph captures "
        f"{fi.graph_captures}; TTFT64 with prefix {info['ttft_ms_64_with_prefix128']} ms")
    fb.set_prefix(pa)
    p16 = SamplingParams(temperature=0, max_new_tokens=16)
    te = eager_greedy(model, ids64, 16, prefix=pa)
    tf = list(fb.generate(ids64, p16, eos_token_ids=[]))
    info["greedy_agree_with_prefix_fast_bf16_vs_eager_bf16"] = f"{agreement(tf, te)}/16"
    say(f"with prefix: greedy fast bf16 = eager bf16 for {agreement(tf, te)}/16 tokens")
    fb.set_prefix(None)
    fi.set_prefix(None)


def other_init_errors(model, fb, ids64, info: dict) -> None:
    """The logits errors again on better-conditioned random models."""
    # residual-branch outputs scaled by 1/sqrt(2 L) (GPT-2's init)
    with torch.no_grad():
        for b in model.transformer.encoder.layers:
            b.self_attention.dense.weight.mul_((2 * 28) ** -0.5)
            b.mlp.dense_4h_to_h.weight.mul_((2 * 28) ** -0.5)
    logits_errors_again(model, fb, ids64, info, "logits_rel_err_scaled_init", "residual projections scaled by 1/sqrt(56)")
    # PyTorch's own initialisation (what the original modeling code gets with empty_init=False): linears
    # U(-1/sqrt(in), 1/sqrt(in)), embedding N(0, 1); every branch adds less than the embedding it reads
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.reset_parameters()
    logits_errors_again(model, fb, ids64, info, "logits_rel_err_torch_init",
                        "PyTorch default init (Linear U(+-1/sqrt(in)), Embedding N(0, 1))")


def bitsandbytes_rows(ids64, ids1024, results: dict, info: dict, copy_bw: float) -> None:
    """8-bit and 4-bit bitsandbytes models (fp16 activations, as the original stack runs them)."""
    try:
        import bitsandbytes  # noqa: F401 - the rows need it
    except ImportError as exc:
        say(f"bitsandbytes rows skipped: {exc}")
        return
    model = build_model(torch.bfloat16).half()
    to_bitsandbytes(model, "int8", threshold=6.0)
    mb = lambda dec: weight_bytes_model(model)  # noqa: E731
    measure("bnb int8 t=6.0 eager", lambda: EagerDecoder(model), results, ids64, ids1024, mb, copy_bw)
    set_bnb_threshold(model, 0.0)
    measure("bnb int8 t=0 eager", lambda: EagerDecoder(model), results, ids64, ids1024, mb, copy_bw)
    dec, _ = measure("fast int8", lambda: FastDecoder(model, weights="same"), results, ids64, ids1024,
                     weight_bytes_fast, copy_bw, decode_reps=3, extra={"note": "8-bit model, int8 rows shared"})
    profile_prefill(dec, ids64)
    prefill_compare(dec, "fast int8", {"64": ids64, "1024": ids1024}, info)
    dec = model = None  # (freed before the 4-bit model is built)
    free()
    model = build_model(torch.bfloat16).half()
    to_bitsandbytes(model, "4bit")
    mb = lambda dec: weight_bytes_model(model)  # noqa: E731
    measure("bnb 4-bit nf4 eager", lambda: EagerDecoder(model), results, ids64, ids1024, mb, copy_bw)
    model = None
    free()


ORDER = ["bf16 eager", "bnb int8 t=6.0 eager", "bnb int8 t=0 eager", "bnb 4-bit nf4 eager", "fast bf16",
         "fast bf16, PDL off", "fast int8", "fast int8 (bf16 act)", "fast int8 (bf16 act), PDL off",
         "fast int8 (bf16 act), prefetch"]
TARGETS = {"fast int8": 350, "fast bf16": 200}


def write_results(out: Path, device: str, date: str, command: str, results: dict, info: dict) -> None:
    payload = {
        "device": device,
        "date": date,
        "command": command,
        "configs": results,
        "adapter_switch_ms": info.get("adapter_switch_ms"),
        "ptuning_step_ms": None,  # filled by the training work
        "ptuning_peak_gpu_gb": None,
        "eval_examples_per_s": None,
        "details": info,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    lines = [
        f"Decode benchmark: ChatGLM2-6B architecture, random weights, batch 1, greedy; {device}; {date}.",
        f"Command: `{command}`. Copy bandwidth measured {info['copy_bandwidth_tb_s']:.2f} TB/s (read + write);",
        "the bound is that bandwidth over the weight bytes one token reads.",
        "",
        "| configuration | decode tok/s (64-token prompt, 128 new) | % of bandwidth bound | TTFT 64 (ms) | TTFT 1024 (ms) | peak GPU (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ORDER + [n for n in results if n not in ORDER]:
        r = results.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['decode_tok_s']} | {r['fraction_of_bound']:.0%} of {r['bound_tok_s']:.0f} | "
                     f"{r.get('ttft_ms_64', '-')} | {r.get('ttft_ms_1024', '-')} | {r.get('peak_gpu_gb', '-')} |")
    lines += [
        "",
        f"Adapter switch (P-Tuning prefix of 128 slots into the fast decoder's cache): {info.get('adapter_switch_ms')} ms; "
        f"graph captures after switching: {info.get('graph_captures_after_switches')}.",
        f"Fast decoder build (Triton JIT + graph capture): {info.get('build_s_fast_bf16_cold')} s cold, "
        f"{info.get('build_s_fast_bf16_warm')} s with Triton's cache warm; first reply after load (build + first "
        f"prompt, cold): fast bf16 {results.get('fast bf16', {}).get('first_reply_s')} s, "
        f"fast int8 {results.get('fast int8', {}).get('first_reply_s')} s.",
        "Logits relative error, 64-token prompt + 32 steps, init N(0, 0.02): "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in info.get("logits_rel_err", {}).items())
        + ". Same with the residual projections scaled by 1/sqrt(56): "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in info.get("logits_rel_err_scaled_init", {}).items())
        + ". Same with PyTorch's default initialisation: "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in info.get("logits_rel_err_torch_init", {}).items()) + ".",
        "Rows 'fast int8' run on the 8-bit (bitsandbytes, fp16) model with its int8 rows shared; "
        "'(bf16 act)' rows quantise the bf16 model (its 12 GB stay resident, so no peak is given).",
        "P-Tuning step and eval throughput: bench/bench_train.py (bench/run_device.sh appends its table below).",
    ]
    if info.get("prefill_graph"):
        lines += [
            "",
            "Prompt through its CUDA graph (padded to a power-of-two bucket) vs eager: TTFT median of 3 after a warm-up;",
            "first use = the first prompt of the bucket (warm-up run + capture + replay).",
            "",
            "| decoder | prompt tokens | TTFT graph (ms) | first use (ms) | TTFT eager (ms) | logits graph = eager | cache graph = eager |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, rows in info["prefill_graph"].items():
            for tag, r in rows.items():
                if isinstance(r, dict):
                    lines.append(f"| {label} | {tag} | {r['ttft_graph_ms']} | {r['ttft_graph_first_use_ms']} | "
                                 f"{r['ttft_eager_ms']} | {r['logits_graph_vs_eager']} | {r['cache_graph_vs_eager']} |")
    variant_rows = [(n, r) for n, r in results.items() if r.get("variant")]
    if variant_rows:
        lines += ["", "Decode variants (graph step = device time of one replay): "
                  + "; ".join(f"{n} {r['step_ms']} ms (pdl {r.get('pdl')})" for n, r in variant_rows) + ".",
                  f"Identical logits vs the plain decoder: bf16 {info.get('bf16_variants_logits_identical')}; "
                  f"int8 {info.get('int8_variants_logits_identical')}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "bench_log.txt").write_text("\n".join(LOG) + "\n")
    say("\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
