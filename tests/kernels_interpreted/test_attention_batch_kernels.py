"""Batched rotary + cache write and decode attention (backend/kernels/attention_batch.py) under Triton's
interpreter, against the model's torch rotary and float32 softmax attention. Run through
tests/test_kernels_batch.py (TRITON_INTERPRET=1 in a subprocess); skipped otherwise."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
triton = pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.kernels import attention_batch as A  # noqa: E402
from backend.modeling import apply_rotary, rotary_cos_sin  # noqa: E402

H, G, D, SLOTS = 8, 2, 32, 160
# rows: prefix 0 at position 0; prefix 3; prefix 10 with 2 loop steps of 64 slots; idle; prefix 0, long
POSITIONS = [0, 5, 70, -1, 150]
PREFIXES = [0, 3, 10, 4, 0]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "an output element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rows():
    return torch.tensor(POSITIONS), torch.tensor(PREFIXES, dtype=torch.int32)


@pytest.mark.parametrize("divisor", [1.0, 16.0])
def test_rope_cache_write_matches_the_model_rotary_at_each_rows_position(divisor):
    B = len(POSITIONS)
    pos, pre = rows()
    qkv = torch.randn(B, (H + 2 * G) * D)
    kc, vc = torch.randn(B, G, SLOTS, D), torch.randn(B, G, SLOTS, D)
    kc0, vc0 = kc.clone(), vc.clone()
    q_out = torch.full((B, H, D), float("nan"))
    A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G,
                       inv_freq=A.rotary_inv_freq(D // 2, "cpu"), position_divisor=divisor, q_out=q_out)
    for b, (p, P) in enumerate(zip(POSITIONS, PREFIXES)):
        if p < 0:  # idle: its cache untouched
            assert torch.equal(kc[b], kc0[b]) and torch.equal(vc[b], vc0[b])
            continue
        q, k, v = qkv[b].split([H * D, G * D, G * D])
        cos, sin = rotary_cos_sin(torch.tensor([[p / divisor]]), D // 2, torch.float32)
        assert rel(q_out[b], apply_rotary(q.view(1, 1, H, D), cos, sin)[0, 0]) < 1e-5
        assert rel(kc[b, :, P + p], apply_rotary(k.view(1, 1, G, D), cos, sin)[0, 0]) < 1e-5
        assert torch.equal(vc[b, :, P + p], v.view(G, D))
        others = torch.ones(SLOTS, dtype=torch.bool)
        others[P + p] = False
        assert torch.equal(kc[b][:, others], kc0[b][:, others]) and torch.equal(vc[b][:, others], vc0[b][:, others])


def test_rope_cache_write_sends_each_tokens_keys_to_its_cache_row():
    """A prompt: one qkv row a token, several tokens to one cache row (``cache_rows``); padding (position -1)
    writes nothing; each token's q and cache entries equal the step's for the same position."""
    token_rows, token_pos, token_prefix = [2, 2, 2, 0, 0, 2], [4, 5, 6, 0, 1, -1], [3, 3, 3, 0, 0, 3]
    n = len(token_rows)
    qkv = torch.randn(n, (H + 2 * G) * D)
    kc, vc = torch.randn(3, G, SLOTS, D), torch.randn(3, G, SLOTS, D)
    kc0, vc0 = kc.clone(), vc.clone()
    inv = A.rotary_inv_freq(D // 2, "cpu")
    q = A.rope_cache_write(qkv, kc, vc, torch.tensor(token_pos), torch.tensor(token_prefix), num_heads=H, num_groups=G,
                           inv_freq=inv, cache_rows=torch.tensor(token_rows))
    written = set()
    for t, (r, p, P) in enumerate(zip(token_rows, token_pos, token_prefix)):
        if p < 0:
            continue
        one_k, one_v = torch.zeros(1, G, SLOTS, D), torch.zeros(1, G, SLOTS, D)
        q_one = A.rope_cache_write(qkv[t:t + 1], one_k, one_v, torch.tensor([p]), torch.tensor([P]), num_heads=H,
                                   num_groups=G, inv_freq=inv)
        assert torch.equal(q[t], q_one[0])
        assert torch.equal(kc[r, :, P + p], one_k[0, :, P + p]) and torch.equal(vc[r, :, P + p], one_v[0, :, P + p])
        written.add((r, P + p))
    untouched = [(r, s) for r in range(3) for s in range(SLOTS) if (r, s) not in written]
    assert all(torch.equal(kc[r, :, s], kc0[r, :, s]) and torch.equal(vc[r, :, s], vc0[r, :, s]) for r, s in untouched)


def reference_attention(q, kc, vc, b, length):
    k = kc[b, :, :length].float().repeat_interleave(H // G, 0)  # [H, L, D]
    v = vc[b, :, :length].float().repeat_interleave(H // G, 0)
    scores = (q[b].float()[:, None, :] @ k.transpose(1, 2))[:, 0] / math.sqrt(D)  # [H, L]
    return (torch.softmax(scores, -1)[:, None, :] @ v)[:, 0].reshape(-1)


@pytest.mark.parametrize("splits", [3, 16])  # (1 split: the CPU default, in the half-precision test)
def test_decode_attention_per_row_lengths_prefixes_and_splits(splits):
    B = len(POSITIONS)
    pos, pre = rows()
    q = torch.randn(B, H, D)
    kc, vc = torch.randn(B, G, SLOTS, D), torch.randn(B, G, SLOTS, D)
    out = torch.full((B, H * D), float("nan"))
    ws = A.attention_workspace(B, H, G, D, "cpu", num_splits=splits)
    A.decode_attention(q, kc, vc, pos, pre, out=out, workspace=ws)
    for b, (p, P) in enumerate(zip(POSITIONS, PREFIXES)):
        if p < 0:
            assert torch.equal(out[b], torch.zeros(H * D))
        else:
            assert rel(out[b], reference_attention(q, kc, vc, b, P + p + 1)) < 1e-5, (b, splits)
    # the last program of each (row, group) left its counter at zero, so the workspace serves the next layer as is
    assert not ws.finished.any()
    again = torch.full_like(out, float("nan"))
    A.decode_attention(q, kc, vc, pos, pre, out=again, workspace=ws)
    assert torch.equal(again, out)


@pytest.mark.parametrize("block_t,splits", [(16, 1), (16, 5), (32, 16)])
def test_decode_attention_with_shorter_slot_tiles(block_t, splits):
    """The kernel's other tiles (``attention_workspace``'s block_t): the same attention for every row."""
    B = len(POSITIONS)
    pos, pre = rows()
    q = torch.randn(B, H, D)
    kc, vc = torch.randn(B, G, SLOTS, D), torch.randn(B, G, SLOTS, D)
    ws = A.attention_workspace(B, H, G, D, "cpu", num_splits=splits, block_t=block_t, num_warps=4)
    out = A.decode_attention(q, kc, vc, pos, pre, workspace=ws)
    for b, (p, P) in enumerate(zip(POSITIONS, PREFIXES)):
        if p < 0:
            assert torch.equal(out[b], torch.zeros(H * D))
        else:
            assert rel(out[b], reference_attention(q, kc, vc, b, P + p + 1)) < 1e-5, (b, block_t, splits)
    assert not ws.finished.any()


@pytest.mark.parametrize("block_t", [16, 64])
def test_short_rows_are_done_by_one_program_without_partials(block_t):
    """``alone_slots`` (the one-row step's ``ONE_ROW_TILE``): a row of at most that many slots is attended by its
    first program alone, which writes the heads' outputs itself (no partials, no counter, no merge); longer rows
    still split. Every row equals the reference either way, and the counters stay at zero."""
    B = len(POSITIONS)
    pos, pre = rows()  # lengths 1, 9, 81, idle, 151
    q = torch.randn(B, H, D)
    kc, vc = torch.randn(B, G, SLOTS, D), torch.randn(B, G, SLOTS, D)
    ws = A.attention_workspace(B, H, G, D, "cpu", num_splits=4, block_t=block_t, num_warps=4, alone_slots=81)
    ws.m.fill_(float("nan"))  # a split's partials overwrite these
    out = A.decode_attention(q, kc, vc, pos, pre, workspace=ws)
    for b, (p, P) in enumerate(zip(POSITIONS, PREFIXES)):
        if p < 0:
            assert torch.equal(out[b], torch.zeros(H * D))
        else:
            assert rel(out[b], reference_attention(q, kc, vc, b, P + p + 1)) < 1e-5, (b, block_t)
        alone = P + p + 1 <= 81 or p < 0
        assert bool(ws.m[b].isnan().all()) == alone, b  # rows up to 81 slots and the idle row left no partials
    assert not ws.finished.any()


@pytest.mark.parametrize("splits", [1, 3])
def test_the_one_row_decoders_split_attention_and_combine(splits):
    """The one-row decoder's (``decode/fast_step.py``) split kernel, whose loop is this module's ``kv_tile`` and
    ``attend_tile``, and its combine: one row's heads against its slots 0..slot."""
    import triton as tr

    from backend.kernels.decode_kernels import _attn_combine_kernel, _attn_split_kernel

    slot, hpg_pad = 150, 16
    q = torch.randn(H, D)
    kc, vc = torch.randn(G, SLOTS, D), torch.randn(G, SLOTS, D)
    pos = torch.tensor([slot - 3, slot])  # (position, cache slot of this token)
    part_o = torch.full((G * splits * hpg_pad, D), float("nan"))
    part_m, part_l = torch.zeros(G * splits * hpg_pad), torch.zeros(G * splits * hpg_pad)
    out = torch.full((H * D,), float("nan"))
    _attn_split_kernel[(G, splits)](q, kc, vc, pos, part_o, part_m, part_l, kc.stride(0), kc.stride(1),
                                    1.0 / math.sqrt(D), H // G, splits, HEAD_DIM=D, HPG_PAD=hpg_pad, BLOCK_T=64,
                                    IEEE=True, PDL=False, num_warps=4)
    _attn_combine_kernel[(H,)](part_o, part_m, part_l, out, H // G, splits, HEAD_DIM=D, HPG_PAD=hpg_pad,
                               SPLITS_PAD=tr.next_power_of_2(splits), PDL=False, num_warps=4)
    assert rel(out, reference_attention(q[None], kc[None], vc[None], 0, slot + 1)) < 1e-5


def test_decode_attention_half_and_a_strided_layer_view():
    # float16: the interpreter has no bfloat16 (bench/check_kernels_batch.py covers bf16 on the GPU)
    B = len(POSITIONS)
    pos, pre = rows()
    q = torch.randn(B, H, D).to(torch.float16)
    cache = torch.randn(2, 2, B, G, SLOTS, D).to(torch.float16)  # [k/v, layers, rows, groups, slots, d]
    kc, vc = cache[0, 1], cache[1, 1]
    ws = A.attention_workspace(B, H, G, D, "cpu")
    assert ws.num_splits == 1  # the CPU default here: no combine of several splits
    out = A.decode_attention(q, kc, vc, pos, pre, workspace=ws)
    assert out.dtype == torch.float16
    for b, (p, P) in enumerate(zip(POSITIONS, PREFIXES)):
        if p >= 0:
            assert rel(out[b], reference_attention(q, kc, vc, b, P + p + 1)) < 5e-3


def test_step_rope_then_attention_sees_the_new_token():
    """Rotary + write, then attention: each row's new key is attended (a row of length 1 returns its own v)."""
    B = len(POSITIONS)
    pos, pre = rows()
    qkv = torch.randn(B, (H + 2 * G) * D)
    kc, vc = torch.randn(B, G, SLOTS, D), torch.randn(B, G, SLOTS, D)
    q = A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G, inv_freq=A.rotary_inv_freq(D // 2, "cpu"))
    out = A.decode_attention(q, kc, vc, pos, pre)
    v0 = qkv[0, (H + G) * D:].view(G, D).repeat_interleave(H // G, 0).reshape(-1)
    assert rel(out[0], v0) < 1e-6  # row 0: prefix 0, position 0: only its own slot
    assert rel(out[2], reference_attention(q, kc, vc, 2, 81)) < 1e-5


def test_rope_cache_write_rounds_angles_as_chatglm2_does_in_fp16():
    """ChatGLM2's original builds its rotary cache in the model dtype (positions past 2048 round in fp16):
    with angle_dtype the kernel gives modeling.rotary_cos_sin's fp16 numbers, which float32 angles do not."""
    from backend.modeling import Rope

    positions, divisor = [3001, 4097, 70], 1.0
    B = len(positions)
    pos, pre = torch.tensor(positions), torch.zeros(B, dtype=torch.int32)
    qkv = torch.randn(B, (H + 2 * G) * D).half()
    kc, vc = torch.zeros(B, G, 4200, D).half(), torch.zeros(B, G, 4200, D).half()
    theta = (1.0 / (10000 ** (torch.arange(0, D // 2, 2, dtype=torch.float16) / (D // 2)))).float()
    q_out = A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G, inv_freq=theta,
                               position_divisor=divisor, angle_dtype=torch.float16)
    q_exact = A.rope_cache_write(qkv, kc.clone(), vc.clone(), pos, pre, num_heads=H, num_groups=G,
                                 inv_freq=A.rotary_inv_freq(D // 2, "cpu"))
    cos, sin = rotary_cos_sin(pos[None], D // 2, torch.float16, Rope(position_divisor=divisor))
    q = qkv.view(B, H + 2 * G, D)[:, :H].float()
    ref = apply_rotary(q[None], cos.float(), sin.float())[0]
    assert rel(q_out.float(), ref) < 2e-3
    assert rel(q_exact.float(), ref) > 1e-2  # the rounding matters at these positions
