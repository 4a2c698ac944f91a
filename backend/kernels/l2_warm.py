"""Bring the next linear's weight into L2 while a kernel that barely touches memory runs (``prefetch.global.L2``).

Why: one row's decode step is a pass over the weights with a few latency-bound kernels in between. While a layer's
attention runs (4-7 us a layer on an H100, bench/ablate_one_row_step.py), the memory is idle, and the dense GEMV after
it then starts its 16 MB (int8) from DRAM, which at that size runs at ~62% of the bandwidth (its ramp and tail). The
attention's programs ask L2 for the dense weight first thing, before they wait for the kernel ahead, so the bytes
stream in while the attention computes and the GEMV finds them in L2.

Not the same as asking for a GEMV's own slice as it starts (bench/NOTES.md run 29, reverted: every line requested
twice, in a kernel that was already streaming): here the requests fill a window in which nothing streams.

``prefetch.global.L2`` exists on every GPU we support (sm_75 and later), writes nothing and reports no fault; it is
not in Triton's language, hence inline PTX, which Triton's CPU interpreter cannot run (``wanted`` is False there).
"""

from __future__ import annotations

import os

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl  # noqa: F401 - triton.jit below


def wanted(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may warm L2 (CUDA, not the interpreter; ``GLMCHAT_L2_WARM=0`` turns it off)."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("GLMCHAT_L2_WARM", "1") != "0"


if HAVE_TRITON:

    @triton.jit
    def prefetch_share(ptr, nbytes, part, parts, LINES: tl.constexpr):
        # part ``part`` of ``parts`` equal shares of bytes [0, nbytes) from ptr, LINES 128-byte lines a pass (one a
        # thread); lines past the share's end ask again for its first (an L2 lookup, no address outside the range)
        share = tl.cdiv(tl.cdiv(nbytes, parts), 128) * 128
        start = part.to(tl.int64) * share
        count = tl.minimum(share, nbytes - start)
        base = ptr.to(tl.pointer_type(tl.int8), bitcast=True) + start
        offs = tl.arange(0, LINES).to(tl.int64) * 128
        for o in range(0, count, LINES * 128):
            at = o + offs
            p = base + tl.where(at < count, at, 0)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                      is_pure=False, pack=1)
