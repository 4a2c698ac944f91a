"""One row's fused step (backend/decode/one_row_step.py) and its tuning under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()  # (each file runs in a subprocess of its own: tests/test_kernels_batch.py)

from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402
from backend.decode.protocol import DecodeRequest  # noqa: E402
from backend.service import SamplingParams  # noqa: E402
from tests.kernels_interpreted.decoder_models import int4_release_model, make_model, run  # noqa: E402


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_one_row_through_the_fused_step_equals_the_general_step_token_for_token(weights):
    """A chat's row (bucket 1) takes decode/one_row_step.py's step: rotary and the cache write in the QKV GEMV (4-bit
    layers: quant_linear, then the rotary kernel), the greedy pick folded into the output GEMV. With an adapter's
    prefix, a next turn into the parked row, and a sampled reply, it gives the general step's tokens, logits and
    cache, bit for bit (the eager decoder's tokens: the tests above and below, whose one-row decoders take this
    step)."""
    model, prefixes = make_model() if weights == "float" else int4_release_model()
    short = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = DecodeRequest([5, 7, 9, 11], short, adapter="ad")
    sampled = DecodeRequest([6, 1, 30], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=3), seed=3)

    def replies(fused: bool):
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
        assert decoder._one_row_step is not None
        if not fused:
            decoder._one_row_step = None
        out = [run(decoder, [first])[0]]
        out.append(run(decoder, [DecodeRequest(first.prompt_ids + out[0] + [9], short, adapter="ad")])[0])  # parked row
        out.append(run(decoder, [sampled])[0])
        decoder.tokens[0], decoder.positions[0], decoder.prefix_lens[0] = 4, 7, 3
        logits, picks = decoder._step_math(1, feed=False)  # (these inputs, not the last step's pick)
        return out, logits.clone(), picks.clone(), decoder.k_cache.clone(), decoder.v_cache.clone()

    fused, general = replies(True), replies(False)
    assert fused[0] == general[0] and len(fused[0][1]) == 3
    for a, b in zip(fused[1:], general[1:]):
        assert torch.equal(a, b)


def test_the_fused_step_writes_no_key_for_an_idle_row():
    """Graphs are captured with row 0 idle (position -1): the QKV GEMV's epilogue writes nothing to the cache then."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    decoder.k_cache.fill_(7.0)
    decoder.v_cache.fill_(7.0)
    decoder.positions[0] = -1
    decoder._step_math(1)
    assert bool((decoder.k_cache == 7.0).all()) and bool((decoder.v_cache == 7.0).all())


@pytest.mark.parametrize("dtype,divisor", [(torch.float16, 1.0), (torch.float16, 2.0), (torch.float32, 2.0)])
def test_the_gemv_rotary_epilogue_equals_the_rotary_kernel_after_the_linear(dtype, divisor):
    """The QKV GEMV's rotary + cache write (int8_gemv.gemv(rope=...)) against the plain GEMV followed by
    kernels.attention_batch.rope_cache_write, in fp16 with ChatGLM2's angle rounding and with 32k's rope_ratio: the
    same q and the same keys and values in the row's slot after its prefix, bit for bit."""
    from backend.int8_linear import LinearWeights, quantize_per_channel
    from backend.kernels.int8_gemv import gemv
    from backend.kernels import attention_batch as A

    torch.manual_seed(1)
    H, G, D, S, K = 4, 2, 16, 40, 64
    N = (H + 2 * G) * D
    w8, scale = quantize_per_channel(torch.randn(N, K) * 0.1)
    lw = LinearWeights(w8, scale, (torch.randn(N) * 0.1).to(dtype))
    x, g = torch.randn(K).to(dtype), (1 + 0.1 * torch.randn(K)).to(dtype)
    pos, pre = torch.tensor([11]), torch.tensor([5])
    inv_freq = A.rotary_inv_freq(D // 2, "cpu").to(dtype).float()
    angle_dtype = dtype if dtype != torch.float32 else None
    qkv = torch.empty(1, N, dtype=dtype)
    gemv(x, lw, qkv[0], norm_weight=g, eps=1e-5)
    kc, vc = torch.zeros(1, G, S, D, dtype=dtype), torch.zeros(1, G, S, D, dtype=dtype)
    q_want = A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G, inv_freq=inv_freq,
                                position_divisor=divisor, angle_dtype=angle_dtype)
    out = torch.empty(N, dtype=dtype)
    kf, vf = torch.zeros(G, S, D, dtype=dtype), torch.zeros(G, S, D, dtype=dtype)
    gemv(x, lw, out, norm_weight=g, eps=1e-5, rope=dict(q_rows=H * D, kv_rows=G * D, head_dim=D, inv_freq=inv_freq,
                                                         pos=pos, prefix=pre, divisor=divisor, angle_dtype=angle_dtype,
                                                         k_cache=kf, v_cache=vf))
    assert torch.equal(out[: H * D].view(H, D), q_want[0])
    assert torch.equal(kf, kc[0]) and torch.equal(vf, vc[0]) and bool(kf[:, 16].abs().sum() > 0)
    # the older one-row decoder's form: the slot beside the position on the device
    kf2, vf2, out2 = torch.zeros_like(kf), torch.zeros_like(vf), torch.empty_like(out)
    gemv(x, lw, out2, norm_weight=g, eps=1e-5, rope=dict(q_rows=H * D, kv_rows=G * D, head_dim=D, inv_freq=inv_freq,
                                                          pos=torch.tensor([11, 16]), divisor=divisor,
                                                          angle_dtype=angle_dtype, k_cache=kf2, v_cache=vf2))
    assert torch.equal(out2[: H * D], out[: H * D]) and torch.equal(kf2, kf) and torch.equal(vf2, vf)


