"""The fast decoder against the eager one, on the CPU (eager math over the static cache).

The CUDA kernels and graph are checked on a GPU by bench/check_kernels.py; here the cache,
prefix slots, reuse across turns, sampling, cancel and int8 weights are covered.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import backend
import backend.decode.fast_prefill
from backend import ChatGLMConfig, ChatGLMForConditionalGeneration
from backend.decoding import EagerDecoder
from backend.fast_decode import FastDecoder, available, make_decoder
from backend.int8_linear import LinearWeights, linear_torch, quantize_per_channel
from backend.service import SamplingParams

backend.register()  # AutoModel.from_pretrained below: our classes for model_type chatglm

GREEDY64 = SamplingParams(temperature=0, max_new_tokens=64)
PROMPT = [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211]
NO_EOS: list[int] = []


def tiny_config(**kw) -> ChatGLMConfig:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16, num_attention_heads=4,
                multi_query_group_num=2, padded_vocab_size=512, seq_length=512)
    base.update(kw)
    return ChatGLMConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float32, std: float = 0.3, **kw) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(tiny_config(**kw)).eval().requires_grad_(False)
    with torch.no_grad():  # larger than init weights, so that greedy decoding does not settle on one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.to(dtype)


def random_prefix(model, P: int, seed: int) -> list[torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.get_input_embeddings().weight.dtype
    return [torch.randn(1, cfg.multi_query_group_num, P, cfg.kv_channels, generator=g).to(dtype)
            for _ in range(2 * cfg.num_layers)]


def run(decoder, ids, params=GREEDY64, eos=NO_EOS, **kw) -> list[int]:
    return list(decoder.generate(ids, params, eos, **kw))


# -- the golden tiny model (the original implementation's weights) ------------------------------

@pytest.fixture(scope="module")
def golden_model(golden_tiny_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(golden_tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def golden_prefix_model(golden_tiny_dir):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(golden_tiny_dir, pre_seq_len=4)
    model = AutoModel.from_pretrained(golden_tiny_dir, config=config, dtype=torch.float32).eval()
    state = torch.load(golden_tiny_dir / "prefix" / "pytorch_model.bin", map_location="cpu")
    model.transformer.prefix_encoder.load_state_dict(
        {k.removeprefix("transformer.prefix_encoder."): v for k, v in state.items()})
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_golden_greedy_64_tokens_equal_eager(golden_tiny_dir, dtype):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(golden_tiny_dir, dtype=dtype).eval()
    eager = run(EagerDecoder(model), PROMPT)
    fast = run(FastDecoder(model, weights="same"), PROMPT)
    assert len(eager) == 64
    assert fast == eager


def test_golden_with_prefix_equal_eager(golden_prefix_model, golden_model):
    model = golden_prefix_model
    with torch.no_grad():
        prefix = model.transformer.prefix_key_values(1, torch.float32)
    eager, fast = EagerDecoder(model), FastDecoder(model, weights="same")
    eager.set_prefix(prefix)
    fast.set_prefix(prefix)
    with_prefix = run(fast, PROMPT)
    assert with_prefix == run(eager, PROMPT)
    # None is the base model (the eager model would re-insert its own prefix encoder's output)
    fast.set_prefix(None)
    base = run(fast, PROMPT)
    assert base == run(EagerDecoder(golden_model), PROMPT)
    assert base != with_prefix  # the prefix changes the reply: it really was attended to


def test_golden_generate_equals_model_stream(golden_model):
    """The eager decoder is itself the model's generate loop: one more anchor for the fast path."""
    from backend.generation import generate_tokens
    from backend.kv_cache import KVCache

    expected = list(generate_tokens(golden_model, torch.tensor([PROMPT]), KVCache(), GREEDY64, NO_EOS))
    assert run(FastDecoder(golden_model, weights="same"), PROMPT) == expected


# -- self-made tiny models (no ../shared needed) ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_greedy_equal_eager(dtype):
    model = tiny_model(dtype=dtype)
    ids = list(range(5, 40))
    eager = run(EagerDecoder(model), ids)
    assert len(set(eager)) > 3
    assert run(FastDecoder(model, weights="same"), ids) == eager


