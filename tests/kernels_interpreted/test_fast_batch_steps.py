"""The batched fast decoder under Triton's interpreter: int8 rows, steps fed on the device, warm-ups."""

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
from tests.kernels_interpreted.decoder_models import GREEDY, make_model, run  # noqa: E402


def test_int8_rows_through_the_gemvs_or_the_matmul_equal_the_packed_kernels(monkeypatch):
    """One row of an int8 linear runs int8_gemv.gemv, 2-4 rows kernels.gemv_rows, more the int8 matmul (here its
    CPU form) with RMSNorm and SwiGLU as kernels of their own: the same sums as quant_linear's, epilogues included."""
    from backend.decode.batch_linear import ONE_ROW_GEMV_MAX_M, BatchLinear
    from backend.kernels import gemv_rows
    from backend.kernels.gemv_4bit import quant_linear

    rows_seen = []
    real = gemv_rows.gemv_rows
    monkeypatch.setattr(gemv_rows, "gemv_rows", lambda x, *a, **k: rows_seen.append(x.shape[0]) or real(x, *a, **k))
    layer = torch.nn.Module()
    layer.weight = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    layer.weight_scale = torch.rand(24) * 1e-2
    layer.in_features, layer.bias = 64, None
    lin = BatchLinear(layer, torch.float32, "dense")
    assert lin.q.fmt == "int8" and ONE_ROW_GEMV_MAX_M == 1
    g = 1 + 0.1 * torch.randn(64)
    for m in (1, 2, 3, 4, 5):
        x, res = torch.randn(m, 64), torch.randn(m, 12)
        out = lin(x, norm=g, swiglu=True, residual=res)
        ref = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), m
        res = torch.randn(m, 24)
        assert torch.allclose(lin(x, residual=res), quant_linear(x, lin.q, residual=res), rtol=1e-4, atol=1e-4), m
    assert rows_seen == [2, 2, 3, 3, 4, 4]
    # GLMCHAT_ROWS_GEMV=0 (the A/B switch) sends them to the matmul
    monkeypatch.setenv("GLMCHAT_ROWS_GEMV", "0")
    off = BatchLinear(layer, torch.float32, "dense")
    x = torch.randn(2, 64)
    assert torch.allclose(off(x), lin(x), rtol=1e-4, atol=1e-4) and rows_seen[-1] == 2 and len(rows_seen) == 7
    # so does a card whose tuning timed the matmul path faster (tuned_config None), for the same sums
    monkeypatch.setattr(gemv_rows, "tuned_config", lambda *a, **k: None)
    x, res = torch.randn(3, 64), torch.randn(3, 12)
    want = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
    assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want, rtol=1e-4, atol=1e-4)
    assert len(rows_seen) == 7
    # and a card that tuned gemv_rows to quant_words' kernel: the same sums, residual added after SwiGLU
    monkeypatch.setattr(gemv_rows, "tuned_config", lambda *a, **k: gemv_rows.RowsGemvConfig(4, 32, kernel="words"))
    for m in (2, 3):
        x, res = torch.randn(m, 64), torch.randn(m, 12)
        want = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
        assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want, rtol=1e-4, atol=1e-4), m
    assert len(rows_seen) == 9


def test_16_bit_rows_through_the_gemvs_or_cublas_give_the_layers_product(monkeypatch):
    """A bf16/fp16 model's linear (here fp32): one row through int8_gemv.gemv, 2-4 rows through kernels.gemv_rows with
    RMSNorm, SwiGLU and the residual folded in, unless the card timed the cuBLAS path faster; more rows through
    cuBLAS: the same product either way."""
    import torch.nn.functional as F

    from backend.decode.batch_linear import BatchLinear
    from backend.kernels import gemv_rows

    rows_seen = []
    real = gemv_rows.gemv_rows
    monkeypatch.setattr(gemv_rows, "gemv_rows", lambda x, *a, **k: rows_seen.append(x.shape[0]) or real(x, *a, **k))
    layer = torch.nn.Linear(64, 24, bias=False)
    lin = BatchLinear(layer, torch.float32, "fc1")
    assert lin.q is None and lin.one_row is not None
    g = 1 + 0.1 * torch.randn(64)

    def want(x, res):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
        a, b = F.linear(h, layer.weight).chunk(2, dim=-1)
        return F.silu(a) * b + res

    with torch.no_grad():
        for m in (1, 2, 3, 4, 5):
            x, res = torch.randn(m, 64), torch.randn(m, 12)
            assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want(x, res), rtol=1e-4, atol=1e-4), m
        assert rows_seen == [2, 3, 4]
        monkeypatch.setattr(gemv_rows, "tuned_config", lambda *a, **k: None)  # cuBLAS timed faster on this card
        x, res = torch.randn(2, 64), torch.randn(2, 12)
        assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want(x, res), rtol=1e-4, atol=1e-4)
        assert rows_seen == [2, 3, 4]


