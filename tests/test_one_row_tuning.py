"""The one-row step's tile descent (backend/decode/one_row_tuning.py) on a cost model: it finds each kind's fastest
tile, keeps the default within the noise margin, and skips a tile that fails on the card."""

from __future__ import annotations

import itertools

import pytest
import torch

from backend.decode import one_row_tuning as T
from backend.kernels import tuning
from backend.kernels.int8_gemv import GemvConfig


def _measure(costs: dict, failing=(), noise=0.0):
    """A step whose time is the sum of its tiles' costs (with alternating noise); ``failing`` tiles do not build."""
    flip = itertools.cycle((noise, -noise))

    def measure(configs):
        if any(c in failing for c in configs.values()):
            raise RuntimeError("out of resources: shared memory")
        total = sum(costs[k].get(c, 1.0) for k, c in configs.items())
        return lambda: total * (1 + next(flip))
    return measure


def test_the_descent_keeps_each_kinds_fastest_tile_and_skips_tiles_that_fail():
    a, b, c = GemvConfig(block_p=2), GemvConfig(block_p=4), GemvConfig(block_p=8)
    start = {"fc1": a, "qkv": a}
    costs = {"fc1": {a: 1.0, b: 0.8, c: 0.9}, "qkv": {a: 0.5, b: 0.3, c: 0.4}}
    measure = _measure(costs)
    best = T.descend(start, {"fc1": [b, c], "qkv": [c, b]}, measure, rounds=3)
    assert best == {"fc1": b, "qkv": b}
    measure = _measure(costs, failing=(b,))
    assert T.descend(start, {"fc1": [b, c], "qkv": [c, b]}, measure) == {"fc1": c, "qkv": c}


def test_a_tile_within_the_noise_margin_does_not_replace_the_default():
    a, b = GemvConfig(block_p=2), GemvConfig(block_p=4)
    costs = {"fc2": {a: 1.0, b: 0.999}}  # 0.1% faster: below KEEP_GAIN
    measure = _measure(costs, noise=0.0005)
    assert T.descend({"fc2": a}, {"fc2": [b]}, measure) == {"fc2": a}


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


