"""The tiny float32 model and helpers the interpreted decoder tests share (tests/kernels_interpreted/)."""

from __future__ import annotations

import torch

from backend.modeling import ChatGLMForConditionalGeneration, split_prefix
from backend.service import SamplingParams
from tests.helpers_tiny import tiny_config

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def make_model():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(tiny_config(96, kv_channels=16)).eval()
    prefix = [t[:1] for t in split_prefix(torch.randn(1, 3, 2 * 2 * 2 * 16) * 0.5, model.config)]
    return model, {None: None, "ad": prefix}


def run(decoder, requests, join_after: int = 0):
    """Tokens per row; the last request joins after ``join_after`` steps (continuous batching)."""
    out = {i: [] for i in range(len(requests))}
    first = requests if not join_after else requests[:-1]
    for i, r in enumerate(first):
        decoder.add(i, r)
    steps = 0
    while decoder.rows:
        for t in decoder.step():
            out[t.row].append(t.token)
        steps += 1
        if join_after and steps == join_after:
            decoder.add(len(requests) - 1, requests[-1])
    assert not decoder.failed()
    return out


def int4_release_model():
    """The tiny model with its layers' linears packed as the chatglm2-6b-int4 release stores them."""
    from backend.int4_release import QUANTIZED_LINEARS, Int4Linear, pack_int4

    model, prefixes = make_model()
    for layer in model.transformer.encoder.layers:
        for parent in (layer.self_attention, layer.mlp):
            for name in QUANTIZED_LINEARS:
                dense = getattr(parent, name, None)
                if dense is None:
                    continue
                packed = Int4Linear(dense.in_features, dense.out_features, dense.bias is not None, torch.float32)
                packed.weight, scale = pack_int4(dense.weight.detach())
                packed.weight_scale = scale.float()
                if dense.bias is not None:
                    packed.bias.data.copy_(dense.bias.detach())
                setattr(parent, name, packed)
    return model, prefixes
