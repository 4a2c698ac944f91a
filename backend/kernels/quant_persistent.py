"""A persistent GEMV for one activation row (or two: compare's) and a 4-bit weight (NF4, the int4 release):
``quant_linear``'s "persistent" kernel, a candidate of the one-row step's descent next to the words kernel
(``quant_words``), and of its own tuner at one and two rows.

Why: at one row the words kernel runs thousands of short programs (NF4 fc1: 6848 programs of 4 weight rows), and
each one reads the activations again for every word it holds (a 16-byte load of x, and one of the norm weight, for
every 4 bytes of weight), makes the norm's sum of squares over the whole row again, and ends in a cross-warp
reduction. ncu counted 7.6-13.6 instructions issued a weight there, against ~3.6 for decoding and multiplying it
(bench/NOTES.md runs 30 and 34). Here a few programs an SM each load the activation row once (times the norm weight,
rounded as the other kernels round it; its 1/rms once), hold it in registers in the weight tile's layout, and loop
over blocks of weight rows: a block is one [BLOCK_N, K/8] tile of words, a whole row of K at a time, and the next
block's words are asked for before this block's products in the source (ptxas issues those loads after them; tiles
with ``l2_ahead`` ask L2 for blocks further ahead: ``weight_prefetch``). The loop is then the words' loads, their
absmax, the decode and products (``packed_products`` with 16-bit rows on a GPU: the register table, or the shared
byte-pair table that a persistent program fills once; the 16-entry table otherwise), one row sum and the epilogue.
With two activation rows (compare) both stay in registers and each word's looked-up weights serve both rows'
products. On an H100 the tuners took it for every NF4 linear: NF4 chat went from 42% to 55.5% of the bandwidth
bound, compare from 535 to 625 tokens/s in all (bench/NOTES.md run 55).

The whole of K is one tile, so K/8 rounds up to a power of two (fc2's 1712 words to 2048: its padding words are
masked off and cost issue slots, not bytes); past ``MAX_WORDS`` the kernel is not offered.
"""

from __future__ import annotations

import torch

from .gemv_4bit import _FMT_ID, HAVE_TRITON, QuantizedWeight

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gemv_4bit import _epilogue
    from .packed_products import (masked_load, packed_dot, packed_dot2, packed_mul, shared_dot, shared_dot2,
                                  shared_pair_table)
    from .quant_words import _halves, _pair_weights, _row_scale2, _word_absmax, _x_pair
    from .weight_prefetch import prefetch_range

MAX_WORDS = 4096  # K up to 32768: a thread's share of x stays in registers at 4-8 warps


def usable(x: torch.Tensor, w: QuantizedWeight, norm_weight, lut: int) -> bool:
    """Whether this kernel can take the call: one 4-bit row the words kernel could read (or two, for compare, with
    the register or shared table), K a multiple of 32 within MAX_WORDS words (groups of 4 words, a 16-byte load
    each, within one NF4 block), the 16-entry table (lut 1), the register table (lut 3) or the shared byte-pair
    table (lut 4, ``packed_products``)."""
    from . import quant_words

    rows_ok = x.shape[0] == 1 or (x.shape[0] == 2 and lut >= 3)  # two rows: packed products only
    return (rows_ok and w.fmt in ("nf4", "int4") and lut in (1, 3, 4) and w.k // 8 <= MAX_WORDS
            and w.k % 32 == 0 and (w.fmt != "nf4" or w.blocksize % 32 == 0) and w.data.data_ptr() % 16 == 0
            and quant_words.usable(x, w, norm_weight, min(lut, 3)))  # (lut 4: 16-bit rows on a GPU, as 3)


