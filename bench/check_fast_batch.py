"""GPU check of the batched fast decoder against the eager batched decoder (device script, small model).

    python bench/check_fast_batch.py

A small random ChatGLM2 (4 layers, hidden 512, 8 heads of 64, 2 groups) in float32: greedy rows of
one batch (different prompts, lengths and adapters, one joining late) must give the eager decoder's
tokens, with and without CUDA graphs; in bf16 the first-step logits must agree to bf16 rounding.
Prints one line per check and "all fast-batch checks passed" last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.configuration import ChatGLMConfig  # noqa: E402
from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402
from backend.decode.protocol import DecodeRequest  # noqa: E402
from backend.modeling import ChatGLMForConditionalGeneration, split_prefix  # noqa: E402
from backend.service import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def model_and_prefixes(dtype):
    torch.manual_seed(0)
    cfg = ChatGLMConfig(num_layers=4, hidden_size=512, ffn_hidden_size=1024, num_attention_heads=8, kv_channels=64,
                        multi_query_group_num=2, padded_vocab_size=2048, seq_length=4096)
    model = ChatGLMForConditionalGeneration(cfg).to("cuda", dtype).eval()
    width = cfg.num_layers * 2 * cfg.multi_query_group_num * cfg.kv_channels
    prefix = [t[:1].to(dtype) for t in split_prefix(torch.randn(1, 16, width, device="cuda") * 0.5, cfg)]
    return model, {None: None, "ad": prefix}


def requests():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(10, 2000, (n,), generator=g).tolist()  # noqa: E731
    return [DecodeRequest(ids(40), GREEDY), DecodeRequest(ids(7), GREEDY, adapter="ad"),
            DecodeRequest(ids(300), GREEDY, adapter="ad"), DecodeRequest(ids(90), GREEDY)]


def run(decoder, reqs):
    out = {i: [] for i in range(len(reqs))}
    for i, r in enumerate(reqs[:-1]):
        decoder.add(i, r)
    steps = 0
    while decoder.rows:
        for t in decoder.step():
            out[t.row].append(t.token)
        steps += 1
        if steps == 3:
            decoder.add(len(reqs) - 1, reqs[-1])
    assert not decoder.failed()
    return out


def run_alone(decoder, request) -> list:
    decoder.add(0, request)
    out = []
    while decoder.rows:
        out += [t.token for t in decoder.step()]
    return out


def logits_decoder(model, prefix_of, max_batch: int) -> BatchFastDecoder:
    """A batched fast decoder whose steps' logits can be read: without the step ahead, whose graph replay writes
    over the queued step's logits (its tokens are read back first). ``ahead_check`` covers the step ahead."""
    return BatchFastDecoder(model, prefix_of, max_batch=max_batch, decode_ahead=False)


def ahead_check(name: str, model, prefix_of, max_batch: int, reqs: list | None = None) -> None:
    """Greedy tokens with the next step fed on the device and queued ahead (what users run) equal those of steps
    fed from the host one at a time: the same kernels on the same inputs, so equal in any dtype."""
    reqs = reqs or requests()
    tokens = [run(BatchFastDecoder(model, prefix_of, max_batch=max_batch, decode_ahead=ahead), reqs)
              for ahead in (True, False)]
    same = sum(a == b for a, b in zip(tokens[0].values(), tokens[1].values()))
    check(f"{name} greedy rows ({len(reqs)}) with the step ahead equal steps fed from the host",
          same == len(tokens[1]), f"{same}/{len(tokens[1])} rows")


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        raise SystemExit(1)


def long_context_check() -> None:
    """chatglm2-6b-32k's rotary (rope_ratio 16) on a prompt far past 8192 tokens: the batched fast decoder, which
    serves such models, against the eager decoder, greedy in float32."""
    torch.manual_seed(0)
    cfg = ChatGLMConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, kv_channels=64,
                        multi_query_group_num=2, padded_vocab_size=2048, seq_length=16384, rope_ratio=16)
    model = ChatGLMForConditionalGeneration(cfg).to("cuda").eval()
    prompt = torch.randint(10, 2000, (12000,), generator=torch.Generator().manual_seed(3)).tolist()
    request = DecodeRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=16))
    tokens = {}
    for name, decoder in (("eager", EagerBatchDecoder(model, lambda a: None, max_batch=1)),
                          ("fast", BatchFastDecoder(model, lambda a: None, max_batch=1, context_length=cfg.seq_length))):
        decoder.add(0, request)
        tokens[name] = []
        while decoder.rows:
            tokens[name] += [t.token for t in decoder.step()]
    check("rope_ratio 16, a 12000-token prompt: batched fast equals eager", tokens["fast"] == tokens["eager"],
          f"{tokens['fast'][:6]}...")


