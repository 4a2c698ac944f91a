"""The fast decoder: a static KV cache, the whole decode step in one CUDA graph, int8 or half weights.

``FastDecoder`` has the methods of ``backend.decoding.EagerDecoder`` (``set_prefix``, ``reset``,
``generate``), so the chat engine can use either; ``make_decoder`` picks one.

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

import dataclasses
import math
import threading
import warnings
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import device_sampling
from .cuda_streams import warmup_stream
from .decoding import EagerDecoder, common_prefix_length
from .generation import logits_processors
from .int8_linear import (
    HAVE_TRITON, default_gemv_config, gemv, is_quantized_module, linear, linear_weights, new_argmax_state, pick_token,
)
from .modeling import Rope, apply_rotary, rope_settings, rotary_cos_sin
from .service import SamplingParams

if HAVE_TRITON:
    import triton
    import triton.language as tl

WEIGHT_MODES = ("int8", "bf16", "fp16", "fp32", "same")
_DTYPE_MODE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Prompts padded on the right to a bucket, one CUDA graph per (bucket, key window) (see ``_prefill``).
PREFILL_MIN_BUCKET = 16
PREFILL_MAX_BUCKET = 2048
PREFILL_MAX_GRAPHS = 32  # oldest dropped beyond this (they share one memory pool, so this bounds host-side state)
# masked key windows up to this many bytes of float32 scores (heads x T x KW x 4) take SDPA's math kernel with
# enable_gqa, as _forward_torch does; larger ones repeat the keys per head for memory-efficient attention
PREFILL_MATH_ATTN_BYTES = 64 << 20


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (as triton.next_power_of_2, without needing Triton)."""
    return 1 << max(0, n - 1).bit_length()


def available() -> bool:
    """True where the fast path runs its CUDA kernels and graph (CUDA and Triton present)."""
    return HAVE_TRITON and torch.cuda.is_available()


