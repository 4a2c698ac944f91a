"""Triton kernels of the fast decoder (import the modules directly: each needs torch, most need Triton).

``HAVE_TRITON``: whether Triton imports here. CPU-only installs have none and run the torch fallbacks; each
module imports ``triton`` itself under this one check."""

import os

try:
    import triton  # noqa: F401 - the check itself

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

# A GEMV with RMSNorm fused reads its activation row once more after the weight loop, for the sum of squares (and
# int8's offset sum): a pass over a few KB that L1/L2 holds, but one dependent round trip per tile of it, at the
# end of every program, when none of the program's weight loads are left in flight. A tile as wide as the row makes
# it one round trip, up to X_PASS_VALUES_A_THREAD activations a thread (registers the weight loop no longer holds).
# bench/ablate_one_row_step.py varies both for an A/B; GLMCHAT_WIDE_X_PASS=0 turns it off in a process (bench/, not a
# user setting).
WIDE_X_PASS = os.environ.get("GLMCHAT_WIDE_X_PASS", "1") != "0"
X_PASS_VALUES_A_THREAD = 64


def x_pass_width(elements: int, tile: int, num_warps: int) -> int:
    """The tile width of that pass over a row of ``elements`` by a program of ``num_warps`` warps, for int8_gemv and
    gemv_rows (quant_words keeps its own: NF4's step did not gain, bench/NOTES.md run 40); their ``tile`` when not
    widened."""
    if not WIDE_X_PASS:
        return tile
    cap = X_PASS_VALUES_A_THREAD * 32 * num_warps
    return max(tile, min(cap, 1 << max(0, elements - 1).bit_length()))


def untested_persistent_tiles() -> bool:
    """Whether the tuners offer the persistent GEMV tiles no GPU has run yet (kernels/persistent_gemv.py at one and
    two rows; NF4's 8-row blocks): under GLMCHAT_PERSISTENT_GEMV=all only (bench/, bench/NOTES.md session 46). They
    have run under Triton's interpreter and compiled for sm_90/80/75; a kernel that faults in a tuning run would take
    the process's CUDA context with it. ``bench/run_device.sh one-row-persistent`` checks and measures them."""
    return os.environ.get("GLMCHAT_PERSISTENT_GEMV", "1") == "all"
