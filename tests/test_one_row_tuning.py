"""The one-row step's tiles (backend/decode/one_row_tuning.py): each kind's start and candidates for the weights
at hand, the cache key, and the winners stored and read back (the descent itself: tests/test_step_tuning.py)."""

from __future__ import annotations

import torch

from backend.decode import one_row_tuning as T


def test_every_kind_has_candidates_for_both_weight_kinds_and_defaults_are_not_repeated():
    from backend.kernels.int8_gemv import DEFAULT_GEMV

    for weights, table in (("int8", "int8"), ("float", "float")):
        assert set(T.CANDIDATES[weights]) == set(T.KINDS)
        for kind in T.KINDS:
            cands = T.CANDIDATES[weights][kind]
            assert DEFAULT_GEMV[table][kind] not in cands and len(set(cands)) == len(cands)


def test_an_8bit_models_output_layer_keeps_the_16_bit_tiles_and_candidates():
    """An 8-bit model's layers are int8 but its output layer stays 16-bit (loading.SKIP_QUANTIZATION): each kind
    starts from, and is tuned among, the tiles of its own weights; the cache key names both."""
    import types

    import torch

    from backend.kernels.int8_gemv import DEFAULT_GEMV

    def lin(int8: bool, shape):
        return types.SimpleNamespace(q=object() if int8 else None, one_row=types.SimpleNamespace(weight=torch.empty(shape)))

    layer = types.SimpleNamespace(qkv=lin(True, (48, 32)), dense=lin(True, (32, 32)), up=lin(True, (128, 32)),
                                  down=lin(True, (32, 64)))
    decoder = types.SimpleNamespace(layers=[layer, layer], output=lin(False, (100, 32)), dtype=torch.float16)
    start = T.defaults(decoder)
    assert start["output"] == DEFAULT_GEMV["float"]["output"] and start["fc2"] == DEFAULT_GEMV["int8"]["fc2"]
    assert T.tuning_key(decoder) == "one_row_step:int8-float:float16:2x48x32x32x64x100"


def _four_bit_decoder(dtype=torch.bfloat16):
    """A 4-bit model's linears as the tuner sees them: NF4 layers (the register table for bf16 rows), a 16-bit
    output layer."""
    import types

    def four_bit(n, k):
        q = types.SimpleNamespace(fmt="nf4", n=n, k=k, table_registers={torch.bfloat16: (0,) * 8})
        return types.SimpleNamespace(q=q, one_row=None, row_config=None)

    layer = types.SimpleNamespace(qkv=four_bit(48, 32), dense=four_bit(32, 32), up=four_bit(128, 32),
                                  down=four_bit(32, 64))
    output = types.SimpleNamespace(q=None, one_row=types.SimpleNamespace(weight=torch.empty(100, 32)), row_config=None)
    return types.SimpleNamespace(layers=[layer, layer], output=output, dtype=dtype, device=torch.device("cpu"))


def test_a_4bit_models_layers_start_from_quant_linears_pick_and_are_tuned_among_its_one_row_tiles():
    """4-bit layers (NF4, the int4 release) start from quant_linear's own pick (None) and are tuned inside the step
    among its words tiles (fc1's halved for SwiGLU), with the register table where the rows' dtype has one; the
    16-bit output layer among the one-row GEMV's tiles."""
    from backend.kernels import packed_products
    from backend.kernels.int8_gemv import DEFAULT_GEMV

    decoder = _four_bit_decoder()
    assert T.defaults(decoder) == {"output": DEFAULT_GEMV["float"]["output"], "qkv": None, "dense": None,
                                   "fc1": None, "fc2": None}
    cands = T.candidates_for(decoder)
    assert list(cands) == list(T.KINDS) and cands["output"] == T.CANDIDATES["float"]["output"]
    table = packed_products.tried()
    for kind in ("qkv", "dense", "fc1", "fc2"):
        assert cands[kind] and all(c.kernel == "words" and (c.lut == 3) == table for c in cands[kind])
    assert max(c.block_n for c in cands["fc1"]) < max(c.block_n for c in cands["qkv"])  # SwiGLU: two rows an output
    assert all(c.lut != 3 for c in T.candidates_for(_four_bit_decoder(torch.float32))["qkv"])  # no fp32 table
    assert T.tuning_key(decoder) == "one_row_step:nf4-float:bfloat16:2x48x32x32x64x100"


def test_a_4bit_step_keeps_the_tiles_that_beat_quant_linears_pick_and_a_new_decoder_reads_them(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    decoder = _four_bit_decoder()
    faster = T.candidates_for(decoder)["fc1"][1]

    def measure(configs):  # only fc1's second candidate beats quant_linear's own pick
        total = 1.0 - 0.1 * (configs["fc1"] == faster)
        return lambda: total

    best = T.tune(decoder, measure)
    assert best["fc1"] == faster and best["qkv"] is None and decoder.layers[1].up.row_config == faster
    again = _four_bit_decoder()
    T.apply(again, T.cached(again))
    assert again.layers[0].up.row_config == faster and again.layers[0].qkv.row_config is None
