"""The fast decoder's decode step: six Triton kernels a layer captured once into a CUDA graph, replayed for
every token with the token fed back on the device (a mixin of ``FastDecoder``; moved unchanged from
backend/fast_decode.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from ..cuda_streams import warmup_stream
from ..generation import INVALID_SCORE_TOKEN
from ..int8_linear import HAVE_TRITON
from ..kernels.int8_gemv import default_gemv_config, gemv, new_argmax_state, pick_token

if HAVE_TRITON:
    import triton

    from ..kernels.decode_kernels import _attn_combine_kernel, _attn_split_kernel


class DecodeStepGraph:
    """The decode step: its buffers, its CUDA graph, and the loop that keeps one step queued ahead."""

    # -- steps -------------------------------------------------------------------------------

    def _device_steps(self, tokens: list[int], n: int, eos: set, cancel, sampler=None) -> Iterator[int]:
        """Decoding with the token chosen where the step runs and fed back there: greedy (the step's own
        pick), or drawn by ``sampler``, a graph replayed after each step that overwrites the pick.

        Step k+1 is queued before token k is read, so the GPU never waits for Python; when the
        reply stops, the step in flight has only written the keys/values of the last token.
        """
        P = self.prefix_len
        start = len(tokens) - 1  # position of the token fed by the first step
        steps = min(n, self.max_seq_len - P - start)  # each step takes one cache slot
        if steps <= 0:
            return
        with torch.inference_mode():
            self._set_step_input(tokens[-1], start)
            self._launch(0, sampler)
        for k in range(steps):
            if k + 1 < steps and not (cancel is not None and cancel.is_set()):
                with torch.inference_mode():
                    self._launch(k + 1, sampler)
            token = self._read(k)
            if cancel is not None and cancel.is_set():
                return
            self._n_cached = len(tokens)
            tokens.append(token)
            yield token
            if token in eos:
                return

    def _launch(self, k: int, sampler=None) -> None:
        """Run one step from self._in; it writes its token to host slot k % 2 and feeds it to the next step."""
        if self._graph is not None:
            self._graph.replay()
            if sampler is not None:
                sampler.replay()
            self._host_tok[k % 2 : k % 2 + 1].copy_(self._next_token.view(1), non_blocking=True)
            self._tok_ready[k % 2].record()
            return
        tok, pos = int(self._in[0]), int(self._in[1])  # the same step in torch (CPU, or shapes the kernels skip)
        logits = self._forward_torch([tok], pos)[0]
        finite = bool(torch.isfinite(logits).all())  # the original's nan/inf guard
        nxt = int(logits.argmax()) if finite else INVALID_SCORE_TOKEN
        self._host_tok[k % 2] = nxt
        self._in[0] = nxt
        self._in[1:] += 1

    def _read(self, k: int) -> int:
        if self._tok_ready is not None and self._graph is not None:
            self._tok_ready[k % 2].synchronize()
        return int(self._host_tok[k % 2])

    # -- CUDA graph ----------------------------------------------------------------------------

    def _graph_of(self, body, warmups: int = 1) -> "torch.cuda.CUDAGraph":
        """``body`` captured into a CUDA graph from this decoder's pool, after ``warmups`` runs on a side stream
        that compile kernels of new shapes, initialise libraries and settle the allocator outside the capture."""
        main = torch.cuda.current_stream(self.device)
        side = warmup_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmups):
                body()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a training run in another thread (the app trains while you chat) may go on meanwhile,
        # and prompt and sampler graphs are captured lazily, in the middle of a reply
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"), torch.inference_mode():
            body()
        return graph

    def _capture(self) -> None:
        self._alloc_step_buffers()
        self._graph = self._graph_of(self._step, warmups=2)
        torch.cuda.synchronize(self.device)
        self.graph_captures += 1

    def _alloc_step_buffers(self, splits: int = 16) -> None:
        """The decode step's intermediates and outputs."""
        dev, dt = self.device, self.dtype
        h, g, d = self.num_heads, self.num_groups, self.head_dim
        self._hpg = h // g
        self._hpg_pad = max(16, triton.next_power_of_2(self._hpg))
        self._splits = splits
        self._x = torch.empty(self.hidden, device=dev, dtype=dt)
        self._q = torch.empty(h * d, device=dev, dtype=dt)
        self._attn = torch.empty(h * d, device=dev, dtype=dt)
        self._mlp = torch.empty(self.layers[0].fc2.weight.shape[1], device=dev, dtype=dt)
        parts = g * self._splits * self._hpg_pad
        self._part_o = torch.empty(parts, d, device=dev, dtype=torch.float32)
        self._part_m = torch.empty(parts, device=dev, dtype=torch.float32)
        self._part_l = torch.empty(parts, device=dev, dtype=torch.float32)
        self._logits = torch.empty(self.output.weight.shape[0], device=dev, dtype=torch.float32)
        self._next_token = torch.zeros((), device=dev, dtype=torch.int64)
        self._argmax = new_argmax_state(dev)
        self._noise = torch.empty(self._logits.numel(), device=dev, dtype=torch.float32)  # the sampler's draws
        self._sampler_graphs = {}  # they read the buffers above

    def _step(self) -> None:
        """One token: the graph's body. Reads self._in (token, pos, slot); writes logits and the next token,
        and advances self._in to feed that token next (greedy replays need no host input)."""
        h, g, d = self.num_heads, self.num_groups, self.head_dim
        cfg, pdl = self._gemv_config, self.pdl
        torch.index_select(self.embedding, 0, self._in[:1], out=self._x.view(1, -1))
        pos = self._in[1:]
        rope_common = dict(q_rows=h * d, kv_rows=g * d, head_dim=d, inv_freq=self.inv_freq, pos=pos)
        for i, lw in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
            gemv(self._x, lw.qkv, self._q, norm_weight=lw.ln1, eps=self.eps,
                 rope=dict(rope_common, k_cache=kc, v_cache=vc), config=cfg("qkv", lw.qkv), pdl=pdl)
            self._attention(kc, vc, pos)
            gemv(self._attn, lw.dense, self._x, residual=self._x, config=cfg("dense", lw.dense), pdl=pdl)
            gemv(self._x, lw.fc1, self._mlp, norm_weight=lw.ln2, eps=self.eps, swiglu=True,
                 config=cfg("fc1", lw.fc1), pdl=pdl)
            gemv(self._mlp, lw.fc2, self._x, residual=self._x, config=cfg("fc2", lw.fc2), pdl=pdl)
        gemv(self._x, self.output, self._logits, norm_weight=self.final_ln, eps=self.eps,
             config=cfg("output", self.output), pdl=pdl, argmax=self._argmax)
        # the greedy token, or INVALID_SCORE_TOKEN where a logit is nan/inf (the original's guard), fed to the next
        # replay
        pick_token(self._argmax, self._next_token, self._in, bad_token=INVALID_SCORE_TOKEN, pdl=pdl)

    def _gemv_config(self, kind: str, lw):
        cfg = self.gemv_configs.get(kind) or default_gemv_config(kind, lw.is_int8)
        return cfg if self.prefetch is None else dataclasses.replace(cfg, prefetch=self.prefetch)

    def _attention(self, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor) -> None:
        g, d = self.num_groups, self.head_dim
        launch = {"launch_pdl": True} if self.pdl else {}
        _attn_split_kernel[(g, self._splits)](
            self._q, kc, vc, pos, self._part_o, self._part_m, self._part_l,
            kc.stride(0), kc.stride(1), 1.0 / math.sqrt(d), self._hpg, self._splits,
            HEAD_DIM=d, HPG_PAD=self._hpg_pad, BLOCK_T=64, IEEE=self.dtype == torch.float32, PDL=self.pdl,
            num_warps=4, **launch,
        )
        _attn_combine_kernel[(self.num_heads,)](
            self._part_o, self._part_m, self._part_l, self._attn, self._hpg, self._splits,
            HEAD_DIM=d, HPG_PAD=self._hpg_pad, SPLITS_PAD=triton.next_power_of_2(self._splits), PDL=self.pdl,
            num_warps=4, **launch,
        )

    def _set_step_input(self, token: int, pos: int) -> None:
        """Token, position and cache slot of the next step, copied from pinned memory without a sync."""
        if self._in_copied is not None:
            self._in_copied.synchronize()  # the previous copy has left the pinned buffer
        self._host_in[0] = token
        self._host_in[1] = pos
        self._host_in[2] = self.prefix_len + pos
        self._in.copy_(self._host_in, non_blocking=True)
        if self._in_copied is not None:
            self._in_copied.record()
