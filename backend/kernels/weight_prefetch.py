"""Weight blocks asked of L2 ahead of their loads (``cp.async.bulk.prefetch.L2``, Hopper on), for the persistent
GEMVs (``quant_persistent`` for 4-bit weights, ``persistent_gemv`` for int8 and 16-bit ones).

Why: those kernels ask for the next block's weights before this block's products, but ptxas moves that load down to
after the products, where this block's word registers are free again (sm_90 SASS under Triton 3.6: in NF4's qkv tile
the next block's two 16-byte loads follow the block's last product, with only the row sums' reduction and the
epilogue left to cover them; in its fc1 and fc2 tiles they sit at 80-85% of the loop; in persistent_gemv's int8
tiles they follow the last product too). So nearly every block waits a whole DRAM round trip, and a program of qkv
or dense does only 4-5 blocks: those linears ran at ~1 TB/s on an H100 (bench/NOTES.md run 55). A prefetch holds
no register and nothing waits on it, so asked for a few blocks ahead, a block's own loads find it in L2 wherever in
an iteration either lands. Memory traffic is unchanged (the same bytes, earlier), and nothing the kernel computes
depends on it.

One bulk prefetch a contiguous range (a block's rows; SwiGLU's up half; NF4's absmax), issued by the program's first
thread (its warp: ``UBLKPF``, ~15 uniform instructions a range): the copy engine splits it into lines. Run 29
(bench/NOTES.md) had every program of the tiled GEMVs ask for each 128-byte line of its slice with
``prefetch.global.L2`` and lost 11-12%: the many extra requests cost more than the latency they hid there. Hopper
only (``cp.async.bulk`` is sm_90's), outside Triton's interpreter (inline PTX): ``tried``.
"""

from __future__ import annotations

import os

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


BLOCKS_AHEAD = (2, 4)  # the distances the tuners try (``l2_ahead``)


def tried() -> bool:
    """Whether tiles with L2 prefetch are offered: on a Hopper or later GPU, outside Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def bulk_prefetch_asm() -> str:
    """PTX: the program's first thread asks L2 for the ``$2`` bytes (a multiple of 16) from address ``$1`` (16-byte
    aligned); ``$0`` is a dummy result (Triton's inline assembly has one)."""
    return ("{\n.reg .pred leader;\n.reg .u32 t;\nmov.u32 t, %tid.x;\nsetp.eq.u32 leader, t, 0;\n"
            "@leader cp.async.bulk.prefetch.L2.global [$1], $2;\n}\nmov.u32 $0, 0;")


if HAVE_TRITON:
    _BULK_PREFETCH = tl.constexpr(bulk_prefetch_asm())

    @triton.jit
    def prefetch_range(start, nbytes):
        # L2 prefetch of nbytes (> 0, a multiple of 16) from pointer start (16-byte aligned); not pure, so the
        # compiler keeps it where it is written
        tl.inline_asm_elementwise(_BULK_PREFETCH, "=r,l,r", [start, nbytes], dtype=tl.int32, is_pure=False, pack=1)
