"""Products of quantized weights and 16-bit activations taken two at a time (``fma.rn.{bf16x2,f16x2}``), the
weights decoded in registers: 4-bit codes from a 16-entry table (any 4-bit code), int8 bytes by an exponent
trick (fp16 rows). Inline PTX for the words kernel (``quant_words``).

4-bit codes.

Why: the words kernel (``quant_words``) spends most of a 4-bit weight's instructions on decoding it: a nibble
shifted out, a 64-bit table address, an L1 load, then a float32 FMA, about 5 a weight before the activations.
On an H200 the NF4 weights of one token arrive at ~10 weights a cycle an SM, which leaves ~12 issue slots a
weight at best, so that path caps NF4 at a fraction of the bandwidth (bench/NOTES.md run 20: 29% on an H100).
Here the table lives in 8 registers (the 16 codes' low bytes in 4, their high bytes in 4, as 16-bit values:
bf16 or fp16, the activations' type) and ``prmt`` (byte permute) looks up 4 nibbles at once, so a word of 8
weights decodes in 16 permutes and 4 selector ops, and the products are ``fma.rn.{bf16x2,f16x2}``: two weights
an instruction, against the activations as loaded (two 16-bit values a 32-bit word, no widening). About 3.5
instructions a weight in all, instead of ~5 plus the activations' widening. No Triton operation lowers to a
byte permute of a register table (Triton's gathers go through shared memory), hence inline PTX.

Rounding: each word's eight products are summed in the 16-bit type (two lanes of four), then widened to
float32 and scaled by the block's absmax in float32 by the caller. The codes are rounded to the 16-bit type
first (as ``dequantize_4bit`` to bf16 rounds the scaled weight). The tuner checks each candidate's output
against its float32 default, so a card or compiler where this disagrees never picks it.

Works for any 16-entry code (NF4, FP4, the int4 release's signed nibbles); nibble order as stored: byte i of a
word holds the even column in its high nibble.

Shared table (``lut`` 4, for kernels whose programs cover many rows: ``quant_persistent``). The register table
spends 16 permutes and 6 selector ops a word on the integer pipe, which ncu found near its limit (bench/NOTES.md
run 34). Instead each program fills 32 KB of shared memory with a byte-pair table: byte b -> (code[b >> 4],
code[b & 15]) as a 16-bit pair, the even column in the low lane, replicated 32 times so that lane l always reads
word 32b + l, its own bank (no conflicts whatever the bytes). A word then costs, per byte, a permute isolating it, a
multiply-add making its address and one shared load: 4 of each, where the register table took 22 integer ops.
The table is declared by inline PTX (function-scope ``.shared``: Triton has no gather from shared memory that the
kernel owns), filled once a program, then a barrier.

int8 (fp16 rows only). A byte u placed under the fp16 exponent of 8.0 (bits 0x48uu) is 8 + u/128, exactly; with
u = b xor 0x80 (the signed byte b offset by 128) and 9 subtracted, it is b/128, exactly. So two weights take a
permute and a packed add, and the words' sums come out 1/128 of the row's (the caller multiplies once after
its K loop). bf16 has 7 mantissa bits: a byte does not fit, so bf16 rows keep the float32 path.
"""

from __future__ import annotations

import os

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


def tried() -> bool:
    """Whether the tuners try these kernels: on a GPU (Triton's interpreter cannot run inline PTX), unless bench/
    turns them off for an A/B (``GLMCHAT_PACKED_PRODUCTS=0``, not a user setting)."""
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("GLMCHAT_PACKED_PRODUCTS", "1") != "0"


INT4_CODE = [float(v) for v in range(8)] + [float(v) for v in range(-8, 0)]  # signed nibble -> value

# prmt selectors: bytes {P_H, P_L} (P_L = low bytes of the 4 looked-up codes, P_H = high bytes; byte k is
# nibble k's code) -> two 16-bit pairs, the even column (the byte's high nibble, odd nibble k) in the low lane
_PAIR_SELECTORS = ("0x4051", "0x6273")


