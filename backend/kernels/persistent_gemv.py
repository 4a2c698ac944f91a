"""A persistent GEMV for one activation row (``int8_gemv.gemv``'s kernel when its tile asks for
``programs_per_sm``: a candidate of the one-row step's descent) or two (compare's: a ``gemv_rows`` tile), for int8
weights against fp16 rows (products two at a time, CVT 3: the 8-bit model, fp16 as the original's) and for 16-bit
weights (the bf16 model; the 8-bit model's output layer). Offered by the tuners only under
``kernels.untested_persistent_tiles`` until a GPU has run it.

Why: ``int8_gemv``'s kernel runs one short program per few weight rows (int8 qkv at 2 row pairs a program: 1152
programs), and each loads the activation row and the norm weight again (as many bytes as an int8 program's weights,
from L2) and makes the norm's sum of squares in a pass of its own at its end. On an H100 int8 qkv and dense ran at
~62% of the bandwidth bound inside the step while fc1 and fc2 ran at 81-101% (bench/NOTES.md run 35); on an H200
every one-row step is further from its bound, as each kernel's start and end weigh more there (run 48). Here, as in
``quant_persistent`` (which took NF4 chat on an H100 from 42% to 55.5% of its bound), a few programs an SM each load
the row once (times the norm weight; its sum of squares once), keep it in registers in the weight tile's layout, and
loop over blocks of row pairs: a block is a whole row of K for each of its weight rows, 16 bytes a thread at a time,
and the next block's weights are asked for before this block's products in the source (ptxas issues those loads
after them; tiles with ``l2_ahead`` ask L2 for blocks further ahead: ``weight_prefetch``). With two rows both stay in
registers and each weight is widened once for both. The epilogue is ``int8_gemv``'s
(``pair_epilogue.finish_pairs``): the bias, the residual, SwiGLU, and at one row rotary with the cache write and the
greedy pick.

The whole of K is one tile, so its 16-byte groups round up to a power of two (fc2's 1712 int8 words to 2048: the
padding is masked off and costs issue slots, not bytes).
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pair_epilogue import finish_pairs
    from .packed_products import int8_dot, int8_dot2, masked_load
    from .quant_persistent import across_warps, across_warps4, words_index, x_words
    from .weight_prefetch import prefetch_range

MAX_GROUPS = 2048  # 16-byte groups of K (int8: K up to 32768; 16-bit: 16384): x stays in registers at 4-8 warps


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can read this call (for int8, ``int8_gemv.takes_packed`` holds already): whole 16-byte
    groups along K, at most MAX_GROUPS of them, the weight 16-byte aligned, x contiguous."""
    group = 16 // weight.element_size()
    k = weight.shape[1]
    return (weight.element_size() in (1, 2) and k % group == 0 and k // group <= MAX_GROUPS
            and weight.data_ptr() % 16 == 0 and x.is_contiguous())


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
    def _block_weights(w_ptr, block, mg, N_PAIRS, ROW_STEP, B_OFF, N, K: tl.constexpr, BLOCK_P: tl.constexpr,
                       G: tl.constexpr, W_INT8: tl.constexpr):
        # block `block`'s weights, rows a and b: two [BLOCK_P, G, E] tiles of 16-byte groups (int8: E = 2 words of
        # 8 weights, as int64; 16-bit: 8 weights); rows out of range (a last partial block, or a block past the
        # end) masked off, their addresses clamped to row 0
        _, row_a, row_b, mask_a, mask_b = _pairs(block, BLOCK_P, N_PAIRS, ROW_STEP, B_OFF, N)
        if W_INT8:
            ptr = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
            idx = words_index(G, 2)
            row_len = K // 8
        else:
            ptr = w_ptr
            idx = words_index(G, 8)
            row_len = K
        ra = tl.where(mask_a, row_a, 0).to(tl.int64)[:, None, None] * row_len
        rb = tl.where(mask_b, row_b, 0).to(tl.int64)[:, None, None] * row_len
        ma = mask_a[:, None, None] if mg is None else mask_a[:, None, None] & mg[None, :, None]
        mb = mask_b[:, None, None] if mg is None else mask_b[:, None, None] & mg[None, :, None]
        return masked_load(ptr + ra + idx, ma, 0), masked_load(ptr + rb + idx, mb, 0)

    @triton.jit
    def _prefetch_block(w_ptr, block, n_blocks, N_PAIRS, ROW_STEP, B_OFF, N, K: tl.constexpr, BLOCK_P: tl.constexpr,
                        W_INT8: tl.constexpr):
        # block `block`'s weight rows asked of L2 (kernels/weight_prefetch.py): pairs p .. p + pairs - 1 are rows
        # 2p, 2p + 1 (one range; the last row may be missing, N odd) or, SwiGLU's, rows p and p + B_OFF (two
        # ranges). Nothing past the last block
        if block < n_blocks:
            first = block * BLOCK_P
            pairs = tl.minimum(N_PAIRS - first, BLOCK_P)
            row_bytes: tl.constexpr = K if W_INT8 else 2 * K
            if ROW_STEP == 2:
                prefetch_range(w_ptr + 2 * first * K, tl.minimum(2 * pairs, N - 2 * first) * row_bytes)
            else:
                prefetch_range(w_ptr + first * K, pairs * row_bytes)
                prefetch_range(w_ptr + (first + B_OFF) * K, pairs * row_bytes)

    @triton.jit
    def _x_float(x_ptr, norm_ptr, mg, BLOCK_P: tl.constexpr, G: tl.constexpr, NORM: tl.constexpr):
        # 16-bit weights: x as float32 in the weight tile's layout ([BLOCK_P, G, 8], times the norm weight in
        # float32, as int8_gemv's kernel), and the row's sum of squares (unnormed)
        idx = tl.reshape(words_index(G, 8), (G, 8))
        m = None if mg is None else tl.reshape(mg, (G, 1))
        x = masked_load(x_ptr + idx, m, 0.0).to(tl.float32)
        ss = tl.sum(tl.sum(x * x, axis=1), axis=0)
        if NORM:
            x = x * masked_load(norm_ptr + idx, m, 0.0).to(tl.float32)
        return tl.broadcast_to(x[None, :, :], (BLOCK_P, G, 8)), ss

    @triton.jit
    def _int8_sums(wa, wb, x0, x1, x2, x3):
        # ([BLOCK_P], [BLOCK_P]): rows a and b's int8 words times x (int8_dot's sums are 1/128 of the products)
        pa = tl.sum(int8_dot(wa.to(tl.int32), (wa >> 32).to(tl.int32), x0, x1, x2, x3), axis=2)
        pb = tl.sum(int8_dot(wb.to(tl.int32), (wb >> 32).to(tl.int32), x0, x1, x2, x3), axis=2)
        a, b = across_warps(pa, pb)
        return a * 128.0, b * 128.0

    @triton.jit
    def _int8_sums2(wa, wb, x0, x1, x2, x3, z0, z1, z2, z3):
        # _int8_sums for two activation rows (x, z) sharing each word's widened weights: a, b, then z's a, b
        pa, qa = int8_dot2(wa.to(tl.int32), (wa >> 32).to(tl.int32), x0, x1, x2, x3, z0, z1, z2, z3)
        pb, qb = int8_dot2(wb.to(tl.int32), (wb >> 32).to(tl.int32), x0, x1, x2, x3, z0, z1, z2, z3)
        a, b, c, d = across_warps4(tl.sum(pa, axis=2), tl.sum(pb, axis=2), tl.sum(qa, axis=2), tl.sum(qb, axis=2))
        return a * 128.0, b * 128.0, c * 128.0, d * 128.0

    @triton.jit
    def _float_sums(wa, wb, x):
        # ([BLOCK_P], [BLOCK_P]): rows a and b's 16-bit weights times x, in float32
        return across_warps(tl.sum(wa.to(tl.float32) * x, axis=2), tl.sum(wb.to(tl.float32) * x, axis=2))

    @triton.jit
    def _float_sums2(wa, wb, x, z):
        # _float_sums for two activation rows (x, z), each weight widened once: a, b, then z's a, b
        fa = wa.to(tl.float32)
        fb = wb.to(tl.float32)
        return across_warps4(tl.sum(fa * x, axis=2), tl.sum(fb * x, axis=2), tl.sum(fa * z, axis=2),
                             tl.sum(fb * z, axis=2))

    @triton.jit
    def _activations(x_ptr, norm_ptr, mg, eps, K: tl.constexpr, BLOCK_P: tl.constexpr, G_PAD: tl.constexpr,
                     W_INT8: tl.constexpr, NORM: tl.constexpr):
        # one activation row as the products read it: int8 weights: 4 tiles of fp16 pairs (x0..x3); 16-bit: one
        # float32 tile (xf; the others bound to it, unused); and the row's RMSNorm factor (1.0 without the norm)
        if W_INT8:
            x0, x1, x2, x3, ss = x_words(x_ptr, norm_ptr.to(tl.pointer_type(tl.int32), bitcast=True), mg, BLOCK_P,
                                         G_PAD, NORM, 2, 2)
            xf = x0
        else:
            xf, ss = _x_float(x_ptr, norm_ptr, mg, BLOCK_P, G_PAD, NORM)
            x0, x1, x2, x3 = xf, xf, xf, xf
        r = 1.0
        if NORM:
            r = tl.rsqrt(ss / K + eps)
        return x0, x1, x2, x3, xf, r

    @triton.jit
    def _persistent_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr,
        N, N_PAIRS, K: tl.constexpr, ROW_STEP, B_OFF, eps,
        Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, pos_divisor, stride_xm, stride_rm, stride_om,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr, SLOT_FROM_PREFIX: tl.constexpr,
        BLOCK_P: tl.constexpr, G_PAD: tl.constexpr, W_INT8: tl.constexpr, NORM: tl.constexpr,
        HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr,
        ARGMAX: tl.constexpr, ROWS: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        # program q: blocks q, q + programs, ... of BLOCK_P row pairs for ROWS (1 or 2: compare's; plain or SwiGLU
        # epilogues only) activation rows at stride_xm; x_ptr: int8 weights' fp16 x as int32 pairs (stride in pairs).
        # PREFETCH: the blocks after the next one asked of L2 that many blocks ahead (0: none)
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching
            tl.extra.cuda.gdc_launch_dependents()
        GROUP: tl.constexpr = 16 if W_INT8 else 8  # weights a 16-byte group
        mg = None if K // GROUP == G_PAD else tl.arange(0, G_PAD) < K // GROUP
        n_blocks = tl.cdiv(N_PAIRS, BLOCK_P)
        # the first block's weights do not depend on the kernels ahead: asked for before the wait
        wa, wb = _block_weights(w_ptr, pid, mg, N_PAIRS, ROW_STEP, B_OFF, N, K, BLOCK_P, G_PAD, W_INT8)
        for ahead in tl.static_range(1, PREFETCH + 1):  # (before the wait too: the weights are static data)
            _prefetch_block(w_ptr, pid + ahead * programs, n_blocks, N_PAIRS, ROW_STEP, B_OFF, N, K, BLOCK_P, W_INT8)
        if PDL:  # x, the residual, the cache, the position: written by the kernels ahead
            tl.extra.cuda.gdc_wait()
        x0, x1, x2, x3, xf, r = _activations(x_ptr, norm_ptr, mg, eps, K, BLOCK_P, G_PAD, W_INT8, NORM)
        z0, z1, z2, z3, zf, r_z = x0, x1, x2, x3, xf, r
        if ROWS == 2:
            z0, z1, z2, z3, zf, r_z = _activations(x_ptr + stride_xm, norm_ptr, mg, eps, K, BLOCK_P, G_PAD, W_INT8,
                                                   NORM)
        for block in range(pid, n_blocks, programs):
            if PREFETCH > 0:
                _prefetch_block(w_ptr, block + (PREFETCH + 1) * programs, n_blocks, N_PAIRS, ROW_STEP, B_OFF, N, K,
                                BLOCK_P, W_INT8)
            # the next block's loads, written before this block's products (masked off past the last block); ptxas
            # issues them after the products, hence PREFETCH (kernels/weight_prefetch.py)
            wa_n, wb_n = _block_weights(w_ptr, block + programs, mg, N_PAIRS, ROW_STEP, B_OFF, N, K, BLOCK_P, G_PAD,
                                        W_INT8)
            if ROWS == 2 and W_INT8:
                a, b, a_z, b_z = _int8_sums2(wa, wb, x0, x1, x2, x3, z0, z1, z2, z3)
            elif ROWS == 2:
                a, b, a_z, b_z = _float_sums2(wa, wb, xf, zf)
            elif W_INT8:
                a, b = _int8_sums(wa, wb, x0, x1, x2, x3)
            else:
                a, b = _float_sums(wa, wb, xf)
            p, row_a, row_b, mask_a, mask_b = _pairs(block, BLOCK_P, N_PAIRS, ROW_STEP, B_OFF, N)
            finish_pairs(a, b, r, p, row_a, row_b, mask_a, mask_b, scale_ptr, bias_ptr, res_ptr, out_ptr,
                         k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr, Q_ROWS, KV_ROWS,
                         cache_stride_g, cache_stride_t, pos_divisor, HEAD_DIM, ROT_PAIRS, ROPE_ROUND,
                         SLOT_FROM_PREFIX, W_INT8, NORM, HAS_BIAS, RESIDUAL, EPILOGUE, ARGMAX)
            if ROWS == 2:
                finish_pairs(a_z, b_z, r_z, p, row_a, row_b, mask_a, mask_b, scale_ptr, bias_ptr, res_ptr + stride_rm,
                             out_ptr + stride_om, k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr,
                             best_ptr, Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, pos_divisor, HEAD_DIM,
                             ROT_PAIRS, ROPE_ROUND, SLOT_FROM_PREFIX, W_INT8, NORM, HAS_BIAS, RESIDUAL, EPILOGUE,
                             ARGMAX)
            wa, wb = wa_n, wb_n


