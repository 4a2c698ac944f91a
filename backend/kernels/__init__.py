"""Triton kernels of the fast decoder (import the modules directly: each needs torch, most need Triton)."""