def test_multi_turn_reuse_equals_fresh():
    model = tiny_model()
    dec = FastDecoder(model, weights="same")
    turn1 = list(range(10, 30))
    reply1 = run(dec, turn1, SamplingParams(temperature=0, max_new_tokens=12))
    assert dec.cached_ids == turn1 + reply1[:-1]
    turn2 = turn1 + reply1 + [7, 8, 9, 10]
    fed: list[int] = []
    original = dec._forward_torch
    dec._forward_torch = lambda ids, start: (fed.append(len(ids)), original(ids, start))[1]
    reused = run(dec, turn2)
    assert fed[0] == len(turn2) - len(turn1) - len(reply1) + 1  # only the last reply token and the new query
    assert reused == run(FastDecoder(model, weights="same"), turn2)
    assert reused == run(EagerDecoder(model), turn2)


def test_edited_history_reuses_only_the_common_start():
    model = tiny_model()
    dec = FastDecoder(model, weights="same")
    run(dec, list(range(10, 40)), SamplingParams(temperature=0, max_new_tokens=5))
    edited = list(range(10, 20)) + [99, 98, 97]
    assert run(dec, edited) == run(EagerDecoder(model), edited)


def test_switching_prefix_equals_fresh_decoders():
    model = tiny_model()
    pa, pb = random_prefix(model, 4, seed=1), random_prefix(model, 4, seed=2)
    ids = list(range(3, 25))
    dec = FastDecoder(model, weights="same")
    results = {}
    for name, prefix in (("a", pa), ("b", pb), ("a2", pa), ("none", None)):
        dec.set_prefix(prefix)
        results[name] = run(dec, ids)
        eager = EagerDecoder(model)
        eager.set_prefix(prefix)
        assert results[name] == run(eager, ids), name
    assert results["a"] == results["a2"]
    assert results["a"] != results["b"]
    assert results["none"] == run(FastDecoder(model, weights="same"), ids)


def test_prefix_of_another_length():
    model = tiny_model()
    dec = FastDecoder(model, weights="same")
    ids = list(range(3, 25))
    for P in (4, 7, 2):
        prefix = random_prefix(model, P, seed=P)
        dec.set_prefix(prefix)
        eager = EagerDecoder(model)
        eager.set_prefix(prefix)
        assert run(dec, ids) == run(eager, ids)
        assert dec.prefix_len == P


def test_cancel_stops_and_next_reply_is_unaffected():
    model = tiny_model()
    dec = FastDecoder(model, weights="same")
    ids = list(range(10, 30))
    cancel = threading.Event()
    got = []
    for tok in dec.generate(ids, GREEDY64, NO_EOS, cancel=cancel):
        got.append(tok)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3
    assert run(dec, ids) == run(EagerDecoder(model), ids)


def test_eos_is_yielded_and_stops():
    model = tiny_model()
    ids = list(range(10, 30))
    first = run(EagerDecoder(model), ids)
    eos = first[4]
    stop = first.index(eos)
    assert run(FastDecoder(model, weights="same"), ids, eos=[eos]) == first[: stop + 1]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=40),
        SamplingParams(temperature=0.7, top_p=1.0, top_k=20, max_new_tokens=40),
        SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=40),
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, max_new_tokens=40),
    ],
)
def test_sampling_matches_eager_with_same_generator(params):
    model = tiny_model()
    ids = list(range(10, 30))
    eager = run(EagerDecoder(model), ids, params, generator=torch.Generator().manual_seed(5))
    fast = run(FastDecoder(model, weights="same"), ids, params, generator=torch.Generator().manual_seed(5))
    assert fast == eager


def test_cache_limits():
    model = tiny_model()
    dec = FastDecoder(model, weights="same", max_seq_len=32)
    with pytest.raises(ValueError):
        run(dec, list(range(40)))
    got = run(dec, list(range(10, 30)))  # 20 prompt slots: 12 more tokens fit, then the cache is full
    assert len(got) == 32 - 20 + 1
    assert got == run(EagerDecoder(model), list(range(10, 30)))[: len(got)]


