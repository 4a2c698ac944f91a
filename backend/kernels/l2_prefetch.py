"""Weight blocks asked of L2 ahead of their loads (``prefetch.global.L2``), for the persistent GEMVs
(``quant_persistent`` for 4-bit weights, ``persistent_gemv`` for int8 and 16-bit ones).

Why: those kernels ask for the next block's weights before this block's products, but ptxas moves that load down to
after the products, where this block's word registers are free again (sm_90 SASS under Triton 3.6: in NF4's qkv tile
the next block's two 16-byte loads follow the block's last product, with only the row sums' reduction and the
epilogue left to cover them; in its fc1 and fc2 tiles they sit at 80-85% of the loop; in persistent_gemv's int8
tiles they follow the last product too). So nearly every block waits a whole DRAM round trip, and a program of qkv
or dense does only 4-5 blocks: those linears ran at ~1 TB/s on an H100 (bench/NOTES.md run 55). A prefetch holds
no register, so it stays ahead of those loads (tests/test_kernels_compile.py checks the SASS); asked for a few blocks
ahead, a block's own loads then find it in L2. Memory traffic is unchanged (the same bytes, earlier), and nothing
the kernel computes depends on it.

One prefetch a thread's 16-byte group, on every card from sm_75 (``cp.async.bulk.prefetch`` would be one a block,
but only on Hopper, and an int8 block's rows are not contiguous). Inline PTX, as Triton has no prefetch of a pointer
tile; Triton's interpreter cannot run it, so the tuners offer these tiles on a GPU only (``tried``).
"""

from __future__ import annotations

import os

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


def tried() -> bool:
    """Whether tiles with L2 prefetch are offered: on a GPU only (Triton's interpreter cannot run inline PTX)."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def prefetch_asm() -> str:
    """PTX: ask L2 for the line holding address ``$1``; ``$0`` is a dummy result (Triton's inline assembly has one)."""
    return "prefetch.global.L2 [$1];\nmov.u32 $0, 0;"


if HAVE_TRITON:
    _PREFETCH_L2 = tl.constexpr(prefetch_asm())

    @triton.jit
    def prefetch_l2(ptrs):
        # a prefetch for each pointer of the tile; not pure, so the compiler keeps it where it is written
        tl.inline_asm_elementwise(_PREFETCH_L2, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
