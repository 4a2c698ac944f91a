"""Triton kernels of the fast decoder (import the modules directly: each needs torch, most need Triton).

``HAVE_TRITON``: whether Triton imports here. CPU-only installs have none and run the torch fallbacks; each
module imports ``triton`` itself under this one check."""

try:
    import triton  # noqa: F401 - the check itself

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False