_sms: dict[str, int] = {}


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a few programs, so each loops over several blocks
    key = str(device)
    if key not in _sms:
        _sms[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[key]


if HAVE_TRITON:

    @triton.jit
    def words_index(G: tl.constexpr, WPG: tl.constexpr):
        # [1, G, WPG]: word WPG g + j at (g, j); a thread's WPG words are consecutive, one 16-byte load (4-bit: 4
        # words of 32 bits, one absmax; int8: 2 of 64 bits)
        j = tl.max_contiguous(tl.multiple_of(tl.arange(0, WPG), WPG), WPG)
        return WPG * tl.arange(0, G)[None, :, None] + j[None, None, :]

    @triton.jit
    def x_words(x_ptr, norm_ptr, mg, BLOCK_N: tl.constexpr, G: tl.constexpr, NORM: tl.constexpr,
                X_KIND: tl.constexpr, WPG: tl.constexpr):
        # the activation pairs that meet each word of the [BLOCK_N, G, WPG] tile (int32 pairs of 16-bit values:
        # 4w .. 4w + 3 for word w of 8 weights), times the norm weight's when NORM (rounded once, as packed_mul),
        # as 4 tiles; and the row's sum of squares (unnormed)
        pair = 4 * tl.reshape(words_index(G, WPG), (G, WPG))[:, :, None] + tl.arange(0, 4)[None, None, :]
        m = None if mg is None else tl.reshape(mg, (G, 1))[:, :, None]
        raw = masked_load(x_ptr + pair, m, 0)
        lo, hi = _halves(raw, X_KIND)
        ss = tl.sum(tl.sum(tl.sum(lo * lo + hi * hi, axis=2), axis=1), axis=0)
        x = raw
        if NORM:
            x = packed_mul(raw, masked_load(norm_ptr + pair, m, 0), X_KIND == 1)
        even, odd = tl.split(tl.reshape(x, (G, WPG, 2, 2)))  # pairs (0, 2) and (1, 3)
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        shape: tl.constexpr = (BLOCK_N, G, WPG)
        return (tl.broadcast_to(x0[None, :, :], shape), tl.broadcast_to(x1[None, :, :], shape),
                tl.broadcast_to(x2[None, :, :], shape), tl.broadcast_to(x3[None, :, :], shape), ss)

    @triton.jit
    def _x_halves(x_ptr, norm_ptr, mg, i: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, NORM: tl.constexpr,
                  X_KIND: tl.constexpr):
        # activations 8w + 2i and 8w + 2i + 1 of each word w as float32 (times the norm weight), broadcast to the
        # tile; and their squares' sum (unnormed)
        pair = 4 * tl.reshape(words_index(G, 4), (G, 4)) + i
        m = None if mg is None else tl.reshape(mg, (G, 1))
        xe, xo = _x_pair(x_ptr, x_ptr, pair, m, False, X_KIND)
        ss = tl.sum(tl.sum(xe * xe + xo * xo, axis=1), axis=0)
        if NORM:
            xe, xo = _x_pair(x_ptr, norm_ptr, pair, m, True, X_KIND)
        shape: tl.constexpr = (BLOCK_N, G, 4)
        return tl.broadcast_to(xe[None, :, :], shape), tl.broadcast_to(xo[None, :, :], shape), ss

    @triton.jit
    def _table_sums(words, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, code_ptr, FMT: tl.constexpr, LUT: tl.constexpr):
        # float32 [tile]: each word's 8 weights (the 16-entry table, or the int4 release's nibbles) times its x
        ev, od = _pair_weights(words, 0, code_ptr, code_ptr, FMT, LUT, 0)
        p = tl.fma(od, xo0, ev * xe0)
        ev, od = _pair_weights(words, 1, code_ptr, code_ptr, FMT, LUT, 0)
        p = tl.fma(od, xo1, tl.fma(ev, xe1, p))
        ev, od = _pair_weights(words, 2, code_ptr, code_ptr, FMT, LUT, 0)
        p = tl.fma(od, xo2, tl.fma(ev, xe2, p))
        ev, od = _pair_weights(words, 3, code_ptr, code_ptr, FMT, LUT, 0)
        return tl.fma(od, xo3, tl.fma(ev, xe3, p))

    @triton.jit
    def _group_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, m, K: tl.constexpr, G: tl.constexpr,
                      NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, ROW_SCALE2: tl.constexpr):
        # [BLOCK_N, G, 1]: the absmax of each group of 4 words (32 weights, within one block: BS % 32 == 0) of rows
        blk = (rows[:, None, None] * K + 32 * tl.arange(0, G)[None, :, None]) // BS
        s2, _ = _row_scale2(absmax2_ptr, rows, 0, K, BS, BS2, ROW_SCALE2, False)
        if ROW_SCALE2:  # the row's second-level scale ([BLOCK_N, 1] there)
            s2 = s2[:, :, None]
        return _word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, m, s2, NESTED, BS2, ROW_SCALE2)

    @triton.jit
    def _block_loads(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, block, N, K: tl.constexpr, mg,
                     FMT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                     SWIGLU: tl.constexpr, ROW_SCALE2: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
        # block `block`'s words [BLOCK_N, G, 4] (and SwiGLU's up half, N rows further) and NF4's absmax of each
        # group of 4 words; rows past N (a last partial block, or a block past the end) are masked off, their
        # addresses clamped to row 0
        rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = rn < N
        rows = tl.where(valid, rn, 0)
        m = valid[:, None, None] if mg is None else valid[:, None, None] & mg[None, :, None]
        offs = rows[:, None, None] * (K // 8) + words_index(G, 4)
        words = masked_load(w_ptr + offs, m, 0)
        words_b = words
        if SWIGLU:
            words_b = masked_load(w_ptr + N * (K // 8) + offs, m, 0)
        a = tl.full([1, 1, 1], 0.0, tl.float32)  # (a tensor either way: these are carried through the loop)
        a_b = a
        if FMT == 0:
            a = _group_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, m, K, G, NESTED, BS, BS2, ROW_SCALE2)
            if SWIGLU:
                a_b = _group_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows + N, m, K, G, NESTED, BS, BS2,
                                    ROW_SCALE2)
        return words, words_b, a, a_b

    @triton.jit
    def _prefetch_block(w_ptr, absmax_ptr, block, n_blocks, N, K: tl.constexpr, FMT: tl.constexpr,
                        NESTED: tl.constexpr, BS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr):
        # block `block`'s words asked of L2 (kernels/weight_prefetch.py; SwiGLU's up half too), and NF4's absmax of
        # those rows: the loop decodes the next block's absmax before it loads that block's words, so a miss there
        # holds them back. Nothing past the last block
        if block < n_blocks:
            first = block * BLOCK_N
            rows = tl.minimum(N - first, BLOCK_N)
            prefetch_range(w_ptr + first * (K // 8), rows * (K // 2))  # (w_ptr: int32 words, 8 weights each)
            if SWIGLU:
                prefetch_range(w_ptr + (N + first) * (K // 8), rows * (K // 2))
            if FMT == 0:
                _prefetch_absmax(absmax_ptr, first, rows, K, BS, NESTED)
                if SWIGLU:
                    _prefetch_absmax(absmax_ptr, N + first, rows, K, BS, NESTED)

    @triton.jit
    def _prefetch_absmax(absmax_ptr, first, rows, K: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr):
        # the absmax bytes of rows first .. first + rows - 1 asked of L2, their range rounded in to whole 16-byte
        # units (the launch checks the absmax is 16-byte aligned)
        SIZE: tl.constexpr = 1 if NESTED else 4  # bytes a value: bitsandbytes' nested bytes, or float32
        start = (first * K // BS * SIZE) // 16 * 16
        end = ((first + rows) * K // BS * SIZE) // 16 * 16
        if end > start:
            prefetch_range(absmax_ptr.to(tl.pointer_type(tl.int8), bitcast=True) + start, end - start)

    @triton.jit
    def _row_sums(words, a, x0, x1, x2, x3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, code_ptr, t0, t1, t2, t3, t4,
                  t5, t6, t7, lane_table, PACKED: tl.constexpr, FMT: tl.constexpr, LUT: tl.constexpr,
                  BF16: tl.constexpr):
        # [BLOCK_N, G]: each row's words times x, a thread's groups summed, NF4's scaled by their absmax (the
        # sums across the program's warps are left to across_warps)
        if LUT == 4:
            p = shared_dot(words, x0, x1, x2, x3, lane_table, BF16)
        elif PACKED:
            p = packed_dot(words, x0, x1, x2, x3, t0, t1, t2, t3, t4, t5, t6, t7, BF16)
        else:
            p = _table_sums(words, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, code_ptr, FMT, LUT)
        return _scaled_groups(p, a, FMT)

    @triton.jit
    def _scaled_groups(p, a, FMT: tl.constexpr):
        # [BLOCK_N, G]: the products' sum a group of 4 words, scaled by its absmax (NF4)
        p = tl.sum(p, axis=2, keep_dims=True)
        if FMT == 0:
            p = p * a
        return tl.sum(p, axis=2)

    @triton.jit
    def across_warps(p, q):
        # the row sums of two [BLOCK_N, G] tiles in one reduction across the program's warps (one exchange through
        # shared memory and its barriers, not one a tile)
        return tl.split(tl.sum(tl.join(p, q), axis=1))

    @triton.jit
    def across_warps4(p, p_b, q, q_b):
        # across_warps for four tiles: (p's, p_b's), (q's, q_b's)
        s, t = tl.split(tl.sum(tl.join(tl.join(p, p_b), tl.join(q, q_b)), axis=1))
        y, y_b = tl.split(s)
        v, v_b = tl.split(t)
        return y, y_b, v, v_b

    @triton.jit
    def _pair_sums(words, a, x0, x1, x2, x3, z0, z1, z2, z3, t0, t1, t2, t3, t4, t5, t6, t7, lane_table,
                   FMT: tl.constexpr, LUT: tl.constexpr, BF16: tl.constexpr):
        # two activation rows (x, z) against the same words, looked up once: _row_sums' [BLOCK_N, G] for each
        if LUT == 4:
            p, q = shared_dot2(words, x0, x1, x2, x3, z0, z1, z2, z3, lane_table, BF16)
        else:
            p, q = packed_dot2(words, x0, x1, x2, x3, z0, z1, z2, z3, t0, t1, t2, t3, t4, t5, t6, t7, BF16)
        return _scaled_groups(p, a, FMT), _scaled_groups(q, a, FMT)

    @triton.jit
    def _activations(x_ptr, norm_ptr, mg, eps, K: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                     NORM: tl.constexpr, X_KIND: tl.constexpr, PACKED: tl.constexpr):
        # one activation row as the products read it: 4 tiles of 16-bit pairs (PACKED), else 8 of float32 halves
        # (the other form's names bound too, unused); and the row's RMSNorm factor ([1]; 1 without the norm)
        if PACKED:
            x0, x1, x2, x3, ss = x_words(x_ptr, norm_ptr, mg, BLOCK_N, G, NORM, X_KIND, 4)
            xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = x0, x1, x2, x3, x0, x1, x2, x3
        else:
            xe0, xo0, ss0 = _x_halves(x_ptr, norm_ptr, mg, 0, BLOCK_N, G, NORM, X_KIND)
            xe1, xo1, ss1 = _x_halves(x_ptr, norm_ptr, mg, 1, BLOCK_N, G, NORM, X_KIND)
            xe2, xo2, ss2 = _x_halves(x_ptr, norm_ptr, mg, 2, BLOCK_N, G, NORM, X_KIND)
            xe3, xo3, ss3 = _x_halves(x_ptr, norm_ptr, mg, 3, BLOCK_N, G, NORM, X_KIND)
            ss = ss0 + ss1 + ss2 + ss3
            x0, x1, x2, x3 = xe0, xo0, xe1, xo1
        r = tl.full([1], 1.0, dtype=tl.float32)
        if NORM:
            r = r * tl.rsqrt(ss / K + eps)
        return x0, x1, x2, x3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, r

    @triton.jit(do_not_specialize=["has_bias", "residual", "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"])
    def _persistent_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, scale_ptr, bias_ptr, norm_ptr, res_ptr,
        out_ptr, pairs_ptr, N, K: tl.constexpr, eps, stride_xm, stride_rm, stride_om, has_bias, residual, t0, t1, t2,
        t3, t4, t5, t6, t7,
        NORM: tl.constexpr, FMT: tl.constexpr, LUT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr,
        BS2: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr, X_KIND: tl.constexpr,
        ROW_SCALE2: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, KW_PAD: tl.constexpr, PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        # program p: blocks p, p + programs, ... of BLOCK_N output columns of the ROWS (1 or 2) activation rows.
        # x_ptr: int32 pairs (16-bit x; stride_xm in pairs) or float32 x. SWIGLU: 2N weight rows, as gemv_4bit's.
        # PREFETCH: the blocks after the next one asked of L2 that many blocks ahead (0: none)
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching
            tl.extra.cuda.gdc_launch_dependents()
        G: tl.constexpr = KW_PAD // 4  # groups of 4 words along K
        mg = None if K // 32 == G else tl.arange(0, G) < K // 32
        n_blocks = tl.cdiv(N, BLOCK_N)
        # the first block's weights do not depend on the kernels ahead: asked for before the wait
        words, words_b, a, a_b = _block_loads(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, pid, N, K, mg, FMT,
                                              NESTED, BS, BS2, SWIGLU, ROW_SCALE2, BLOCK_N, G)
        for ahead in tl.static_range(1, PREFETCH + 1):  # (before the wait too: the weights are static data)
            _prefetch_block(w_ptr, absmax_ptr, pid + ahead * programs, n_blocks, N, K, FMT, NESTED, BS, SWIGLU,
                            BLOCK_N)
        lane_table = 0
        if LUT == 4:  # the shared byte-pair table (static data: filled before the wait too)
            lane_table = shared_pair_table(pairs_ptr, pid)
        if PDL:  # x, the residual: written by the kernels ahead
            tl.extra.cuda.gdc_wait()
        PACKED: tl.constexpr = LUT >= 3 and X_KIND != 0
        x0, x1, x2, x3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, r = _activations(
            x_ptr, norm_ptr, mg, eps, K, BLOCK_N, G, NORM, X_KIND, PACKED)
        z0, z1, z2, z3, r1 = x0, x1, x2, x3, r
        if ROWS == 2:  # (packed products only)
            z0, z1, z2, z3, _, _, _, _, _, _, _, _, r1 = _activations(x_ptr + stride_xm, norm_ptr, mg, eps, K, BLOCK_N,
                                                                      G, NORM, X_KIND, PACKED)
        row = tl.zeros([1], dtype=tl.int64)
        for block in range(pid, n_blocks, programs):
            if PREFETCH > 0:
                _prefetch_block(w_ptr, absmax_ptr, block + (PREFETCH + 1) * programs, n_blocks, N, K, FMT, NESTED,
                                BS, SWIGLU, BLOCK_N)
            # the next block's loads, written before this block's products (masked off past the last block); ptxas
            # issues them after the products, hence PREFETCH (kernels/weight_prefetch.py)
            nxt, nxt_b, a_n, a_nb = _block_loads(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, block + programs,
                                                 N, K, mg, FMT, NESTED, BS, BS2, SWIGLU, ROW_SCALE2, BLOCK_N, G)
            if ROWS == 2:
                p, q = _pair_sums(words, a, x0, x1, x2, x3, z0, z1, z2, z3, t0, t1, t2, t3, t4, t5, t6, t7, lane_table,
                                  FMT, LUT, X_KIND == 1)
                if SWIGLU:
                    p_b, q_b = _pair_sums(words_b, a_b, x0, x1, x2, x3, z0, z1, z2, z3, t0, t1, t2, t3, t4, t5, t6, t7,
                                          lane_table, FMT, LUT, X_KIND == 1)
                    y, y_b, v, v_b = across_warps4(p, p_b, q, q_b)
                else:
                    y, v = across_warps(p, q)
                    y_b, v_b = y, v
            else:
                p = _row_sums(words, a, x0, x1, x2, x3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, code_ptr, t0, t1, t2,
                              t3, t4, t5, t6, t7, lane_table, PACKED, FMT, LUT, X_KIND == 1)
                if SWIGLU:
                    p_b = _row_sums(words_b, a_b, x0, x1, x2, x3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, code_ptr, t0,
                                    t1, t2, t3, t4, t5, t6, t7, lane_table, PACKED, FMT, LUT, X_KIND == 1)
                    y, y_b = across_warps(p, p_b)
                else:
                    y = tl.sum(p, axis=1)
                    y_b = y
            rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue(y[None, :], y_b[None, :], r, row, rn, row >= 0, rn < N, N, scale_ptr, bias_ptr, res_ptr,
                      out_ptr, stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)
            if ROWS == 2:
                _epilogue(v[None, :], v_b[None, :], r1, row + 1, rn, row >= 0, rn < N, N, scale_ptr, bias_ptr,
                          res_ptr, out_ptr, stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)
            words, words_b, a, a_b = nxt, nxt_b, a_n, a_nb


def launch(x, w: QuantizedWeight, out, bias, residual, norm_weight, eps: float, swiglu: bool, cfg, pdl: bool,
           dummy) -> None:
    """Run the persistent kernel (cfg: a ``gemv_4bit.QuantLinearConfig`` of kernel "persistent": block_n weight rows
    a block, ``programs_per_sm`` programs on each multiprocessor)."""
    if not usable(x, w, norm_weight, cfg.lut):
        raise ValueError("the persistent kernel takes one row of 16-bit (or float32) activations, or two of 16-bit on "
                         f"a GPU, and a 4-bit weight with K a multiple of 32 up to {8 * MAX_WORDS}")
    from .quant_words import X_KIND, row_scale2

    n_out = w.n // 2 if swiglu else w.n
    kind = X_KIND[x.dtype]
    nf4 = w.fmt == "nf4"
    norm_arg = norm_weight if norm_weight is not None else dummy
    if kind and norm_weight is not None:
        norm_arg = norm_weight.view(torch.int32)
    table = w.table_registers.get(x.dtype, (0,) * 8) if cfg.lut == 3 else (0,) * 8
    programs = min(triton.cdiv(n_out, cfg.block_n), multiprocessors(x.device) * max(1, cfg.programs_per_sm))
    res = residual if residual is not None else dummy
    _persistent_kernel[(programs,)](
        x if kind == 0 else x.view(torch.int32), w.data.reshape(-1).view(torch.int32), w.absmax if nf4 else dummy,
        w.code if nf4 else dummy, w.code2 if w.nested else dummy, w.absmax2 if w.nested else dummy, w.offset,
        w.scale if w.scale is not None else dummy, bias if bias is not None else dummy, norm_arg,
        res, out, w.shared_pairs(x.dtype) if cfg.lut == 4 else dummy, n_out, w.k, eps,
        x.stride(0) if kind == 0 else x.stride(0) // 2, res.stride(0), out.stride(0), int(bias is not None),
        int(residual is not None), *table,
        NORM=norm_weight is not None, FMT=_FMT_ID[w.fmt], LUT=cfg.lut, NESTED=w.nested,
        BS=w.blocksize if nf4 else 32, BS2=w.blocksize2, HAS_SCALE=w.scale is not None, SWIGLU=swiglu, X_KIND=kind,
        ROW_SCALE2=row_scale2(w), ROWS=x.shape[0], BLOCK_N=cfg.block_n, KW_PAD=triton.next_power_of_2(w.k // 8), PDL=pdl,
        PREFETCH=cfg.l2_ahead if not nf4 or w.absmax.data_ptr() % 16 == 0 else 0, num_warps=cfg.num_warps, num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )
