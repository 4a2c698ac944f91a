"""The batched fast decoder's decode step for one row (bucket 1: a chat's reply), with the one-row decoder's fusions.

The general step (``BatchFastDecoder._step_math``) runs, a layer, the QKV GEMV, a rotary + cache-write kernel, the
split attention and its combine, then dense, up and down; after the output GEMV, the batched greedy pick
(``kernels.greedy_rows``, two launches). For one row this step
- rotates q and k and writes k and v to the row's cache slots in the QKV GEMV's epilogue (no rotary kernel);
- folds the greedy pick into the output GEMV (an atomic max of (value, -row) keys, then one 1-thread kernel);
- launches its kernels as programmatic dependents on Hopper and later, so each one's launch overlaps the tail of
  the one before.
4-bit layers (NF4, the int4 release) keep their own GEMV (``quant_linear``, tuned per card), whose words kernel
does the rotary and cache write in its epilogue too (the rotary kernel follows the other tiles), launched as
programmatic dependents too; the pick is folded into the output GEMV, which is 16-bit in every 4-bit checkpoint.
That is what the older one-row decoder (``decode/fast_step.py``) does and the general step did not: on the H200
the general step's row took 2.54 ms, ~0.1 ms of it the rotary kernel and the pick's torch kernels, plus a launch
boundary each (bench/NOTES.md runs 8 and 16).

The math is the general step's: the GEMV rounds q, k and v to the model dtype before rotating them, as the rotary
kernel reads them, and takes its angles from the same table and rounding (``kernels.rotary``), so a row's tokens
do not depend on which of the two steps ran it. ``GLMCHAT_ONE_ROW_FUSED=0`` runs one row through the general step,
for an A/B in one process.
"""

from __future__ import annotations

import os

import torch

from ..generation import INVALID_SCORE_TOKEN
from ..kernels.int8_gemv import new_argmax_state, pick_token
from ..kernels.attention_batch import ONE_ROW_TILE, RopeWrite, attention_workspace, decode_attention
from ..kernels.gemv_4bit import kernels_run
from ..kernels.step_feed import feed_and_embed


def fused_one_row_enabled() -> bool:
    return os.environ.get("GLMCHAT_ONE_ROW_FUSED", "1") != "0"


def applies(decoder) -> bool:
    """Whether the output layer has one-row GEMV weights (16-bit or int8: the pick is folded into it), every other
    linear has them or is 4-bit (``quant_linear``), and the kernels run here (CUDA, or Triton's interpreter in the
    CPU tests)."""
    layers = [lin for lw in decoder.layers for lin in (lw.qkv, lw.dense, lw.up, lw.down)]
    return (decoder.output.one_row is not None and all(lin.one_row is not None or lin.q is not None for lin in layers)
            and kernels_run(decoder.embedding[:1]))


class OneRowStep:
    """Row 0's decode step over the decoder's cache and step inputs; returns (logits [1, V], greedy pick [1])."""

    def __init__(self, decoder, pdl: bool):
        self.dec = decoder
        self.pdl = pdl
        dev, dt = decoder.device, decoder.dtype
        hidden = decoder.embedding.shape[1]
        self.x = torch.empty(1, hidden, device=dev, dtype=dt)
        qkv_rows = (decoder.heads + 2 * decoder.groups) * decoder.head_dim
        self.qkv = torch.empty(1, qkv_rows, device=dev, dtype=dt)
        self.attn = torch.empty(1, decoder.heads * decoder.head_dim, device=dev, dtype=dt)
        down = decoder.layers[0].down
        self.mlp = torch.empty(1, down.q.k if down.one_row is None else down.one_row.weight.shape[1], device=dev, dtype=dt)
        self.logits = torch.empty(1, decoder.output.one_row.weight.shape[0], device=dev, dtype=dt)
        self.picks = decoder.fed_picks[:1]  # (where the general step's picks go too: the next step may feed from them)
        self.argmax = new_argmax_state(dev)
        self.workspace = attention_workspace(1, decoder.heads, decoder.groups, decoder.head_dim, dev, **ONE_ROW_TILE)

    def __call__(self, feed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``feed``: the decoder's step, fed from the last step's pick where the decoder's fed flag is set
        (``kernels.step_feed``), which it then sets; without, the inputs as they are (tuning replays the step)."""
        dec, pdl = self.dec, self.pdl
        H, D = dec.heads, dec.head_dim
        pos, plen = dec.positions[:1], dec.prefix_lens[:1]
        if feed:
            feed_and_embed(dec._fed_flag, dec.fed_picks, dec.tokens, dec.positions, dec.embedding, self.x)
        else:
            torch.index_select(dec.embedding, 0, dec.tokens[:1], out=self.x)
        q = self.qkv[:, : H * D].view(1, H, D)
        for i, lw in enumerate(dec.layers):
            kc, vc = dec.k_cache[i, :1], dec.v_cache[i, :1]
            self._qkv(lw, kc, vc, pos, plen)
            decode_attention(q, kc, vc, pos, plen, out=self.attn, workspace=self.workspace, pdl=pdl)
            self._linear(lw.dense, self.attn, self.x, residual=self.x)
            self._linear(lw.up, self.x, self.mlp, norm=lw.ln2, swiglu=True)
            self._linear(lw.down, self.mlp, self.x, residual=self.x)
        dec.output.gemv_row(self.x[0], self.logits[0], norm=dec.final_ln, eps=dec.eps, argmax=self.argmax, pdl=pdl)
        pick_token(self.argmax, self.picks, None, bad_token=INVALID_SCORE_TOKEN, pdl=pdl,
                   fed_flag=dec._fed_flag if feed else None)
        return self.logits, self.picks

    def _qkv(self, lw, kc, vc, pos, plen) -> None:
        """QKV, rotary, and k and v into the row's cache slot: in the GEMV's epilogue (int8 and 16-bit), in the 4-bit
        words kernel's (``quant_linear``), or by the rotary kernel after a 4-bit tile without one."""
        dec = self.dec
        rope = RopeWrite(kc, vc, pos, plen, dec.heads, dec.groups, dec.inv_freq, dec.rope.position_divisor,
                         dec.angle_dtype)
        if lw.qkv.one_row is not None:
            lw.qkv.gemv_row(self.x[0], self.qkv[0], norm=lw.ln1, eps=dec.eps, rope=rope.gemv_args(), pdl=self.pdl)
        else:
            lw.qkv(self.x, norm=lw.ln1, eps=dec.eps, out=self.qkv, pdl=self.pdl, rope=rope)

    def _linear(self, lin, x, out, **epilogue) -> None:
        """x [1, K] into out [1, N] through the one-row GEMV, or for 4-bit weights through ``quant_linear``."""
        if lin.one_row is not None:
            lin.gemv_row(x[0], out[0], eps=self.dec.eps, pdl=self.pdl, **epilogue)
        else:
            lin(x, eps=self.dec.eps, out=out, pdl=self.pdl, **epilogue)
