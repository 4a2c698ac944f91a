"""The fast decoder: a static KV cache, the whole decode step in one CUDA graph, int8 or half weights.

``FastDecoder`` has the methods of ``backend.decoding.EagerDecoder`` (``set_prefix``, ``reset``,
``generate``); ``backend.decode.fast.SerialFastDecoder`` serves it through the batched decoder
protocol. Its parts: this file (weights, static cache with prefix slots, the reply loop, the torch
math), ``fast_step`` (the decode step's CUDA graph), ``fast_prefill`` (prompts in bucket graphs),
``fast_sampler`` (sampling), and the Triton kernels in ``backend/kernels/decode_kernels.py``.

- Cache: keys and values of every layer in two preallocated tensors [L, g, S, d]; a P-Tuning
  prefix takes slots 0..P-1, a conversation's tokens follow. Switching adapters copies the new
  prefix into those slots; P lives in a device scalar, so nothing is recaptured or recompiled.
- Prompt (prefill): the model's math in torch over the static cache (int8 linears through a
  Triton matmul on CUDA). On CUDA a prompt of up to 2048 new tokens is padded on the right to a
  power-of-two bucket and replayed from a CUDA graph captured on the bucket's first use (one per
  bucket and key window; inputs read from device tensors), which removes the ~11 launches a layer
  from Python; longer prompts, and the CPU, run the same math eagerly.
- Decode step on CUDA: six Triton kernels a layer (fused norm/linear/rotary/cache-write, split
  attention and its combine, linear + residual, norm + linear + SwiGLU, linear + residual),
  the final norm + output linear with the greedy pick folded in, captured once into a CUDA graph
  and replayed for every token; the token is fed back on the device. Sampling (temperature,
  top-k, top-p) replays a second small graph after the step (``device_sampling``); only the
  repetition penalty samples on the host. No torch.compile: start-up is the kernels' JIT (cached
  by Triton). GEMV configs per linear are tuned inside the captured step (bench/explore_gemv.py).
- Without CUDA (or Triton) the same decoder runs the torch math for every step, so CPU tests
  cover the cache, prefix, reuse and sampling logic.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from .. import device_sampling
from ..decoding import common_prefix_length
from ..generation import logits_processors
from ..int8_linear import HAVE_TRITON, is_quantized_module, linear, linear_weights
from ..kernels.attention_batch import rotary_inv_freq
from ..lean_autograd import rms_norm
from ..modeling import Rope, apply_rotary, attention, rope_settings, rotary_cos_sin
from ..service import SamplingParams
from .fast_prefill import PrefillGraphs
from .fast_sampler import DeviceSampler
from .fast_step import DecodeStepGraph
from ..gpu_memory import free_bytes

if HAVE_TRITON:
    from ..kernels.decode_kernels import _rope_cache_kernel, rms_norm_rows, swiglu_rows

WEIGHT_MODES = ("int8", "bf16", "fp16", "fp32", "same")
_DTYPE_MODE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def available() -> bool:
    """True where the fast path runs its CUDA kernels and graph (CUDA and Triton present)."""
    return HAVE_TRITON and torch.cuda.is_available()


def plain_rope(config) -> bool:
    """Whether the one-row decoder's fused kernels apply: they compute ChatGLM2-6B's plain rotary angles."""
    return rope_settings(config) == Rope(float32=getattr(config, "family", "chatglm2") == "chatglm3")


def cache_slots(model, memory_share: float = 0.5) -> int:
    """The model's seq_length, or fewer slots when its KV cache would take more than ``memory_share``
    of the free GPU memory (a 6B model's 32768 slots take 1.9 GB in 16-bit)."""
    cfg = model.config
    slot_bytes = cfg.num_layers * cfg.multi_query_group_num * cfg.kv_channels * 2 * 2  # keys and values, 16-bit
    want = int(cfg.seq_length)
    if torch.cuda.is_available() and model.get_input_embeddings().weight.is_cuda:
        free = free_bytes(model.get_input_embeddings().weight.device)
        want = min(want, int(free * memory_share) // slot_bytes)
    return max(256, want)


class _Layer:
    """One block's compact weights."""

    def __init__(self, block, mode: str, dtype: torch.dtype):
        attn, mlp = block.self_attention, block.mlp
        self.ln1 = block.input_layernorm.weight.detach().to(dtype)
        self.ln2 = block.post_attention_layernorm.weight.detach().to(dtype)
        self.qkv = linear_weights(attn.query_key_value, mode, dtype)
        self.dense = linear_weights(attn.dense, mode, dtype)
        self.fc1 = linear_weights(mlp.dense_h_to_4h, mode, dtype)
        self.fc2 = linear_weights(mlp.dense_4h_to_h, mode, dtype)



def _weights_and_activations(weights: str, quantized: bool, model_dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """(weight mode, activation dtype): "same" keeps int8 for a quantized model, else the model's dtype; the
    activations take the model's dtype, or the weights' when half weights were asked for."""
    mode = ("int8" if quantized else _DTYPE_MODE.get(model_dtype, "fp32")) if weights == "same" else weights
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, model_dtype)
    return mode, dtype if dtype.is_floating_point else torch.float16


class FastDecoder(PrefillGraphs, DecodeStepGraph, DeviceSampler):
    """Batch-1 decoding over a static cache; on CUDA each token is one CUDA-graph replay."""

    def __init__(
        self,
        model,
        max_seq_len: int = 8192,
        weights: str = "int8",
        use_graph: Optional[bool] = None,
        gemv_configs: Optional[dict] = None,
        pdl: Optional[bool] = None,
        prefetch: Optional[bool] = None,
        prefill_graphs: Optional[bool] = None,
    ):
        """``prefill_graphs``: prompts that fit a bucket run padded, captured into one CUDA graph per bucket
        (default: on where the decode step uses a graph); set on the CPU it runs the same padded math
        without a graph (tests)."""
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, not {weights!r}")
        cfg = model.config
        tr = model.transformer
        emb = tr.embedding.word_embeddings.weight
        self.device = emb.device
        self.num_layers = cfg.num_layers
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.multi_query_group_num
        self.head_dim = cfg.kv_channels
        self.hidden = cfg.hidden_size
        self.eps = cfg.layernorm_epsilon
        self.rotary_dim = cfg.kv_channels // 2
        self.rope = rope_settings(cfg)  # the torch paths; the fused kernels assume the plain one (plain_rope)
        self.inv_freq = rotary_inv_freq(self.rotary_dim, self.device)  # the QKV GEMV's rotary epilogue
        self.max_seq_len = max_seq_len
        self.gemv_configs = dict(gemv_configs or {})  # "qkv" | "dense" | "fc1" | "fc2" | "output" -> GemvConfig
        self.prefetch = prefetch  # None: as each config says
        quantized = any(is_quantized_module(m) for m in tr.encoder.modules())
        self.mode, self.dtype = _weights_and_activations(weights, quantized, emb.dtype)
        mode = self.mode
        with torch.no_grad():
            self.embedding = emb.detach().to(self.dtype)
            self.layers = [_Layer(b, mode, self.dtype) for b in tr.encoder.layers]
            self.final_ln = tr.encoder.final_layernorm.weight.detach().to(self.dtype)
            self.output = linear_weights(tr.output_layer, mode, self.dtype)
        shape = (self.num_layers, self.num_groups, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.prefix_len = 0
        self._history: list[int] = []  # the conversation's tokens ...
        self._n_cached = 0  # ... of which the first n have keys/values after the prefix slots
        self._graph = None
        self.graph_captures = 0  # how many times a decode graph was captured (1 per decoder)
        cuda = self.device.type == "cuda"
        # step inputs (token, position, slot) and the chosen token, read back through pinned memory
        self._in = torch.zeros(3, dtype=torch.int64, device=self.device)
        # sampling inside the graph: one small graph per (temperature, top_k, top_p), a seed per reply
        self._sampler_graphs: dict = {}
        self._seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self._host_in = torch.zeros(3, dtype=torch.int64, pin_memory=cuda)
        self._host_tok = torch.zeros(2, dtype=torch.int64, pin_memory=cuda)
        self._in_copied = torch.cuda.Event() if cuda else None
        self._tok_ready = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        kernels_fit = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0 and self.hidden % 2 == 0
        # the prompt's elementwise stages as Triton kernels (CUDA); the CPU keeps the model's exact torch math
        self.fused_prefill = available() and cuda and kernels_fit
        if use_graph is None:
            use_graph = available() and cuda and kernels_fit
        self.use_graph = use_graph
        if pdl is None:  # programmatic dependent launch: Hopper and later
            pdl = use_graph and torch.cuda.get_device_capability(self.device)[0] >= 9
        self.pdl = bool(pdl)
        # all graphs of this decoder allocate from one pool: they never run at the same time (one stream),
        # and every tensor that outlives a replay (inputs, logits, cache) is allocated outside the pool
        self._graph_pool = torch.cuda.graph_pool_handle() if use_graph else None
        self._init_prefill(use_graph if prefill_graphs is None else prefill_graphs)
        if use_graph:
            try:
                self._capture()
            except Exception:  # a driver or runtime without PDL in graphs: capture the plain launches
                if not self.pdl:
                    raise
                torch.cuda.synchronize(self.device)
                self.pdl = False
                self._capture()

    @property
    def cached_ids(self) -> list[int]:
        """The tokens whose keys/values the cache holds after the prefix slots."""
        return self._history[: self._n_cached]

    # -- chat engine interface ----------------------------------------------------------------

    def set_prefix(self, prefix_kv: Optional[list[torch.Tensor]]) -> None:
        """2*layers tensors [1, g, P, d] (key, value per layer) into the first P slots, or None."""
        if prefix_kv is None:
            self.prefix_len = 0
        else:
            P = prefix_kv[0].shape[2]
            if P >= self.max_seq_len:
                raise ValueError(f"prefix of {P} slots does not fit a cache of {self.max_seq_len}")
            with torch.no_grad():
                for i in range(self.num_layers):
                    self.k_cache[i, :, :P].copy_(prefix_kv[2 * i][0])
                    self.v_cache[i, :, :P].copy_(prefix_kv[2 * i + 1][0])
            self.prefix_len = P
        self.reset()

    def reset(self) -> None:
        self._history = []
        self._n_cached = 0

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        cancel: Optional[threading.Event] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[int]:
        """Yield new token ids for the prompt ``input_ids``, reusing the cached tokens that begin it."""
        if not input_ids:
            raise ValueError("empty prompt")
        P = self.prefix_len
        if P + len(input_ids) > self.max_seq_len:
            raise ValueError(f"prompt of {len(input_ids)} tokens does not fit the cache ({self.max_seq_len - P} slots)")
        keep = min(common_prefix_length(self.cached_ids, input_ids), len(input_ids) - 1)  # feed >= 1 token
        tokens = list(input_ids)
        self._history, self._n_cached = tokens, keep
        eos = set(eos_token_ids)
        if params.max_new_tokens <= 0 or (cancel is not None and cancel.is_set()):
            return
        procs = logits_processors(params)
        penalty = bool(params.repetition_penalty) and params.repetition_penalty != 1.0
        all_ids = torch.tensor([tokens], device=self.device) if penalty else None
        with torch.inference_mode():
            logits = self._prefill(tokens[keep:], keep)
            token = self._select(logits, procs, all_ids, params, generator)
        self._n_cached = len(tokens)
        tokens.append(token)
        yield token
        if token in eos:
            return
        if params.greedy and not penalty:
            yield from self._device_steps(tokens, params.max_new_tokens - 1, eos, cancel)
            return
        sampler = self._sampler_graph(params) if device_sampling.on_device(params) else None
        if sampler is not None:
            self._seed.fill_(self._reply_seed(generator))
            yield from self._device_steps(tokens, params.max_new_tokens - 1, eos, cancel, sampler)
            return
        for _ in range(params.max_new_tokens - 1):
            if cancel is not None and cancel.is_set():
                return
            pos = len(tokens) - 1  # the last token is fed at this position
            if P + pos >= self.max_seq_len:
                return  # the cache is full
            if all_ids is not None:
                all_ids = torch.cat((all_ids, all_ids.new_tensor([[tokens[-1]]])), dim=1)
            with torch.inference_mode():
                if self._graph is not None:
                    self._set_step_input(tokens[-1], pos)
                    self._graph.replay()
                    logits = self._logits.view(1, -1).clone()
                else:
                    logits = self._forward_torch(tokens[-1:], pos)
                token = self._select(logits, procs, all_ids, params, generator)
            self._n_cached = len(tokens)
            tokens.append(token)
            yield token
            if token in eos:
                return

    # -- the torch math (CPU steps, prompts the graphs skip) --------------------------------------

    def _forward_torch(self, new_ids: list[int], start: int) -> torch.Tensor:
        """The model's math (as modeling.py computes it) for tokens at positions start.., writing the cache.

        Returns the last position's logits [1, V] float32. Runs the prompt on CUDA and every step on the CPU.
        """
        P = self.prefix_len
        s = len(new_ids)
        past = P + start  # slots before the new tokens
        t = past + s
        ids = torch.tensor([new_ids], device=self.device)
        x = F.embedding(ids, self.embedding)  # [1, s, hidden]
        cos = sin = None  # the fused prompt kernels compute the rotary angles themselves
        if not self.fused_prefill:
            positions = torch.arange(start, start + s, device=self.device)[None]
            cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.dtype, self.rope)
        mask = None  # as the model: plain causal when nothing precedes, no mask for one token
        if past and s > 1:
            rows = torch.arange(s, device=self.device)[:, None] + past
            mask = (torch.arange(t, device=self.device)[None, :] <= rows)[None, None]  # [1, 1, s, t]
        h, d = self.num_heads, self.head_dim
        for i, lw in enumerate(self.layers):
            qkv = linear(self._rms(x, lw.ln1), lw.qkv)  # [1, s, (h + 2g) d]
            q = self._rope_and_cache(qkv, i, cos, sin, start, past, s)  # [1, h, s, d]
            keys, values = self.k_cache[i, :, :t][None], self.v_cache[i, :, :t][None]  # [1, g, t, d]
            out = attention(q, keys, values, mask, causal=mask is None and s == t and s > 1, gqa=True)
            x = x + linear(out.transpose(1, 2).reshape(1, s, h * d), lw.dense)
            x = x + linear(self._swiglu(linear(self._rms(x, lw.ln2), lw.fc1)), lw.fc2)
        x = self._rms(x[:, -1:], self.final_ln)
        return linear(x, self.output)[:, -1].float()  # [1, V]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused_prefill:
            return rms_norm_rows(x, weight, self.eps)
        return rms_norm(x, weight, self.eps)

    def _rope_and_cache(self, qkv, i, cos, sin, start, past, s, meta=None):
        """q [1, h, s, d] rotated; k (rotated) and v written to layer i's cache slots past..past+s.

        ``meta``: an int64 device tensor (start, past, ...) read in place of the ints (graph capture)."""
        h, g, d = self.num_heads, self.num_groups, self.head_dim
        if self.fused_prefill:
            q = torch.empty(1, h, s, d, device=qkv.device, dtype=qkv.dtype)
            kc, vc = self.k_cache[i], self.v_cache[i]
            from_device = meta is not None
            _rope_cache_kernel[(s, h + 2 * g)](
                qkv, q, kc, vc, 0 if from_device else start, 0 if from_device else past,
                meta if from_device else qkv, s, h, g, kc.stride(0), kc.stride(1),
                HEAD_DIM=d, ROT_PAIRS=self.rotary_dim // 2, LOG2_BASE=13.287712379549449, FROM_DEVICE=from_device,
                num_warps=1,
            )
            return q
        q, k, v = qkv.split([h * d, g * d, g * d], dim=-1)
        q = apply_rotary(q.view(1, s, h, d), cos, sin).transpose(1, 2)  # [1, h, s, d]
        k = apply_rotary(k.view(1, s, g, d), cos, sin).transpose(1, 2)  # [1, g, s, d]
        v = v.view(1, s, g, d).transpose(1, 2)
        if meta is None:
            self.k_cache[i, :, past : past + s] = k[0]
            self.v_cache[i, :, past : past + s] = v[0]
        else:
            slots = meta[1] + torch.arange(s, device=qkv.device)
            self.k_cache[i].index_copy_(1, slots, k[0].to(self.k_cache.dtype))
            self.v_cache[i].index_copy_(1, slots, v[0].to(self.v_cache.dtype))
        return q

    def _swiglu(self, y: torch.Tensor) -> torch.Tensor:
        if self.fused_prefill:
            return swiglu_rows(y)
        a, b = y.chunk(2, dim=-1)
        return F.silu(a) * b