def test_tuning_the_one_row_step_runs_every_candidate_tile_to_the_same_step_and_keeps_the_winner(monkeypatch, tmp_path):
    """decode/one_row_tuning.py's descent through BatchFastDecoder.tune_one_row, with the step run (not timed) for
    each candidate tile: every tile gives the default's logits, the fastest (by a cost model) is kept, stored for
    this device and applied by the next decoder; row 0 is left idle and its cache row unclaimed, and a reply after
    it gives the eager decoder's tokens."""
    from backend.decode import one_row_tuning as T

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    logits_seen = []

    def measure(configs):
        T.apply(decoder, configs)
        logits_seen.append(decoder._one_row_step()[0].clone())
        cost = 1.0 - 0.01 * (configs["fc1"] == T.CANDIDATES["float"]["fc1"][2])
        return lambda: cost

    decoder.tune_one_row(measure)
    assert len(logits_seen) == 1 + sum(len(v) for v in T.candidates_for(decoder).values())
    assert all(torch.allclose(x, logits_seen[0], rtol=1e-5, atol=1e-5) for x in logits_seen)
    assert decoder.layers[0].up.row_config == T.CANDIDATES["float"]["fc1"][2]
    assert decoder.output.row_config == T.defaults(decoder)["output"]
    assert int(decoder.positions[0]) == -1 and 0 not in decoder._parked
    stored = T.cached(decoder)  # (the CPU's tuning file here; a GPU model's on a GPU)
    assert stored == {k: lin[0].row_config for k, lin in T.linears_by_kind(decoder).items()}
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=2), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])


def _int8_layers(model):
    """The tiny model with its layers' linears int8 (a scale per row), as an 8-bit model holds them."""
    from backend.int4_release import QUANTIZED_LINEARS
    from backend.int8_layer import Int8Linear
    from backend.int8_linear import LinearWeights, quantize_per_channel

    for layer in model.transformer.encoder.layers:
        for parent in (layer.self_attention, layer.mlp):
            for name in QUANTIZED_LINEARS:
                dense = getattr(parent, name, None)
                if dense is not None:
                    q, scale = quantize_per_channel(dense.weight.detach())
                    bias = dense.bias.detach() if dense.bias is not None else None
                    setattr(parent, name, Int8Linear.from_weights(LinearWeights(q, scale, bias)))
    return model


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_the_one_row_step_on_the_persistent_gemv_equals_it_on_the_tiled_one(weights, monkeypatch):
    """An fp16 model's one-row step (the bf16 model's form; the 8-bit model's, its int8 products run by
    tests/ptx_emulator.py) with every linear it reads through int8_gemv on the persistent kernel: the QKV's rotary
    and cache write, fc1's SwiGLU, the residual adds and the output's greedy pick in its epilogue give the tiled
    kernel's logits, keys and values within fp16 rounding, and the same token."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.decode import one_row_tuning as T
    from backend.kernels import persistent_gemv
    from backend.kernels.int8_gemv import GemvConfig

    model, prefixes = make_model()
    model = (_int8_layers(model) if weights == "int8" else model).half()
    ran = []
    real = persistent_gemv.launch
    monkeypatch.setattr(persistent_gemv, "launch", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    with interpreted_inline_ptx():
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
        kinds = {k: w for k, w in T._weights(decoder).items() if w in ("int8", "float")}
        assert set(kinds) == set(T.KINDS)  # (the 8-bit model's output layer is 16-bit)
        steps = []
        for persistent in (False, True):
            T.apply(decoder, {k: GemvConfig(block_p=2, block_k=0 if persistent else 64, cvt=3 if w == "int8" else 2,
                                            programs_per_sm=int(persistent)) for k, w in kinds.items()})
            decoder.tokens[0], decoder.positions[0], decoder.prefix_lens[0] = 4, 7, 3
            decoder.k_cache.zero_()
            logits, picks = decoder._step_math(1, feed=False)
            steps.append((logits.float().clone(), picks.clone(), decoder.k_cache.float().clone(),
                          decoder.v_cache.float().clone()))
    assert len(ran) == len(decoder.layers) * 4 + 1  # every linear of the step, on the persistent kernel
    (l0, p0, k0, v0), (l1, p1, k1, v1) = steps
    assert torch.equal(p0, p1) and float((l1 - l0).norm() / l0.norm()) < 5e-3
    assert float((k1 - k0).norm() / k0.norm()) < 5e-3 and float((v1 - v0).norm() / v0.norm()) < 5e-3
    assert float(k1.abs().sum()) > 0
