"""The batched decoder's Triton kernels compile for the GPUs we support, without a GPU: Hopper (sm_90, with and
without programmatic dependent launch), Ampere (sm_80) and Turing (sm_75, fp16: no bf16 there).

Triton's interpreter (tests/kernels_interpreted) checks what the kernels compute; this checks what only the
compiler sees: that each variant the tuner may pick lowers to PTX and SASS, fits the card's shared memory,
and reads int8 weights with vector loads (Triton specialises pointers and dimensions divisible by 16, as the
real shapes are; a byte-wide load of a weight would cost most of the bandwidth).

Register layouts differ between Triton releases (a loop without barriers under one may get them under another):
run it with the GPU machine's Triton too, e.g. ``pip install --target /tmp/tri36 --no-deps triton==3.6.0`` and
``PYTHONPATH=/tmp/tri36 python -m pytest tests/test_kernels_compile.py`` (torch 2.11's Triton, as the device has).
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from backend.kernels import x_pass_width  # noqa: E402
from backend.kernels.int8_gemv import _gemv_kernel, _pick_kernel  # noqa: E402
from backend.kernels import attention_batch as A  # noqa: E402
from backend.kernels import gemv_4bit as Q  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 75: 64 * 1024}
ACT = "*fp16"
QUANT_TYPES = {"x_ptr": ACT, "w_ptr": "*i8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "lut_ptr": "*i64",
               "code2_ptr": "*fp32", "absmax2_ptr": "*fp32", "offset": "fp32", "scale_ptr": "*fp32", "bias_ptr": ACT,
               "norm_ptr": ACT, "res_ptr": ACT, "out_ptr": ACT, "eps": "fp32", "part_ptr": "*fp32", "ss_ptr": "*fp32"}
# runtime integers Triton does not specialise (do_not_specialize), or small counts that are not multiples of 16
NOT_ALIGNED = {"M", "has_bias", "residual", "norm", "G", "HPG", "NUM_SPLITS", "H", "divisor", "sm_scale", "N_PAIRS",
               "ROW_STEP", "B_OFF", "Q_ROWS", "KV_ROWS", "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"}


MATMUL_TYPES = {"a_ptr": ACT, "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": ACT, "c_ptr": ACT, "res_ptr": ACT,
                "part_ptr": "*fp32", "count_ptr": "*i32"}


def compile_for(fn, types: dict, consts: dict, arch: int, warps: int = 4, stages: int = 3):
    """Compile ``fn`` for sm_``arch``: pointers and other integers divisible by 16, as the decoder's are; its PTX."""
    return compile_kernel(fn, types, consts, arch, warps, stages).asm["ptx"]


