"""A GEMV for one or two activation rows that reads a packed weight (NF4, the int4 release, per-row int8) as 32-bit
words: ``quant_linear``'s "words" kernel (configs, tuning and the fused prologue/epilogues are ``gemv_4bit``'s),
and a candidate of ``gemv_rows`` for compare's two int8 rows.

Why another GEMV: at one or two rows a linear is a pass over its weight, so its time is the bytes read and the
instructions spent on each byte. ``gemv_4bit``'s "gemv" kernel splits each tile into even and odd columns
and reduces it per 64-weight block, and ``gemv_rows`` sums each tile per row: Triton lowers those reshapes,
the activation loads and the per-tile reductions through shared memory, with barriers inside the K loop
(sm_90 PTX: 8 ``bar.sync`` an iteration in the 4-bit GEMV, 12-16 in ``gemv_rows`` at two rows); on the
H200 the 4-bit GEMV read NF4 weights at 6-16% of the copy bandwidth.

Here every tensor of the loop is one [BLOCK_N, BLOCK_W] tile of words (8 weights a word at 4 bits, 4 at
int8), float32 partial sums stay in that tile until the loop ends, and the activations are loaded through
pointers of the tile's shape, so Triton keeps one register layout throughout: no barrier until the final
row sums. The activations are read as int32 pairs of 16-bit values (the even column in the low half,
matching the high nibble of a 4-bit byte, or the lower int8 byte), widened to float32 by bit shifts (bf16)
or a conversion (fp16); on the packed-products path a word's four pairs come as one 16-byte load (a
[rows, words, 4] tile split in registers, ``packed_products.word_pairs``). NF4 codes come from the
16-entry table (64 bytes: one cache line, so a warp's 32 lookups are one L1 transaction; the 256-entry
byte-pair table spans 16 lines), int4 and int8 values by arithmetic shifts. An NF4 word's sum is scaled by
its block's absmax (nested absmax decoded per word; its second-level scale loaded once a row where a row's
blocks all fall in one group, as at K = 4096); the row scale (int4, int8) and the epilogue come after the loop.
With two rows the decoded weights serve both (compare's batch of two). As the QKV linear of a decode step it can
also rotate q and k and write k and v to each row's cache slot in its epilogue (``rope``): a launch a layer fewer
than the rotary kernel after it, with the same math and roundings.

K is a compile-time constant (one compiled kernel per K: a model has a few): with it a thread's rows sit at constant
distances and load at immediate offsets from one address (bench/NOTES.md run 33). With ``prefetch`` (the one-row
step's tiles, launched as programmatic dependents) the first K step is peeled off the loop and its words asked for
before the wait on the kernel ahead.

Needs K a multiple of the weights a word, a 4-byte aligned weight, and 16-bit activations with an even row
stride (or float32, the tests' dtype, read directly); ``usable`` says whether a call qualifies, else the
caller takes its default kernel.
"""

from __future__ import annotations

import torch

from .gemv_4bit import _FMT_ID, HAVE_TRITON, QuantizedWeight
from .rotary import round_mode

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gemv_4bit import _epilogue, _scale_bias
    from .rotary import rotate_pairs_store
    from .packed_products import int8_words_sums, masked_load, packed_dot, packed_dot2, word_pairs

X_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def usable(x: torch.Tensor, w: QuantizedWeight, norm_weight, lut: int = 1, cvt: int = 1) -> bool:
    """Whether the words kernel can take this call (alignment, dtype and shape; see the module docstring).
    Packed products (packed_products.py, inline PTX: a GPU): lut 3 needs a 4-bit weight and 16-bit rows; int8
    with cvt 3 needs fp16 rows and 8-byte aligned rows of weights."""
    if w.k % (4 if w.fmt == "int8" else 8) or w.data.data_ptr() % 4 or w.n * w.k >= 2**31:
        return False
    if lut == 3 and w.fmt != "int8" and (x.dtype not in w.table_registers or not x.is_cuda):
        return False
    if w.fmt == "int8" and cvt == 3 and (x.dtype != torch.float16 or not x.is_cuda or w.k % 8
                                         or w.data.data_ptr() % 8):
        return False
    if w.fmt == "nf4" and w.blocksize % 8:
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype not in X_KIND or x.stride(0) % 2 or x.data_ptr() % 4:
        return False
    return norm_weight is None or (norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
                                   and norm_weight.data_ptr() % 4 == 0)


