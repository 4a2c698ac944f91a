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
    _patched = True