def make_decoder(model, engine: str = "auto", weights: str = "same", max_seq_len: Optional[int] = None):
    """The decoder the chat engine should use: "fast", "eager", or "auto" (fast on CUDA, eager on CPU).

    The fast cache holds the model's seq_length slots where memory allows (``cache_slots``)."""
    if engine not in ("auto", "fast", "eager"):
        raise ValueError(f"engine must be auto, fast or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    # The fused kernels compute ChatGLM2-6B's plain rotary angles; other rope settings run eagerly.
    plain_rope = rope_settings(model.config) == Rope(float32=getattr(model.config, "family", "chatglm2") == "chatglm3")
    if engine == "fast" and not plain_rope:
        from .service import BackendError

        raise BackendError(f"the fast decoder does not implement rope_ratio={model.config.rope_ratio} yet; use --engine eager (or auto).")
    if engine == "eager" or (engine == "auto" and not (on_cuda and available() and plain_rope)):
        return EagerDecoder(model)
    return FastDecoder(model, max_seq_len=max_seq_len or cache_slots(model), weights=weights)


def cache_slots(model, memory_share: float = 0.5) -> int:
    """The model's seq_length, or fewer slots when its KV cache would take more than ``memory_share``
    of the free GPU memory (a 6B model's 32768 slots take 1.9 GB in 16-bit)."""
    cfg = model.config
    slot_bytes = cfg.num_layers * cfg.multi_query_group_num * cfg.kv_channels * 2 * 2  # keys and values, 16-bit
    want = int(cfg.seq_length)
    if torch.cuda.is_available() and model.get_input_embeddings().weight.is_cuda:
        free, _ = torch.cuda.mem_get_info(model.get_input_embeddings().weight.device)
        want = min(want, int(free * memory_share) // slot_bytes)
    return max(256, want)


if HAVE_TRITON:

    @triton.jit
    def _attn_split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr,
        stride_g, stride_t, sm_scale, HPG, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        # one (group, split): its HPG query heads against keys [start, end) of the cache
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        g = tl.program_id(0)
        s = tl.program_id(1)
        length = tl.load(pos_ptr + 1) + 1  # slots 0..slot hold the prefix, past tokens and this one
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_T) * BLOCK_T
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        h = tl.arange(0, HPG_PAD)
        d = tl.arange(0, HEAD_DIM)
        mh = h < HPG
        q = tl.load(q_ptr + (g * HPG + h)[:, None] * HEAD_DIM + d[None, :], mask=mh[:, None], other=0.0)
        m_i = tl.full([HPG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HPG_PAD], tl.float32)
        acc = tl.zeros([HPG_PAD, HEAD_DIM], tl.float32)
        base = g.to(tl.int64) * stride_g
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mt = t < end
            kv_off = base + t.to(tl.int64)[:, None] * stride_t + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=mt[:, None], other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(mt[None, :], sc * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=mt[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        part = (g * NUM_SPLITS + s) * HPG_PAD + h
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)

    @triton.jit
    def _attn_combine_kernel(
        o_ptr, m_ptr, l_ptr, out_ptr, HPG, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        head = tl.program_id(0)
        g = head // HPG
        h = head % HPG
        s = tl.arange(0, SPLITS_PAD)
        ms = s < NUM_SPLITS
        d = tl.arange(0, HEAD_DIM)
        part = (g * NUM_SPLITS + s) * HPG_PAD + h
        m = tl.load(m_ptr + part, mask=ms, other=float("-inf"))
        l = tl.load(l_ptr + part, mask=ms, other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        o = tl.load(o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=ms[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    # -- the prompt on CUDA: the torch math's elementwise stages, one launch each ------------------

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + row * K + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + offs, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, start_arg, past_arg, meta_ptr, S, H, G, stride_g, stride_t,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, LOG2_BASE: tl.constexpr, FROM_DEVICE: tl.constexpr,
    ):
        # token tok, head hd of qkv [S, (H + 2G) * D]: rotary on q and k, q to [H, S, D], k and v to the cache.
        # FROM_DEVICE: start (position of row 0) and past (its cache slot) are meta[0], meta[1] on the device,
        # so that one captured graph serves every start; else the Python ints start_arg, past_arg.
        if FROM_DEVICE:
            start = tl.load(meta_ptr)
            past = tl.load(meta_ptr + 1)
        else:
            start = start_arg
            past = past_arg
        tok = tl.program_id(0)
        hd = tl.program_id(1)
        i = tl.arange(0, HEAD_DIM // 2)
        src = qkv_ptr + (tok.to(tl.int64) * (H + 2 * G) + hd) * HEAD_DIM + 2 * i
        x0 = tl.load(src).to(tl.float32)
        x1 = tl.load(src + 1).to(tl.float32)
        theta = tl.exp2(-(2.0 * i.to(tl.float32) / (2 * ROT_PAIRS)) * LOG2_BASE)
        angle = (start + tok).to(tl.float32) * theta
        c = tl.cos(angle)
        s = tl.sin(angle)
        rot = (i < ROT_PAIRS) & (hd < H + G)
        y0 = tl.where(rot, x0 * c - x1 * s, x0)
        y1 = tl.where(rot, x1 * c + x0 * s, x1)
        if hd < H:
            dst = q_ptr + (hd.to(tl.int64) * S + tok) * HEAD_DIM + 2 * i
        elif hd < H + G:
            dst = k_cache_ptr + (hd - H).to(tl.int64) * stride_g + (past + tok).to(tl.int64) * stride_t + 2 * i
        else:
            dst = v_cache_ptr + (hd - H - G).to(tl.int64) * stride_g + (past + tok).to(tl.int64) * stride_t + 2 * i
        tl.store(dst, y0.to(dst.dtype.element_ty))
        tl.store(dst + 1, y1.to(dst.dtype.element_ty))

    @triton.jit
    def _swiglu_kernel(y_ptr, out_ptr, F_DIM, BLOCK: tl.constexpr):
        # y [S, 2F] -> out [S, F] = silu(y[:, :F]) * y[:, F:]
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F_DIM
        a = tl.load(y_ptr + row * 2 * F_DIM + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + row * 2 * F_DIM + F_DIM + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * F_DIM + offs, (a / (1.0 + tl.exp(-a)) * b).to(out_ptr.dtype.element_ty), mask=m)


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


class FastDecoder:
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
        self.rope = rope_settings(cfg)  # the torch paths; the fused kernels assume the plain one (make_decoder)
        self.max_seq_len = max_seq_len
        self.gemv_configs = dict(gemv_configs or {})  # "qkv" | "dense" | "fc1" | "fc2" | "output" -> GemvConfig
        self.prefetch = prefetch  # None: as each config says
        quantized = any(is_quantized_module(m) for m in tr.encoder.modules())
        if weights == "same":
            mode = "int8" if quantized else _DTYPE_MODE.get(emb.dtype, "fp32")
        else:
            mode = weights
        # activations: the model's dtype, or the weights' when half weights were asked for
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, emb.dtype)
        if not self.dtype.is_floating_point:
            self.dtype = torch.float16
        self.mode = mode
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
        nxt = 5 if not bool(torch.isfinite(logits).all()) else int(logits.argmax())  # the original's nan/inf guard
        self._host_tok[k % 2] = nxt
        self._in[0] = nxt
        self._in[1:] += 1

    def _read(self, k: int) -> int:
        if self._tok_ready is not None and self._graph is not None:
            self._tok_ready[k % 2].synchronize()
        return int(self._host_tok[k % 2])

    def _sampler_graph(self, params: SamplingParams):
        """The graph that draws the next token from the step's logits as ``params`` say (captured on first use),
        or None where the step has no graph or the capture fails (the host then samples)."""
        if self._graph is None:
            return None
        key = (params.temperature, params.top_k, params.top_p)
        if key in self._sampler_graphs:
            return self._sampler_graphs[key]
        procs = logits_processors(params)
        noise = self._noise  # outside the graph's pool, alive as long as the graph (a graph holds no tensors)

        def draw():
            token = device_sampling.sample(self._logits.view(1, -1), procs, noise, self._seed, self._in[1:2])[0]
            self._next_token.copy_(token)
            self._in[0].copy_(token)

        try:
            saved = self._in.clone()  # the warm-up draw writes the token
            graph = self._graph_of(draw)
            self._in.copy_(saved)
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: sample on the host instead
            warnings.warn(f"sampling stays on the host: its graph could not be captured ({exc})", stacklevel=2)
            graph = None
        if len(self._sampler_graphs) >= 4:  # a few settings in use at once; drop the oldest
            self._sampler_graphs.pop(next(iter(self._sampler_graphs)))
        self._sampler_graphs[key] = graph
        return graph

    @staticmethod
    def _reply_seed(generator: Optional[torch.Generator]) -> int:
        """The device sampler's seed for one reply: from ``generator`` when given, so a seeded reply repeats."""
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 2**40, (1,), generator=generator, device=device))

    def _select(self, logits, procs, all_ids, params: SamplingParams, generator) -> int:
        """The next token from logits [1, V] float32, as ``generate_tokens`` picks it."""
        scores = procs(all_ids, logits)
        if params.greedy:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))

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
            if mask is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=s == t and s > 1, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            x = x + linear(out.transpose(1, 2).reshape(1, s, h * d), lw.dense)
            x = x + linear(self._swiglu(linear(self._rms(x, lw.ln2), lw.fc1)), lw.fc2)
        x = self._rms(x[:, -1:], self.final_ln)
        return linear(x, self.output)[:, -1].float()  # [1, V]

    # -- the prompt, padded to a bucket, in a CUDA graph -----------------------------------------
    #
    # Eager, the prompt is ~11 launches a layer from Python (~11 ms of host time for 64 tokens on an H100,
    # twice its GPU time). Here it is padded on the right to T rows (a power of two) and replayed from a graph.
    # Everything that varies between prompts of one bucket is read from device tensors (ids, start, past,
    # last row), so a graph serves any prompt of its bucket. Right padding is safe: the pad rows come after
    # the real ones, so causally they change nothing; their keys/values land in slots past+s..past+T-1,
    # which the decoder holds empty from then on (cached_ids ends with the prompt): each decode step writes
    # its slot before reading slots < its length, and a later prompt reuses only slots of cached tokens and
    # reads none after its own rows. Keys: a static window [0, KW), KW a power of two >= past + T, with a
    # mask from ``past`` (or plain causal when past = 0, KW = T).

    def _init_prefill(self, enabled: bool) -> None:
        self.prefill_graphs = bool(enabled)
        self.prefill_max_bucket = min(PREFILL_MAX_BUCKET, self.max_seq_len)
        self.prefill_captures = 0
        self._prefill_graph_cache: dict[tuple[int, int, bool], "torch.cuda.CUDAGraph"] = {}
        cuda = self.device.type == "cuda"
        n = 3 + self.prefill_max_bucket  # start, past, last real row, then the ids
        self._pf_in = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._pf_host = torch.zeros(n, dtype=torch.int64, pin_memory=cuda)
        self._pf_copied = torch.cuda.Event() if cuda else None
        self._pf_logits = torch.zeros(1, self.output.weight.shape[0], device=self.device, dtype=torch.float32)

    def clear_prefill_graphs(self) -> None:
        """Drop the captured prompt graphs (the next prompt of each bucket captures again)."""
        self._prefill_graph_cache.clear()

    def _prefill_key(self, s: int, past: int) -> Optional[tuple[int, int, bool]]:
        """(rows T, key window KW, causal) for s new tokens after ``past`` slots, or None: run eagerly."""
        T = max(PREFILL_MIN_BUCKET, _next_pow2(s))
        if T > self.prefill_max_bucket or past + T > self.max_seq_len:
            return None  # the pad rows' cache slots must exist
        if past == 0:
            return T, T, True
        return T, min(_next_pow2(past + T), self.max_seq_len), False

    def _prefill(self, new_ids: list[int], start: int) -> torch.Tensor:
        """Logits [1, V] float32 of the last of ``new_ids`` (positions start..), writing their cache slots."""
        key = self._prefill_key(len(new_ids), self.prefix_len + start) if self.prefill_graphs else None
        if key is None:
            return self._forward_torch(new_ids, start)
        self._set_prefill_input(new_ids, start, key[0])
        if self._graph_pool is None:  # no CUDA graphs: the same padded math, run directly
            return self._forward_padded(*key).clone()
        graph = self._prefill_graph_cache.get(key)
        if graph is None:
            try:
                graph = self._capture_prefill(key)
            except Exception as exc:  # something in the prompt's math that does not capture: stay eager
                warnings.warn(f"prompt graph capture failed, prompts run eagerly: {type(exc).__name__}: {exc}")
                self.prefill_graphs = False
                torch.cuda.synchronize(self.device)
                return self._forward_torch(new_ids, start)
        graph.replay()
        return self._pf_logits.clone()  # the next prompt's replay overwrites the static buffer

    def _set_prefill_input(self, new_ids: list[int], start: int, T: int) -> None:
        """(start, past, last row) and the ids padded with 0 to the bucket of T rows, into _pf_in without a sync."""
        s = len(new_ids)
        if self._pf_copied is not None:
            self._pf_copied.synchronize()  # the previous copy has left the pinned buffer
        host = self._pf_host
        host[0], host[1], host[2] = start, self.prefix_len + start, s - 1
        host[3 : 3 + s] = torch.tensor(new_ids, dtype=torch.int64)
        host[3 + s : 3 + T] = 0  # pad id: any valid row of the embedding
        self._pf_in[: 3 + T].copy_(host[: 3 + T], non_blocking=True)
        if self._pf_copied is not None:
            self._pf_copied.record()

    def _forward_padded(self, T: int, KW: int, causal: bool) -> torch.Tensor:
        """``_forward_torch`` for the prompt in ``_pf_in``, padded to T rows, with nothing read on the host.

        Shapes depend only on (T, KW, causal), so this is what a prompt graph captures; it also runs as is
        (CPU tests). Writes the logits of the last real row to ``_pf_logits`` [1, V] and returns it."""
        meta, ids = self._pf_in[:3], self._pf_in[3 : 3 + T]
        dev = self.device
        x = F.embedding(ids[None], self.embedding)  # [1, T, hidden]
        cos = sin = None
        if not self.fused_prefill:
            cos, sin = rotary_cos_sin((meta[0] + torch.arange(T, device=dev))[None], self.rotary_dim, self.dtype, self.rope)
        mask = None
        if not causal:  # row r (slot past + r) sees slots 0..past+r: the earlier tokens and itself
            rows = meta[1] + torch.arange(T, device=dev)
            mask = (torch.arange(KW, device=dev)[None, :] <= rows[:, None])[None, None]  # [1, 1, T, KW]
        h, d = self.num_heads, self.head_dim
        for i, lw in enumerate(self.layers):
            qkv = linear(self._rms(x, lw.ln1), lw.qkv)  # [1, T, (h + 2g) d]
            q = self._rope_and_cache(qkv, i, cos, sin, None, None, T, meta=meta)  # [1, h, T, d]
            out = self._window_attention(q, i, KW, mask)
            x = x + linear(out.transpose(1, 2).reshape(1, T, h * d), lw.dense)
            x = x + linear(self._swiglu(linear(self._rms(x, lw.ln2), lw.fc1)), lw.fc2)
        x = self._rms(x.index_select(1, meta[2:3]), self.final_ln)  # the last real row
        self._pf_logits.copy_(linear(x, self.output)[:, -1].float())
        return self._pf_logits

    def _window_attention(self, q: torch.Tensor, i: int, KW: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q [1, h, T, d] against layer i's cache slots [0, KW)."""
        keys, values = self.k_cache[i, :, :KW], self.v_cache[i, :, :KW]  # [g, KW, d]
        if mask is None:  # causal from slot 0: as _forward_torch (flash attention on CUDA)
            return F.scaled_dot_product_attention(q, keys[None], values[None], is_causal=True, enable_gqa=True)
        h, (g, _, d) = self.num_heads, keys.shape
        if h * q.shape[2] * KW * 4 <= PREFILL_MATH_ATTN_BYTES:  # as _forward_torch: the math kernel, small scores
            return F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask, enable_gqa=True)
        # a mask with enable_gqa falls back to the math kernel, whose [h, T, KW] float32 scores would stay
        # reserved in the graph pool; with the groups' keys repeated per head, memory-efficient attention
        # takes the mask
        keys = keys[:, None].expand(g, h // g, KW, d).reshape(1, h, KW, d)
        values = values[:, None].expand(g, h // g, KW, d).reshape(1, h, KW, d)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _capture_prefill(self, key: tuple[int, int, bool]) -> "torch.cuda.CUDAGraph":
        """Capture the padded prompt for ``key``; the input in _pf_in is already set (and the result replayed)."""
        # the warm-up writes the very cache slots (same values) that the replay after the capture writes again
        graph = self._graph_of(lambda: self._forward_padded(*key))
        if len(self._prefill_graph_cache) >= PREFILL_MAX_GRAPHS:
            self._prefill_graph_cache.pop(next(iter(self._prefill_graph_cache)))
        self._prefill_graph_cache[key] = graph
        self.prefill_captures += 1
        return graph

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused_prefill:
            out = torch.empty_like(x)
            K = x.shape[-1]
            _rmsnorm_kernel[(x.numel() // K,)](x, weight, out, K, self.eps, BLOCK=triton.next_power_of_2(K), num_warps=8)
            return out
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)

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
            F_dim = y.shape[-1] // 2
            out = torch.empty(*y.shape[:-1], F_dim, device=y.device, dtype=y.dtype)
            rows = y.numel() // y.shape[-1]
            _swiglu_kernel[(rows, triton.cdiv(F_dim, 1024))](y, out, F_dim, BLOCK=1024, num_warps=4)
            return out
        a, b = y.chunk(2, dim=-1)
        return F.silu(a) * b

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
        rope_common = dict(q_rows=h * d, kv_rows=g * d, head_dim=d, rot_pairs=self.rotary_dim // 2, pos=pos)
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
        # the greedy token, or 5 where a logit is nan/inf (the original's guard), fed to the next replay
        pick_token(self._argmax, self._next_token, self._in, bad_token=5, pdl=pdl)

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

    def _replay(self, token: int, pos: int) -> None:
        self._set_step_input(token, pos)
        self._graph.replay()
