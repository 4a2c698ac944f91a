"""The official chatglm2-6b-int4 layout: a tiny model packed by the release's rule loads without remote
code, keeps its weights packed, unpacks to round(w / scale), gives the dequantized model's logits, and
trains a prefix; a checkpoint that does not fit its config is one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend import int8_linear
from backend.int4_release import QUANTIZED_LINEARS, Int4Linear, pack_int4, unpack_int4, widen_int4
from backend.loading import load_model
from backend.modeling import ChatGLMForConditionalGeneration
from backend.service import BackendError
from helpers_tiny import make_tiny_model_dir


def test_packing_follows_the_release_rule():
    w = torch.tensor([[-3.0, 5.0, 7.0, -7.0], [0.5, -1.0, 0.0, 0.25]])
    packed, scale = pack_int4(w)
    assert packed.dtype == torch.int8 and packed.shape == (2, 2) and scale.dtype == torch.float16
    assert scale[0] == 1.0 and packed[0].tolist() == [(0xD5 - 256), (0x79)]  # -3 high, 5 low; 7 high, -7 low
    q = torch.round(w / (w.abs().amax(1, keepdim=True) / 7))
    assert torch.equal(unpack_int4(packed).float(), q)
    assert int(unpack_int4(packed).min()) >= -8 and int(unpack_int4(packed).max()) <= 7


def test_widening_rows_and_column_runs_follows_the_packing_rule():
    torch.manual_seed(0)
    packed, scale = pack_int4(torch.randn(6, 16))
    want = unpack_int4(packed).float() * scale.float()[:, None]
    assert torch.equal(widen_int4(packed, scale, torch.float32), want)
    assert torch.equal(widen_int4(packed[2:5], scale[2:5], torch.float32), want[2:5])
    assert torch.equal(widen_int4(packed[:, 2:6], scale, torch.float32), want[:, 4:12])
    assert torch.equal(widen_int4(packed, scale, torch.float16), want.half())  # q * scale is exact, rounded once


def packed_layer(n: int, k: int) -> Int4Linear:
    torch.manual_seed(1)
    layer = Int4Linear(k, n, bias=True, dtype=torch.float32)
    layer.weight, layer.weight_scale = pack_int4(torch.randn(n, k))
    layer.weight_scale = layer.weight_scale.float()
    layer.bias.data = torch.randn(n)
    return layer


@pytest.mark.parametrize("block_bytes", [None, 128 * 512 * 4], ids=["whole", "blocks of 128"])
def test_the_packed_linear_keeps_no_widened_weight_for_its_backward(monkeypatch, block_bytes):
    """P-Tuning backpropagates through every frozen linear: autograd must keep the packed weight, not a widened
    copy of it (~11 GB over the 6B model's 112 linears in fp16), and the input's gradient must still be dy @ W."""
    if block_bytes:
        monkeypatch.setattr(int8_linear, "WIDEN_CHUNK_BYTES", block_bytes)
    n, k = 512, 512
    layer = packed_layer(n, k)
    w = layer.dequantize_weight(torch.float32)
    x = torch.randn(2, 5, k, requires_grad=True)
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = layer(x)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= n * k], "a widened weight was kept"
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=1e-4, rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory) -> Path:
    """A tiny model directory written as the int4 release writes one (fp16 tensors, packed layer linears)."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("int4") / "model", seed=4)
    state = load_file(str(path / "model.safetensors"))
    packed_state = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in QUANTIZED_LINEARS and ".layers." in key:
            packed_state[key], packed_state[f"{module}.weight_scale"] = pack_int4(tensor * 5)
        else:
            packed_state[key] = (tensor * (1 if "layernorm" in key else 5)).half()
    save_file(packed_state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(quantization_bit=4, torch_dtype="float16")
    (path / "config.json").write_text(json.dumps(config))
    return path


def dequantized_reference(int4_dir: Path) -> ChatGLMForConditionalGeneration:
    """The same model as plain float32 linears holding unpack(weight) * weight_scale."""
    from backend.configuration import ChatGLMConfig

    state = load_file(str(int4_dir / "model.safetensors"))
    plain = {}
    for key, tensor in state.items():
        if key.endswith(".weight_scale"):
            continue
        scale_key = key.removesuffix(".weight") + ".weight_scale"
        plain[key] = unpack_int4(tensor).float() * state[scale_key].float()[:, None] if scale_key in state else tensor.float()
    config = ChatGLMConfig.from_pretrained(int4_dir)
    model = ChatGLMForConditionalGeneration(config).eval()
    model.load_state_dict(plain, strict=False)
    return model


def test_the_release_layout_loads_packed_and_gives_the_dequantized_logits(int4_dir):
    loaded = load_model(int4_dir, device="cpu")
    layer = loaded.model.transformer.encoder.layers[0]
    assert isinstance(layer.self_attention.query_key_value, Int4Linear) and isinstance(layer.mlp.dense_4h_to_h, Int4Linear)
    assert layer.mlp.dense_h_to_4h.weight.dtype == torch.int8
    assert loaded.quantization == "int4" and loaded.precision == "4bit"
    reference = dequantized_reference(int4_dir)
    ids = torch.tensor([loaded.tokenizer.encode(loaded.tokenizer.build_prompt("你好"))])
    with torch.no_grad():
        got = loaded.model(ids).logits
        want = reference(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.std() > 0.1  # the weights were really used


def test_a_prefix_trains_through_the_packed_weights(int4_dir):
    loaded = load_model(int4_dir, device="cpu")
    model, cfg = loaded.model, loaded.model.config
    prefix = torch.zeros(1, 3, cfg.prefix_kv_size, requires_grad=True)
    from backend.modeling import split_prefix

    ids = torch.tensor([loaded.tokenizer.encode("类型#上衣")])
    loss = model(ids, labels=ids, prefix_kv=split_prefix(prefix, cfg), use_cache=False).loss
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_an_int4_checkpoint_that_does_not_fit_its_config_is_one_sentence(int4_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(int4_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["ffn_hidden_size"] = 96
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match="different models"):
        load_model(other, device="cpu")
    del config["quantization_bit"]
    config["ffn_hidden_size"] = json.loads((int4_dir / "config.json").read_text())["ffn_hidden_size"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match="quantization_bit"):
        load_model(other, device="cpu")
    with pytest.raises(BackendError, match="already 4-bit"):
        load_model(int4_dir, device="cpu", quantization="8bit")


def test_chat_and_training_run_on_the_release(int4_dir, tmp_path):
    from backend.decoding import EagerDecoder
    from backend.engine import ChatEngine
    from backend.fast_decode import FastDecoder
    from backend.service import SamplingParams
    from backend.training import train_prefix
    from test_training import request, write_data

    engine = ChatEngine.load(str(int4_dir), device="cpu")
    assert engine.info.precision == "4bit"
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    ids = engine.prompt_ids("你好", [])
    fast = list(FastDecoder(engine.model, max_seq_len=64, weights="fp32").generate(ids, greedy, []))
    assert fast == list(EagerDecoder(engine.model).generate(ids, greedy, []))
    assert engine.reply("你好", [], greedy).new_tokens > 0
    result = train_prefix(engine.model, engine.tokenizer, request(tmp_path, write_data(tmp_path / "t.json", 4), max_steps=2, save_steps=2, pre_seq_len=4))
    assert result.steps_done == 2 and result.last_checkpoint is not None
    engine.close()


def test_a_long_prompt_reads_the_packed_weight_a_block_at_a_time(monkeypatch):
    """The batched decoder's linear beyond QUANT_MAX_M rows (a prompt) widens the int4 weight in blocks, not
    the whole of it with float32 copies on the way (~1 GB for fc1 of the 6B model)."""
    from backend.decode.batch_linear import QUANT_MAX_M, BatchLinear

    monkeypatch.setattr(int8_linear, "WIDEN_CHUNK_BYTES", 128 * 512 * 4)
    layer = packed_layer(512, 512)
    x = torch.randn(QUANT_MAX_M + 3, 512)
    got = BatchLinear(layer, torch.float32, "fc2")(x)
    torch.testing.assert_close(got, x @ layer.dequantize_weight(torch.float32).T + layer.bias, atol=1e-4, rtol=1e-5)