def test_int8_weights_close_to_fp32():
    # weights of scale 1/sqrt(width): int8's rounding is not amplified layer after layer
    model = tiny_model(seed=3, std=128**-0.5, hidden_size=128, ffn_hidden_size=256, kv_channels=32)
    ids = list(range(10, 30))
    ref = FastDecoder(model, weights="same")
    q8 = FastDecoder(model, weights="int8")
    assert q8.layers[0].fc1.weight.dtype == torch.int8 and q8.output.weight.dtype == torch.int8
    with torch.inference_mode():
        a = ref._forward_torch(ids, 0)
        b = q8._forward_torch(ids, 0)
    assert 0 < ((a - b).norm() / a.norm()).item() < 5e-2  # rounding to 8 bits, nothing more
    # the int8 path is the fp32 model on the dequantised weights
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for lw, block in zip(q8.layers, deq.transformer.encoder.layers):
            block.self_attention.query_key_value.weight.copy_(lw.qkv.dequantize(torch.float32))
            block.self_attention.dense.weight.copy_(lw.dense.dequantize(torch.float32))
            block.mlp.dense_h_to_4h.weight.copy_(lw.fc1.dequantize(torch.float32))
            block.mlp.dense_4h_to_h.weight.copy_(lw.fc2.dequantize(torch.float32))
        deq.transformer.output_layer.weight.copy_(q8.output.dequantize(torch.float32))
        c = FastDecoder(deq, weights="same")._forward_torch(ids, 0)
    assert ((b - c).norm() / c.norm()).item() < 1e-5
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    assert run(q8, ids, greedy) == run(EagerDecoder(deq), ids, greedy)


def test_quantize_per_channel_round_trip():
    w = torch.randn(48, 80)
    w[3] = 0  # an all-zero row must not divide by zero
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert q.abs().max() == 127
    back = q.float() * s[:, None]
    assert torch.all((back - w).abs() <= s[:, None] / 2 + 1e-6)
    x = torch.randn(5, 80)
    y = linear_torch(x, LinearWeights(q, s, None))
    assert torch.allclose(y, x @ back.T, atol=1e-5)


def test_bitsandbytes_int8_storage_is_shared():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model().half()
    layer = model.transformer.encoder.layers[0].mlp
    lin = layer.dense_h_to_4h
    n, k = lin.weight.shape
    new = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0, device="meta")
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.data)
    new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    layer.dense_h_to_4h = new
    dec = FastDecoder(model, weights="same")
    assert dec.mode == "int8"
    assert dec.layers[0].fc1.weight.data_ptr() == cb.data_ptr()  # no copy, no fp16 widening
    assert torch.allclose(dec.layers[0].fc1.scale, scb / 127)


def test_make_decoder_selection():
    model = tiny_model()
    assert isinstance(make_decoder(model, "eager"), EagerDecoder)
    assert isinstance(make_decoder(model, "fast"), FastDecoder)
    auto = make_decoder(model)
    assert isinstance(auto, FastDecoder if available() else EagerDecoder)  # the CPU gets the eager one
    with pytest.raises(ValueError):
        make_decoder(model, "turbo")
    with pytest.raises(ValueError):
        FastDecoder(model, weights="int4")


def test_backend_import_has_no_cuda_requirement():
    assert backend.ChatGLMForConditionalGeneration is ChatGLMForConditionalGeneration
    dec = FastDecoder(tiny_model(), weights="same")
    assert dec.use_graph is False and dec._graph is None


# -- the prompt padded to a bucket: what the CUDA prompt graphs capture, run as plain torch on the CPU --

def padded(model, **kw) -> FastDecoder:
    """A decoder whose prompts run padded to a bucket (graphs on CUDA; here the same math without one)."""
    return FastDecoder(model, weights="same", prefill_graphs=True, **kw)


@pytest.mark.parametrize("P, math_attn", [(0, True), (4, True), (4, False)])
def test_padded_prefill_equals_unpadded(P, math_attn, monkeypatch):
    if not math_attn:  # masked windows through the keys repeated per head (the large windows' way)
        monkeypatch.setattr(backend.decode.fast_prefill, "PREFILL_MATH_ATTN_BYTES", 0)
    model = tiny_model()
    ref, dec = FastDecoder(model, weights="same", max_seq_len=256), padded(model, max_seq_len=256)
    assert ref.prefill_graphs is False  # the CPU default: the model's own unpadded math
    prefix = random_prefix(model, P, seed=1) if P else None
    ref.set_prefix(prefix)
    dec.set_prefix(prefix)
    ids = list(range(3, 125))
    # tokens lo..hi at positions lo..: a first turn of 37 (bucket 64), a second turn of 20 after it, a full
    # bucket, one token, an edited history from position 60 (same bucket and window as the second turn; the
    # slots after 80 are stale from then on, as generate() treats them), a new first turn of 50
    for lo, hi in ((0, 37), (37, 57), (57, 121), (121, 122), (60, 80), (0, 50)):
        T, KW, causal = dec._prefill_key(hi - lo, P + lo)
        assert causal == (P + lo == 0) and T >= hi - lo and KW >= P + lo + T
        with torch.inference_mode():
            want = ref._forward_torch(ids[lo:hi], lo)
            got = dec._prefill(ids[lo:hi], lo)
        n = P + hi
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dec.k_cache[:, :, :n], ref.k_cache[:, :, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dec.v_cache[:, :, :n], ref.v_cache[:, :, :n], rtol=1e-4, atol=1e-5)
        if (lo, hi) == (0, 37):  # the pad rows did run: they wrote the slots after the prompt
            assert dec.k_cache[:, :, n : P + 64].abs().sum() > 0
            assert ref.k_cache[:, :, n : P + 64].abs().sum() == 0


