"""The batched greedy pick (backend/kernels/greedy_rows.py) under Triton's interpreter: torch's argmax and guard
exactly, ties to the first index across tiles, nan and inf rows to the guard's token. Run through
tests/test_kernels_batch.py (TRITON_INTERPRET=1 in a subprocess)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.kernels.greedy_rows import BLOCK, greedy_rows, greedy_rows_torch  # noqa: E402

BAD = 13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_rows_pick_is_torchs_argmax_or_the_guards_token(dtype):
    torch.manual_seed(0)
    V = 2 * BLOCK + 77  # a partial last tile
    logits = torch.randn(7, V).to(dtype)
    logits[1, [5, BLOCK + 3, 2 * BLOCK + 9]] = 50.0  # a tie across tiles: the first index
    logits[2, 2 * BLOCK + 76] = 60.0  # the very last logit
    logits[3, 100] = float("nan")
    logits[4, BLOCK] = float("inf")
    logits[5, :] = float("-inf")
    logits[6, :] = -1e4  # all equal: index 0
    logits[6, 9] = -0.0
    want = greedy_rows_torch(logits, BAD)
    got = greedy_rows(logits, BAD)
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
    assert got[1] == 5 and got[2] == 2 * BLOCK + 76 and got[3:6].tolist() == [BAD] * 3 and got[6] == 9


def test_zeros_of_either_sign_tie_to_the_first_index_and_rows_may_be_strided():
    logits = torch.full((2, 300), -1.0)
    logits[0, 40], logits[0, 7] = 0.0, -0.0  # equal values: the first
    wide = torch.randn(2, 512)
    wide[:, :300] = logits
    assert greedy_rows(wide[:, :300], BAD).tolist() == greedy_rows_torch(logits, BAD).tolist() == [7, 0]