def one_row_checks(model, prefixes, eager: dict) -> None:
    """A chat's row alone (bucket 1) takes decode/one_row_step.py's step in a graph: rotary and the cache write in
    the QKV GEMV, the greedy pick in the output GEMV, PDL on Hopper, this card's tuned tiles once a warm-up ran.
    Its greedy tokens against eager, and the general step's (GLMCHAT_ONE_ROW_FUSED=0's) logits against it."""
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1)
    decoder.warm_up()  # tunes the one-row tiles on a new card, as the app's background warm-up does
    alone = [run_alone(decoder, r) for r in requests()]
    same = sum(a == b for a, b in zip(alone, eager.values()))
    step = "the general step" if decoder._one_row_step is None else f"the one-row step (pdl={decoder._one_row_step.pdl})"
    check(f"fp32 greedy rows one at a time through {step} equal eager", same == len(eager), f"{same}/{len(eager)} rows")
    if decoder._one_row_step is None:  # GLMCHAT_ONE_ROW_FUSED=0: no fused step to hold against the general one
        return
    fused, general = logits_decoder(model, prefixes.get, 1), logits_decoder(model, prefixes.get, 1)
    general._one_row_step = None
    logits = []
    for dec in (fused, general):
        captured = []
        take = dec._take
        dec._take = lambda row, lg, *a: captured.append(lg.float().clone()) or take(row, lg, *a)
        run_alone(dec, requests()[1])
        logits.append(torch.cat(captured))
    err = ((logits[0] - logits[1]).abs().max() / logits[1].abs().max()).item()
    check("fp32 one-row step logits against the general step's", err < 1e-4, f"max relative difference {err:.1e}")


def one_row_prompt_check(model, prefixes) -> None:
    """bf16 rows alone past the prompt graphs' buckets (a pasted document): a 300-token prompt after an adapter's
    prefix, then a next turn of 150 tokens over its cached slots, attended causally to the end of the row's slots
    by flash attention with grouped keys (modeling.causal_to_end). First-token logits against eager."""
    first = requests()[2]
    turn2 = DecodeRequest(first.prompt_ids + list(range(100, 250)), GREEDY, adapter=first.adapter)
    logits = {}
    for name, dec in (("eager", EagerBatchDecoder(model, prefixes.get, max_batch=1)),
                      ("fast", logits_decoder(model, prefixes.get, 1))):
        captured = []
        take = dec._take
        dec._take = lambda row, lg, *a: captured.append(lg.float().clone()) or take(row, lg, *a)
        run_alone(dec, first)
        n = len(captured)
        run_alone(dec, turn2)
        logits[name] = torch.cat([captured[0], captured[n]])
    err = ((logits["fast"] - logits["eager"]).norm() / logits["eager"].norm()).item()
    check("bf16 one row's long prompt and next turn (no mask): first-token logits agree with eager", err < 2e-2,
          f"relative error {err:.2e}")


def main() -> None:
    if "--long" in sys.argv:
        long_context_check()
        return
    if "--one-row-prompt" in sys.argv:
        one_row_prompt_check(*model_and_prefixes(torch.bfloat16))
        return
    if "--quantized" in sys.argv:  # only the 8-bit and 4-bit lines (the kernels reading packed weights)
        only = [q for q in ("8bit", "4bit") if q in sys.argv]  # `--quantized 4bit`: NF4's lines only
        quantized_checks(tuple(only) or ("8bit", "4bit"))
        return
    model, prefixes = model_and_prefixes(torch.float32)
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=8), requests())
    for graphs in (False, True):
        fast = run(BatchFastDecoder(model, prefixes.get, max_batch=8, use_graphs=graphs), requests())
        same = sum(a == b for a, b in zip(fast.values(), eager.values()))
        check(f"fp32 greedy rows equal eager (graphs={graphs})", same == len(eager), f"{same}/{len(eager)} rows")
    one_row_checks(model, prefixes, eager)
    sampled = [DecodeRequest(r.prompt_ids, SamplingParams(temperature=0.8, top_p=0.8, top_k=(0, 20)[i % 2],
                                                          max_new_tokens=24), r.adapter, seed=i) for i, r in enumerate(requests())]
    together = run(BatchFastDecoder(model, prefixes.get, max_batch=8), sampled + requests())
    alone = [run_alone(BatchFastDecoder(model, prefixes.get, max_batch=1), r) for r in sampled]
    same = sum(together[i] == alone[i] for i in range(len(sampled)))
    check("fp32 seeded sampled rows (on the device) equal each row alone", same == len(sampled), f"{same}/{len(sampled)} rows")
    model, prefixes = model_and_prefixes(torch.bfloat16)
    logits = {}
    for name, dec in (("eager", EagerBatchDecoder(model, prefixes.get, max_batch=4)),
                      ("fast", logits_decoder(model, prefixes.get, max_batch=4))):
        captured = []
        take = dec._take
        dec._take = lambda row, lg, *a: captured.append(lg.float().clone()) or take(row, lg, *a)
        run(dec, requests())
        logits[name] = torch.cat(captured[:8])
    err = ((logits["fast"] - logits["eager"]).norm() / logits["eager"].norm()).item()
    check("bf16 logits of the first steps agree with eager", err < 2e-2, f"relative error {err:.2e}")
    one_row_prompt_check(model, prefixes)
    ahead_check("bf16", model, prefixes.get, 4)
    model, prefixes = model_and_prefixes(torch.float32)
    many = requests() * 50  # 200 rows: the 256-row bucket evaluation uses
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=256), many)
    fast = run(BatchFastDecoder(model, prefixes.get, max_batch=256), many)
    same = sum(a == b for a, b in zip(fast.values(), eager.values()))
    check("fp32 greedy rows equal eager, 200 rows in one batch", same == len(eager), f"{same}/{len(eager)} rows")
    quantized_checks()
    print("all fast-batch checks passed")


