"""The int4 release's layers in the batched fast decoder and its one-row tuning, under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()  # (each file runs in a subprocess of its own: tests/test_kernels_batch.py)

from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402
from backend.decode.protocol import DecodeRequest  # noqa: E402
from backend.service import SamplingParams  # noqa: E402
from tests.kernels_interpreted.decoder_models import GREEDY, int4_release_model, run  # noqa: E402


@pytest.mark.parametrize("words", [False, True])
def test_int4_release_rows_equal_the_eager_decoder_through_either_4bit_gemv(words, monkeypatch):
    """The packed weights through quant_linear, one row and a compare's two: the earlier GEMV (the default config)
    or quant_words' (put first, as a tuner picking it would), the eager decoder's tokens either way. The words
    kernel rotates q and k and writes the cache in its epilogue: no rotary kernel runs after the QKV linear then."""
    from backend.kernels import attention_batch as A
    from backend.kernels import gemv_4bit as Q

    monkeypatch.setattr(Q, "_chosen", {})  # (picks memoised by an earlier test)
    if words:
        real = Q.candidate_configs
        monkeypatch.setattr(Q, "candidate_configs", lambda fmt, m, swiglu=False: (
            [c for c in real(fmt, m, swiglu) if c.kernel == "words"] + real(fmt, m, swiglu)))
    launched = []
    real_launch = Q._launch
    monkeypatch.setattr(Q, "_launch", lambda x, w, out, *a, **k: launched.append(a[-2].kernel)
                        or real_launch(x, w, out, *a, **k))
    rotary_after, real_after = [], A.RopeWrite.after
    monkeypatch.setattr(A.RopeWrite, "after", lambda self, *a, **k: rotary_after.append(1) or real_after(self, *a, **k))
    model, prefixes = int4_release_model()
    requests = [DecodeRequest([5, 7, 9, 11], GREEDY), DecodeRequest([3, 4], GREEDY, adapter="ad")]
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=2), requests)
    fast = run(BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False), requests)
    assert fast == eager
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), requests[:1])
    assert alone[0] == eager[0]
    assert ("words" in launched) == words
    assert bool(rotary_after) != words


def test_tuning_a_4bit_models_one_row_step_runs_every_words_tile_to_the_same_step(monkeypatch, tmp_path):
    """The int4 release's layers in the one-row descent: quant_linear's one-row words tiles, run inside the step,
    give the step that quant_linear's own pick gives; the kept tile is applied, and a reply after tuning gives the
    eager decoder's tokens."""
    from backend.decode import one_row_tuning as T

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    model, prefixes = int4_release_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    every = T.candidates_for(decoder)
    assert all(every[k] for k in ("qkv", "dense", "fc1", "fc2"))
    # the first and last tiles of each kind (the interpreter runs a step in seconds; every tile: minutes)
    candidates = {k: [c[0], c[-1]] if len(c) > 1 else c for k, c in every.items()}
    monkeypatch.setattr(T, "candidates_for", lambda _: candidates)
    logits_seen = []
    faster = candidates["fc2"][0]

    def measure(configs):
        T.apply(decoder, configs)
        logits_seen.append(decoder._one_row_step()[0].clone())
        cost = 1.0 - 0.01 * (configs["fc2"] == faster)
        return lambda: cost

    decoder.tune_one_row(measure)
    assert len(logits_seen) == 1 + sum(len(v) for v in candidates.values())
    assert all(torch.allclose(x, logits_seen[0], rtol=1e-4, atol=1e-4) for x in logits_seen)
    assert decoder.layers[0].down.row_config == faster and decoder.layers[0].qkv.row_config is None
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=2), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])