def _code_bits(code, dtype: torch.dtype) -> torch.Tensor:
    """int64 [16]: each of the 16 code values rounded to ``dtype`` (bf16 or fp16), its 16 bits."""
    values = torch.as_tensor(code, dtype=torch.float32).detach().cpu().reshape(-1)
    if values.numel() != 16:
        raise ValueError(f"a 4-bit code has 16 values, this one {values.numel()}")
    return values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def byte_planes(code, dtype: torch.dtype) -> tuple[int, ...]:
    """The 8 table registers for 16 code values rounded to ``dtype`` (bf16 or fp16), as signed int32: low bytes
    of codes 0-3, 4-7, 8-11, 12-15, then their high bytes (byte k of a register holds code 4r + k's byte)."""
    bits = _code_bits(code, dtype)
    planes = []
    for shift in (0, 8):
        plane = (bits >> shift) & 0xFF
        for r in range(4):
            word = sum(int(plane[4 * r + k]) << (8 * k) for k in range(4))
            planes.append(word - (1 << 32) if word >= 1 << 31 else word)
    return tuple(planes)


def _widened_sums(rows: int, bf16: bool) -> list[str]:
    # each row's packed sum (acc0, acc1) -> float32 outputs $0, $1
    lines = []
    for r in range(rows):
        if bf16:  # a bf16 is the top half of a float32
            lines += [f"shl.b32 t, acc{r}, 16;", f"and.b32 a, acc{r}, 0xFFFF0000;", "mov.b32 fa, t;", "mov.b32 fb, a;"]
        else:
            lines += [f"mov.b32 {{lo, hi}}, acc{r};", "cvt.f32.f16 fa, lo;", "cvt.f32.f16 fb, hi;"]
        lines.append(f"add.f32 ${r}, fa, fb;")
    return lines


def _products(rows: int, kind: str, x: list[list[str]]) -> list[str]:
    # acc_r = sum over the four weight pairs w0..w3 of w_i * x[r][i], lane by lane
    lines = ["mov.b32 nz, 0x80008000;"]  # -0.0 twice: x * w + (-0) is the product, rounded once
    for r in range(rows):
        lines.append(f"fma.rn.{kind} acc{r}, w0, {x[r][0]}, nz;")
        lines += [f"fma.rn.{kind} acc{r}, w{i}, {x[r][i]}, acc{r};" for i in (1, 2, 3)]
    return lines


_DECLARE = [".reg .b32 s0, s1, c0, c1, t, a, b, pl, ph, nz, w0, w1, w2, w3, acc0, acc1;", ".reg .b16 lo, hi;",
            ".reg .f32 fa, fb;"]


def dot_asm(rows: int, bf16: bool) -> str:
    """PTX for one word: outputs ``$0`` (and ``$1`` at two rows), float32 sums of its 8 weights times the
    row's 8 activations; inputs the word, 4 activation pairs a row, then the 8 table registers."""
    kind = "bf16x2" if bf16 else "f16x2"
    word = f"${rows}"
    x = [[f"${rows + 1 + 4 * r + i}" for i in range(4)] for r in range(rows)]
    t = [f"${rows + 1 + 4 * rows + i}" for i in range(8)]
    lines = [
        "{",
        *_DECLARE,
        # selectors: nibble bits 0-2 index a table half; bit 3 (moved to bit 2, over byte k's own index k)
        # picks which half's byte k is kept
        f"and.b32 s0, {word}, 0x77777777;",
        "shr.u32 s1, s0, 16;",
        f"shr.u32 t, {word}, 1;",
        "lop3.b32 c0, t, 0x4444, 0x3210, 0xEA;",
        f"shr.u32 t, {word}, 17;",
        "lop3.b32 c1, t, 0x4444, 0x3210, 0xEA;",
    ]
    for half in (0, 1):
        for plane, regs in (("pl", t[:4]), ("ph", t[4:])):
            lines += [f"prmt.b32 a, {regs[0]}, {regs[1]}, s{half};", f"prmt.b32 b, {regs[2]}, {regs[3]}, s{half};",
                      f"prmt.b32 {plane}, a, b, c{half};"]
        lines += [f"prmt.b32 w{2 * half + i}, pl, ph, {sel};" for i, sel in enumerate(_PAIR_SELECTORS)]
    lines += _products(rows, kind, x) + _widened_sums(rows, bf16) + ["}"]
    return "\n".join(lines)


