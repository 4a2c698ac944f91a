"""Decode attention for a batch of rows over a static KV cache, and the rotary + cache write before it.

Cache layout, per layer: ``k_cache``/``v_cache`` [rows, groups, slots, head_dim] (views of one
[layers, rows, groups, slots, head_dim] tensor each; any strides with a unit head_dim stride work). A row's
slots are its own: slots 0..P_r-1 hold its adapter's prefix keys/values (P_r = 0 for the base model), its
tokens follow, so a token at position p sits in slot P_r + p. Keeping (row, group) outermost makes every
split read one contiguous run of slots, and a row's slots can be refilled (a new request, another adapter)
without touching the other rows. Each row carries two device integers, read by the kernels at run time so
one CUDA graph serves every mix of lengths and adapters: ``positions[r]`` (the position of the token being
decoded; negative = an idle row: nothing written, zeros out) and ``prefix_lens[r]`` (P_r).

- ``rope_cache_write``: qkv [B, (H + 2G) * D] from the QKV linear -> q [B, H, D] rotated, k rotated and v
  written to slot P_r + p of each row. Rotary as ``modeling.apply_rotary``: interleaved pairs (x[2i],
  x[2i+1]) of the first ``rotary_dim`` dims, angle = (p / position_divisor) * inv_freq[i] in float32
  (``position_divisor`` = the config's rope_ratio: positional interpolation of chatglm2-6b-32k).
- ``decode_attention``: each row's H query heads against its slots [0, P_r + p] (the prefix, the earlier
  tokens and this one); multi-query: the H / G heads of a group share its keys and go through one tl.dot.
  Split over slots (split-K: ``num_splits`` chunks a (row, group), each with its own running max and sum); the
  last program of a (row, group) to finish, told by a counter, merges the chunks that held slots in chunk order,
  so the result does not depend on which program came last. One launch a layer: a second kernel to merge cost
  one row's step ~1-2 us a layer more, and short rows (one or two chunks) merge little.

Why hand-written: library decode attention (flash-attn's kv-cache kernel, SDPA) takes per-row lengths from
host-side shapes or a separate API, not a device tensor per row inside a captured graph, and does not read
a per-row prefix region in the same cache; the batch-1 kernels in the decoder read one row only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

from .rotary import round_mode

BLOCK_T = 64  # slots a loop step of the general step's attention, at 8 warps. At head_dim 128, 16 splits (sm_90
# ptxas): Triton 3.9 no spills (234 registers), the device's 3.6 568 bytes; 4 warps spill ~1.5 KB. The one-row
# tile (ONE_ROW_TILE, 32 x 4 warps) spills 112-128 bytes and still runs faster (bench/NOTES.md run 53)


if HAVE_TRITON:
    from .rotary import rope_cos_sin

    @triton.jit
    def _rope_cache_batch_kernel(
        qkv_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, divisor, cache_row_ptr,
        stride_qkv, stride_qb, stride_qh, stride_kr, stride_kg, stride_kt, H, G,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, PDL: tl.constexpr, ROUND: tl.constexpr = 0,
        CACHE_ROWS: tl.constexpr = False,
    ):
        # program (row b, head hd of q | k | v): rotary on q and k heads, q out, k and v to the row's slot;
        # ROUND: kernels.rotary.rope_cos_sin's rounding to the model dtype (ChatGLM2); CACHE_ROWS: row b writes to cache
        # row cache_row_ptr[b] (a prompt's tokens, several to one cache row), else to cache row b (a decode step)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching; wait for ours
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        b = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        active = pos >= 0
        slot = tl.load(prefix_ptr + b).to(tl.int64) + pos
        cache_row = tl.load(cache_row_ptr + b).to(tl.int64) if CACHE_ROWS else b
        i = tl.arange(0, HEAD_DIM // 2)
        src = qkv_ptr + b * stride_qkv + hd * HEAD_DIM + 2 * i
        x0 = tl.load(src).to(tl.float32)
        x1 = tl.load(src + 1).to(tl.float32)
        freq = tl.load(inv_freq_ptr + i, mask=i < ROT_PAIRS, other=0.0)
        c, s = rope_cos_sin(pos, freq, divisor, ROUND)
        rot = (i < ROT_PAIRS) & (hd < H + G)
        y0 = tl.where(rot, x0 * c - x1 * s, x0)
        y1 = tl.where(rot, x1 * c + x0 * s, x1)
        if hd < H:
            dst = q_ptr + b * stride_qb + hd * stride_qh + 2 * i
            tl.store(dst, y0.to(dst.dtype.element_ty))
            tl.store(dst + 1, y1.to(dst.dtype.element_ty))
        else:
            g = tl.where(hd < H + G, hd - H, hd - H - G).to(tl.int64)
            off = cache_row * stride_kr + g * stride_kg + tl.maximum(slot, 0) * stride_kt + 2 * i
            m = i < tl.where(active, HEAD_DIM // 2, 0)  # an idle row writes nothing: its slots may be being refilled
            if hd < H + G:
                tl.store(k_ptr + off, y0.to(k_ptr.dtype.element_ty), mask=m)
                tl.store(k_ptr + off + 1, y1.to(k_ptr.dtype.element_ty), mask=m)
            else:
                tl.store(v_ptr + off, y0.to(v_ptr.dtype.element_ty), mask=m)
                tl.store(v_ptr + off + 1, y1.to(v_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def attend_tile(q, k, v, mt, m_i, l_i, acc, sm_scale, IEEE: tl.constexpr):
        # one tile of slots (k, v [BLOCK_T, HEAD_DIM]; mt: the slots held) into the running max, sum and output
        # (also the one-row decoder's split kernel, decode_kernels._attn_split_kernel)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.where(mt[None, :], sc * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def kv_tile(k_ptr, v_ptr, base, t0, end, stride_kt, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        # the keys and values of slots [t0, t0 + BLOCK_T) below end (zeros past it), both asked for at once
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < end
        kv_off = base + t.to(tl.int64)[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_off, mask=mt[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=mt[:, None], other=0.0)
        return k, v, mt

    @triton.jit
    def _split_partial(q_ptr, k_ptr, v_ptr, r, g, start, end, stride_qb, stride_qh, stride_kr, stride_kg, stride_kt,
                       sm_scale, HPG, HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       IEEE: tl.constexpr):
        # the group's HPG query heads against slots [start, end): running max m, sum l, unnormalised output acc
        h = tl.arange(0, HPG_PAD)
        d = tl.arange(0, HEAD_DIM)
        q_rows = r * stride_qb + (g * HPG + h).to(tl.int64) * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=(h < HPG)[:, None], other=0.0)
        m_i = tl.full([HPG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HPG_PAD], tl.float32)
        acc = tl.zeros([HPG_PAD, HEAD_DIM], tl.float32)
        base = r * stride_kr + g.to(tl.int64) * stride_kg
        for t0 in range(start, end, BLOCK_T):
            k, v, mt = kv_tile(k_ptr, v_ptr, base, t0, end, stride_kt, HEAD_DIM, BLOCK_T)
            m_i, l_i, acc = attend_tile(q, k, v, mt, m_i, l_i, acc, sm_scale, IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _split_slots(pos_ptr, prefix_ptr, r, s, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, ALONE: tl.constexpr):
        # (splits holding slots, this split's first slot and end) of row r; the split's slots are
        # BLOCK_T-aligned runs, so short rows use few splits, and a row of at most ALONE slots one
        pos = tl.load(pos_ptr + r)
        length = tl.where(pos >= 0, tl.load(prefix_ptr + r) + pos + 1, 0)
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_T) * BLOCK_T
        chunk = tl.where(length <= ALONE, length, chunk)
        n_active = tl.cdiv(length, tl.maximum(chunk, 1))  # splits s < n_active hold slots
        start = s * chunk
        return n_active, start, tl.minimum(start + chunk, length)

    @triton.jit
    def _merge_splits(o_ptr, m_ptr, l_ptr, first, n_active, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HPG_PAD: tl.constexpr):
        # [HPG_PAD, HEAD_DIM]: the first n_active splits' partial results (part indices first + s * HPG_PAD + h)
        # merged by their running maxima, in split order; read past L1 (.cg): other programs wrote them
        h = tl.arange(0, HPG_PAD)
        d = tl.arange(0, HEAD_DIM)
        mx = tl.full([HPG_PAD], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            live = h < tl.where(s < n_active, HPG_PAD, 0)  # (a tensor mask: the interpreter takes no scalar one)
            m = tl.load(m_ptr + first + s * HPG_PAD + h, mask=live, other=float("-inf"), cache_modifier=".cg")
            mx = tl.maximum(mx, m)
        mx = tl.where(mx > float("-inf"), mx, 0.0)  # an empty row: no -inf - -inf
        den = tl.zeros([HPG_PAD], tl.float32)
        acc = tl.zeros([HPG_PAD, HEAD_DIM], tl.float32)
        for s in tl.static_range(SPLITS):
            live = h < tl.where(s < n_active, HPG_PAD, 0)
            part = first + s * HPG_PAD + h
            m = tl.load(m_ptr + part, mask=live, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
            den += w * tl.load(l_ptr + part, mask=live, other=0.0, cache_modifier=".cg")
            o = tl.load(o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0,
                        cache_modifier=".cg")
            acc += w[:, None] * o
        return acc / tl.where(den > 0, den, 1.0)[:, None]

    @triton.jit
    def _attn_batch_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, prefix_ptr, o_ptr, m_ptr, l_ptr, count_ptr, out_ptr,
        stride_qb, stride_qh, stride_kr, stride_kg, stride_kt, stride_ob, sm_scale, G, HPG,
        SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr, ALONE: tl.constexpr = 0,
    ):
        # program (row r, group g, split s): the group's query heads against the split's slots; the last of a (row,
        # group)'s programs to finish merges the splits that held slots and writes the heads' outputs (one kernel:
        # no second launch a layer, and short rows merge one or two splits). A row whose slots fit one split (at
        # most ALONE, or one chunk) is done by its first program alone: no partials, counter or merge
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching; wait for ours
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        s = tl.program_id(2)
        n_active, start, end = _split_slots(pos_ptr, prefix_ptr, r, s, SPLITS, BLOCK_T, ALONE)
        h = tl.arange(0, HPG_PAD)
        d = tl.arange(0, HEAD_DIM)
        out_rows = out_ptr + r * stride_ob + (g * HPG + h)[:, None] * HEAD_DIM + d[None, :]
        if SPLITS == 1 or n_active <= 1:  # (an idle row too: its output zeros)
            if s == 0:
                m_i, l_i, acc = _split_partial(q_ptr, k_ptr, v_ptr, r, g, start, end, stride_qb, stride_qh,
                                               stride_kr, stride_kg, stride_kt, sm_scale, HPG, HEAD_DIM, HPG_PAD,
                                               BLOCK_T, IEEE)
                out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=(h < HPG)[:, None])
        else:
            first = (r * G + g) * SPLITS * HPG_PAD
            if s < n_active:  # an empty split writes nothing: the merge reads only splits that held slots
                m_i, l_i, acc = _split_partial(q_ptr, k_ptr, v_ptr, r, g, start, end, stride_qb, stride_qh,
                                               stride_kr, stride_kg, stride_kt, sm_scale, HPG, HEAD_DIM, HPG_PAD,
                                               BLOCK_T, IEEE)
                part = first + s * HPG_PAD + h
                tl.store(m_ptr + part, m_i)
                tl.store(l_ptr + part, l_i)
                tl.store(o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)
            tl.debug_barrier()  # every thread's partials issued before the release below
            arrived = tl.atomic_add(count_ptr + r * G + g, 1, sem="acq_rel")
            if arrived == SPLITS - 1:  # the last program here: the others' partials are visible (acquire)
                out = _merge_splits(o_ptr, m_ptr, l_ptr, first, n_active, SPLITS, HEAD_DIM, HPG_PAD)
                tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=(h < HPG)[:, None])
                tl.store(count_ptr + r * G + g, 0)  # ready for the next layer and step


def _pdl_launch(pdl: bool) -> dict:
    """Launch options of a programmatic dependent launch (Hopper and later), as int8_gemv.gemv does."""
    return {"launch_pdl": True} if pdl else {}


def rotary_inv_freq(rotary_dim: int, device) -> torch.Tensor:
    """float32 [rotary_dim / 2]: the inverse frequencies, computed as ``modeling.rotary_cos_sin`` does."""
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))


def rope_cache_write(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    num_heads: int,
    num_groups: int,
    inv_freq: torch.Tensor,
    position_divisor: float = 1.0,
    q_out: Optional[torch.Tensor] = None,
    angle_dtype: Optional[torch.dtype] = None,
    pdl: bool = False,
    cache_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rotary on row b's q and k at position positions[b], k and v into slot prefix_lens[b] + positions[b].

    qkv [B, (H + 2G) * D] (unit inner stride); k_cache/v_cache [B, G, slots, D] (one layer); positions,
    prefix_lens int [B] on the device (positions[b] < 0: row b idle, its cache untouched); inv_freq float32
    [rotary_dim / 2] (``rotary_inv_freq``); position_divisor: the config's rope_ratio; angle_dtype fp16/bf16:
    round as ChatGLM2's original rotary cache does in that model dtype (pass inv_freq computed in it too),
    None: float32 throughout (ChatGLM3); pdl: programmatic dependent launch (Hopper); cache_rows int [B]: the
    cache row each row of qkv writes to (a prompt: one qkv row a token, any number of cache rows), None: row b
    writes to cache row b. Returns q [B, H, D]."""
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    H, G = num_heads, num_groups
    rows_match = k_cache.shape[0] == B if cache_rows is None else cache_rows.shape == (B,)
    if qkv.shape[1] != (H + 2 * G) * D or not rows_match or k_cache.stride(-1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match a cache of {tuple(k_cache.shape)} with {H} heads")
    if q_out is None:
        q_out = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    _rope_cache_batch_kernel[(B, H + 2 * G)](
        qkv, q_out, k_cache, v_cache, positions, prefix_lens, inv_freq, float(position_divisor),
        positions if cache_rows is None else cache_rows,
        qkv.stride(0), q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H, G, HEAD_DIM=D, ROT_PAIRS=inv_freq.numel(), PDL=pdl, ROUND=round_mode(angle_dtype),
        CACHE_ROWS=cache_rows is not None, num_warps=1, **_pdl_launch(pdl),
    )
    return q_out


@dataclass(frozen=True)
class RopeWrite:
    """What the rotary + cache write after a QKV linear needs (``rope_cache_write``'s arguments for one layer): given
    to the linear, whose kernel does it in its epilogue where it has one (``quant_words``' words kernel) and calls
    ``after`` otherwise. Row b of the linear's rows writes cache row b."""

    k_cache: torch.Tensor  # [B, G, slots, D], one layer
    v_cache: torch.Tensor
    positions: torch.Tensor  # int [B] on the device; < 0: an idle row (no key or value written)
    prefix_lens: torch.Tensor  # int [B]: each row's prefix slots, before its tokens
    num_heads: int
    num_groups: int
    inv_freq: torch.Tensor  # float32 [rotary_dim / 2]
    position_divisor: float = 1.0
    angle_dtype: Optional[torch.dtype] = None

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[-1]

    def q_view(self, qkv: torch.Tensor) -> torch.Tensor:
        """The rotated queries [B, H, D]: the first H * D columns of qkv, where both forms leave them."""
        return qkv[:, : self.num_heads * self.head_dim].view(qkv.shape[0], self.num_heads, self.head_dim)

    def after(self, qkv: torch.Tensor, pdl: bool = False) -> torch.Tensor:
        """The rotary kernel after a linear without the epilogue: q rotated in place in qkv; returns ``q_view``."""
        return rope_cache_write(qkv, self.k_cache, self.v_cache, self.positions, self.prefix_lens,
                                num_heads=self.num_heads, num_groups=self.num_groups, inv_freq=self.inv_freq,
                                position_divisor=self.position_divisor, q_out=self.q_view(qkv),
                                angle_dtype=self.angle_dtype, pdl=pdl)

    def gemv_args(self) -> dict:
        """The one-row GEMV's ``rope`` (``int8_gemv.gemv``) for row 0."""
        return dict(q_rows=self.num_heads * self.head_dim, kv_rows=self.num_groups * self.head_dim,
                    head_dim=self.head_dim, inv_freq=self.inv_freq, pos=self.positions[:1],
                    prefix=self.prefix_lens[:1], divisor=self.position_divisor, angle_dtype=self.angle_dtype,
                    k_cache=self.k_cache[0], v_cache=self.v_cache[0])


@dataclass
class AttentionWorkspace:
    """The splits' partial results, float32 o [B, G, splits, HPG_PAD, D], m and l [B, G, splits, HPG_PAD], and the
    programs of each (row, group) that have finished, int32 [B, G] (zero between launches)."""

    o: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    finished: torch.Tensor
    num_splits: int
    hpg_pad: int
    block_t: int = BLOCK_T  # slots a loop step
    num_warps: int = 8
    alone_slots: int = 0  # a row of at most this many slots is done by one program (no split, no merge)


# The one-row step's tile (H100, bench/NOTES.md run 53: 8-bit step at context 128 2.652 -> 2.579 ms with 16 splits,
# 2.522 with one program; 1024: 2.722 -> 2.689): at one row the attention is a latency chain, and each split's
# partials, counter and merge cost ~3 us, about four 32-slot tiles, so rows of up to five tiles take one program.
# 1 or 2 warps were slower at every split count (run 54), and so was this tile for compare's two rows, which keep
# the general one
ONE_ROW_TILE = dict(block_t=32, num_warps=4, alone_slots=160)


def default_splits(batch: int, num_groups: int, device: torch.device) -> int:
    """Splits a (row, group): enough programs for about two per SM, at most 16 (slots are read once either way)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-2 * sms // max(1, batch * num_groups))
    return max(1, min(16, 1 << (want - 1).bit_length()))


def attention_workspace(batch: int, num_heads: int, num_groups: int, head_dim: int, device,
                        num_splits: Optional[int] = None, block_t: int = BLOCK_T, num_warps: int = 8,
                        alone_slots: int = 0) -> AttentionWorkspace:
    """Partial buffers for ``decode_attention`` (allocate once before graph capture and pass them in), and the
    kernel's tile: ``block_t`` slots a loop step (a power of two, at least 16), ``num_warps``, and rows of at most
    ``alone_slots`` slots done by one program (``ONE_ROW_TILE``: the one-row step's)."""
    device = torch.device(device)
    splits = num_splits or default_splits(batch, num_groups, device)
    hpg_pad = max(16, 1 << (num_heads // num_groups - 1).bit_length())
    parts = (batch, num_groups, splits, hpg_pad)
    f32 = dict(device=device, dtype=torch.float32)
    return AttentionWorkspace(torch.empty(*parts, head_dim, **f32), torch.empty(*parts, **f32),
                              torch.empty(*parts, **f32), torch.zeros(batch, num_groups, device=device, dtype=torch.int32),
                              splits, hpg_pad, block_t, num_warps, alone_slots)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[AttentionWorkspace] = None,
    sm_scale: Optional[float] = None,
    pdl: bool = False,
) -> torch.Tensor:
    """One decode token a row: q [B, H, D] against each row's slots [0, prefix_lens[b] + positions[b]].

    k_cache/v_cache [B, G, slots, D] (one layer, after ``rope_cache_write``); returns out [B, H * D] in q's
    dtype (idle rows, positions[b] < 0, get zeros)."""
    B, H, D = q.shape
    G = k_cache.shape[1]
    if H % G or k_cache.shape[0] != B or k_cache.shape[-1] != D or q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"q {tuple(q.shape)} does not match a cache of {tuple(k_cache.shape)}")
    ws = workspace or attention_workspace(B, H, G, D, q.device)
    if out is None:
        out = torch.empty(B, H * D, device=q.device, dtype=q.dtype)
    hpg = H // G
    _attn_batch_kernel[(B, G, ws.num_splits)](
        q, k_cache, v_cache, positions, prefix_lens, ws.o, ws.m, ws.l, ws.finished, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        sm_scale or 1.0 / math.sqrt(D), G, hpg,
        SPLITS=ws.num_splits, HEAD_DIM=D, HPG_PAD=ws.hpg_pad, BLOCK_T=ws.block_t, IEEE=q.dtype == torch.float32,
        PDL=pdl, ALONE=ws.alone_slots, num_warps=ws.num_warps, **_pdl_launch(pdl),
    )
    return out
