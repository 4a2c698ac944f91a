"""The one-row GEMV for int8 (or 16-bit) weights: the decode step of one token, ``gemv``.

Each program reads a few whole weight rows and fuses what sits around the linear in ChatGLM2: the RMSNorm before
it (prologue), and after it the bias, the residual add, SwiGLU (``silu(a) * b`` of the two halves of
``dense_h_to_4h``), the interleaved rotary embedding with the key/value cache write (``query_key_value``), or
the greedy pick folded into the output layer (``argmax``, read by ``pick_token``). Rows are handled in two sets
(a, b): row pairs (2p, 2p+1) for rotary, (p, p + F) for SwiGLU. Tile shapes and the int8 conversion are chosen
per card inside the captured step (``decode/one_row_tuning.py``); ``DEFAULT_GEMV`` holds an H100's.

The weights come as ``int8_linear.LinearWeights``; the torch math of the same linear is ``int8_linear.linear_torch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch

from . import persistent_gemv
from .rotary import round_mode

if TYPE_CHECKING:
    from ..int8_linear import LinearWeights

from . import HAVE_TRITON, x_pass_width

if HAVE_TRITON:
    import triton
    import triton.language as tl

EPI_PLAIN, EPI_SWIGLU, EPI_ROPE = 0, 1, 2

if HAVE_TRITON:
    from .packed_products import int8_words_sums
    from .pair_epilogue import finish_pairs

    @triton.jit
    def int8_as_float(w, CVT: tl.constexpr):
        # int8 weights to float32 for a GEMV's sums. CVT 2, one integer op: bits (w << 15) + 0x3FC00000 are the
        # float 1.5 + w / 256 exactly, so sum w x = 256 (sum f x - 1.5 sum x) (the offset is only ~12x the
        # signal in float32); CVT 1, without the conversion unit: (w + 128) in the low mantissa bits of 2^23;
        # CVT 0: the conversion instruction
        if CVT == 2:
            return ((w.to(tl.int32) << 15) + 0x3FC00000).to(tl.float32, bitcast=True)
        elif CVT == 1:
            return ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return w.to(tl.float32)

    @triton.jit
    def _pick_kernel(best_ptr, next_ptr, in_ptr, flag_ptr, BAD_TOKEN: tl.constexpr, PDL: tl.constexpr,
                     FEED: tl.constexpr, FLAG: tl.constexpr):
        # after the output GEMV with ARGMAX: the next token (BAD_TOKEN if any logit was not finite) into
        # next_ptr; FEED (the one-row decoder): also into in_ptr[0], position and cache slot in_ptr[1:3]
        # advanced; FLAG (the batched decoder): flag_ptr set, the next step may feed itself (kernels.step_feed);
        # the keys reset
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        key = tl.load(best_ptr)
        row = 4294967296 - 1 - (key - ((key >> 32) << 32))  # the low 32 bits hold 2^32 - 1 - row
        tok = tl.where(tl.load(best_ptr + 1) > 0, BAD_TOKEN, row)
        tl.store(next_ptr, tok)
        if FEED:
            tl.store(in_ptr, tok)
            tl.store(in_ptr + 1, tl.load(in_ptr + 1) + 1)
            tl.store(in_ptr + 2, tl.load(in_ptr + 2) + 1)
        if FLAG:
            tl.store(flag_ptr, 1)
        tl.store(best_ptr, -(2**63))
        tl.store(best_ptr + 1, 0)

    @triton.jit
    def _x_tile(x_ptr, norm_ptr, kk, K, BLOCK_P: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        # x[kk] (times norm[kk]) as a [BLOCK_P, BLOCK_K] tile of equal rows (a thread's rows share its loads)
        ptrs = kk[None, :] + tl.zeros([BLOCK_P, 1], dtype=tl.int32)
        if EVEN_K:
            x = tl.load(x_ptr + ptrs).to(tl.float32)
            if NORM:
                x = x * tl.load(norm_ptr + ptrs).to(tl.float32)
        else:
            x = tl.load(x_ptr + ptrs, mask=ptrs < K, other=0.0).to(tl.float32)
            if NORM:
                x = x * tl.load(norm_ptr + ptrs, mask=ptrs < K, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _x_sums(x_ptr, norm_ptr, K, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
        # [BLOCK_K] partial sums of x^2 (for RMSNorm) and of x times the norm weight (CVT 2's offset), as the
        # GEMV loop accumulates them without X_TILE: a pass of its own over x (a few KB, mostly from L1/L2;
        # BLOCK_K here is kernels.x_pass_width's)
        offs_k = tl.arange(0, BLOCK_K)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        xs = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if NORM:
                ss += x * x
                x = x * tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            xs += x
        return ss, xs

    @triton.jit
    def _word_tiles(words_ptr, ra, rb, kw, KW, mask_a, mask_b, zero, EVEN: tl.constexpr):
        # rows a and b's words kw (int64, 8 weights each); past KW or outside the rows: 0 (none when EVEN)
        if EVEN:
            wa = tl.load(words_ptr + ra + kw[None, :])
            wb = tl.load(words_ptr + rb + kw[None, :])
        else:
            mk = (kw < KW)[None, :] & (zero == 0)
            wa = tl.load(words_ptr + ra + kw[None, :], mask=mask_a[:, None] & mk, other=0)
            wb = tl.load(words_ptr + rb + kw[None, :], mask=mask_b[:, None] & mk, other=0)
        return wa, wb

    @triton.jit
    def _wide_sums(x_ptr, norm_ptr, w_ptr, row_a, row_b, mask_a, mask_b, K, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr,
                   PDL: tl.constexpr):
        # CVT 3: rows a and b times fp16 x (times the norm weight), int8 read as 64-bit words of 8 weights and
        # multiplied two at a time in fp16 (kernels/packed_products.py); x through pointers of the word tile's
        # shape, so the loop keeps one register layout. EVEN: whole tiles, every row in range. PREFETCH: the
        # first tile's words are asked for before waiting on the previous kernel (PDL; weights do not depend on
        # it), and each next tile's before this one's products
        BLOCK_W: tl.constexpr = BLOCK_K // 8
        KW = K // 8
        wi = tl.max_contiguous(tl.arange(0, BLOCK_W), 1)  # (as quant_words: one layout for words and x)
        words_ptr = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        pairs_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        norm_pairs = norm_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        zero = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.int32)
        ra = row_a.to(tl.int64)[:, None] * KW
        rb = row_b.to(tl.int64)[:, None] * KW
        acc_a = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
        if PREFETCH:
            wa_n, wb_n = _word_tiles(words_ptr, ra, rb, wi, KW, mask_a, mask_b, zero, False)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x and the residual: written by earlier kernels
        for k0 in range(0, KW, BLOCK_W):
            kw = k0 + wi
            if PREFETCH:  # this tile came one iteration ago (or before the wait); ask for the next one now
                wa = wa_n
                wb = wb_n
                wa_n, wb_n = _word_tiles(words_ptr, ra, rb, kw + BLOCK_W, KW, mask_a, mask_b, zero, False)
            else:
                wa, wb = _word_tiles(words_ptr, ra, rb, kw, KW, mask_a, mask_b, zero, EVEN)
            mk = None if EVEN else (kw < KW)[None, :] & (zero == 0)
            # rows a and b are the two weight sets of one activation row
            p_a, _, p_b, _ = int8_words_sums(wa, wb, pairs_ptr, norm_pairs, 0, 0, 0, kw, zero, mk, NORM, 1, True)
            acc_a += p_a
            acc_b += p_b
        return tl.sum(acc_a, axis=1) * 128.0, tl.sum(acc_b, axis=1) * 128.0  # int8_dot's sums are 1/128

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr,
        N, N_PAIRS, K, ROW_STEP, B_OFF, eps,
        Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, pos_divisor,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr, SLOT_FROM_PREFIX: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
        W_INT8: tl.constexpr, CVT: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_P: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr, ROW_SUM: tl.constexpr, ARGMAX: tl.constexpr, X_TILE: tl.constexpr,
        X_PASS: tl.constexpr,
    ):
        # out rows a = p * ROW_STEP and b = a + B_OFF for the BLOCK_P pairs p of this program
        pid = tl.program_id(0)
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        row_a = p * ROW_STEP
        row_b = row_a + B_OFF
        mask_a = p < N_PAIRS
        mask_b = mask_a & (row_b < N)
        if PDL:  # programmatic dependent launch: the next kernel may start; weights do not depend on the last one
            tl.extra.cuda.gdc_launch_dependents()
        if CVT == 3:  # int8 against fp16 x, products two at a time (_wide_sums)
            a, b = _wide_sums(x_ptr, norm_ptr, w_ptr, row_a, row_b, mask_a, mask_b, K, BLOCK_P, BLOCK_K, NORM,
                              EVEN_K and EVEN_P, PREFETCH, PDL)
            if NORM:
                ss, xs = _x_sums(x_ptr, norm_ptr, K, X_PASS, NORM)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            wa_ptrs = w_ptr + row_a.to(tl.int64)[:, None] * K + offs_k[None, :]
            wb_ptrs = w_ptr + row_b.to(tl.int64)[:, None] * K + offs_k[None, :]
            if ROW_SUM:  # one float32 per row: registers for more bytes in flight, a reduction per tile
                acc_a = tl.zeros([BLOCK_P], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_P], dtype=tl.float32)
            else:  # a float32 per weight of the tile, summed once at the end
                acc_a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            xs = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of x, for the offset of CVT 2
            if PREFETCH:  # first weight tile before anything that waits on the previous kernel
                wa_n = tl.load(wa_ptrs, mask=mask_a[:, None] & (offs_k < K)[None, :], other=0)
                wb_n = tl.load(wb_ptrs, mask=mask_b[:, None] & (offs_k < K)[None, :], other=0)
            if PDL:
                tl.extra.cuda.gdc_wait()  # x, residual, cache, position: written by earlier kernels
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                if X_TILE:  # x (times the norm weight) through pointers of the weight tile's shape: loaded in the
                    # tile's register layout, where x[None, :] is converted through shared memory (barriers) each tile
                    x = _x_tile(x_ptr, norm_ptr, kk, K, BLOCK_P, NORM, EVEN_K)
                else:
                    if EVEN_K:
                        x = tl.load(x_ptr + kk).to(tl.float32)
                    else:
                        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    if NORM:
                        ss += x * x
                        if EVEN_K:
                            x = x * tl.load(norm_ptr + kk).to(tl.float32)
                        else:
                            x = x * tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    if W_INT8 and CVT == 2:
                        xs += x
                    x = x[None, :]
                if PREFETCH:  # this tile was loaded one iteration ago; ask for the next one now
                    wa = wa_n
                    wb = wb_n
                    nxt = (kk + BLOCK_K < K)[None, :]
                    wa_n = tl.load(wa_ptrs + k0 + BLOCK_K, mask=mask_a[:, None] & nxt, other=0)
                    wb_n = tl.load(wb_ptrs + k0 + BLOCK_K, mask=mask_b[:, None] & nxt, other=0)
                elif EVEN_K and EVEN_P:
                    wa = tl.load(wa_ptrs + k0)
                    wb = tl.load(wb_ptrs + k0)
                else:
                    mk = (kk < K)[None, :]
                    wa = tl.load(wa_ptrs + k0, mask=mask_a[:, None] & mk, other=0)
                    wb = tl.load(wb_ptrs + k0, mask=mask_b[:, None] & mk, other=0)
                if W_INT8:
                    wa_f = int8_as_float(wa, CVT)
                    wb_f = int8_as_float(wb, CVT)
                else:
                    wa_f = wa.to(tl.float32)
                    wb_f = wb.to(tl.float32)
                if ROW_SUM:
                    acc_a += tl.sum(wa_f * x, axis=1)
                    acc_b += tl.sum(wb_f * x, axis=1)
                else:
                    acc_a += wa_f * x
                    acc_b += wb_f * x
            if X_TILE and (NORM or (W_INT8 and CVT == 2)):  # the sums over x the loop left out, in a pass of their own
                ss, xs = _x_sums(x_ptr, norm_ptr, K, X_PASS, NORM)
            if ROW_SUM:
                a = acc_a
                b = acc_b
            else:
                a = tl.sum(acc_a, axis=1)
                b = tl.sum(acc_b, axis=1)
            if W_INT8 and CVT == 2:
                x_sum = 1.5 * tl.sum(xs, axis=0)
                a = (a - x_sum) * 256.0
                b = (b - x_sum) * 256.0
        r = 1.0
        if NORM:  # RMSNorm is a per-token scalar: applied to the sums, the norm weight went into x
            r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        finish_pairs(a, b, r, p, row_a, row_b, mask_a, mask_b, scale_ptr, bias_ptr, res_ptr, out_ptr, k_cache_ptr,
                     v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr, Q_ROWS, KV_ROWS, cache_stride_g,
                     cache_stride_t, pos_divisor, HEAD_DIM, ROT_PAIRS, ROPE_ROUND, SLOT_FROM_PREFIX, W_INT8, NORM,
                     HAS_BIAS, RESIDUAL, EPILOGUE, ARGMAX)


@dataclass(frozen=True)
class GemvConfig:
    block_p: int = 4  # row pairs per program (2 * block_p weight rows)
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 1
    cvt: int = 2  # int8 -> float32: 0 conversion instruction; 1 w + 2^23 trick (4 ops); 2 1.5 + w/256 (1 op);
    # 3 int8 to fp16 two at a time, products two at a time in fp16 (fp16 x: kernels/packed_products.py)
    prefetch: bool = False  # load the next weight tile before using this one (by hand: Triton does not for non-dot loops)
    row_sum: bool = False  # reduce each tile to one float32 per row (fewer registers, bigger tiles)
    x_tile: bool = False  # x loaded in the weight tile's layout (no shared-memory conversion in the loop), its
    # sums for RMSNorm and CVT 2 in a pass of their own
    # the persistent kernel (kernels/persistent_gemv.py; int8 weights at CVT 3, or 16-bit ones): this many programs
    # on each multiprocessor looping over blocks of block_p row pairs, a whole row of K at a time (block_k 0; a call
    # it cannot read takes the tiled kernel at the default block_k). Out of repr, which the tuning digests hash: the
    # tiles a card picked before this field existed stay valid
    programs_per_sm: int = field(default=0, repr=False)
    # persistent: blocks asked of L2 this far ahead of their loads (kernels/weight_prefetch.py; 0: none)
    l2_ahead: int = field(default=0, repr=False)


# Measured on an H100 inside the captured step (bench/explore_gemv.py, bench/NOTES.md run 5): a GEMV's time
# alone does not predict its time in the step, where the kernels overlap and the prologues/epilogues do more.
# The defaults: the batched decoder's one-row step runs the same descent on each card at its first warm-up
# (decode/one_row_tuning.py) and keeps that card's winners.
DEFAULT_GEMV = {
    "int8": {
        "qkv": GemvConfig(block_p=4, block_k=1024, row_sum=True),
        "dense": GemvConfig(block_p=2, block_k=1024, cvt=1),
        "fc1": GemvConfig(block_p=4, block_k=2048, row_sum=True),
        "fc2": GemvConfig(block_p=2, block_k=1024, cvt=0, prefetch=True),
        "output": GemvConfig(block_p=8, block_k=1024, row_sum=True),
    },
    "float": {
        "qkv": GemvConfig(block_p=1, block_k=1024),
        "dense": GemvConfig(block_p=2, block_k=1024, row_sum=True),
        "fc1": GemvConfig(block_p=1, block_k=1024),
        "fc2": GemvConfig(block_p=1, block_k=1024, num_warps=8),
        "output": GemvConfig(block_p=8, block_k=1024, row_sum=True),
    },
}


def default_gemv_config(kind: str, int8: bool) -> GemvConfig:
    return DEFAULT_GEMV["int8" if int8 else "float"].get(kind, GemvConfig())


def gemv(
    x: torch.Tensor,
    lw: LinearWeights,
    out: torch.Tensor,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    swiglu: bool = False,
    rope: Optional[dict] = None,
    config: Optional[GemvConfig] = None,
    pdl: bool = False,
    argmax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token through a linear on CUDA: ``out = epilogue(W @ norm(x))``; x [K] contiguous.

    ``norm_weight``: RMSNorm x first (eps). ``residual``: out = residual + W x (may be ``out``).
    ``swiglu``: W has 2F rows, out [F] = silu(W[:F] x) * W[F:] x. ``rope``: dict with q_rows,
    kv_rows, head_dim, inv_freq (float32 [rotary pairs], ``kernels.attention_batch.rotary_inv_freq``),
    k_cache/v_cache ([g, S, d] views) and pos on the device: int64 [pos, slot], or [pos] with ``prefix``
    (int [1], the slot is prefix + pos; pos < 0 writes no key or value); optional divisor (rope_ratio) and
    angle_dtype (fp16/bf16: angles rounded as ChatGLM2's original, ``kernels.rotary``). out receives q
    (rotated), the cache receives k and v at the slot. ``pdl``: launch as a
    programmatic dependent of the previous kernel (Hopper), loading weights before waiting for it.
    ``argmax``: int64 [2] from ``new_argmax_state`` (plain epilogue only): the greedy pick of ``out`` is
    folded into it, for ``pick_token`` to read.
    """
    w = lw.weight
    N, K = w.shape
    cfg = config or GemvConfig()
    if cfg.cvt == 3 and not takes_packed(x, lw, norm_weight):
        cfg = replace(cfg, cvt=2)
    persistent = cfg.programs_per_sm > 0 and (cfg.cvt == 3 or not lw.is_int8) and persistent_gemv.usable(x, w)
    if cfg.programs_per_sm and not persistent:  # a tuned persistent tile, for a call it cannot read
        cfg = replace(cfg, programs_per_sm=0, block_k=cfg.block_k or GemvConfig.block_k)
    if argmax is not None and (swiglu or rope is not None):
        raise ValueError("argmax goes with the plain epilogue (the output layer)")
    pointers, shape_args, meta = kernel_args(x, lw, out, norm_weight, eps, residual, swiglu, rope, argmax)
    n_pairs = shape_args[1]
    if persistent:
        persistent_gemv.launch(x, w, pointers, shape_args, meta, cfg.block_p, cfg.programs_per_sm, cfg.num_warps,
                               pdl, cfg.l2_ahead)
        return out
    _gemv_kernel[(triton.cdiv(n_pairs, cfg.block_p),)](
        *pointers, *shape_args, **meta, BLOCK_P=cfg.block_p, BLOCK_K=cfg.block_k, W_INT8=lw.is_int8, CVT=cfg.cvt,
        EVEN_K=K % cfg.block_k == 0, EVEN_P=n_pairs % cfg.block_p == 0 and (swiglu or N % 2 == 0),
        PREFETCH=cfg.prefetch, PDL=pdl, ROW_SUM=cfg.row_sum, X_TILE=cfg.x_tile,
        X_PASS=x_pass_width(K, cfg.block_k, cfg.num_warps), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def kernel_args(x, lw: LinearWeights, out, norm_weight, eps: float, residual, swiglu: bool, rope: Optional[dict],
                argmax: Optional[torch.Tensor]) -> tuple[tuple, tuple, dict]:
    """The GEMV kernels' arguments (this module's and ``persistent_gemv``'s): the pointers (x, weight, scale, bias,
    norm weight, residual, out, the rotary ones, the pick's state; ``out`` stands in for those absent), the shape
    arguments (N, row pairs, K, row step, b's offset, eps, the rotary ones) and the epilogue's constexprs. Rows are
    taken in pairs: (2p, 2p + 1), or SwiGLU's (p, p + F)."""
    n, k = lw.weight.shape
    n_pairs, row_step, b_off = (n // 2, 1, n // 2) if swiglu else ((n + 1) // 2, 2, 1)
    dummy = out
    rope_pointers, rope_shape, rope_meta = _rope_args(rope, dummy)
    pointers = (x, lw.weight, lw.scale if lw.is_int8 else dummy, lw.bias if lw.bias is not None else dummy,
                norm_weight if norm_weight is not None else dummy, residual if residual is not None else dummy, out,
                *rope_pointers, argmax if argmax is not None else dummy)
    epilogue = EPI_SWIGLU if swiglu else (EPI_ROPE if rope is not None else EPI_PLAIN)
    meta = dict(rope_meta, NORM=norm_weight is not None, HAS_BIAS=lw.bias is not None, RESIDUAL=residual is not None,
                EPILOGUE=epilogue, ARGMAX=argmax is not None)
    return pointers, (n, n_pairs, k, row_step, b_off, eps, *rope_shape), meta


def _rope_args(rope: Optional[dict], dummy: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """The GEMV kernels' rotary arguments: (k cache, v cache, position, prefix, inv_freq), (q rows, kv rows, the
    cache's strides, the position divisor), and their constexprs; placeholders without ``rope``."""
    if rope is None:
        return (dummy,) * 5, (0, 0, 0, 0, 1.0), dict(HEAD_DIM=2, ROT_PAIRS=1, ROPE_ROUND=0, SLOT_FROM_PREFIX=False)
    kc, vc, inv_freq, prefix = rope["k_cache"], rope["v_cache"], rope["inv_freq"], rope.get("prefix")
    pointers = (kc, vc, rope["pos"], prefix if prefix is not None else dummy, inv_freq)
    args = (rope["q_rows"], rope["kv_rows"], kc.stride(0), kc.stride(1), float(rope.get("divisor", 1.0)))
    return pointers, args, dict(HEAD_DIM=rope["head_dim"], ROT_PAIRS=inv_freq.numel(),
                                ROPE_ROUND=round_mode(rope.get("angle_dtype")), SLOT_FROM_PREFIX=prefix is not None)


def takes_packed(x: torch.Tensor, lw: LinearWeights, norm_weight: Optional[torch.Tensor]) -> bool:
    """Whether ``gemv`` can run CVT 3 for these: int8 rows of 8-byte multiples, fp16 x (and norm weight), aligned."""
    w = lw.weight
    return (lw.is_int8 and x.dtype == torch.float16 and w.shape[1] % 8 == 0 and w.data_ptr() % 8 == 0
            and x.data_ptr() % 4 == 0 and (norm_weight is None or (norm_weight.dtype == torch.float16
                                                                   and norm_weight.data_ptr() % 4 == 0)))


def new_argmax_state(device) -> torch.Tensor:
    """The best (value, row) key and the non-finite flag that ``gemv(argmax=...)`` folds into."""
    return torch.tensor([-(2**63), 0], dtype=torch.int64, device=device)


def pick_token(argmax: torch.Tensor, next_token: torch.Tensor, step_in: Optional[torch.Tensor], bad_token: int,
               pdl: bool = False, fed_flag: Optional[torch.Tensor] = None) -> None:
    """After ``gemv(argmax=...)``: next_token = the greedy token (``bad_token`` where a logit was nan or inf, as
    the original's guard does), the state reset; with ``step_in`` (the one-row decoder's [token, position, slot])
    also step_in[0] = that token and step_in[1:3] + 1; with ``fed_flag`` (the batched decoder's) that set to 1."""
    _pick_kernel[(1,)](argmax, next_token, step_in if step_in is not None else next_token,
                       fed_flag if fed_flag is not None else next_token, BAD_TOKEN=bad_token, PDL=pdl,
                       FEED=step_in is not None, FLAG=fed_flag is not None, num_warps=1,
                       **({"launch_pdl": True} if pdl else {}))