TABLE_WORDS = 256 * 32  # the shared byte-pair table: 256 pairs, each replicated for the 32 lanes (32 KB)


def pair_words(code, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256]: byte b -> the 16-bit pair (code[b >> 4] in the low half, code[b & 15] in the high half) rounded
    to ``dtype``, the shared table's entries (as ``byte_planes``' pairs)."""
    bits = _code_bits(code, dtype)
    b = torch.arange(256)
    pairs = bits[b >> 4] | bits[b & 15] << 16
    return torch.where(pairs >= 1 << 31, pairs - (1 << 32), pairs).to(torch.int32)


def shared_table_asm() -> str:
    """PTX declaring the shared byte-pair table once (function scope) and giving its address; ``$1`` is unused (a
    scalar operand, so Triton emits the block once)."""
    return f".shared .align 16 .b32 glmchat_byte_pairs[{TABLE_WORDS}];\nmov.u32 $0, glmchat_byte_pairs;"


def lane_offset_asm() -> str:
    """PTX: ``$0`` = this thread's lane times 4 (its replica's byte offset in a row of the table)."""
    return "{\n.reg .u32 l;\nmov.u32 l, %laneid;\nshl.b32 $0, l, 2;\n}"


def store_shared_asm() -> str:
    """PTX: store ``$2`` at shared address ``$1``; ``$0`` is a dummy result (Triton's inline assembly has one)."""
    return "st.shared.b32 [$1], $2;\nmov.u32 $0, 0;"


def shared_dot_asm(rows: int, bf16: bool) -> str:
    """PTX for one word against the shared table: outputs ``$0`` (and ``$1`` at two rows), float32 sums of its 8
    weights times the row's 8 activations; inputs the word, 4 activation pairs a row, then this lane's table
    address (base + 4 * lane)."""
    kind = "bf16x2" if bf16 else "f16x2"
    word = f"${rows}"
    x = [[f"${rows + 1 + 4 * r + i}" for i in range(4)] for r in range(rows)]
    lane_table = f"${rows + 1 + 4 * rows}"
    lines = ["{", *_DECLARE, "mov.b32 b, 0;"]
    for i in range(4):  # byte i: isolated by a permute (zeros above), times 128 bytes a table row, plus the lane's
        lines += [f"prmt.b32 t, {word}, b, 0x444{i};", f"mad.lo.u32 a, t, 128, {lane_table};",
                  f"ld.shared.b32 w{i}, [a];"]
    lines += _products(rows, kind, x) + _widened_sums(rows, bf16) + ["}"]
    return "\n".join(lines)


def int8_dot_asm(rows: int) -> str:
    """PTX for 8 int8 weights (two words, ``$rows`` and the next) against each row's 4 fp16 activation pairs:
    float32 outputs ``$0`` (``$1``), 1/128 of the sums. Then the 4 rows' pairs."""
    lo, hi = f"${rows}", f"${rows + 1}"
    x = [[f"${rows + 2 + 4 * r + i}" for i in range(4)] for r in range(rows)]
    lines = ["{", *_DECLARE, "mov.b32 b, 0x48484848;", "mov.b32 c0, 0xC880C880;"]  # c0: -9.0 twice
    for half, word in enumerate((lo, hi)):
        lines.append(f"xor.b32 a, {word}, 0x80808080;")
        for i, sel in enumerate(("0x4140", "0x4342")):
            lines += [f"prmt.b32 t, a, b, {sel};", f"add.rn.f16x2 w{2 * half + i}, t, c0;"]
    lines += _products(rows, "f16x2", x) + _widened_sums(rows, False) + ["}"]
    return "\n".join(lines)


def widen_int8_asm() -> str:
    """PTX: 4 int8 (one packed register ``$2``) to 4 fp16 (``$0``, ``$1``), exactly: a byte u under the fp16
    exponent of 1024 is 1024 + u, so (b xor 0x80) under it minus 1152 is b. For the int8 matmul's tiles, in place
    of a conversion instruction per byte (a quarter of the FMA rate on sm_90) and the permutes packing them."""
    return ("{\n.reg .b32 a, b, c;\nxor.b32 a, $2, 0x80808080;\nmov.b32 b, 0x64646464;\nmov.b32 c, 0xE480E480;\n"
            "prmt.b32 $0, a, b, 0x4140;\nprmt.b32 $1, a, b, 0x4342;\nadd.rn.f16x2 $0, $0, c;\nadd.rn.f16x2 $1, $1, c;\n}")


def mul_asm(bf16: bool) -> str:
    """PTX: ``$0`` = the two 16-bit products of ``$1`` and ``$2`` (two values each), each rounded once, as the
    other kernels round the norm weight's product (float32 product, exact for 16-bit inputs, then rounded)."""
    kind = "bf16x2" if bf16 else "f16x2"
    return "{\n.reg .b32 nz;\nmov.b32 nz, 0x80008000;\n" + f"fma.rn.{kind} $0, $1, $2, nz;\n" + "}"


if HAVE_TRITON:
    _DOT1_BF16 = tl.constexpr(dot_asm(1, True))
    _DOT1_F16 = tl.constexpr(dot_asm(1, False))
    _DOT2_BF16 = tl.constexpr(dot_asm(2, True))
    _DOT2_F16 = tl.constexpr(dot_asm(2, False))
    _INT8_DOT1 = tl.constexpr(int8_dot_asm(1))
    _INT8_DOT2 = tl.constexpr(int8_dot_asm(2))
    _WIDEN_INT8 = tl.constexpr(widen_int8_asm())
    _SHARED_TABLE = tl.constexpr(shared_table_asm())
    _LANE_OFFSET = tl.constexpr(lane_offset_asm())
    _STORE_SHARED = tl.constexpr(store_shared_asm())
    _TABLE_WORDS = tl.constexpr(TABLE_WORDS)
    _SHARED_DOT1_BF16 = tl.constexpr(shared_dot_asm(1, True))
    _SHARED_DOT1_F16 = tl.constexpr(shared_dot_asm(1, False))
    _SHARED_DOT2_BF16 = tl.constexpr(shared_dot_asm(2, True))
    _SHARED_DOT2_F16 = tl.constexpr(shared_dot_asm(2, False))
    _MUL_BF16 = tl.constexpr(mul_asm(True))
    _MUL_F16 = tl.constexpr(mul_asm(False))

    @triton.jit
    def masked_load(ptr, mask, other):
        # a load, unpredicated when mask is None (whole tiles)
        if mask is None:
            v = tl.load(ptr)
        else:
            v = tl.load(ptr, mask=mask, other=other)
        return v

    @triton.jit
    def packed_mul(x, g, BF16: tl.constexpr):
        # int32 tiles of 16-bit pairs: x * g per lane, rounded to the 16-bit type
        if BF16:
            y = tl.inline_asm_elementwise(_MUL_BF16, "=r,r,r", [x, g], dtype=tl.int32, is_pure=True, pack=1)
        else:
            y = tl.inline_asm_elementwise(_MUL_F16, "=r,r,r", [x, g], dtype=tl.int32, is_pure=True, pack=1)
        return y

    @triton.jit
    def packed_dot(words, x0, x1, x2, x3, t0, t1, t2, t3, t4, t5, t6, t7, BF16: tl.constexpr):
        # float32 [tile]: each word's 8 weights (table t0..t7) times activation pairs x0..x3 (int32 tiles)
        args = [words, x0, x1, x2, x3, t0, t1, t2, t3, t4, t5, t6, t7]
        if BF16:
            s = tl.inline_asm_elementwise(_DOT1_BF16, "=f" + ",r" * 13, args, dtype=tl.float32, is_pure=True, pack=1)
        else:
            s = tl.inline_asm_elementwise(_DOT1_F16, "=f" + ",r" * 13, args, dtype=tl.float32, is_pure=True, pack=1)
        return s

    @triton.jit
    def shared_pair_table(pairs_ptr, anchor):
        # fill this program's shared byte-pair table from pairs_ptr (int32 [256], ``pair_words``), then a barrier;
        # returns this lane's table address (base + 4 * lane). anchor: any scalar (the declaring block's operand)
        base = tl.inline_asm_elementwise(_SHARED_TABLE, "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1)
        for start in tl.static_range(0, _TABLE_WORDS, 1024):
            word = start + tl.arange(0, 1024)  # word 32b + l holds pair b
            value = tl.load(pairs_ptr + word // 32)
            tl.inline_asm_elementwise(_STORE_SHARED, "=r,r,r", [base + 4 * word, value], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()
        return base + tl.inline_asm_elementwise(_LANE_OFFSET, "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def shared_dot(words, x0, x1, x2, x3, lane_table, BF16: tl.constexpr):
        # float32 [tile]: each word's 8 weights (the shared table at lane_table) times activation pairs x0..x3;
        # not pure: its loads must stay after the barrier that ends the table's fill
        args = [words, x0, x1, x2, x3, lane_table + tl.zeros(words.shape, dtype=tl.int32)]
        if BF16:
            s = tl.inline_asm_elementwise(_SHARED_DOT1_BF16, "=f" + ",r" * 6, args, dtype=tl.float32, is_pure=False,
                                          pack=1)
        else:
            s = tl.inline_asm_elementwise(_SHARED_DOT1_F16, "=f" + ",r" * 6, args, dtype=tl.float32, is_pure=False,
                                          pack=1)
        return s

    @triton.jit
    def shared_dot2(words, x0, x1, x2, x3, y0, y1, y2, y3, lane_table, BF16: tl.constexpr):
        # shared_dot for two activation rows (x, y) sharing each word's looked-up weights: (row x sums, row y sums)
        args = [words, x0, x1, x2, x3, y0, y1, y2, y3, lane_table + tl.zeros(words.shape, dtype=tl.int32)]
        if BF16:
            s, u = tl.inline_asm_elementwise(_SHARED_DOT2_BF16, "=f,=f" + ",r" * 10, args,
                                             dtype=(tl.float32, tl.float32), is_pure=False, pack=1)
        else:
            s, u = tl.inline_asm_elementwise(_SHARED_DOT2_F16, "=f,=f" + ",r" * 10, args,
                                             dtype=(tl.float32, tl.float32), is_pure=False, pack=1)
        return s, u

    @triton.jit
    def packed_dot2(words, x0, x1, x2, x3, y0, y1, y2, y3, t0, t1, t2, t3, t4, t5, t6, t7, BF16: tl.constexpr):
        # packed_dot for two activation rows (x, y) sharing each word's decoded weights: (row x sums, row y sums)
        args = [words, x0, x1, x2, x3, y0, y1, y2, y3, t0, t1, t2, t3, t4, t5, t6, t7]
        if BF16:
            s, u = tl.inline_asm_elementwise(_DOT2_BF16, "=f,=f" + ",r" * 17, args, dtype=(tl.float32, tl.float32),
                                             is_pure=True, pack=1)
        else:
            s, u = tl.inline_asm_elementwise(_DOT2_F16, "=f,=f" + ",r" * 17, args, dtype=(tl.float32, tl.float32),
                                             is_pure=True, pack=1)
        return s, u

    @triton.jit
    def word_pairs(pairs_ptr, norm_pairs_ptr, kw, zero, mask, NORM: tl.constexpr, BF16: tl.constexpr):
        # the 4 int32 pairs of 16-bit activations that meet each word kw of the tile (4kw .. 4kw + 3), as 4 tiles
        # of the words' shape, times the norm weight's pairs when NORM (rounded once, as packed_mul); mask None:
        # unpredicated. Loaded as one [rows, words, 4] tile, so each word's pairs are one 16-byte load, not four
        # 4-byte ones (sm_90 SASS with the device's Triton 3.6, global loads in the kernel: NF4 fc1 at 4 x 2048,
        # 68 -> 44; int8 cvt 3 fc1 at 2 x 2048, 2 warps, 90 -> 42); the splits stay in the thread's registers,
        # so the loop keeps the words' layout (no barrier)
        pair = tl.max_contiguous(tl.multiple_of((4 * kw[None, :] + zero)[:, :, None] + tl.arange(0, 4)[None, None, :],
                                                [1, 1, 4]), [1, 1, 4])
        mask = None if mask is None else mask[:, :, None]
        x = masked_load(pairs_ptr + pair, mask, 0)
        if NORM:
            x = packed_mul(x, masked_load(norm_pairs_ptr + pair, mask, 0), BF16)
        even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 2, 2)))  # pairs (0, 2) and (1, 3)
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def int8_dot(lo, hi, x0, x1, x2, x3):
        # float32 [tile]: 1/128 of 8 int8 weights (words lo, hi: columns 0-3, 4-7) times fp16 pairs x0..x3
        return tl.inline_asm_elementwise(_INT8_DOT1, "=f" + ",r" * 6, [lo, hi, x0, x1, x2, x3], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def int8_dot2(lo, hi, x0, x1, x2, x3, y0, y1, y2, y3):
        # int8_dot for two rows (x, y) sharing the widened weights
        return tl.inline_asm_elementwise(_INT8_DOT2, "=f,=f" + ",r" * 10, [lo, hi, x0, x1, x2, x3, y0, y1, y2, y3],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def int8_words_sums(words, words_b, x_ptr, norm_ptr, m0, m1, stride_xm, kw, zero, mk, NORM: tl.constexpr,
                        ROWS: tl.constexpr, TWO_SETS: tl.constexpr):
        # int8 weights read as 64-bit words (8 weights, word tile [rows, kw]) against fp16 rows m0 (and m1 at
        # ROWS 2) of x, 16-bit pairs at x_ptr: (row m0 x words, row m1 x words, row m0 x words_b, row m1 x
        # words_b), each 1/128 of the sums (int8_dot); words_b (a second set of weight rows: SwiGLU's up half, or
        # the one-row GEMV's second row) only when TWO_SETS
        x0, x1, x2, x3 = word_pairs(x_ptr + m0 * stride_xm, norm_ptr, kw, zero, mk, NORM, False)
        lo, hi = words.to(tl.int32), (words >> 32).to(tl.int32)
        lo_b, hi_b = words_b.to(tl.int32), (words_b >> 32).to(tl.int32)
        p1 = tl.zeros(words.shape, dtype=tl.float32)
        p0_b = tl.zeros(words.shape, dtype=tl.float32)
        p1_b = tl.zeros(words.shape, dtype=tl.float32)
        if ROWS == 2:
            y0, y1, y2, y3 = word_pairs(x_ptr + m1 * stride_xm, norm_ptr, kw, zero, mk, NORM, False)
            p0, p1 = int8_dot2(lo, hi, x0, x1, x2, x3, y0, y1, y2, y3)
            if TWO_SETS:
                p0_b, p1_b = int8_dot2(lo_b, hi_b, x0, x1, x2, x3, y0, y1, y2, y3)
        else:
            p0 = int8_dot(lo, hi, x0, x1, x2, x3)
            if TWO_SETS:
                p0_b = int8_dot(lo_b, hi_b, x0, x1, x2, x3)
        return p0, p1, p0_b, p1_b

    @triton.jit
    def widen_int8_f16(w):
        # int8 tile -> the same values in fp16 (widen_int8_asm), four bytes a register
        return tl.inline_asm_elementwise(_WIDEN_INT8, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