def compile_kernel(fn, types: dict, consts: dict, arch: int, warps: int = 4, stages: int = 3):
    """``compile_for``'s compiled kernel (its PTX, cubin and metadata)."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and n not in NOT_ALIGNED and not types.get(n, "i32").startswith("fp")}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                       attrs=aligned)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    except RuntimeError as err:  # pragma: no cover - a Triton wheel without ptxas
        if "ptxas" in str(err).lower():
            pytest.skip(f"Triton cannot run ptxas here: {err}")
        raise
    assert kernel.metadata.shared <= SHARED_LIMIT[arch], (fn.__name__, consts, kernel.metadata.shared)
    return kernel


def byte_loads(ptx: str) -> int:
    return len(re.findall(r"ld\.global[^\n]*\.(u8|s8|b8)\b", ptx))


TARGETS = [(90, True), (90, False), (80, False), (75, False)]
SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]  # ChatGLM2-6B: qkv, dense, fc1, fc2


@pytest.mark.parametrize("arch,pdl", TARGETS)
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantized_linear_tiles_and_k_splits(arch, pdl, fmt):
    fid = Q._FMT_ID[fmt]
    types = dict(QUANT_TYPES, w_ptr="*u8" if fmt == "nf4" else "*i8")
    for bn, bk, bm, split, stages in ((32, 128, 16, 1, 3), (16, 256, 16, 2, 3), (64, 64, 64, 4, 3)):
        if arch == 75 and bm == 64:
            stages = 2  # Turing's 64 KB of shared memory: the tuner's 64-row tiles there run with fewer stages
        consts = dict(FMT=fid, LUT=2, NESTED=fmt == "nf4", BS=64 if fmt == "nf4" else 2, BS2=256, BLOCKED=fmt == "nf4",
                      HAS_SCALE=fmt != "nf4", SWIGLU=True, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl,
                      SPLIT_K=split)
        ptx = compile_for(Q._mm_quant_kernel, types, consts, arch, warps=8 if bm == 64 else 4, stages=stages)
        if fmt == "int8":
            assert byte_loads(ptx) == 0, (bn, bk, bm, split)
    epilogue = dict(SPLIT_K=4, HAS_SCALE=True, SWIGLU=True, BLOCK_N=256)
    compile_for(Q._split_k_epilogue_kernel, QUANT_TYPES, epilogue, arch)
    if fmt != "int8":
        consts = dict(FMT=fid, LUT=2, NESTED=False, BS=64 if fmt == "nf4" else 2, BS2=256, BLOCKED=fmt == "nf4",
                      HAS_SCALE=fmt != "nf4", SWIGLU=False, BLOCK_N=8, BLOCK_K=512, BLOCK_SUM=fmt == "nf4", PDL=pdl)
        compile_for(Q._gemv_quant_kernel, types, consts, arch, stages=1)


@pytest.mark.parametrize("arch,pdl", TARGETS)
def test_the_multi_row_and_one_row_int8_gemvs(arch, pdl):
    for rows, bn, bk in ((2, 4, 512), (8, 8, 256)):
        ptx = compile_for(Q._rows_int8_kernel, QUANT_TYPES, dict(SWIGLU=True, ROWS=rows, BLOCK_N=bn, BLOCK_K=bk), arch, stages=1)
        assert byte_loads(ptx) == 0, (rows, bn, bk)
    types = {"x_ptr": ACT, "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": ACT, "norm_ptr": ACT, "res_ptr": ACT,
             "out_ptr": ACT, "k_cache_ptr": ACT, "v_cache_ptr": ACT, "pos_ptr": "*i64", "prefix_ptr": "*i64",
             "inv_freq_ptr": "*fp32", "best_ptr": "*i64", "eps": "fp32", "pos_divisor": "fp32"}
    # plain (+ residual, or the folded greedy pick), SwiGLU, and rotary + the cache write with fp16's angle rounding,
    # as the batched decoder's one-row step calls them
    for epilogue, row_sum, argmax, x_tile in ((0, True, False, False), (0, True, True, False), (1, False, False, False),
                                              (2, True, False, False), (1, False, False, True), (2, False, False, True)):
        rope = dict(HEAD_DIM=128, ROT_PAIRS=32, ROPE_ROUND=1, SLOT_FROM_PREFIX=True) if epilogue == 2 else \
            dict(HEAD_DIM=2, ROT_PAIRS=1, ROPE_ROUND=0, SLOT_FROM_PREFIX=False)
        consts = dict(rope, BLOCK_P=4, BLOCK_K=1024, W_INT8=True,
                      CVT=2, NORM=True, HAS_BIAS=epilogue != 1, RESIDUAL=epilogue == 0 and not argmax,
                      EPILOGUE=epilogue, EVEN_K=True, EVEN_P=True, PREFETCH=False, PDL=pdl, ROW_SUM=row_sum,
                      ARGMAX=argmax, X_TILE=x_tile, X_PASS=x_pass_width(4096, 1024, 4))
        ptx = compile_for(_gemv_kernel, types, consts, arch, stages=1)
        assert byte_loads(ptx) == 0, epilogue
    pick = {"best_ptr": "*i64", "next_ptr": "*i64", "in_ptr": "*i64", "flag_ptr": "*i64"}
    # the batched decoder's pick (its positions fed by the next step), the one-row decoder's (fed back)
    for feed, flag in ((False, True), (True, False)):
        compile_for(_pick_kernel, pick, dict(BAD_TOKEN=5, PDL=pdl, FEED=feed, FLAG=flag), arch, warps=1, stages=1)


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_the_few_rows_gemv_configs(arch):
    """Every config the few-rows GEMV may be tuned to, at 2 and 4 rows, plain and SwiGLU, int8 weights (with vector
    loads) and 16-bit ones (bf16, fp16 on Turing)."""
    from backend.kernels.gemv_rows import _gemv_rows_kernel, candidate_configs

    half = "*fp16" if arch == 75 else "*bf16"
    for int8 in (True, False):
        act = ACT if int8 else half
        types = {"x_ptr": act, "w_ptr": "*i8" if int8 else half, "scale_ptr": "*fp32" if int8 else act, "bias_ptr": act,
                 "norm_ptr": act, "res_ptr": act, "out_ptr": act, "eps": "fp32"}
        for swiglu in (False, True):
            for rows in (2, 4):
                for cfg in candidate_configs(swiglu, int8):
                    consts = dict(ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, W_INT8=int8,
                                  CVT=cfg.cvt if int8 else 0, NORM=True, HAS_BIAS=not swiglu, RESIDUAL=not swiglu,
                                  SWIGLU=swiglu, EVEN_K=True, EVEN_N=True, TILE_ACC=cfg.kernel == "gemv_acc",
                                  X_PASS=x_pass_width(4096, cfg.block_k, cfg.num_warps))  # as _launch passes it
                    ptx = compile_for(_gemv_rows_kernel, types, consts, arch, warps=cfg.num_warps, stages=1)
                    assert byte_loads(ptx) == 0, (swiglu, rows, cfg)


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_the_swapped_int8_matmul_feeds_the_widened_weight_from_registers(arch):
    """The swapped matmul at every tile ``matmul_config`` gives up to 256 rows, split and not: it compiles and fits, reads
    int8 by vector loads, and on Hopper hands wgmma the widened weight as its register operand (the point of
    swapping: the unswapped kernel stores each widened tile to shared memory for wgmma's second operand)."""
    from backend.kernels.int8_matmul import _matmul_kernel, matmul_config

    configs = {matmul_config(m, n, k) for m in (5, 8, 16, 32, 64, 128, 256) for n, k in SHAPES}
    configs |= {c[:-1] + (1,) for c in configs}
    for bm, bn, bk, warps, stages, split in sorted(configs):
        consts = {"W_INT8": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                  "GROUP_M": 8, "SPLIT_K": split, "SWAP_AB": True, "WIDEN": 1,  # (fp16 rows: widened by PTX)
                  "RESIDUAL": True, "SWIGLU": False, "LAST_SUMS": split > 1}
        ptx = compile_for(_matmul_kernel, MATMUL_TYPES, consts, arch, warps=warps, stages=stages)
        assert byte_loads(ptx) == 0, (bm, bn, bk)
        if arch == 90:  # wgmma.mma_async ... {accumulators}, {A registers}, B descriptor
            assert re.search(r"wgmma\.mma_async[^;]*\{[^}]*\},\s*\{%r", ptx), (bm, bn, bk)


@pytest.mark.parametrize("arch,pdl", TARGETS)
def test_batched_rotary_and_attention(arch, pdl):
    types = {"qkv_ptr": ACT, "q_ptr": ACT, "k_ptr": ACT, "v_ptr": ACT, "pos_ptr": "*i64", "prefix_ptr": "*i64",
             "inv_freq_ptr": "*fp32", "divisor": "fp32", "o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
             "out_ptr": ACT, "sm_scale": "fp32", "cache_row_ptr": "*i64", "count_ptr": "*i32"}
    for rounding, cache_rows in ((0, False), (1, False), (1, True)):  # a decode step; a prompt (its tokens' rows)
        compile_for(A._rope_cache_batch_kernel, types,
                    dict(HEAD_DIM=128, ROT_PAIRS=32, PDL=pdl, ROUND=rounding, CACHE_ROWS=cache_rows), arch, warps=1, stages=1)
    for splits in (1, 2, 16):  # one chunk writes its heads itself; several: the last program merges them
        for block_t, warps, alone in ((A.BLOCK_T, 8, 0), (32, 4, 160), (16, 4, 0)):  # the general step's, the one-row
            # step's (ONE_ROW_TILE) and bench/'s shortest tile
            consts = dict(SPLITS=splits, HEAD_DIM=128, HPG_PAD=16, BLOCK_T=block_t, IEEE=False, PDL=pdl, ALONE=alone)
            ptx = compile_for(A._attn_batch_kernel, types, consts, arch, warps=warps, stages=1)
            if splits > 1:  # the counter: a release/acquire atomic at GPU scope after a barrier
                assert re.search(r"atom\.global\.gpu\.acq_rel\.add|atom\.acq_rel\.gpu\.global\.add", ptx)
    # the one-row decoder's split kernel (decode/fast_step.py), whose loop is attention_batch's tile helpers
    from backend.kernels import decode_kernels

    compile_for(decode_kernels._attn_split_kernel, dict(types, pos_ptr="*i32"),
                dict(HEAD_DIM=128, HPG_PAD=16, BLOCK_T=64, IEEE=False, PDL=pdl), arch, warps=4, stages=1)


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_the_int8_matmul_configs_fit_each_card(arch):
    """Every tile config the int8 matmul picks (decode rows, 128/256 rows, prompts and training) compiles and fits
    the card's shared memory, with int8 weights read by vector loads; so does the widening for cuBLAS."""
    from backend.kernels.int8_matmul import _matmul_kernel, _split_sum_kernel, matmul_config
    from backend.kernels.widen_int8 import _widen_kernel

    ptx = compile_for(_widen_kernel, {"q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": ACT}, {"BLOCK_N": 32, "BLOCK_K": 256}, arch)
    assert byte_loads(ptx) == 0

    types = MATMUL_TYPES
    configs = {matmul_config(m, n, k) for m in (2, 3, 16, 32, 64, 128, 256, 512) for n, k in SHAPES}
    assert {c[-1] for c in configs} != {1}  # some decode rows split K
    configs |= {c[:-1] + (1,) for c in configs}  # and prompts run the same tiles unsplit
    for bm, bn, bk, warps, stages, split in sorted(configs):
        for last_sums in {split > 1, False}:  # a split's partials added by each tile's last program, or by the sum kernel
            consts = {"W_INT8": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                      "GROUP_M": 8, "SPLIT_K": split, "SWAP_AB": False, "WIDEN": 1, "RESIDUAL": split == 1 or last_sums,
                      "SWIGLU": False, "LAST_SUMS": last_sums}
            ptx = compile_for(_matmul_kernel, types, consts, arch, warps=warps, stages=stages)
            assert byte_loads(ptx) == 0, (bm, bn, bk)
            if last_sums:  # the tile's counter: a release/acquire atomic at GPU scope after a barrier
                assert re.search(r"atom\.global\.gpu\.acq_rel\.add|atom\.acq_rel\.gpu\.global\.add", ptx)
    for m in (2, 3, 16):  # a few decode rows' fc1: SwiGLU in the epilogue, each half's tile half as wide
        bm, bn, bk, warps, stages, _ = matmul_config(m, 27392, 4096)
        consts = {"W_INT8": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": max(16, bn // 2),
                  "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1, "SWAP_AB": False, "WIDEN": 1, "RESIDUAL": False,
                  "SWIGLU": True}
        assert byte_loads(compile_for(_matmul_kernel, types, consts, arch, warps=warps, stages=stages)) == 0
    for split in sorted({c[-1] for c in configs} - {1}):
        for residual in (False, True):
            compile_for(_split_sum_kernel, {"part_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": ACT, "c_ptr": ACT,
                                            "res_ptr": ACT},
                        {"SPLIT_K": split, "W_INT8": True, "HAS_BIAS": False, "BLOCK_N": 1024, "RESIDUAL": residual},
                        arch)


def test_every_tile_the_one_row_step_may_be_tuned_to_compiles_for_hopper_with_vector_loads():
    """decode/one_row_tuning.py's int8 candidates, each with its linear's epilogue (the QKV's rotary, fc1's SwiGLU,
    dense/fc2's residual, the output's folded pick), as the one-row step launches them on an H100/H200; those that
    load x in the weight tile's layout (x_tile, without per-tile row sums) have no barrier in their K loop."""
    from backend.decode.one_row_tuning import CANDIDATES, PACKED_INT8, _c

    types = {"x_ptr": ACT, "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": ACT, "norm_ptr": ACT, "res_ptr": ACT,
             "out_ptr": ACT, "k_cache_ptr": ACT, "v_cache_ptr": ACT, "pos_ptr": "*i64", "prefix_ptr": "*i64",
             "inv_freq_ptr": "*fp32", "best_ptr": "*i64", "eps": "fp32", "pos_divisor": "fp32"}
    epilogues = {"qkv": (2, True, False, False), "dense": (0, False, True, False), "fc1": (1, True, False, False),
                 "fc2": (0, False, True, False), "output": (0, True, False, True)}  # (epilogue, norm, residual, argmax)
    for kind, cands in CANDIDATES["int8"].items():
        epilogue, norm, residual, argmax = epilogues[kind]
        # (and fp16 x: cvt 3's packed products)
        for cfg in cands + [_c(bp, bk, w, cvt=3, pf=pf) for bp, bk, w, pf in PACKED_INT8]:
            consts = dict(HEAD_DIM=128, ROT_PAIRS=32, ROPE_ROUND=1, SLOT_FROM_PREFIX=True, BLOCK_P=cfg.block_p,
                          BLOCK_K=cfg.block_k, W_INT8=True, CVT=cfg.cvt, NORM=norm, HAS_BIAS=kind == "qkv",
                          RESIDUAL=residual, EPILOGUE=epilogue, EVEN_K=True, EVEN_P=True, PREFETCH=cfg.prefetch,
                          PDL=True, ROW_SUM=cfg.row_sum, ARGMAX=argmax, X_TILE=cfg.x_tile,
                          X_PASS=x_pass_width(4096, cfg.block_k, cfg.num_warps))  # as gemv() launches it
            ptx = compile_for(_gemv_kernel, types, consts, 90, warps=cfg.num_warps, stages=cfg.num_stages)
            assert byte_loads(ptx) == 0, (kind, cfg)
            if (cfg.x_tile and not cfg.row_sum) or cfg.cvt == 3:
                assert not any("bar.sync" in body for body in loop_bodies(ptx)), (kind, cfg)
            if cfg.cvt == 3:  # packed products: a word's four activation pairs in one 16-byte load
                assert vector_pair_loads(ptx), (kind, cfg)


def loop_bodies(ptx: str) -> list[str]:
    """The PTX of each loop: the text from a label to a branch back to it, plus the blocks the compiler's comments
    place in that loop ("in Loop: Header=...": a rotated loop's latch may sit before its header)."""
    blocks = re.split(r"^(?=\$L__BB\d+_\d+:)", ptx, flags=re.M)
    bodies = []
    for m in re.finditer(r"^\$L__(BB\d+_\d+):", ptx, re.M):
        back = list(re.finditer(rf"\bbra(\.uni)?\s+\$L__{m.group(1)};", ptx[m.end():]))
        if back:
            in_loop = [b for b in blocks if f"Header={m.group(1)} " in b.split("\n", 1)[0]]
            bodies.append(ptx[m.start(): m.end() + back[-1].end()] + "".join(in_loop))
    return bodies


def loop_sass(kernel) -> list[str]:
    """The SASS instructions of the kernel's longest loop (a label to the last branch back to it), by the nvdisasm
    that ships with Triton; skips where there is none."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(tool):  # pragma: no cover - a Triton wheel without the CUDA tools
        pytest.skip("this Triton has no nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout
    items = []  # ("label", name) or ("op", instruction)
    for line in text.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        op = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if label or op:
            items.append(("label", label.group(1)) if label else ("op", op.group(1)))
    loops = []
    for i, (kind, name) in enumerate(items):
        back = [j for j in range(i + 1, len(items)) if items[j][0] == "op" and f"`({name})" in items[j][1]]
        if kind == "label" and back:
            loops.append([v for k, v in items[i:back[-1] + 1] if k == "op"])
    return max(loops, key=len) if loops else []


def loop_bulk_prefetches(kernel) -> int:
    """How many L2 bulk prefetches (``UBLKPF``) the SASS of the kernel's loop over blocks holds."""
    return sum("UBLKPF.L2" in op for op in loop_sass(kernel))


def vector_pair_loads(ptx: str) -> bool:
    """Whether the loop of packed products (the one with byte permutes) loads 32-bit values 16 bytes at a time
    (``packed_products.word_pairs``: a word's four activation pairs in one load, not four)."""
    loops = [body for body in loop_bodies(ptx) if "prmt.b32" in body]
    return bool(loops) and all(re.search(r"ld\.global(\.\w+)*\.v4\.b32", body) for body in loops)


def words_configs(fmt: str) -> set:
    """Every words-kernel config a tuner may pick: quant_linear's (4-bit, 1 and 2 rows), gemv_rows' (int8)."""
    if fmt != "int8":
        from backend.decode.one_row_tuning import early_first_step

        one_row_early = set(early_first_step(Q._words_configs(1, fmt)))  # (the one-row step's extra tiles)
        return {c for rows in (1, 2) for c in Q._words_configs(rows, fmt)} | one_row_early
    from backend.kernels.gemv_rows import candidate_configs

    return {Q.QuantLinearConfig("words", c.block_n, c.block_k, 2, c.num_warps, 1,
                                cvt=c.cvt if c.cvt == 3 else min(c.cvt, 1))
            for c in candidate_configs(False) + candidate_configs(True) if c.kernel == "words"}


@pytest.mark.parametrize("arch,pdl", TARGETS)
@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_the_words_gemv_keeps_one_register_layout_through_its_k_loop(arch, pdl, fmt):
    """quant_words' reason to exist: no shared-memory round trip (bar.sync) inside the K loop, at one row and two,
    with SwiGLU, and as a 4-bit QKV with the rotary epilogue, for each tile the tuner may pick; it compiles for every
    card we support (fp16 rows on Turing)."""
    from backend.kernels import quant_words as W

    act = "*fp16" if arch == 75 else "*bf16"
    types = dict(QUANT_TYPES, x_ptr="*i32", w_ptr="*i32", norm_ptr="*i32", absmax_ptr="*u8", bias_ptr=act,
                 res_ptr=act, out_ptr=act, k_cache_ptr=act, v_cache_ptr=act, pos_ptr="*i64", prefix_ptr="*i64",
                 inv_freq_ptr="*fp32", pos_divisor="fp32")
    for cfg in words_configs(fmt):
        wide = fmt == "int8" and cfg.cvt == 3  # int8 read as 64-bit words against fp16 rows
        types["w_ptr"] = "*i64" if wide else "*i32"
        # (fc1 has the norm and SwiGLU; fc2's K has a tail.) Nested NF4's second-level scale: loaded once a row
        # where each row lies within one group of BS2 blocks (as K = 4096 with bitsandbytes' 256: here groups of
        # two rows), else once a word (rows across groups, or the tail)
        passes = ((False, True, 2), (True, False, None)) + (((False, True, 0.5),) if fmt == "nf4" else ())
        loop_loads = {}
        for swiglu, even_k, group_rows in passes:
            k = 32 * cfg.block_k if even_k else 32 * cfg.block_k + 64  # long enough that the K loop stays a loop
            bs2 = int(group_rows * k // 64) if group_rows else 256
            consts = dict(FMT=Q._FMT_ID[fmt], LUT=cfg.lut, NESTED=fmt == "nf4", BS=64 if fmt == "nf4" else 8, BS2=bs2,
                          BLOCKED=even_k, HAS_SCALE=fmt != "nf4", SWIGLU=swiglu,
                          X_KIND=2 if arch == 75 or cfg.cvt == 3 else 1,
                          ROWS=cfg.block_m,
                          BLOCK_N=max(2, cfg.block_n // 2) if swiglu else cfg.block_n,
                          BLOCK_W=cfg.block_k // (4 if fmt == "int8" and not wide else 8),
                          CVT=cfg.cvt if fmt == "int8" else 0,
                          NORM=True, EVEN_K=even_k, EVEN_N=even_k, PDL=pdl, PREFETCH=cfg.prefetch,  # (clamped
                          # rows with the tail)
                          ROW_SCALE2=fmt == "nf4" and group_rows == 2, K=k,
                          ROPE=not swiglu, HEAD_DIM=128, ROT_PAIRS=32, ROPE_ROUND=1)
            ptx = compile_for(W._gemv_words_kernel, types, consts, arch, warps=cfg.num_warps, stages=1)
            loops = loop_bodies(ptx)
            assert loops and not any("bar.sync" in body for body in loops), (cfg, swiglu)
            if cfg.lut == 3 or wide:  # packed products: a word's four activation pairs in one 16-byte load
                assert vector_pair_loads(ptx), (cfg, swiglu)
            loop_loads[group_rows] = sum(body.count("ld.global") for body in loops)
        if fmt == "nf4":  # the row's second-level scale leaves the loop
            assert loop_loads[2] < loop_loads[0.5], (cfg, loop_loads)


@pytest.mark.parametrize("arch", [90, 80, 75])
@pytest.mark.parametrize("fmt,nested", [(0, True), (0, False), (1, False)])
def test_widen_4bit_kernel_compiles(arch, fmt, nested):
    """kernels/widen_4bit.py: NF4 (nested absmax or not) and the int4 release widened to fp16 for cuBLAS."""
    from backend.kernels.widen_4bit import BLOCK_K, BLOCK_N, _widen_4bit_kernel

    types = {**QUANT_TYPES, "w_ptr": "*u8" if fmt == 0 else "*i8", "absmax_ptr": "*u8" if nested else "*fp32",
             "scale_ptr": "*fp16", "out_ptr": ACT}
    compile_for(_widen_4bit_kernel, types, dict(FMT=fmt, NESTED=nested, BS=64 if fmt == 0 else 2, BS2=256,
                                                BLOCKED=fmt == 0, HAS_SCALE=fmt == 1, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K),
                arch, warps=4, stages=1)


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_the_batched_greedy_pick(arch):
    """The batched step's greedy pick: a program a tile of logits, then one a row (kernels/greedy_rows.py)."""
    from backend.kernels.greedy_rows import BLOCK, _row_pick_kernel, _tile_best_kernel

    compile_for(_tile_best_kernel, {"logits_ptr": ACT, "key_ptr": "*i64", "bad_ptr": "*i32"}, {"BLOCK": BLOCK}, arch,
                stages=1)
    for flag in (False, True):  # a prompt's pick; a decode step's, which lets the next step feed itself
        compile_for(_row_pick_kernel, {"key_ptr": "*i64", "bad_ptr": "*i32", "out_ptr": "*i64", "flag_ptr": "*i64"},
                    {"BAD_TOKEN": 5, "TILES_POW2": 32, "FLAG": flag}, arch, warps=1, stages=1)


@pytest.mark.parametrize("arch", [90, 80, 75])
def test_the_step_feed(arch):
    """A batched step's first launch: its rows' tokens fed from the last picks or the host, and their embeddings."""
    from backend.kernels.step_feed import BLOCK, _feed_embed_kernel

    half = "*fp16" if arch == 75 else "*bf16"
    compile_for(_feed_embed_kernel, {"flag_ptr": "*i64", "picks_ptr": "*i64", "tokens_ptr": "*i64", "pos_ptr": "*i64",
                                     "emb_ptr": half, "x_ptr": half}, {"BLOCK": BLOCK}, arch, stages=1)


@pytest.mark.parametrize("arch,pdl", TARGETS)
@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_the_persistent_gemv_reads_four_words_a_load(arch, pdl, fmt, monkeypatch):
    """quant_persistent's tiles (one and two activation rows) compile for every card we support, as qkv (the norm),
    fc1 (SwiGLU) and fc2 (K padded to a power of two) would run them; inside the loop over row blocks each thread
    reads its 4 words of a row as one 16-byte load, and the activations are not read again (they were loaded once,
    before the loop). Tiles with L2 prefetch (``l2_ahead``, Hopper only) ask for a block once an iteration: its
    words (SwiGLU: two row sets) and NF4's absmax, one bulk prefetch a range, all of them in the loop's SASS."""
    from backend.kernels import quant_persistent as P

    from backend.kernels import weight_prefetch

    monkeypatch.setenv("GLMCHAT_PERSISTENT_GEMV", "all")  # (the tiles not yet on by default too)
    monkeypatch.setattr(weight_prefetch, "tried", lambda: True)  # (as on a Hopper card)
    act = "*fp16" if arch == 75 else "*bf16"
    types = dict(QUANT_TYPES, pairs_ptr="*i32", x_ptr="*i32", w_ptr="*i32", norm_ptr="*i32", absmax_ptr="*u8", bias_ptr=act,
                 res_ptr=act, out_ptr=act)
    tiles = {(c.block_n, c.num_warps, c.lut, c.block_m, c.l2_ahead) for m in (1, 2) for swiglu in (False, True)
             for c in Q.candidate_configs(fmt, m, swiglu) if c.kernel == "persistent"}
    assert {t[3] for t in tiles} == {1, 2} and {t[4] for t in tiles} == {0, 2, 4}
    if arch != 90:  # (every tile on Hopper; one a table kind and row count elsewhere, none with the bulk prefetch)
        tiles = {t for t in tiles if t[:2] == (2, 4) and t[4] == 0}
    for k, swiglu, norm in ((4096, False, True), (4096, True, True), (13696, False, False)):
        for block_n, warps, lut, rows, ahead in sorted(tiles):
            consts = dict(NORM=norm, FMT=Q._FMT_ID[fmt], LUT=lut, NESTED=fmt == "nf4", BS=64 if fmt == "nf4" else 32,
                          BS2=256, HAS_SCALE=fmt != "nf4", SWIGLU=swiglu, X_KIND=2 if arch == 75 else 1,
                          ROW_SCALE2=fmt == "nf4" and k == 4096, ROWS=rows, BLOCK_N=block_n,
                          KW_PAD=1 << (k // 8 - 1).bit_length(), PDL=pdl, K=k, PREFETCH=ahead)
            kernel = compile_kernel(P._persistent_kernel, types, consts, arch, warps=warps, stages=1)
            loops = loop_bodies(kernel.asm["ptx"])
            assert len(loops) == 1, (k, block_n, warps)
            words = re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", loops[0])  # a thread's share of the block's words
            share = max(1, block_n * consts["KW_PAD"] // 4 // (32 * warps)) * (2 if swiglu else 1)
            assert len(words) == share, (k, block_n, warps, swiglu)
            asked = (2 if swiglu else 1) * (2 if fmt == "nf4" else 1) if ahead else 0  # (row sets; NF4's absmax)
            assert len(re.findall(r"cp\.async\.bulk\.prefetch\.L2", loops[0])) == asked, (k, block_n, ahead)
            assert arch != 90 or loop_bulk_prefetches(kernel) == asked, (k, block_n, warps, swiglu, rows, ahead)


@pytest.mark.parametrize("arch,pdl", TARGETS)
@pytest.mark.parametrize("weights", ["int8", "float"])
def test_the_one_row_persistent_gemv_reads_16_bytes_a_load(arch, pdl, weights, monkeypatch):
    """persistent_gemv's tiles (decode/one_row_tuning.PERSISTENT_TILES: int8 against fp16 rows, on every card the
    8-bit model runs; 16-bit weights, bf16 or fp16 where a card has no bf16) compile as qkv (the norm, the bias, rotary
    with the cache write), fc1 (SwiGLU), fc2 (K padded to a power of two, the residual) and the output layer (the
    greedy pick) run them, and at two rows (gemv_rows' tiles: fc1, fc2): inside the loop over blocks each thread reads
    its weights of a row 16 bytes at a time, and the activations are not read again (loaded once, before the loop).
    Tiles with L2 prefetch (Hopper only) ask for a block once an iteration: one bulk prefetch of rows 2p, 2p + 1 or
    two of SwiGLU's rows p and p + N/2 (the row step is a runtime value, so both are compiled; Triton 3.9's LLVM
    merges the one call with one of the two), all in the loop's SASS."""
    from backend.decode.one_row_tuning import persistent_candidates
    from backend.kernels import persistent_gemv as P
    from backend.kernels.gemv_rows import persistent_configs

    from backend.kernels import weight_prefetch

    monkeypatch.setenv("GLMCHAT_PERSISTENT_GEMV", "all")  # (the tiles not yet on by default too)
    monkeypatch.setattr(weight_prefetch, "tried", lambda: True)  # (as on a Hopper card)
    act = "*bf16" if weights == "float" and arch != 75 else ACT
    types = {"x_ptr": "*i32" if weights == "int8" else act, "w_ptr": "*i8" if weights == "int8" else act,
             "scale_ptr": "*fp32", "bias_ptr": act, "norm_ptr": act, "res_ptr": act, "out_ptr": act,
             "k_cache_ptr": act, "v_cache_ptr": act, "pos_ptr": "*i64", "prefix_ptr": "*i64", "inv_freq_ptr": "*fp32",
             "best_ptr": "*i64", "eps": "fp32", "pos_divisor": "fp32"}
    tiles = sorted({(c.block_p, c.num_warps, c.l2_ahead) for c in persistent_candidates(weights)})
    two_rows = sorted({(c.block_n, c.num_warps, c.l2_ahead) for c in persistent_configs(weights == "int8", 2,
                                                                                        torch.float16)})
    assert {t[2] for t in tiles} == {t[2] for t in two_rows} == {0, 2, 4}
    if arch != 90:  # (every tile on Hopper; one elsewhere, none with the bulk prefetch, to keep the test short)
        tiles, two_rows = ([t for t in ts if t[2] == 0][:1] for ts in (tiles, two_rows))
    group = 16 if weights == "int8" else 8
    cases = [(k, epilogue, norm, residual, argmax, 1, tiles)
             for k, epilogue, norm, residual, argmax in ((4096, 2, True, False, False), (4096, 1, True, False, False),
                                                         (13696, 0, False, True, False), (4096, 0, True, False, True))]
    cases += [(4096, 1, True, False, False, 2, two_rows), (13696, 0, False, True, False, 2, two_rows)]  # (gemv_rows')
    for k, epilogue, norm, residual, argmax, rows, row_tiles in cases:
        for block_p, warps, ahead in row_tiles:
            consts = dict(HEAD_DIM=128, ROT_PAIRS=32, ROPE_ROUND=1, SLOT_FROM_PREFIX=True, BLOCK_P=block_p,
                          G_PAD=1 << (k // group - 1).bit_length(), W_INT8=weights == "int8", NORM=norm,
                          HAS_BIAS=epilogue == 2, RESIDUAL=residual, EPILOGUE=epilogue, PDL=pdl and rows == 1,
                          ARGMAX=argmax, K=k, ROWS=rows, PREFETCH=ahead)
            kernel = compile_kernel(P._persistent_kernel, types, consts, arch, warps=warps, stages=1)
            loops = loop_bodies(kernel.asm["ptx"])  # the products' loop: the one with the weight loads
            loop = max(loops, key=lambda body: len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.b(?:64|32)", body)))
            vector = r"ld\.global(?:\.\w+)*\.v2\.b64" if weights == "int8" else r"ld\.global(?:\.\w+)*\.v4\.b32"
            share = max(1, 2 * block_p * consts["G_PAD"] // (32 * warps))  # a thread's 16-byte loads a block
            assert len(re.findall(vector, loop)) == share, (k, block_p, warps)
            asked = {2, 3} if ahead else {0}  # (LLVM may merge the plain range's call with one of SwiGLU's)
            assert len(re.findall(r"cp\.async\.bulk\.prefetch\.L2", loop)) in asked, (k, block_p, ahead)
            assert arch != 90 or loop_bulk_prefetches(kernel) in asked, (k, block_p, warps, rows, ahead)
            if weights == "int8":  # (x: int32 pairs, 16 bytes a load, once before the loop)
                assert not re.search(r"ld\.global(?:\.\w+)*\.v4\.b32", loop), (k, block_p, warps)