def launch(x, weight, pointers: tuple, shape_args: tuple, meta: dict, block_p: int, programs_per_sm: int,
           num_warps: int, pdl: bool, l2_ahead: int = 0) -> None:
    """Run the kernel for ``int8_gemv.gemv`` (one row x [K]): ``pointers`` (x, weight, scale, ... best) and
    ``shape_args`` (N, N_PAIRS, K, ..., pos_divisor) as its kernel takes them, ``meta`` its epilogue's constexprs;
    ``block_p`` row pairs a block, ``programs_per_sm`` programs on each multiprocessor, blocks asked of L2
    ``l2_ahead`` blocks ahead (kernels/weight_prefetch.py; 0: none)."""
    _run(x, weight, pointers, shape_args + (0, 0, 0), meta, 1, block_p, programs_per_sm, num_warps, pdl, l2_ahead)


def launch_rows(x, lw, out, norm_weight, residual, eps: float, swiglu: bool, block_p: int, programs_per_sm: int,
                num_warps: int, l2_ahead: int = 0) -> torch.Tensor:
    """Two activation rows x [2, K] (compare's) for ``gemv_rows``: out = the residual (SwiGLU: none) plus
    silu(W[:F] y) * W[F:] y or W y, y = norm(x) per row, times the int8 row scale, plus the bias."""
    from .int8_gemv import kernel_args

    res = residual if not swiglu else None
    pointers, shape_args, meta = kernel_args(x, lw, out, norm_weight, eps, res, swiglu, None, None)
    int8 = lw.weight.element_size() == 1
    strides = (x.stride(0) // 2 if int8 else x.stride(0), res.stride(0) if res is not None else 0, out.stride(0))
    _run(x, lw.weight, pointers, shape_args + strides, meta, 2, block_p, programs_per_sm, num_warps, False, l2_ahead)
    return out


def usable_rows(x: torch.Tensor, lw) -> bool:
    """Whether ``launch_rows`` can read these rows: two, each row's start 16-byte aligned; int8 weights against
    fp16 rows (the packed products), or 16-bit weights."""
    w = lw.weight
    return (x.shape[0] == 2 and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
            and (x.dtype == torch.float16 if w.element_size() == 1 else w.is_floating_point())
            and usable(x[0], w))


def _run(x, weight, pointers, shape_args, meta, rows: int, block_p, programs_per_sm, num_warps, pdl,
         l2_ahead) -> None:
    from .quant_persistent import multiprocessors

    n_pairs, k = shape_args[1], shape_args[2]
    int8 = weight.element_size() == 1
    programs = min(triton.cdiv(n_pairs, block_p), multiprocessors(x.device) * programs_per_sm)
    _persistent_kernel[(programs,)](
        x.view(torch.int32) if int8 else x, *pointers[1:], *shape_args, BLOCK_P=block_p,
        G_PAD=max(2, triton.next_power_of_2(k // (16 // weight.element_size()))), W_INT8=int8, PDL=pdl, ROWS=rows,
        PREFETCH=l2_ahead, num_warps=num_warps, num_stages=1, **meta, **({"launch_pdl": True} if pdl else {}),
    )
