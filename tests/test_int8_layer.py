"""The 8-bit model's weight-only int8 linears: what ``load_model`` builds, and what bitsandbytes 8-bit layers
(a model loaded through transformers' ``BitsAndBytesConfig``) are swapped for before training, over the same
int8 storage. Same function as the dequantised weights, forward and input gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from backend.int8_layer import Int8Linear, use_weight_only_int8
from backend.loading import load_model
from backend.modeling import split_prefix
from helpers_tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("int8") / "model")


def dequantised_copy(model):
    """A float32 model whose linears hold exactly the int8 rows times their scales."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.data = child.weight.float() * child.scale[:, None]
                if child.bias is not None:
                    lin.bias.data = child.bias.float()
                setattr(module, child_name, lin)
    return ref


def bitsandbytes_8bit_model(tiny_dir):
    """The model as transformers' BitsAndBytesConfig loads it (the seed snippet), on the CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModel, BitsAndBytesConfig

    import backend

    backend.register()
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return AutoModel.from_pretrained(tiny_dir, quantization_config=config).requires_grad_(False)


def assert_same_function_as_dequantised(model):
    ref = dequantised_copy(model)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 12))
    cfg = model.config
    prefix = torch.randn(2, 3, cfg.prefix_kv_size, requires_grad=True)
    outs, grads = [], []
    for m in (model, ref):
        loss = m(ids, labels=ids, prefix_kv=split_prefix(prefix, cfg), use_cache=False).loss
        (grad,) = torch.autograd.grad(loss, prefix)
        outs.append(loss.detach())
        grads.append(grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_8bit_load_builds_int8_layers_that_match_their_dequantised_weights(tiny_dir):
    loaded = load_model(tiny_dir, quantization="8bit", device="cpu")
    model = loaded.model
    layer = model.transformer.encoder.layers[0].self_attention.query_key_value
    assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8 and layer.bias is not None
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)  # kept 16-bit, like the seed's 8-bit
    assert use_weight_only_int8(model) == 0  # nothing left to swap
    assert_same_function_as_dequantised(model)


def test_8bit_load_quantizes_each_row_to_127_steps_of_its_absmax(tiny_dir):
    from safetensors.torch import load_file

    model = load_model(tiny_dir, quantization="8bit", device="cpu").model
    stored = load_file(str(tiny_dir / "model.safetensors"))["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"].float()
    layer = model.transformer.encoder.layers[1].mlp.dense_4h_to_h
    absmax = stored.abs().amax(dim=1)
    torch.testing.assert_close(layer.scale, absmax / 127)
    assert torch.equal(layer.weight.abs().amax(dim=1), torch.full_like(absmax, 127, dtype=torch.int8))
    back = layer.weight.float() * layer.scale[:, None]
    assert torch.all((back - stored).abs() <= layer.scale[:, None] / 2 + 1e-6)  # rounded to the nearest step


def test_swap_shares_bitsandbytes_storage_and_matches_dequantised_weights(tiny_dir):
    model = bitsandbytes_8bit_model(tiny_dir)
    cb = model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.CB
    assert use_weight_only_int8(model) == 2 * 4  # 4 linears a layer, output layer kept 16-bit
    assert use_weight_only_int8(model) == 0
    layer = model.transformer.encoder.layers[0].mlp.dense_h_to_4h
    assert isinstance(layer, Int8Linear) and layer.weight.data_ptr() == cb.data_ptr()
    assert_same_function_as_dequantised(model)


def test_fast_decoder_built_after_the_swap_shares_the_int8_rows(tiny_dir):
    from backend.decoding import EagerDecoder
    from backend.fast_decode import FastDecoder
    from backend.service import SamplingParams

    model = bitsandbytes_8bit_model(tiny_dir)
    use_weight_only_int8(model)
    decoder = FastDecoder(model)
    assert decoder.mode == "int8"
    qweight = model.transformer.encoder.layers[1].mlp.dense_4h_to_h.weight
    assert any(lw.weight.data_ptr() == qweight.data_ptr() for lw in vars(decoder.layers[1]).values() if hasattr(lw, "weight"))
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    ids = list(range(5, 20))
    assert list(decoder.generate(ids, greedy, [2])) == list(EagerDecoder(model).generate(ids, greedy, [2]))


_KERNEL_CHECK = r"""
import torch
from backend.int8_linear import quantize_per_channel
from backend.int8_layer import grad_input_torch, grad_input_triton

torch.manual_seed(0)
# (M, N, K): one output tile with the sum over N split, several tiles with ragged edges, one split
for M, N, K, dtype in ((5, 300, 200, torch.float16), (70, 1100, 130, torch.float16), (3, 64, 64, torch.float32)):
    q, s = quantize_per_channel(torch.randn(N, K) * 0.02)
    g = torch.randn(M, N).to(dtype)
    ref = g.double() @ (q.double() * s.double()[:, None])
    for out in (grad_input_triton(g, q, s), grad_input_torch(g, q, s)):
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert out.dtype == dtype and out.shape == (M, K), (out.dtype, out.shape)
        assert err < (2e-3 if dtype == torch.float16 else 1e-5), (M, N, K, dtype, err)
