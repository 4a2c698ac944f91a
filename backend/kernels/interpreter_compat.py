"""Run the kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``) with current NumPy."""

from __future__ import annotations

import os

_patched = False


def numpy_compat() -> None:
    """The interpreter holds a scalar argument as a 1-element array and takes int() of it for a loop bound;
    NumPy >= 2.3 refuses int() of a 1-D array. Take .item() instead. A no-op outside the interpreter."""
    global _patched
    if _patched or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    _row_independent_dot(interpreter)
    _patched = True


def _row_independent_dot(interpreter) -> None:
    """A float ``tl.dot`` whose rows do not depend on the tile's other rows, as on a GPU. The interpreter calls
    ``np.matmul`` in float32, and OpenBLAS's kernel for some CPUs (Haswell's, on AMD EPYC) rounds a row differently
    by its place in the micro-tile, so a batch-invariant kernel's rows changed with the batch under the interpreter
    only. In float64, then rounded once to the accumulator's type, a row's sum is the same wherever it sits."""
    import numpy as np

    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not np.issubdtype(d.data.dtype, np.floating) or a.dtype.primitive_bitwidth == 8:
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
        return interpreter.TensorHandle(exact.astype(d.data.dtype) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
