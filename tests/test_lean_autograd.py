"""The lean RMSNorm, loss and MLP recomputation: the same values and gradients as plain torch,
with fewer bytes kept for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.lean_autograd import causal_lm_loss, rms_norm
from backend.modeling import ChatGLMForConditionalGeneration, split_prefix
from helpers_tiny import tiny_config


def plain_rms_norm(x, weight, eps):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(x.dtype)


def plain_loss(logits, labels):
    shift = logits.float()[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for the backward of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rms_norm_matches_plain_torch(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64).to(dtype)
    out = rms_norm(x, w, 1e-5)
    ref = plain_rms_norm(x, w, 1e-5)
    assert torch.equal(out, ref)  # the forward is the same arithmetic, bit for bit
    got = torch.autograd.grad(out, (x, w), grad)
    want = torch.autograd.grad(ref, (x, w), grad)
    # the mean of squares is float32 in both, so float64 agrees to float32 rounding of that path
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_rms_norm_keeps_only_its_input():
    x = torch.randn(192, 512, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(512, dtype=torch.bfloat16)
    lean = saved_bytes(lambda: rms_norm(x, w, 1e-5))
    plain = saved_bytes(lambda: plain_rms_norm(x, w, 1e-5))
    assert lean <= x.numel() * 2 + 192 * 4 + 512 * 2
    assert plain >= 2 * lean


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_loss_matches_cross_entropy(dtype, monkeypatch):
    monkeypatch.setattr("backend.lean_autograd._CHUNK_ELEMENTS", 3 * 50)  # several chunks of 3 rows
    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 50) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # an unlabelled prompt, as the P-Tuning data has
    labels[1, 5] = -100
    loss, ref = causal_lm_loss(logits, labels), plain_loss(logits, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    got, = torch.autograd.grad(loss * 3, logits)
    want, = torch.autograd.grad(ref * 3, logits)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float64 else 1e-2, atol=1e-6)
    assert got[0, :2].abs().sum() == 0 and got[:, -1].abs().sum() == 0  # unlabelled targets and the last position


def test_loss_of_nothing_labelled_is_nan_like_torch():
    logits = torch.randn(1, 4, 10, requires_grad=True)
    labels = torch.full((1, 4), -100)
    assert torch.isnan(causal_lm_loss(logits, labels)) and torch.isnan(plain_loss(logits, labels))


def test_loss_keeps_only_the_16_bit_logits():
    logits = torch.randn(1, 192, 4096, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (1, 192))
    lean = saved_bytes(lambda: causal_lm_loss(logits, labels))
    plain = saved_bytes(lambda: plain_loss(logits, labels))
    assert lean < logits.numel() * 2 * 1.05
    assert plain > 1.9 * lean  # a float32 copy at least


def test_mlp_recomputation_gives_the_same_prefix_gradient_and_keeps_less():
    torch.manual_seed(0)
    config = tiny_config(300, num_layers=3, pre_seq_len=None)
    model = ChatGLMForConditionalGeneration(config).double().requires_grad_(False)
    encoder = model.transformer.encoder
    ids = torch.randint(3, 300, (2, 24))
    prefix = torch.randn(2, 4, config.prefix_kv_size, dtype=torch.float64, requires_grad=True)

    def step():
        return model(ids, labels=ids, prefix_kv=split_prefix(prefix, config), use_cache=False).loss

    results = {}
    for recompute in (False, True):
        encoder.recompute_mlp = recompute
        loss = step()
        results[recompute] = (loss.detach(), torch.autograd.grad(loss, prefix)[0], saved_bytes(step))
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-12, atol=1e-14)
    # per layer: the up-projection (2 x 128) and SwiGLU outputs (128) of 48 rows no longer kept
    assert results[False][2] - results[True][2] >= 3 * 48 * (2 * 128 + 128) * 8 * 0.9
