"""The batched decode kernels (backend/kernels/) on the CPU: tests/kernels_interpreted/ run in a subprocess
under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton compiles anything, so not here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_batch_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests" / "kernels_interpreted")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and "skipped" not in done.stdout, tail