def test_the_one_row_persistent_tiles_are_candidates_only_when_asked_for(monkeypatch):
    """persistent_gemv's tiles join the descent's int8 (with fp16 products) and 16-bit candidates under
    GLMCHAT_PERSISTENT_GEMV=all only (not yet run on a GPU), as do NF4's 8-row block and the tiles that ask L2 for
    blocks ahead (kernels/weight_prefetch.py; on a GPU: outside Triton's interpreter): by default the candidates, and so
    the digest a card's stored tiles were picked among, are those before them."""
    import types

    from backend.kernels import packed_products, weight_prefetch

    monkeypatch.setattr(packed_products, "tried", lambda: True)
    monkeypatch.setattr(weight_prefetch, "tried", lambda: True)  # (as on a Hopper card)

    def lin(int8: bool, shape):
        return types.SimpleNamespace(q=object() if int8 else None, one_row=types.SimpleNamespace(weight=torch.empty(shape)))

    layer = types.SimpleNamespace(qkv=lin(True, (48, 32)), dense=lin(True, (32, 32)), up=lin(True, (128, 32)),
                                  down=lin(True, (32, 64)))
    decoder = types.SimpleNamespace(layers=[layer], output=lin(False, (100, 32)), dtype=torch.float16)
    monkeypatch.delenv("GLMCHAT_PERSISTENT_GEMV", raising=False)
    default = T.candidates_for(decoder)
    assert not any(c.programs_per_sm or c.l2_ahead for cands in default.values() for c in cands)
    monkeypatch.setenv("GLMCHAT_PERSISTENT_GEMV", "all")
    asked = T.candidates_for(decoder)
    for kind, cands in asked.items():
        extra = [c for c in cands if c.programs_per_sm]
        assert cands[: len(default[kind])] == default[kind] and len(extra) == 6 + 4, kind
        assert all(c.cvt == (2 if kind == "output" else 3) and c.block_k == 0 for c in extra), kind
        assert sorted(c.l2_ahead for c in extra) == [0] * 6 + [2, 2, 4, 4], kind
    shown = extra[-1]  # (the tuning log shows the fields the digests leave out)
    assert "l2_ahead" not in repr(shown) and tuning.describe(shown).endswith("programs_per_sm=2, l2_ahead=4)")
    assert T.candidates_for(decoder) != default
    from backend.kernels.gemv_4bit import candidate_configs  # NF4's 8-row persistent block, one row only

    eight = [c for c in candidate_configs("nf4", 1, False) if c.kernel == "persistent" and c.block_n == 8]
    assert eight and not [c for c in candidate_configs("nf4", 2, False) if c.block_n == 8 and c.kernel == "persistent"]
    for rows in (1, 2):  # NF4's prefetching tiles: the shared table's, at one and two rows
        ahead = [c for c in candidate_configs("nf4", rows, True) if c.kernel == "persistent" and c.l2_ahead]
        assert len(ahead) == 4 and all(c.lut == 4 for c in ahead), rows
    monkeypatch.undo()  # (before Hopper, or in Triton's interpreter: none; the gate still set)
    monkeypatch.setattr(packed_products, "tried", lambda: True)
    monkeypatch.setenv("GLMCHAT_PERSISTENT_GEMV", "all")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not weight_prefetch.tried() and not [c for c in T.candidates_for(decoder)["qkv"] if c.l2_ahead]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert not weight_prefetch.tried()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert weight_prefetch.tried()
    monkeypatch.delenv("GLMCHAT_PERSISTENT_GEMV")
    assert not [c for c in candidate_configs("nf4", 1, False) if c.kernel == "persistent" and c.block_n == 8]
    assert not [c for rows in (1, 2) for c in candidate_configs("nf4", rows, True) if c.l2_ahead]


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
    among its words and persistent tiles (fc1's halved for SwiGLU), with the register table where the rows' dtype has one; the
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
        assert cands[kind] and all(c.kernel in ("words", "persistent") and (c.lut >= 3) == table for c in cands[kind])
        assert any(c.kernel == "persistent" for c in cands[kind])
    assert max(c.block_n for c in cands["fc1"]) < max(c.block_n for c in cands["qkv"])  # SwiGLU: two rows an output
    assert all(c.lut < 3 for c in T.candidates_for(_four_bit_decoder(torch.float32))["qkv"])  # no fp32 table
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


def test_a_faster_tile_whose_step_is_wrong_is_not_kept(caplog):
    a, b, c = GemvConfig(block_p=2), GemvConfig(block_p=4), GemvConfig(block_p=8)
    costs = {"fc1": {a: 1.0, b: 0.5, c: 0.8}}
    timed = _measure(costs)

    def measure(configs):
        if configs["fc1"] == b:  # what graph_timer raises when the step's logits are off the default's
            raise T.WrongResult("logits off the default tiles' by 1.4")
        return timed(configs)

    with caplog.at_level("WARNING", logger="glmchat.tuning"):
        assert T.descend({"fc1": a}, {"fc1": [b, c]}, measure) == {"fc1": c}
    assert "computes a different step" in caplog.text and "off the default tiles' by 1.4" in caplog.text


def test_each_step_is_checked_against_the_first_steps_logits():
    reference = []
    logits = torch.linspace(-3, 3, 100)
    T.check_step(reference, logits)  # the default tiles' step: the reference
    T.check_step(reference, logits * 1.01)  # another summation order: within STEP_AGREEMENT
    with pytest.raises(T.WrongResult, match="off the default tiles' by 2"):
        T.check_step(reference, -logits)
    with pytest.raises(T.WrongResult, match="inf"):
        T.check_step(reference, logits * float("nan"))
