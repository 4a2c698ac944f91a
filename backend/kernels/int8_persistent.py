"""A persistent one-row GEMV for int8 weights against fp16 activations (``int8_gemv``'s products two at a time,
CVT 3): ``int8_gemv.gemv``'s kernel when its tile asks for ``programs_per_sm``, a candidate of the one-row step's
descent for the 8-bit model (fp16, as the original's).

Why: ``int8_gemv``'s kernel runs one short program per few weight rows (qkv at 2 row pairs a program: 1152
programs), and each loads the activation row and the norm weight again (as many bytes as the program's weights,
from L2) and makes the norm's sum of squares in a pass of its own at its end. On an H100 qkv and dense ran at
~62% of the bandwidth bound inside the step while fc1 and fc2 ran at 81-101% (bench/NOTES.md run 35). Here, as in
``quant_persistent`` (which took NF4 chat from 42% to 55.5% of its bound), a few programs an SM each load the row
once (times the norm weight, rounded as the other kernels round it; its sum of squares once), keep it in
registers in the weight tile's layout, and loop over blocks of row pairs: a block is a whole row of K for each of
its weight rows, one 16-byte load (two 64-bit words) a thread at a time, and the next block's words are asked for
before this block's products. The epilogue is ``int8_gemv``'s (``finish_pairs``): the bias, the residual, SwiGLU,
rotary with the cache write, the greedy pick.

The whole of K is one tile, so K/8 rounds up to a power of two (fc2's 1712 words to 2048: its padding words are
masked off and cost issue slots, not bytes).
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pair_epilogue import finish_pairs
    from .packed_products import int8_dot, masked_load
    from .quant_persistent import across_warps, words_index, x_words

MAX_WORDS = 4096  # K up to 32768: a thread's share of x stays in registers at 4-8 warps
WORDS_A_GROUP = 2  # 64-bit words a thread loads at once (16 bytes)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can read this call (``int8_gemv.takes_packed`` holds already): K a multiple of 16 (whole
    16-byte groups) within MAX_WORDS words, and the weight 16-byte aligned."""
    k = weight.shape[1]
    return k % 16 == 0 and k // 8 <= MAX_WORDS and weight.data_ptr() % 16 == 0 and x.is_contiguous()