print("ok")
"""


def test_backward_kernel_matches_float64_under_the_triton_interpreter():
    """The CUDA backward kernel's arithmetic, run by Triton's CPU interpreter (bf16 is not emulated there)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 128 * 260 * 2])  # whole, and 128 rows/columns at a time
def test_widened_linear_and_grad_input_equal_the_dequantised_weight(monkeypatch, chunk_bytes):
    """The compute-bound path (long prompts, training micro-batches): cuBLAS on (q * scale) rounded once to the
    activation dtype, whole or a block at a time."""
    from backend import int8_linear
    from backend.int8_linear import LinearWeights, quantize_per_channel, widened_grad_input, widened_linear

    monkeypatch.setattr(int8_linear, "WIDEN_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(300, 260, generator=g))
    bias = torch.randn(300, generator=g).to(torch.bfloat16)
    x = torch.randn(7, 260, generator=g).to(torch.bfloat16)
    dy = torch.randn(7, 300, generator=g).to(torch.bfloat16)
    w = (q.float() * scale[:, None]).to(torch.bfloat16)  # the widened weight, rounded once
    # (BLAS may sum a narrower matrix in another order: equal up to the last bf16 bit)
    torch.testing.assert_close(widened_linear(x, LinearWeights(q, scale, bias)), torch.nn.functional.linear(x, w, bias),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(widened_grad_input(dy, q, scale), dy @ w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 128 * 260 * 2])
def test_the_widened_product_adds_into_the_residual_in_place(monkeypatch, chunk_bytes):
    """A long prompt's dense and fc2: out is the residual stream, and cuBLAS adds each block's product into it (no
    add of its own); with another out, or none, the residual is added after; the caller's residual is untouched."""
    from backend import int8_linear
    from backend.int8_linear import LinearWeights, quantize_per_channel, widened_linear

    monkeypatch.setattr(int8_linear, "WIDEN_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(1)
    q, scale = quantize_per_channel(torch.randn(300, 260, generator=g))
    x = torch.randn(7, 260, generator=g)
    residual = torch.randn(7, 300, generator=g)
    lw = LinearWeights(q, scale, None)
    want = x @ (q.float() * scale[:, None]).T + residual
    stream = residual.clone()
    got = widened_linear(x, lw, stream, out=stream)
    assert got.data_ptr() == stream.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    biased = LinearWeights(q, scale, torch.randn(300, generator=g))  # (a bias added after the product, in place too)
    stream = residual.clone()
    torch.testing.assert_close(widened_linear(x, biased, stream, out=stream), want + biased.bias, rtol=1e-5, atol=1e-4)
    kept = residual.clone()
    torch.testing.assert_close(widened_linear(x, lw, residual), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(widened_linear(x, lw, residual, out=torch.empty(7, 300)), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(residual, kept)


def test_big_cards_widen_bigger_blocks_unless_capped(monkeypatch):
    """On a GPU this process may use 32 GiB of, a whole 6B fc1 widens in one block (half a long prompt's launches);
    a small card, or a small card's memory cap on a big one, keeps the small blocks; the CPU keeps them too."""
    from types import SimpleNamespace

    from backend import int8_linear

    gib = 1 << 30
    for total, fraction, want in ((80 * gib, 1.0, int8_linear.WIDE_CARD_CHUNK_BYTES),
                                  (80 * gib, 6 / 80, int8_linear.WIDEN_CHUNK_BYTES),
                                  (16 * gib, 1.0, int8_linear.WIDEN_CHUNK_BYTES)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, t=total: SimpleNamespace(total_memory=t))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i, f=fraction: f, raising=False)
        assert int8_linear.widen_chunk_bytes(torch.device("cuda", 0)) == want
    assert int8_linear.widen_chunk_bytes(torch.device("cpu")) == int8_linear.WIDEN_CHUNK_BYTES
    assert int8_linear._widen_block(27392, 4096, 2, torch.device("cpu")) == 8192  # fc1 in 64 MB blocks on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton/cuBLAS choice is made on CUDA only")
def test_int8_layer_switches_to_the_widened_path_at_widen_min_rows():
    """Below WIDEN_MIN_ROWS tokens the Triton kernels, from it cuBLAS on the widened weight: both close to the
    dequantised weight, forward and input gradient."""
    from backend import int8_linear
    from backend.int8_linear import LinearWeights, quantize_per_channel

    q, scale = quantize_per_channel(torch.randn(4608, 4096, device="cuda"))
    layer = Int8Linear.from_weights(LinearWeights(q, scale, torch.randn(4608, device="cuda", dtype=torch.bfloat16)))
    w = q.float() * scale[:, None]
    for rows in (int8_linear.WIDEN_MIN_ROWS - 1, int8_linear.WIDEN_MIN_ROWS):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        (grad,) = torch.autograd.grad(y.float().square().sum(), x)
        ref_y = x.float() @ w.T + layer.bias.float()
        torch.testing.assert_close(y.float(), ref_y, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad.float(), (2 * y.float()) @ w, rtol=2e-2, atol=5e-1)
