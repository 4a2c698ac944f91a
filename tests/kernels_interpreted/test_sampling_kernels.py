"""The sampler's noise kernel (backend/device_sampling.py) under Triton's interpreter: row r of a batch of rows
draws what that row's (seed, position) draws alone, so a row sampled in a batch draws what it would draw alone. Run through tests/test_kernels_batch.py (TRITON_INTERPRET=1 in a subprocess)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
triton = pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend import device_sampling as ds  # noqa: E402


def test_rows_noise_equals_the_one_row_noise_for_each_rows_seed_and_position():
    V = 2500  # not a multiple of the 1024 block
    seeds, positions = torch.tensor([0, 7, 7, 2**40 - 1]), torch.tensor([0, 0, 9, 12345])
    rows = ds.exponential_noise_rows(torch.empty(4, V), seeds, positions)
    for r in range(4):
        alone = ds.exponential_noise(torch.empty(V), seeds[r], positions[r])
        assert torch.equal(rows[r], alone), r
    assert rows.min() > 0 and not torch.equal(rows[1], rows[2])