if HAVE_TRITON:

    @triton.jit
    def _pairs(block, BLOCK_P: tl.constexpr, N_PAIRS, ROW_STEP, B_OFF, N):
        # block `block`'s row pairs p and their rows a = p * ROW_STEP, b = a + B_OFF (as int8_gemv's kernel)
        p = block * BLOCK_P + tl.arange(0, BLOCK_P)
        row_a = p * ROW_STEP
        row_b = row_a + B_OFF
        mask_a = p < N_PAIRS
        return p, row_a, row_b, mask_a, mask_a & (row_b < N)

    @triton.jit
    def _block_words(words_ptr, block, mg, N_PAIRS, ROW_STEP, B_OFF, N, K: tl.constexpr, BLOCK_P: tl.constexpr,
                     G: tl.constexpr):
        # block `block`'s words, rows a and b: two [BLOCK_P, G, 2] int64 tiles; rows out of range (a last partial
        # block, or a block past the end) masked off, their addresses clamped to row 0
        _, row_a, row_b, mask_a, mask_b = _pairs(block, BLOCK_P, N_PAIRS, ROW_STEP, B_OFF, N)
        idx = words_index(G, 2)
        ra = tl.where(mask_a, row_a, 0).to(tl.int64)[:, None, None] * (K // 8)
        rb = tl.where(mask_b, row_b, 0).to(tl.int64)[:, None, None] * (K // 8)
        ma = mask_a[:, None, None] if mg is None else mask_a[:, None, None] & mg[None, :, None]
        mb = mask_b[:, None, None] if mg is None else mask_b[:, None, None] & mg[None, :, None]
        return masked_load(words_ptr + ra + idx, ma, 0), masked_load(words_ptr + rb + idx, mb, 0)

    @triton.jit
    def _pair_sums(wa, wb, x0, x1, x2, x3):
        # ([BLOCK_P], [BLOCK_P]): rows a and b's int8 words times x (int8_dot's sums are 1/128 of the products),
        # summed across the program's warps together (one exchange through shared memory, not one a row set)
        pa = tl.sum(int8_dot(wa.to(tl.int32), (wa >> 32).to(tl.int32), x0, x1, x2, x3), axis=2)
        pb = tl.sum(int8_dot(wb.to(tl.int32), (wb >> 32).to(tl.int32), x0, x1, x2, x3), axis=2)
        a, b = across_warps(pa, pb)
        return a * 128.0, b * 128.0

    @triton.jit
    def _persistent_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr,
        N, N_PAIRS, K: tl.constexpr, ROW_STEP, B_OFF, eps,
        Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, pos_divisor,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr, SLOT_FROM_PREFIX: tl.constexpr,
        BLOCK_P: tl.constexpr, KW_PAD: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr, ARGMAX: tl.constexpr,
    ):
        # program q: blocks q, q + programs, ... of BLOCK_P row pairs; x_ptr: fp16 x as int32 pairs
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching
            tl.extra.cuda.gdc_launch_dependents()
        G: tl.constexpr = KW_PAD // 2  # 16-byte groups of 2 words along K
        mg = None if K // 16 == G else tl.arange(0, G) < K // 16
        n_blocks = tl.cdiv(N_PAIRS, BLOCK_P)
        words_ptr = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        # the first block's weights do not depend on the kernels ahead: asked for before the wait
        wa, wb = _block_words(words_ptr, pid, mg, N_PAIRS, ROW_STEP, B_OFF, N, K, BLOCK_P, G)
        if PDL:  # x, the residual, the cache, the position: written by the kernels ahead
            tl.extra.cuda.gdc_wait()
        x0, x1, x2, x3, ss = x_words(x_ptr, norm_ptr.to(tl.pointer_type(tl.int32), bitcast=True), mg, BLOCK_P, G,
                                     NORM, 2, 2)
        r = 1.0
        if NORM:
            r = tl.rsqrt(ss / K + eps)
        for block in range(pid, n_blocks, programs):
            # the next block's loads go out before this block's products (masked off past the last block)
            wa_n, wb_n = _block_words(words_ptr, block + programs, mg, N_PAIRS, ROW_STEP, B_OFF, N, K, BLOCK_P, G)
            a, b = _pair_sums(wa, wb, x0, x1, x2, x3)
            p, row_a, row_b, mask_a, mask_b = _pairs(block, BLOCK_P, N_PAIRS, ROW_STEP, B_OFF, N)
            finish_pairs(a, b, r, p, row_a, row_b, mask_a, mask_b, scale_ptr, bias_ptr, res_ptr, out_ptr,
                         k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr, Q_ROWS, KV_ROWS,
                         cache_stride_g, cache_stride_t, pos_divisor, HEAD_DIM, ROT_PAIRS, ROPE_ROUND,
                         SLOT_FROM_PREFIX, True, NORM, HAS_BIAS, RESIDUAL, EPILOGUE, ARGMAX)
            wa, wb = wa_n, wb_n


def launch(x, weight, pointers: tuple, shape_args: tuple, meta: dict, block_p: int, programs_per_sm: int,
           num_warps: int, pdl: bool) -> None:
    """Run the kernel for ``int8_gemv.gemv``: ``pointers`` (x, weight, scale, ... best) and ``shape_args`` (N,
    N_PAIRS, K, ..., pos_divisor) as its kernel takes them, ``meta`` its epilogue's constexprs; ``block_p`` row
    pairs a block, ``programs_per_sm`` programs on each multiprocessor."""
    from .quant_persistent import multiprocessors

    n_pairs, k = shape_args[1], shape_args[2]
    programs = min(triton.cdiv(n_pairs, block_p), multiprocessors(x.device) * programs_per_sm)
    _persistent_kernel[(programs,)](
        x.view(torch.int32), *pointers[1:], *shape_args, BLOCK_P=block_p,
        KW_PAD=max(2, triton.next_power_of_2(k // 8)), PDL=pdl, num_warps=num_warps, num_stages=1,
        **meta, **({"launch_pdl": True} if pdl else {}),
    )
