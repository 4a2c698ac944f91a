"""Ask the L2 cache for a GEMV program's whole weight slice as the program starts (``prefetch.global.L2``).

Why: at one token a linear is a pass over its weight, and the one-row GEMVs keep only a tile or two of it in
flight a program (the 4-bit words kernel as tuned: two rows of 1024 weights, 1 KB, then a chain of decode
work before the next load). The loop waits a full DRAM round trip each tile, and each kernel's first and last
microseconds leave the memory idle (113 launches a token). One prefetch instruction a 128-byte line, issued
for the program's rows before its loop and, under programmatic dependent launch, before it waits for the
kernel ahead of it, puts the whole slice in flight at once: the loop's loads then find their lines in L2 or on
the way, and a program placed on an SM while the kernel ahead drains starts pulling its bytes in then. The
slices of a wave of programs (tens of KB an SM) fit the L2 many times over.

``prefetch.global.L2`` exists on every CUDA GPU we support (sm_75 and later), is a hint (it writes no memory and
reports no fault), and is not in Triton's language, hence inline PTX. Triton's CPU interpreter cannot run
inline PTX, so the kernels take it as a compile-time switch that is off there.

Off unless ``GLMCHAT_L2_PREFETCH=1``: it has not been timed on a GPU yet (``bash bench/run_device.sh ab-l2``
runs the A/B; bench/NOTES.md run 29), and what users run by default is what was measured.
"""

from __future__ import annotations

import os

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


def wanted(device) -> bool:
    """Whether the GEMVs on ``device`` prefetch their slices (CUDA only, when asked: the interpreter has no inline
    PTX)."""
    if getattr(device, "type", None) != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return os.environ.get("GLMCHAT_L2_PREFETCH", "0") == "1"


if HAVE_TRITON:

    @triton.jit
    def prefetch_bytes(ptr, start, count, LINES: tl.constexpr):
        # bytes [start, start + count) from ptr (any pointer type; start and count in bytes, count may be <= 0),
        # LINES lines of 128 bytes a pass; lines past the end ask for the first one again (a prefetch of a line
        # already asked for costs an L2 lookup, and no address outside the range is touched)
        base = ptr.to(tl.pointer_type(tl.int8), bitcast=True) + start.to(tl.int64)
        offs = tl.arange(0, LINES).to(tl.int64) * 128
        for o in range(0, count, LINES * 128):
            at = o + offs
            p = base + tl.where(at < count, at, 0)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                      is_pure=False, pack=1)