if HAVE_TRITON:

    @triton.jit
    def _halves(p, X_KIND: tl.constexpr):
        # an int32 holding two 16-bit activations: (low half, high half) as float32
        if X_KIND == 1:  # bf16 is the top half of a float32
            lo = (p << 16).to(tl.float32, bitcast=True)
            hi = (p & -65536).to(tl.float32, bitcast=True)
        else:
            lo = p.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _round(v, X_KIND: tl.constexpr):
        # float32 v rounded to the activation dtype (the norm's product, as the other kernels round it)
        if X_KIND == 1:
            v = v.to(tl.bfloat16).to(tl.float32)
        elif X_KIND == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _x_pair(x_ptr, norm_ptr, pair, mask, NORM: tl.constexpr, X_KIND: tl.constexpr):
        # activations 2 * pair and 2 * pair + 1 (x_ptr: int32 view of 16-bit x, or float32 x), times the
        # norm weight when norm
        if X_KIND == 0:
            xe = masked_load(x_ptr + 2 * pair, mask, 0.0)
            xo = masked_load(x_ptr + 2 * pair + 1, mask, 0.0)
            if NORM:
                xe = xe * masked_load(norm_ptr + 2 * pair, mask, 0.0)
                xo = xo * masked_load(norm_ptr + 2 * pair + 1, mask, 0.0)
        else:
            xe, xo = _halves(masked_load(x_ptr + pair, mask, 0), X_KIND)
            if NORM:
                ge, go = _halves(masked_load(norm_ptr + pair, mask, 0), X_KIND)
                xe = _round(xe * ge, X_KIND)
                xo = _round(xo * go, X_KIND)
        return xe, xo

    @triton.jit
    def _pair_weights(words, i: tl.constexpr, code_ptr, lut_ptr, FMT: tl.constexpr, LUT: tl.constexpr,
                      CVT: tl.constexpr):
        # the two weights of each word that pair with activation pair i: 4-bit, byte i's high nibble (the even
        # column) and low nibble; int8, bytes 2i and 2i + 1
        if FMT == 2 and CVT == 1:  # byte b + 128 in the low mantissa bits of 2^23, minus 2^23 + 128: exact, and
            # no conversion instruction (sm_90 converts a byte at a quarter of the FMA rate, about the rate int8
            # weights arrive at); the xor sets 0x4B000000 and flips the byte's sign bit in one logic op
            ev = (((words >> (16 * i)) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            od = (((words >> (16 * i + 8)) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        elif FMT == 2:  # the conversion instruction (fewer instructions; the tuner times both)
            ev = ((words << (24 - 16 * i)) >> 24).to(tl.float32)
            od = ((words << (16 - 16 * i)) >> 24).to(tl.float32)
        elif FMT == 1:  # int4 release: signed nibbles
            ev = ((words << (24 - 8 * i)) >> 28).to(tl.float32)
            od = ((words << (28 - 8 * i)) >> 28).to(tl.float32)
        elif LUT == 2:  # a gather per byte from the byte-pair table (int64: low word = the even column)
            pair = tl.load(lut_ptr + ((words >> (8 * i)) & 255))
            ev = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            od = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            ev = tl.load(code_ptr + ((words >> (8 * i + 4)) & 15))
            od = tl.load(code_ptr + ((words >> (8 * i)) & 15))
        return ev, od

    @triton.jit
    def _word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mask, s2, NESTED: tl.constexpr,
                     BS2: tl.constexpr, ROW_SCALE2: tl.constexpr):
        # float32 absmax of blocks blk; nested: code2[q] * absmax2[blk // BS2] + offset, as bitsandbytes decodes it
        # (ROW_SCALE2: absmax2[blk // BS2] is the row's, s2, loaded before the K loop)
        if NESTED:
            q = masked_load(absmax_ptr + blk, mask, 0).to(tl.int32)
            if ROW_SCALE2:
                a2 = s2
            else:  # blk >= 0: unsigned, the division by a power of two is one shift (signed takes three)
                a2 = masked_load(absmax2_ptr + (blk.to(tl.uint32) // BS2).to(tl.int32), mask, 0.0)
            a = tl.load(code2_ptr + q) * a2 + offset
        else:
            a = masked_load(absmax_ptr + blk, mask, 0.0)
        return a

    @triton.jit
    def _sum_squares(x_ptr, stride_xm, m, K, X_KIND: tl.constexpr):
        # sum of x[m]^2 (for the fused RMSNorm): a pass over the row, which is tiny next to the weight
        offs = tl.arange(0, 1024)
        ss = tl.zeros([1024], dtype=tl.float32)
        for k0 in range(0, K // 2, 1024):
            xe, xo = _x_pair(x_ptr + m * stride_xm, x_ptr, k0 + offs, k0 + offs < K // 2, False, X_KIND)
            ss += xe * xe + xo * xo
        return tl.sum(ss, axis=0)

    @triton.jit
    def _word_sums(words, words_b, x_ptr, norm_ptr, code_ptr, lut_ptr, m0, m1, stride_xm, kw, zero, mk,
                   NORM: tl.constexpr, FMT: tl.constexpr, LUT: tl.constexpr, CVT: tl.constexpr, X_KIND: tl.constexpr,
                   ROWS: tl.constexpr, SWIGLU: tl.constexpr, PAIRS: tl.constexpr):
        # each word's weights times its activations, in float32: (row m0, row m1, and the same for words_b)
        p0 = tl.zeros(words.shape, dtype=tl.float32)
        p1 = tl.zeros(words.shape, dtype=tl.float32)
        p0_b = tl.zeros(words.shape, dtype=tl.float32)
        p1_b = tl.zeros(words.shape, dtype=tl.float32)
        for i in tl.static_range(PAIRS):
            pair = PAIRS * kw[None, :] + i + zero
            xe, xo = _x_pair(x_ptr + m0 * stride_xm, norm_ptr, pair, mk, NORM, X_KIND)
            ev, od = _pair_weights(words, i, code_ptr, lut_ptr, FMT, LUT, CVT)
            p0 = tl.fma(od, xo, tl.fma(ev, xe, p0))
            if ROWS == 2:
                ye, yo = _x_pair(x_ptr + m1 * stride_xm, norm_ptr, pair, mk, NORM, X_KIND)
                p1 = tl.fma(od, yo, tl.fma(ev, ye, p1))
            if SWIGLU:
                ev, od = _pair_weights(words_b, i, code_ptr, lut_ptr, FMT, LUT, CVT)
                p0_b = tl.fma(od, xo, tl.fma(ev, xe, p0_b))
                if ROWS == 2:
                    p1_b = tl.fma(od, yo, tl.fma(ev, ye, p1_b))
        return p0, p1, p0_b, p1_b

    @triton.jit
    def _packed_word_sums(words, words_b, x_ptr, norm_ptr, m0, m1, stride_xm, kw, zero, mk, t0, t1, t2, t3, t4, t5,
                          t6, t7, NORM: tl.constexpr, X_KIND: tl.constexpr, ROWS: tl.constexpr, SWIGLU: tl.constexpr):
        # _word_sums through packed_products: 4-bit words, 16-bit activations (X_KIND 1 or 2)
        BF16: tl.constexpr = X_KIND == 1
        x0, x1, x2, x3 = word_pairs(x_ptr + m0 * stride_xm, norm_ptr, kw, zero, mk, NORM, BF16)
        p1 = tl.zeros(words.shape, dtype=tl.float32)
        p0_b = tl.zeros(words.shape, dtype=tl.float32)
        p1_b = tl.zeros(words.shape, dtype=tl.float32)
        if ROWS == 2:
            y0, y1, y2, y3 = word_pairs(x_ptr + m1 * stride_xm, norm_ptr, kw, zero, mk, NORM, BF16)
            p0, p1 = packed_dot2(words, x0, x1, x2, x3, y0, y1, y2, y3, t0, t1, t2, t3, t4, t5, t6, t7, BF16)
            if SWIGLU:
                p0_b, p1_b = packed_dot2(words_b, x0, x1, x2, x3, y0, y1, y2, y3, t0, t1, t2, t3, t4, t5, t6, t7,
                                         BF16)
        else:
            p0 = packed_dot(words, x0, x1, x2, x3, t0, t1, t2, t3, t4, t5, t6, t7, BF16)
            if SWIGLU:
                p0_b = packed_dot(words_b, x0, x1, x2, x3, t0, t1, t2, t3, t4, t5, t6, t7, BF16)
        return p0, p1, p0_b, p1_b

    @triton.jit
    def _k_step(acc0, acc1, acc0_b, acc1_b, words, words_b, a, a_b, x_ptr, norm_ptr, code_ptr, lut_ptr, m0, m1,
                stride_xm, kw, zero, mk, t0, t1, t2, t3, t4, t5, t6, t7, NORM: tl.constexpr, FMT: tl.constexpr,
                LUT: tl.constexpr, CVT: tl.constexpr, X_KIND: tl.constexpr, ROWS: tl.constexpr, SWIGLU: tl.constexpr,
                PAIRS: tl.constexpr, WIDE: tl.constexpr):
        # one K step of the words kernel: the tile's words (a, a_b: NF4's absmax of each) into the four sums
        if WIDE:
            p0, p1, p0_b, p1_b = int8_words_sums(words, words_b, x_ptr, norm_ptr, m0, m1, stride_xm, kw, zero, mk,
                                                 NORM, ROWS, SWIGLU)
        elif LUT == 3 and FMT != 2:  # 4-bit, 16-bit rows: the register table and packed products
            p0, p1, p0_b, p1_b = _packed_word_sums(words, words_b, x_ptr, norm_ptr, m0, m1, stride_xm, kw, zero,
                                                   mk, t0, t1, t2, t3, t4, t5, t6, t7, NORM, X_KIND, ROWS, SWIGLU)
        else:
            p0, p1, p0_b, p1_b = _word_sums(words, words_b, x_ptr, norm_ptr, code_ptr, lut_ptr, m0, m1, stride_xm,
                                            kw, zero, mk, NORM, FMT, LUT, CVT, X_KIND, ROWS, SWIGLU, PAIRS)
        if FMT == 0:
            acc0 = tl.fma(p0, a, acc0)
            acc1 = tl.fma(p1, a, acc1)
            if SWIGLU:
                acc0_b = tl.fma(p0_b, a_b, acc0_b)
                acc1_b = tl.fma(p1_b, a_b, acc1_b)
        else:
            acc0 += p0
            acc1 += p1
            acc0_b += p0_b
            acc1_b += p1_b
        return acc0, acc1, acc0_b, acc1_b

    # norm is compile-time here (NORM): inside the K loop a runtime flag costs predicated work on every word
    @triton.jit(do_not_specialize=["has_bias", "residual", "M", "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"])
    def _gemv_words_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset,
        scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, M, N, K: tl.constexpr, eps, stride_xm, stride_rm, stride_om,
        has_bias, residual, t0, t1, t2, t3, t4, t5, t6, t7,
        k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, Q_ROWS, KV_ROWS, stride_kr, stride_kg, stride_kt,
        pos_divisor,
        NORM: tl.constexpr, FMT: tl.constexpr, LUT: tl.constexpr, CVT: tl.constexpr, NESTED: tl.constexpr,
        BS: tl.constexpr, BS2: tl.constexpr, BLOCKED: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
        X_KIND: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr,
        PREFETCH: tl.constexpr = False, ROW_SCALE2: tl.constexpr = False, ROPE: tl.constexpr = False,
        HEAD_DIM: tl.constexpr = 2, ROT_PAIRS: tl.constexpr = 1, ROPE_ROUND: tl.constexpr = 0,
    ):
        # program (n block, row pair): BLOCK_N output columns of activation rows m0 (and m0 + 1 when ROWS == 2).
        # stride_xm in x_ptr's elements (int32 pairs for 16-bit x). SWIGLU: 2N weight rows, as gemv_4bit's
        pid_n = tl.program_id(0)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching
            tl.extra.cuda.gdc_launch_dependents()
        m0 = tl.program_id(1) * ROWS
        m1 = tl.minimum(m0 + 1, M - 1)  # ROWS == 2 with an odd M: the last pair repeats its row, stored once
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        # K is a compile-time constant and, with whole row blocks (EVEN_N), the rows are not clamped: a thread's
        # rows then sit at constant distances, so each row's words (and absmax) load from one base register plus
        # an immediate offset instead of a 64-bit address computed per row (sm_90 SASS: 449 -> 328 instructions
        # an iteration at 8 rows of nested NF4)
        rows = rn if EVEN_N else tl.where(mask_n, rn, 0)
        WIDE: tl.constexpr = FMT == 2 and CVT == 3  # int8 as 64-bit words (packed_products.int8_dot)
        PAIRS: tl.constexpr = 2 if FMT == 2 and not WIDE else 4  # activation pairs a word: 4 int8, 8 4-bit or wide
        KW = K // (2 * PAIRS)
        # one register layout for every tile of the loop: the weight's pointers look no more contiguous than the
        # activations' (stride 2-4 words), so Triton does not give the weight loads a vector layout of their own
        # and convert between the two each iteration (Triton 3.6 did: 16 bar.sync an iteration); the words are
        # still read coalesced, 32 consecutive words a warp
        wi = tl.max_contiguous(tl.arange(0, BLOCK_W), 1)
        zero = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)  # x pointers as tiles
        acc0 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc0_b = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc1_b = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        FIRST: tl.constexpr = BLOCK_W * PREFETCH  # where the K loop starts (the first step may be peeled off)
        # ROW_SCALE2 (``row_scale2``): the second-level scale is the row's, loaded once here instead of once a word
        s2, s2_b = _row_scale2(absmax2_ptr, rows, N, K, BS, BS2, ROW_SCALE2, SWIGLU)
        if PREFETCH:  # the first K step's words (and absmax) asked for before the wait: the weights do not depend on
            # the kernels ahead, so these loads fill their tail instead of following it
            mk0 = None if EVEN_K else (wi < KW)[None, :]
            words0, words0_b = _tile_words(w_ptr, rows, N, KW, wi, mk0, SWIGLU)
            a0 = 0.0
            a0_b = 0.0
            if FMT == 0:
                a0, a0_b = _words_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, N, K, wi, mk0, s2, s2_b,
                                         NESTED, BS, BS2, BLOCKED, SWIGLU, ROW_SCALE2)
        if PDL:  # x, the residual: written by the kernels ahead
            tl.extra.cuda.gdc_wait()
        if PREFETCH:
            acc0, acc1, acc0_b, acc1_b = _k_step(acc0, acc1, acc0_b, acc1_b, words0, words0_b, a0, a0_b, x_ptr,
                                                 norm_ptr, code_ptr, lut_ptr, m0, m1, stride_xm, wi, zero, mk0, t0, t1,
                                                 t2, t3, t4, t5, t6, t7, NORM, FMT, LUT, CVT, X_KIND, ROWS, SWIGLU,
                                                 PAIRS, WIDE)
        for k0 in range(FIRST, KW, BLOCK_W):
            kw = k0 + wi
            mk = None  # EVEN_K: whole tiles, no predicates
            if not EVEN_K:
                mk = (kw < KW)[None, :]
            a = 0.0
            a_b = 0.0
            if FMT == 0:  # NF4: each word's block absmax (a word never straddles blocks), asked for before the
                # products so its loads issue with the words'
                a, a_b = _words_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, N, K, kw, mk, s2, s2_b,
                                       NESTED, BS, BS2, BLOCKED, SWIGLU, ROW_SCALE2)
            words, words_b = _tile_words(w_ptr, rows, N, KW, kw, mk, SWIGLU)
            acc0, acc1, acc0_b, acc1_b = _k_step(acc0, acc1, acc0_b, acc1_b, words, words_b, a, a_b, x_ptr, norm_ptr,
                                                 code_ptr, lut_ptr, m0, m1, stride_xm, kw, zero, mk, t0, t1, t2, t3,
                                                 t4, t5, t6, t7, NORM, FMT, LUT, CVT, X_KIND, ROWS, SWIGLU, PAIRS, WIDE)
        if WIDE:  # int8_dot's sums are 1/128 of the products'
            acc0, acc1, acc0_b, acc1_b = acc0 * 128.0, acc1 * 128.0, acc0_b * 128.0, acc1_b * 128.0
        rope = (k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, Q_ROWS, KV_ROWS, stride_kr, stride_kg,
                stride_kt, pos_divisor)
        _finish_row(acc0, acc0_b, x_ptr, m0, rn, mask_n, N, K, eps, stride_xm, stride_rm, stride_om, scale_ptr,
                    bias_ptr, res_ptr, out_ptr, has_bias, residual, rope, NORM, HAS_SCALE, SWIGLU, X_KIND, ROPE,
                    BLOCK_N, HEAD_DIM, ROT_PAIRS, ROPE_ROUND)
        if ROWS == 2:
            if m0 + 1 < M:
                _finish_row(acc1, acc1_b, x_ptr, m1, rn, mask_n, N, K, eps, stride_xm, stride_rm, stride_om,
                            scale_ptr, bias_ptr, res_ptr, out_ptr, has_bias, residual, rope, NORM, HAS_SCALE, SWIGLU,
                            X_KIND, ROPE, BLOCK_N, HEAD_DIM, ROT_PAIRS, ROPE_ROUND)

    @triton.jit
    def _words_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, N, K: tl.constexpr, kw, mk, s2, s2_b,
                      NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, BLOCKED: tl.constexpr,
                      SWIGLU: tl.constexpr, ROW_SCALE2: tl.constexpr):
        # the absmax of each word of the tile [rows, kw], and of the rows N further (SwiGLU's up half; else a)
        if BLOCKED:  # rows hold whole blocks: the index from row and column, without dividing a row-major
            # element offset (fewer integer ops a word)
            blk = rows[:, None] * (K // BS) + (kw.to(tl.uint32) // (BS // 8)).to(tl.int32)[None, :]
        else:
            blk = (rows[:, None] * K + 8 * kw[None, :]) // BS
        a = _word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mk, s2, NESTED, BS2, ROW_SCALE2)
        a_b = a
        if SWIGLU:
            if BLOCKED:
                blk = blk + N * (K // BS)
            else:
                blk = ((rows + N)[:, None] * K + 8 * kw[None, :]) // BS
            a_b = _word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mk, s2_b, NESTED, BS2, ROW_SCALE2)
        return a, a_b

    @triton.jit
    def _row_scale2(absmax2_ptr, rows, N, K: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                    ROW_SCALE2: tl.constexpr, SWIGLU: tl.constexpr):
        # ROW_SCALE2: the second-level scale of each of the program's rows ([BLOCK_N, 1]) and of the rows N further
        # (SwiGLU's up half); else unused zeros
        s2 = 0.0
        s2_b = 0.0
        if ROW_SCALE2:
            s2 = tl.load(absmax2_ptr + ((rows * (K // BS)).to(tl.uint32) // BS2).to(tl.int32)[:, None])
            s2_b = s2
            if SWIGLU:
                s2_b = tl.load(absmax2_ptr + (((rows + N) * (K // BS)).to(tl.uint32) // BS2).to(tl.int32)[:, None])
        return s2, s2_b

    @triton.jit
    def _tile_words(w_ptr, rows, N, KW, kw, mk, SWIGLU: tl.constexpr):
        # words kw of the program's rows, and of the rows N further (SwiGLU's up half); where mk is False, 0
        words = masked_load(w_ptr + rows[:, None] * KW + kw[None, :], mk, 0)
        words_b = words
        if SWIGLU:
            words_b = masked_load(w_ptr + (rows + N)[:, None] * KW + kw[None, :], mk, 0)
        return words, words_b

    @triton.jit
    def _finish_row(acc, acc_b, x_ptr, m, rn, mask_n, N, K, eps, stride_xm, stride_rm, stride_om, scale_ptr,
                    bias_ptr, res_ptr, out_ptr, has_bias, residual, rope, NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
                    SWIGLU: tl.constexpr, X_KIND: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr):
        # row m's sums [BLOCK_N, BLOCK_W] -> the shared epilogue (norm factor, scale, bias, SwiGLU, residual), or
        # (ROPE) the rotary + cache write
        a = tl.sum(acc, axis=1)
        b = tl.sum(acc_b, axis=1)
        r = tl.full([1], 1.0, dtype=tl.float32)
        if NORM:
            r = r * tl.rsqrt(_sum_squares(x_ptr, stride_xm, m, K, X_KIND) / K + eps)
        if ROPE:
            a = _scale_bias(a[None, :] * r[:, None], rn, mask_n, scale_ptr, bias_ptr, has_bias, HAS_SCALE)
            _rope_store(tl.reshape(a, [BLOCK_N]), rn, mask_n, m, out_ptr + m * stride_om, rope, BLOCK_N, HEAD_DIM,
                        ROT_PAIRS, ROPE_ROUND)
        else:
            rm = tl.zeros([1], dtype=tl.int64) + m
            _epilogue(a[None, :], b[None, :], r, rm, rn, rm >= 0, mask_n, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                      stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)

    @triton.jit
    def _rope_store(y, rn, mask_n, m, out_ptr, rope, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr):
        # y [BLOCK_N]: QKV rows rn of activation row m (an even BLOCK_N from an even row: whole rotary pairs).
        # Rounded to the output dtype, as the rotary kernel after a plain linear would read them, split into rotary
        # pairs; then rotated at row m's position, q into out_ptr, k and v into row m's cache slot (its prefix, then
        # its tokens)
        k_ptr, v_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, Q_ROWS, KV_ROWS, stride_kr, stride_kg, stride_kt, divisor = rope
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        ye, yo = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
        row, _ = tl.split(tl.reshape(rn, [BLOCK_N // 2, 2]))
        mask, _ = tl.split(tl.reshape(mask_n, [BLOCK_N // 2, 2]))
        pos = tl.load(pos_ptr + m).to(tl.int64)
        slot = tl.maximum(tl.load(prefix_ptr + m).to(tl.int64) + pos, 0)
        row_cache = m.to(tl.int64) * stride_kr
        rotate_pairs_store(ye, yo, row, mask, pos, slot, out_ptr, k_ptr + row_cache, v_ptr + row_cache, inv_freq_ptr,
                           divisor, Q_ROWS, KV_ROWS, stride_kg, stride_kt, HEAD_DIM, ROT_PAIRS, ROPE_ROUND)


def row_scale2(w: QuantizedWeight) -> bool:
    """Whether each weight row of nested NF4 lies within one group of ``blocksize2`` blocks (K = 4096 with
    bitsandbytes' 64 and 256: qkv, dense, fc1), so that a row has one second-level scale."""
    blocks = w.k // w.blocksize if w.fmt == "nf4" else 0
    return bool(w.nested and blocks and w.k % w.blocksize == 0 and w.blocksize2 % blocks == 0)


def takes_rope(cfg, swiglu: bool = False) -> bool:
    """Whether the words kernel at this tile can do the rotary + cache write in its epilogue: whole rotary pairs
    (an even number of output rows a program) and no SwiGLU."""
    return cfg.kernel == "words" and cfg.block_n % 2 == 0 and not swiglu


def _rope_args(rope, x: torch.Tensor, w: QuantizedWeight, dummy) -> tuple[tuple, dict]:
    """The kernel's rotary arguments and constexprs: ``rope`` (an ``attention_batch.RopeWrite``), or unused ones."""
    if rope is None:
        return (dummy, dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 1.0), {}
    kc = rope.k_cache
    q_rows, kv_rows = rope.num_heads * rope.head_dim, rope.num_groups * rope.head_dim
    if (w.n != q_rows + 2 * kv_rows or kc.shape[0] < x.shape[0] or kc.stride(-1) != 1 or kc.shape[-1] % 2
            or rope.v_cache.stride() != kc.stride()):
        raise ValueError(f"a QKV weight of {w.n} rows does not match a cache of {tuple(kc.shape)} with "
                         f"{rope.num_heads} heads")
    args = (kc, rope.v_cache, rope.positions, rope.prefix_lens, rope.inv_freq, q_rows, kv_rows, kc.stride(0),
            kc.stride(1), kc.stride(2), float(rope.position_divisor))
    return args, dict(ROPE=True, HEAD_DIM=rope.head_dim, ROT_PAIRS=rope.inv_freq.numel(),
                      ROPE_ROUND=round_mode(rope.angle_dtype))


def launch(x, w: QuantizedWeight, out, bias, residual, norm_weight, eps: float, swiglu: bool, cfg, pdl: bool,
           lut, dummy, rope=None) -> None:
    """Run the words kernel (cfg: a ``gemv_4bit.QuantLinearConfig``, block_m rows a program: 1 or 2). ``rope``
    (an ``attention_batch.RopeWrite``, where ``takes_rope``): rotary on q and k, q into out's first H * D
    columns, k and v into each row's cache slot; out's other columns are not written."""
    if not usable(x, w, norm_weight, cfg.lut, cfg.cvt):
        raise ValueError("the words kernel cannot read these: it needs K a multiple of the weights a word holds, "
                         "an aligned weight and 16-bit rows of even stride (16-bit rows on a GPU for lut 3)")
    if rope is not None and (not takes_rope(cfg, swiglu) or residual is not None):
        raise ValueError("the rotary epilogue needs an even block_n, and no SwiGLU or residual")
    rope_args, rope_consts = _rope_args(rope, x, w, dummy)
    M = x.shape[0]
    n_out = w.n // 2 if swiglu else w.n
    kind = X_KIND[x.dtype]
    x_arg = x if kind == 0 else x.view(torch.int32)
    stride_xm = x.stride(0) if kind == 0 else x.stride(0) // 2
    norm_arg = norm_weight if norm_weight is not None else dummy
    if kind and norm_weight is not None:
        norm_arg = norm_weight.view(torch.int32)
    nf4 = w.fmt == "nf4"
    res = residual if residual is not None else dummy
    rows = max(1, min(2, cfg.block_m))
    wide = w.fmt == "int8" and cfg.cvt == 3
    per_word = 4 if w.fmt == "int8" and not wide else 8  # weights a word (32-bit; 64-bit when wide)
    table = w.table_registers.get(x.dtype, (0,) * 8) if cfg.lut == 3 else (0,) * 8
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(M, rows))
    words = w.data.reshape(-1).view(torch.int64 if wide else torch.int32)
    _gemv_words_kernel[grid](
        x_arg, words, w.absmax if nf4 else dummy, w.code if nf4 else dummy, lut,
        w.code2 if w.nested else dummy, w.absmax2 if w.nested else dummy, w.offset,
        w.scale if w.scale is not None else dummy, bias if bias is not None else dummy, norm_arg, res, out,
        M, n_out, w.k, eps, stride_xm, res.stride(0), out.stride(0), int(bias is not None), int(residual is not None),
        *table, *rope_args,
        NORM=norm_weight is not None, FMT=_FMT_ID[w.fmt], LUT=cfg.lut, CVT=cfg.cvt if w.fmt == "int8" else 0,
        NESTED=w.nested,
        BS=w.blocksize if nf4 else 8, BS2=w.blocksize2, BLOCKED=w.k % (w.blocksize if nf4 else 8) == 0,
        HAS_SCALE=w.scale is not None, SWIGLU=swiglu, X_KIND=kind,
        ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_k // per_word, EVEN_K=w.k % cfg.block_k == 0,
        EVEN_N=n_out % cfg.block_n == 0, PDL=pdl, PREFETCH=cfg.prefetch, ROW_SCALE2=row_scale2(w), **rope_consts,
        num_warps=cfg.num_warps, num_stages=1,
        **({"launch_pdl": True} if pdl else {}),
    )