def test_prefill_buckets():
    model = tiny_model()
    dec = padded(model, max_seq_len=8192)
    assert dec._prefill_key(1, 0) == (16, 16, True)
    assert dec._prefill_key(16, 0) == (16, 16, True)
    assert dec._prefill_key(17, 0) == (32, 32, True)
    assert dec._prefill_key(10, 5) == (16, 32, False)
    assert dec._prefill_key(64, 100) == (64, 256, False)
    assert dec._prefill_key(2048, 0) == (2048, 2048, True)
    assert dec._prefill_key(2049, 0) is None  # past the largest bucket: eager
    small = padded(model, max_seq_len=100)
    assert small._prefill_key(10, 80) == (16, 100, False)  # the key window stops at the cache's end
    assert small._prefill_key(10, 90) is None  # 16 pad rows would not fit the cache
    assert small._prefill_key(60, 0) == (64, 64, True)
    assert small._prefill_key(70, 0) is None  # bucket 128 is larger than the cache


def test_padded_prefill_generate_equals_eager():
    model = tiny_model()
    dec = padded(model)
    turn1 = list(range(10, 30))
    reply1 = run(dec, turn1, SamplingParams(temperature=0, max_new_tokens=12))
    assert reply1 == run(EagerDecoder(model), turn1, SamplingParams(temperature=0, max_new_tokens=12))
    turn2 = turn1 + reply1 + [7, 8, 9, 10]  # the second turn feeds 5 tokens after 31 cached ones
    assert run(dec, turn2) == run(EagerDecoder(model), turn2)
    edited = list(range(10, 20)) + [99, 98, 97]  # an edited history: 10 tokens reused, 3 fed
    assert run(dec, edited) == run(EagerDecoder(model), edited)


def test_padded_prefill_prefix_sampling_and_cache_end():
    model = tiny_model()
    ids = list(range(3, 25))
    prefix = random_prefix(model, 4, seed=1)
    dec, eager = padded(model), EagerDecoder(model)
    dec.set_prefix(prefix)
    eager.set_prefix(prefix)
    assert run(dec, ids) == run(eager, ids)
    params = SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=40)
    assert run(dec, ids, params, generator=torch.Generator().manual_seed(5)) == run(
        eager, ids, params, generator=torch.Generator().manual_seed(5))
    # a cache of 32 slots: the 20-token prompt runs as bucket 32 and its pad rows fill every slot
    full = padded(model, max_seq_len=32)
    got = run(full, list(range(10, 30)))
    assert len(got) == 32 - 20 + 1
    assert got == run(EagerDecoder(model), list(range(10, 30)))[: len(got)]


def test_golden_padded_prefill_equals_eager(golden_model, golden_prefix_model):
    assert run(padded(golden_model), PROMPT) == run(EagerDecoder(golden_model), PROMPT)
    with torch.no_grad():
        prefix = golden_prefix_model.transformer.prefix_key_values(1, torch.float32)
    dec, eager = padded(golden_prefix_model), EagerDecoder(golden_prefix_model)
    dec.set_prefix(prefix)
    eager.set_prefix(prefix)
    assert run(dec, PROMPT) == run(eager, PROMPT)


def test_decode_step_kernels_under_the_triton_interpreter():
    """The decode step's Triton kernels (GEMV prologues/epilogues, row-sum tiles, the folded greedy pick with
    ties and nan/inf, the attention split and combine, a whole step, the sampler's noise and frequencies)
    against float64 and the decoder's torch math, run by Triton's CPU interpreter through bench/check_kernels.py."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(root / "bench" / "check_kernels.py"), "--small", "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ALL KERNEL CHECKS PASSED" in done.stdout, (done.stdout[-3000:], done.stderr[-2000:])
    assert "argmax tie" in done.stdout and "step picks the argmax" in done.stdout
    assert "sampling frequencies" in done.stdout