def test_steps_fed_on_the_device_give_the_tokens_of_host_fed_steps():
    """While the same rows run, none waits to join and every token is picked on the device, the next step is
    launched from the last one's picks before the host reads them (decode-ahead). Rows that end at different
    steps (their length, a stop token), greedy and sampled on the device, and a row dropped while a step ahead is
    queued: the same tokens as host-fed steps give, and most steps went ahead."""
    model, prefixes = make_model()
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False),
                [DecodeRequest([8, 8, 2, 6], SamplingParams(temperature=0.0, max_new_tokens=12))])[0]
    stop = next(t for i, t in enumerate(alone) if i >= 3 and t not in alone[:i])  # a stop mid-reply
    requests = [
        DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=10)),
        DecodeRequest([3, 4], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=9), adapter="ad", seed=3),
        DecodeRequest([1, 30, 31], SamplingParams(temperature=0.0, max_new_tokens=4)),
        DecodeRequest([8, 8, 2, 6], SamplingParams(temperature=0.0, max_new_tokens=12), stop_token_ids=frozenset({stop})),
        DecodeRequest([9, 9, 9], SamplingParams(temperature=0.0, max_new_tokens=12)),  # dropped after 5 steps
    ]

    def tokens(decode_ahead: bool) -> tuple[dict, int]:
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=8, use_graphs=False, decode_ahead=decode_ahead)
        went_ahead = []
        queue_ahead = decoder._queue_ahead
        decoder._queue_ahead = lambda: (lambda queued: went_ahead.append(queued is not None) or queued)(queue_ahead())
        out = {i: [] for i in range(len(requests))}
        for i, r in enumerate(requests):
            decoder.add(i, r)
        for steps in range(100):
            if not decoder.rows:
                break
            if steps == 5:
                decoder.drop(4)
            for t in decoder.step():
                out[t.row].append(t.token)
        return out, sum(went_ahead)

    ahead, went = tokens(True)
    host_fed, none = tokens(False)
    assert ahead == host_fed and none == 0 and went >= 6, went
    assert len(ahead[2]) == 4 and ahead[3] == alone[: alone.index(stop) + 1] and len(ahead[0]) == 10
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=4), [requests[0], requests[2], requests[3]])
    assert [ahead[0], ahead[2], ahead[3]] == [eager[0], eager[1], eager[2]]


def test_a_step_whose_logits_a_replay_ahead_overwrote_hands_out_none_and_the_others_the_right_ones():
    """In CUDA graphs every replay of a bucket writes the same logits buffer, so once the step ahead is queued the
    queued step's logits are the next step's (on the GPU, check_fast_batch.py found bf16 "logits" 70% off). Such
    steps hand their rows no logits; the steps that keep theirs hand out the logits of host-fed steps."""
    model, prefixes = make_model()
    requests = [DecodeRequest([5, 7, 9, 11], GREEDY), DecodeRequest([3, 4], GREEDY, adapter="ad")]

    def logits_seen(decode_ahead: bool) -> list:
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False, decode_ahead=decode_ahead)
        buffers = {}

        def replay(bucket):  # as a captured graph: one output buffer a bucket, written over by every replay
            logits, picks = decoder._step_math(bucket)
            kept = buffers.setdefault(bucket, (torch.empty_like(logits), torch.empty_like(picks)))
            kept[0].copy_(logits), kept[1].copy_(picks)
            return kept

        decoder.use_graphs, decoder._run_step = True, replay
        seen = []
        take = decoder._take
        decoder._take = lambda row, lg, *a: seen.append((row.id, None if lg is None else lg.clone())) or take(row, lg, *a)
        run(decoder, requests)
        return seen

    ahead, host_fed = logits_seen(True), logits_seen(False)
    assert [r for r, _ in ahead] == [r for r, _ in host_fed]
    assert any(lg is None for _, lg in ahead) and all(lg is not None for _, lg in host_fed)
    kept = [(a, b) for (_, a), (_, b) in zip(ahead, host_fed) if a is not None]
    assert len(kept) >= 2 and all(torch.equal(a, b) for a, b in kept)


def test_a_warm_up_that_fails_midway_leaves_no_row_behind(monkeypatch):
    """The app warms the decoder in the background; if that fails (out of memory, say) in the middle of its replies,
    their rows are gone and a real request decodes as on a fresh decoder."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False)
    real_step, steps = decoder.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_step()

    monkeypatch.setattr(decoder, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        decoder.warm_up()
    monkeypatch.setattr(decoder, "step", real_step)
    assert decoder.rows == 0
    request = DecodeRequest([5, 7, 9, 11], GREEDY, adapter="ad")
    fresh = run(BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False), [request])
    assert run(decoder, [request]) == fresh


def test_a_warm_up_without_captures_tunes_the_few_row_linears_and_runs_a_chats_replies_one_row_at_a_time(monkeypatch):
    """Where memory is short the engine's background warm-up tunes linears at up to 64 rows (decode steps and short
    prompts), runs one row's step once (its kernels compiled), then a chat's replies (greedy, sampled on the device)
    and a next turn into a parked row, one row at a time: no step of two rows or more, no long prompt, nothing left
    running or parked, and a reply after it gives the eager decoder's tokens."""
    from backend.decode import batch_linear

    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    rows = []
    call = batch_linear.BatchLinear.__call__
    monkeypatch.setattr(batch_linear.BatchLinear, "__call__", lambda self, x, **kw: rows.append(x.shape[0]) or call(self, x, **kw))
    monkeypatch.setattr(decoder, "_warm_long_prompt", lambda: pytest.fail("no long prompt where memory is short"))
    steps, buckets = [], []
    one_row = type(decoder._one_row_step).__call__
    monkeypatch.setattr(type(decoder._one_row_step), "__call__", lambda step, **kw: steps.append(1) or one_row(step, **kw))
    step_math = decoder._step_math
    monkeypatch.setattr(decoder, "_step_math", lambda bucket, **kw: buckets.append(bucket) or step_math(bucket, **kw))
    decoder.warm_up(captures=False)
    assert rows and max(rows) <= batch_linear.QUANT_MAX_M and 1 in rows
    assert decoder.rows == 0 and not decoder._parked and not decoder._graphs
    assert len(steps) > 1 and set(buckets) == {1}  # the warm-up's own step run, then the replies' steps
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=3), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])