def quantized_checks(quantizations=("8bit", "4bit")) -> None:
    for quantization in quantizations:
        for copies in (1, 4, 50):  # 4 rows (the few-rows GEMVs), 16 (the int8 matmul with the residual and
            # SwiGLU in its epilogue), 200 (the matmul's own)
            err = quantized_logits_error(quantization, copies)
            # the eager layers (Int8Linear's matmul for 8-bit, bitsandbytes' for NF4) against the batched step's
            # kernels reading the same packed weights: rounding apart
            check(f"{quantization} logits of {4 * copies} rows (prompt + 2 steps) agree with eager",
                  err < 5e-2, f"relative error {err:.2e}")
        # compare's two rows (the second joins after three steps): the two-row bucket's own step, then its greedy
        # tokens with the step ahead
        err = quantized_logits_error(quantization, reqs=requests()[:2])
        check(f"{quantization} logits of 2 rows (compare's bucket; prompt + 2 steps) agree with eager", err < 5e-2,
              f"relative error {err:.2e}")
        # one row's 1100-token prompt: the weight widened for cuBLAS, which adds dense's and fc2's products into
        # the residual stream in place
        g = torch.Generator().manual_seed(2)
        long = [DecodeRequest(torch.randint(10, 2000, (1100,), generator=g).tolist(), GREEDY)]
        err = quantized_logits_error(quantization, reqs=long)
        check(f"{quantization} logits of one row's 1100-token prompt (+ 2 steps) agree with eager", err < 5e-2,
              f"relative error {err:.2e}")


def quantized_logits_error(quantization: str, copies: int = 1, reqs: list | None = None) -> float:
    """Save the small model, load it 8-bit or 4-bit as users do, and compare the batched fast decoder's
    logits (prompt and two steps of ``4 * copies`` rows in one batch, or of ``reqs``) with the eager decoder's (the
    model's own quantized modules); a step's logits count where both picked the same tokens before."""
    import tempfile

    from backend.loading import load_model
    from tests.helpers_tiny import make_tokenizer_file
    from backend.tokenization import ChatGLMTokenizer

    model, _ = model_and_prefixes(torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ChatGLMTokenizer(vocab_file=str(make_tokenizer_file(Path(tmp) / "_sp"))).save_pretrained(tmp)
        loaded = load_model(tmp, quantization=quantization)
    captured, tokens = {}, {}
    if reqs is None:
        reqs = requests() * copies
        if copies == 1:
            ahead_check(quantization, loaded.model, lambda a: None, 4)
    elif len(reqs) == 2:  # compare's two rows
        ahead_check(quantization, loaded.model, lambda a: None, 2, reqs)
    reqs = [DecodeRequest(r.prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=3)) for r in reqs]
    for name, dec in (("eager", EagerBatchDecoder(loaded.model, lambda a: None, max_batch=len(reqs))),
                      ("fast", logits_decoder(loaded.model, lambda a: None, max_batch=len(reqs)))):
        rows = captured[name] = {}
        take = dec._take
        dec._take = lambda row, lg, *a, rows=rows, take=take: rows.setdefault(row.id, []).append(lg.float().clone()) or take(row, lg, *a)
        tokens[name] = run(dec, reqs) if len(reqs) > 1 else {0: run_alone(dec, reqs[0])}
    pairs = [(captured["fast"][i][k], captured["eager"][i][k]) for i in tokens["eager"] for k in range(3)
             if tokens["fast"][i][:k] == tokens["eager"][i][:k]]
    fast, eager = torch.cat([a.flatten() for a, _ in pairs]), torch.cat([b.flatten() for _, b in pairs])
    return ((fast - eager).norm() / eager.norm()).item()


if __name__ == "__main__":
    main()
