"""The batched decode kernels (backend/kernels/) on the CPU: tests/kernels_interpreted/ run in a subprocess
under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton compiles anything, so not here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


# one subprocess a file, each with its own time limit: in one process they took over 23 minutes on a 2-core machine
# (the interpreter runs every kernel's Python for every element; a decoder test takes 1-4 minutes)
HERE = Path(__file__).resolve().parent / "kernels_interpreted"
FILES = sorted(p.name for p in HERE.glob("test_*.py"))


@pytest.mark.timeout(1500)  # over the per-test 600 s of pyproject.toml
@pytest.mark.parametrize("name", FILES)
def test_batch_kernels_under_the_triton_interpreter(name):
    pytest.importorskip("triton")
    root = HERE.parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / name)],
        cwd=root, env=env, capture_output=True, text=True, timeout=1400,
    )
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and "skipped" not in done.stdout, tail


def test_cpu_path_is_the_same_math_without_triton():
    """Off CUDA (and outside the interpreter) quant_linear runs torch math on the unpacked weight."""
    import torch

    from backend.kernels import gemv_4bit as Q

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernels; this checks the torch path")
    n, k = 6, 8
    q = torch.randint(-8, 8, (n, k), dtype=torch.int32)
    scale = (torch.rand(n) + 0.5).half()
    packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8).view(torch.int8)  # the release's rule
    w = Q.int4_release_weight(packed, scale)
    ref_w = q.float() * scale.float()[:, None]
    assert torch.equal(w.dequantize(), ref_w)
    x, g, res = torch.randn(3, k), 1 + torch.rand(k), torch.randn(3, n // 2)
    out = Q.quant_linear(x, w, residual=res, norm_weight=g, swiglu=True)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    a, b = (xn @ ref_w.T).chunk(2, dim=-1)
    assert torch.allclose(out, torch.nn.functional.silu(a) * b + res, atol=1e-5)
