"""The batched fast decoder: up to 256 rows over one static cache, each decode step one CUDA-graph replay.

Weights stay as loaded: int8 rows (the 8-bit model's Int8Linear, or bitsandbytes 8-bit layers), NF4
(bitsandbytes 4-bit) and the int4 release are read packed (``batch_linear.BatchLinear``: RMSNorm, SwiGLU
and the residual folded in); 16-bit weights go through cuBLAS. Nothing is widened or copied at load.

- Cache: keys and values of every layer in two tensors [L, rows, G, slots, D]. Row r's first P_r
  slots hold its adapter's prefix, its tokens follow (token at position p in slot P_r + p). Each
  row's position and P_r live in device tensors, so one graph per batch bucket (1, 2, 4, ... 256
  rows) serves every mix of lengths and adapters: an adapter switch is a copy into the row's
  prefix slots, never a capture.
- Step: the rows' tokens (fed from the last step's picks when it runs ahead of the host: ``kernels.step_feed``)
  and their embeddings, then per layer QKV (norm folded), rotary + cache write, split attention over
  each row's slots, dense + residual, up-projection + SwiGLU (norm folded), down + residual; the
  final norm and output linear give [rows, V] logits. Idle rows (position -1) write nothing.
- Prompt (prefill): the rows that joined since the last step, right-padded into one batch: the
  step's rotary + cache-write kernel (one launch a layer for every token's row and slot), SDPA over
  each row's prefix + earlier slots, linears through quant_linear up to 64 tokens, else the int8
  matmul tiles or the weight widened a block at a time for a tensor-core matmul. A short prompt's
  time is mostly host-side launches: one row's prompt of up to 128 tokens replays a CUDA graph
  (``prompt_graphs``), and each op a layer counts for the rest.
  It is written here rather than through ``modeling.py``'s modules so that every row's prompt and
  cache slots go through one pass, and a bitsandbytes 8-bit model (loaded through transformers) is read
  as weight-only rows instead of through LLM.int8's outlier decomposition (10x slower).
- A finished row stays parked with its cache for a later request of the same adapter whose
  prompt begins with its tokens (a chat's next turn feeds only the new tokens), until its row is
  needed.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..device_sampling import on_device
from ..generation import INVALID_SCORE_TOKEN, logits_processors
from ..int8_linear import WIDEN_MIN_ROWS
from ..kernels.int8_matmul import MATMUL_MID_ROWS
from ..kernels.attention_batch import RopeWrite, attention_workspace, decode_attention, rope_cache_write
from ..kernels.gemv_4bit import kernels_run
from ..kernels.greedy_rows import greedy_rows, greedy_rows_torch
from ..kernels.step_feed import feed_and_embed
from ..modeling import causal_to_end, decoding_attention, keys_per_head, rope_settings
from ..service import BackendError, SamplingParams
from .batch_linear import QUANT_MAX_M, BatchLinear
from .batch_sampler import BatchSampler
from . import one_row_step, one_row_tuning
from .prompt_graphs import TOKEN_BUCKETS, PromptGraphs, prompt_inputs
from .staged_copy import ReadBack, StagedCopy
from .eager import common_prefix_length
from .protocol import DecodeRequest, RowToken, next_token
from ..gpu_memory import free_bytes

# Rows a decoder holds unless told: a server's clients, each with an 8192-token cache. Evaluation asks for up to
# MAX_ROWS short rows (more rows a step, fewer steps); int8 rows go through the matmul tiles at any count, NF4
# and int4 rows beyond batch_linear.QUANT_MAX_M through each weight widened.
DEFAULT_ROWS = 64
MAX_ROWS = 256
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFIX_SLOTS = 256  # reserved before each row's context for an adapter prefix
LONG_WARM_TOKENS = 1600  # the warm-up's long prompt (``_warm_long_prompt``)
# pasted documents the warm-up runs after its captures (``_warm_pasted_documents``); 0 for bench/'s A/B
WARM_PASTED_DOCUMENTS = int(os.environ.get("GLMCHAT_WARM_PASTED_DOCUMENTS", "2"))
# Up to this many short prompts arriving together (a compare's two, a server's few joining requests) replay the
# one-row prompt graphs one after the other: a 64-token chat's first token takes ~7 ms that way, where two rows'
# eager prompt (~30 launches a layer from Python) gave first tokens at 14-42 ms on the H100 (bench/NOTES.md, run
# 23); more rows go eagerly as one batch, whose host time is shared by all of them
GRAPHED_PROMPT_ROWS = 3
FOUR_BIT_PDL_MAX_ROWS = 2  # a 4-bit model's general step launches as programmatic dependents up to this many rows


def rows_pdl(layers, bucket: int, hopper_graphs: bool) -> bool:
    """Whether a general step of ``bucket`` rows launches its layers as programmatic dependents: in CUDA graphs on
    Hopper and later (``hopper_graphs``), for the few rows of a 4-bit model (compare's two), whose linears are all
    ``quant_linear``'s many small programs, as the one-row step's are (NF4 compare +0.7%, bench/NOTES.md run 54). Not
    for int8's matmul tiles: there it parked waiting programs on the SMs the tiles ahead needed (run 45).
    GLMCHAT_ROWS_PDL_4BIT=0 turns it off, for an A/B in one process."""
    if not hopper_graphs or bucket > FOUR_BIT_PDL_MAX_ROWS or os.environ.get("GLMCHAT_ROWS_PDL_4BIT", "1") == "0":
        return False
    return all(lin.q is not None and lin.q.fmt != "int8" for lw in layers for lin in (lw.qkv, lw.dense, lw.up, lw.down))


def greedy_pick(logits: torch.Tensor, out: Optional[torch.Tensor] = None,
                fed_flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmax per row [B], or INVALID_SCORE_TOKEN where a row's logits hold nan/inf (the original chat's guard);
    into ``out`` if given, then ``fed_flag`` set (a decode step's picks, which the next step may feed itself)."""
    pick = greedy_rows if kernels_run(logits) else greedy_rows_torch
    return pick(logits, INVALID_SCORE_TOKEN, out=out, fed_flag=fed_flag)


@dataclass
class _LayerWeights:
    ln1: torch.Tensor
    qkv: BatchLinear
    dense: BatchLinear
    ln2: torch.Tensor
    up: BatchLinear
    down: BatchLinear


@dataclass
class _Row:
    id: int
    request: DecodeRequest
    slot: int  # cache row
    prefix_len: int
    limit: int  # new tokens allowed
    tokens: list
    cached: int = 0  # tokens whose keys/values the cache row holds after the prefix
    new: int = 0
    generator: Optional[torch.Generator] = None
    procs: object = None
    penalty: bool = False
    device_seed: Optional[int] = None  # sampled on the device (batch_sampler.BatchSampler) with this seed


@dataclass
class _Parked:
    adapter: Optional[str]
    cached_ids: list = field(default_factory=list)


def _picked_on_host(row: _Row) -> bool:
    """Whether the row's token is drawn on the host (a repetition penalty, or a sampler seeded on the host), not
    read from the step's picks."""
    return row.device_seed is None and not (row.request.params.greedy and not row.penalty)


class BatchFastDecoder:
    """The decoder protocol (``backend.decode.protocol.Decoder``) on the fast path, CUDA and Triton."""

    def __init__(self, model, prefix_of: Callable, max_batch: Optional[int] = None,
                 context_length: Optional[int] = None, cache_share: float = 0.6, use_graphs: Optional[bool] = None,
                 prompt_graphs: Optional[bool] = None, decode_ahead: Optional[bool] = None):
        cfg = model.config
        tr = model.transformer
        emb = tr.embedding.word_embeddings.weight
        self.device, self.dtype = emb.device, emb.dtype
        self.prefix_of = prefix_of
        self.eps = cfg.layernorm_epsilon
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        self._set_rotary(cfg)
        self._take_weights(tr)
        self.slot_bytes = cfg.num_layers * 2 * self.groups * self.head_dim * self.dtype.itemsize
        self.memory_short = False  # set by _size_cache when the context had to shrink to fit
        self.context_length, self.max_batch = self._size_cache(cfg, context_length, max_batch, cache_share)
        self.slots = PREFIX_SLOTS + self.context_length
        shape = (cfg.num_layers, self.max_batch, self.groups, self.slots, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # step inputs, read by every graph: the token, position (-1 idle) and prefix length of each row,
        # set on the host and copied over in one transfer a step (a row dropped meanwhile changes the host side),
        # and the fed flag ([3, 0]): 0 as sent, 1 once a step has picked its tokens into fed_picks; a step that
        # finds it set feeds itself from them (kernels.step_feed: a step queued ahead, ``_queue_ahead``)
        cuda = self.device.type == "cuda"
        host_in = torch.zeros(4, self.max_batch, dtype=torch.long)
        host_in[1] = -1
        self._step_in = StagedCopy(host_in, self.device)
        self._host_in = self._step_in.host
        self.tokens, self.positions, self.prefix_lens, flags = self._step_in.device
        self._fed_flag = flags[:1]
        self.fed_picks = torch.zeros(self.max_batch, device=self.device, dtype=torch.long)  # each step's tokens
        self._slot_adapter: list = [object()] * self.max_batch  # whose prefix each cache row holds
        self._rows: dict[int, _Row] = {}  # running rows by id
        self._pending: list[_Row] = []
        self._parked: OrderedDict[int, _Parked] = OrderedDict()  # cache row -> finished row's tokens, oldest first
        self._failed: list = []
        self._queued: Optional[tuple] = None  # (rows, logits, picks, their read-back) of the decode step on the GPU now
        self._readback = ReadBack(self.max_batch, self.device)
        # the next decode step fed from the last one's picks on the device (``_queue_ahead``);
        # GLMCHAT_DECODE_AHEAD=0 turns it off, for an A/B in one benchmark process
        if decode_ahead is None:
            decode_ahead = os.environ.get("GLMCHAT_DECODE_AHEAD", "1") != "0"
        self.decode_ahead = decode_ahead
        # the step ahead fed by its own first launch (kernels.step_feed); GLMCHAT_FEED_IN_STEP=0 feeds it by torch
        # launches between the replays instead, as before (an A/B in one benchmark process)
        self.feed_in_step = os.environ.get("GLMCHAT_FEED_IN_STEP", "1") != "0"
        self._workspaces: dict = {}
        self._graphs: dict = {}
        self._graph_out: dict = {}  # bucket -> (logits, greedy picks) written by its graph
        self.use_graphs = cuda if use_graphs is None else use_graphs
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.sampler = BatchSampler(self.max_batch, cfg.padded_vocab_size, self.device, self.use_graphs, self._pool)
        # one-row prompts from graphs (prompt_graphs True without CUDA graphs: padded as in them, run eagerly);
        # GLMCHAT_PROMPT_GRAPHS=0 turns them off, for an A/B in one benchmark process
        if prompt_graphs is None:
            prompt_graphs = self.use_graphs and os.environ.get("GLMCHAT_PROMPT_GRAPHS", "1") != "0"
        self._prompt_graphs = PromptGraphs(self._prompt_math, self.device, self._pool, self.slots,
                                           capture=self.use_graphs) if prompt_graphs else None
        # programmatic dependent launches: from Hopper on, in graphs (cleared where a capture with them fails)
        self.pdl_in_graphs = self.use_graphs and cuda and torch.cuda.get_device_capability(self.device)[0] >= 9
        # one row's decode step with the one-row decoder's fusions (decode/one_row_step.py), where its GEMV applies
        self._one_row_step = None
        if one_row_step.fused_one_row_enabled() and one_row_step.applies(self):
            self._one_row_step = one_row_step.OneRowStep(self, self.pdl_in_graphs)
            tuned = one_row_tuning.cached(self) if cuda else None  # this card's tiles, tuned by an earlier warm-up
            if tuned:
                one_row_tuning.apply(self, tuned)

    def _set_rotary(self, cfg) -> None:
        """The family's rotary, as modeling.rotary_cos_sin computes it: ChatGLM2 rounds its angles in a 16-bit model
        dtype (the kernel is told to round the same way), ChatGLM3 keeps float32."""
        self.rotary_dim = cfg.kv_channels // 2
        self.rope = rope_settings(cfg)
        half = self.dtype in (torch.float16, torch.bfloat16)
        self.angle_dtype = self.dtype if half and not self.rope.float32 else None
        work = self.angle_dtype or torch.float32
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=work, device=self.device) / self.rotary_dim
        self.inv_freq = (1.0 / (self.rope.base ** exponents)).float()

    @torch.no_grad()
    def _take_weights(self, tr) -> None:
        """The model's weights as stored (shared, not copied): each layer's norms and linears, the final norm and the
        output layer."""
        self.embedding = tr.embedding.word_embeddings.weight.detach()
        dt = self.dtype
        self.layers = [
            _LayerWeights(b.input_layernorm.weight.detach(), BatchLinear(b.self_attention.query_key_value, dt, "qkv"),
                          BatchLinear(b.self_attention.dense, dt, "dense"), b.post_attention_layernorm.weight.detach(),
                          BatchLinear(b.mlp.dense_h_to_4h, dt, "fc1"), BatchLinear(b.mlp.dense_4h_to_h, dt, "fc2"))
            for b in tr.encoder.layers
        ]
        self.final_ln = tr.encoder.final_layernorm.weight.detach()
        self.output = BatchLinear(tr.output_layer, self.dtype, "output")

    def _size_cache(self, cfg, context_length, max_batch, share) -> tuple[int, int]:
        """Context per row and rows, from the model's seq_length and the memory free now."""
        context = min(context_length or cfg.seq_length, cfg.seq_length)
        rows = min(max_batch or DEFAULT_ROWS, MAX_ROWS)
        if self.device.type != "cuda":
            return context, rows
        budget = free_bytes(self.device) * share
        row_bytes = lambda c: (PREFIX_SLOTS + c) * self.slot_bytes  # noqa: E731
        fit = int(budget // row_bytes(context))
        if fit < min(rows, 2):
            # short of memory: a shorter context, two rows (a compare) in half the budget, the other half left free
            # (on a 6 GiB card the app trains beside the chat: measured so with one such row, bench/NOTES.md run 12)
            context = max(512, int(budget // (4 * self.slot_bytes)) - PREFIX_SLOTS)
            context = min(context, cfg.seq_length)
            warnings.warn(f"GPU memory is short: the fast decoder keeps {context} tokens of context per reply.", stacklevel=3)
            self.memory_short = True
            fit = int(budget // row_bytes(context))
        if fit < 1:
            raise BackendError("the GPU has no memory left for the decoder's cache; load a smaller precision (--quantization 4bit).")
        return context, max(1, min(rows, fit))

    def warm_up(self, captures: bool = True) -> None:
        """Tune the kernels for every row count and capture every bucket's graph now, not at a first reply
        (tuning results are cached on disk per GPU model, so only the first run on a card pays it). Without
        ``captures`` (a cache that had to shrink for memory): only the tuning at the rows of decode steps and short
        prompts, whose temporaries are a few rows wide, one row's step run once outside a graph (idle: it writes
        no key) so that its kernels compile now, and a chat's replies one row at a time (``_warm_replies``: no other
        bucket's graph, no long prompt); nothing is kept. A first reply on a 6 GiB card waited 37 s for that tuning
        (bench/NOTES.md, run 17), 8.9 s for those compiles (run 38), and a next turn 122 ms for its own (run 41)."""
        from ..kernels.gemv_4bit import M_BUCKETS

        with torch.inference_mode():
            # prompts of up to 64 tokens and decode steps run at these row counts (decode steps split K, prompts do
            # not: both); then each tile config of the int8 matmul (up to 256 rows, beyond) and the weights widened
            # for cuBLAS (long prompts)
            for m in M_BUCKETS + ((QUANT_MAX_M + 1, MATMUL_MID_ROWS + 1, WIDEN_MIN_ROWS) if captures else ()):
                x = torch.randn(m, self.embedding.shape[1], device=self.device, dtype=self.dtype)
                lw = self.layers[0]
                for split_k in (True, False) if m <= QUANT_MAX_M else (True,):
                    lw.qkv(x, norm=lw.ln1, eps=self.eps, split_k=split_k)
                    lw.down(lw.up(x, norm=lw.ln2, eps=self.eps, swiglu=True), residual=x, split_k=split_k)
                    lw.dense(x, residual=x, split_k=split_k)
            if not captures:
                if self._one_row_step is not None and not self.rows:
                    self._one_row_step()
                self._warm_replies(one_row=True)
                return
            self._warm_replies()
            if self._one_row_step is not None and self.use_graphs and one_row_tuning.cached(self) is None:
                self.tune_one_row(one_row_tuning.graph_timer(self, self._one_row_step))
            if self._prompt_graphs is not None:
                self._prompt_graphs.capture_all()
                self._slot_adapter[0] = object()  # the captures wrote keys over whatever prefix row 0 held
            for bucket in BUCKETS:
                if bucket <= self.max_batch and self.use_graphs and bucket not in self._graphs:
                    self._capture(bucket)
                if bucket <= min(self.max_batch, DEFAULT_ROWS) and self.use_graphs:  # (evaluation's rows are greedy)
                    self.sampler.capture(bucket, *self._graph_out[bucket], self.positions)
            if self.device.type == "cuda":
                self._warm_pasted_documents()

    def _warm_replies(self, one_row: bool = False) -> None:
        """Three short replies to 65-token prompts in three rows (greedy, sampled on the device, sampled with a
        repetition penalty on the host), then a next turn of the first that feeds its parked row one token: the
        first of each kind of kernel a chat, a compare and the samplers use loads or compiles now, not in a user's
        first reply (on the H200 first replies took 0.5-0.9 s longer than the next ones, 87 ms to the first token
        with this warm-up: bench/NOTES.md, runs 8 and 9). Nothing of it is kept. ``one_row`` (memory short): a
        chat's kinds only, greedy and sampled on the device, one row at a time, 32-token prompts, no long prompt."""
        if self.rows:  # (made for a decoder that runs nothing yet: the rows it uses are overwritten)
            return
        # 65 tokens: a prompt past QUANT_MAX_M rows takes the wide path; where memory is short, 32 (its temporaries)
        prompt = list(range(10, 10 + (QUANT_MAX_M // 2 if one_row else QUANT_MAX_M + 1)))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=2)
        sampled = SamplingParams(temperature=0.8, top_p=0.8, top_k=40, max_new_tokens=2)
        penalised = SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.1, max_new_tokens=2)
        first = [DecodeRequest(prompt, greedy), DecodeRequest(prompt[:-1] + [7], sampled, seed=0),
                 DecodeRequest(prompt[:-1] + [8], penalised, seed=0)]
        if one_row:
            replies = [self._run_alone([request])[0] for request in first[:2]]
        else:
            replies = self._run_alone(first[: self.max_batch])
        self._run_alone([DecodeRequest(prompt + replies[0] + [11], greedy)])
        if self.device.type == "cuda" and not one_row:  # (the kernels to load are CUDA's)
            self._warm_long_prompt()
        self._forget_parked_rows()

    def _forget_parked_rows(self) -> None:
        """Drop the warm-up's parked rows: their tokens are nobody's, and whatever prefix a row held is gone (graph
        captures write keys over the rows)."""
        for slot in list(self._parked):
            del self._parked[slot]
            self._slot_adapter[slot] = object()

    def _long_warm_tokens(self) -> int:
        """The warm-up's long prompts' length, or 0 where the context is too short for such prompts to come."""
        tokens = min(LONG_WARM_TOKENS, self.slots // 2)
        return tokens if tokens > WIDEN_MIN_ROWS else 0

    def _warm_long_prompt(self) -> None:
        """A pasted document's prompt (LONG_WARM_TOKENS, unpadded: the weights widened for cuBLAS, causal flash
        attention) and a next turn of it over its cached slots: the kernels those load on first use cost the first
        long prompt of a process 50-90 ms more than the next (a 1600-token one on the H100: 94-131 ms, then 40-52;
        bench/NOTES.md, run 23)."""
        tokens = self._long_warm_tokens()
        if not tokens:
            return
        prompt = self._warm_ids(tokens, 10)
        reply = self._warm_prompts([prompt])
        if reply:
            self._warm_prompts([prompt + reply + self._warm_ids(TOKEN_BUCKETS[-1] + 8, 20)])

    def _warm_pasted_documents(self) -> None:
        """``WARM_PASTED_DOCUMENTS`` long prompts after the captures, as a user's pasted documents come: each begins
        as the last one did (a chat template's few tokens, found in its parked row) and goes on with other text.
        After the warm-up, the first two such prompts of a process took ~48 ms to the first token on an H200 where
        the next took ~37.5, with nothing compiled, no new Triton specialization and 1-3 new memory segments between
        them; in each the GPU sat idle ~4 ms three times (bench/NOTES.md, run 47). Run here, they are not a user's."""
        tokens = self._long_warm_tokens()
        if not tokens or WARM_PASTED_DOCUMENTS < 1:
            return
        head = self._warm_ids(4, 10)
        self._warm_prompts([head + self._warm_ids(tokens - 4, 1000 + 7919 * k) for k in range(WARM_PASTED_DOCUMENTS)])
        self._forget_parked_rows()

    def _warm_ids(self, n: int, first: int) -> list[int]:
        """n consecutive token ids from ``first`` (modulo the vocabulary): a warm-up prompt's text."""
        vocab = self.embedding.shape[0]
        return [(first + i) % vocab for i in range(n)]

    def _warm_prompts(self, prompts: list[list[int]]) -> list[int]:
        """Run the prompts one after the other, a token each; the last one's token, or none where a prompt failed.
        A card that cannot hold such a prompt's temporaries stops at the first that fails (running out of memory
        fails the row, not the call): the captures still come, and a long prompt later gets the decoder's sentence."""
        reply, one = [], SamplingParams(temperature=0.0, max_new_tokens=1)
        try:
            for prompt in prompts:
                reply = self._run_alone([DecodeRequest(prompt, one)])[0]
                if not reply:  # (no token: the prompt failed its row)
                    break
        except torch.OutOfMemoryError:
            reply = []
        if self._forget_warm_up_failures() or not reply:
            torch.cuda.empty_cache()
            return []
        return reply

    def _forget_warm_up_failures(self) -> bool:
        """Whether a warm-up row (ids < 0, ``_run_alone``'s) failed; their failures are not any caller's to read."""
        ours = [f for f in self._failed if f[0] < 0]
        self._failed = [f for f in self._failed if f[0] >= 0]
        return bool(ours)

    def tune_one_row(self, measure) -> None:
        """The one-row step's GEMV tiles for this card (``one_row_tuning``, on first use per GPU model), timed on row
        0 at position 64 of this idle decoder (a short chat's keys to attend to); its cache row is overwritten, and
        bucket 1 is captured again after. A failure keeps the default tiles."""
        if self.rows or not one_row_tuning.tuning.tuning_enabled():
            return
        if self.use_graphs and 1 not in self._graphs:
            self._capture(1)  # settles whether this runtime captures PDL launches, before the candidates' graphs
        self._host_in[:3, 0] = torch.tensor([INVALID_SCORE_TOKEN, min(64, self.slots - 1), 0])  # (any token: timing only)
        self._send_step_inputs()
        try:
            one_row_tuning.tune(self, measure)
        except Exception as exc:  # noqa: BLE001 - tuning is an optimisation: replies go on with the defaults
            warnings.warn(f"tuning the one-row decode step failed ({type(exc).__name__}: {exc}); it keeps its default tiles.")
            one_row_tuning.apply(self, one_row_tuning.defaults(self))
        finally:
            self._host_in[1, 0] = -1
            self._send_step_inputs()
            self._slot_adapter[0] = object()
            self._parked.pop(0, None)
            self._graphs.pop(1, None)

    def _run_alone(self, requests: list) -> list[list[int]]:
        """Each request's tokens, decoded to the end as rows -1, -2, ... of this otherwise idle decoder."""
        out = {-1 - i: [] for i in range(len(requests))}
        for row, request in zip(out, requests):
            self.add(row, request)
        try:
            while self.rows:
                for token in self.step():
                    out[token.row].append(token.token)
        except BaseException:  # (a warm-up that failed, out of memory say, leaves no row behind)
            for row in out:
                self.drop(row)
            raise
        return list(out.values())

    # -- protocol: admission ------------------------------------------------------------------

    def check(self, request: DecodeRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise BackendError("the prompt is empty; send some text.")
        if n >= self.context_length:
            raise BackendError(f"the prompt is {n} tokens but the model's context here is {self.context_length}; shorten it or start a new conversation.")
        if self._prefix_len(request.adapter) > PREFIX_SLOTS:
            raise BackendError(f"adapter {request.adapter!r} has a prefix longer than {PREFIX_SLOTS} tokens, which the fast decoder does not hold; use --engine eager.")

    def fits(self, request: DecodeRequest) -> bool:
        return self.rows < self.max_batch

    @property
    def rows(self) -> int:
        return len(self._rows) + len(self._pending)

    def add(self, row: int, request: DecodeRequest) -> None:
        self._pending.append(self._new_row(row, request))

    def drop(self, row: int) -> None:
        kept = [r for r in self._pending if r.id != row]
        for r in self._pending:
            if r.id == row:
                self._free(r, park=False)
        self._pending = kept
        if row in self._rows:
            self._free(self._rows.pop(row), park=False)

    def failed(self) -> list:
        failed, self._failed = self._failed, []
        return failed

    def _prefix_len(self, adapter) -> int:
        prefix = self.prefix_of(adapter)
        return prefix[0].shape[2] if prefix else 0

    def _new_row(self, row: int, request: DecodeRequest) -> _Row:
        tokens = list(request.prompt_ids)
        slot, cached = self._take_slot(request.adapter, tokens)
        limit = min(request.params.max_new_tokens, self.context_length - len(tokens))
        generator = device_seed = None
        if on_device(request.params):  # a seeded reply repeats: its noise seed comes from its seed
            seeded = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
            device_seed = int(torch.randint(0, 2**40, (1,), generator=seeded))
        elif request.seed is not None and not request.params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        penalty = request.params.repetition_penalty not in (0, 1.0, None)
        self.sampler.set_row(slot, request.params if device_seed is not None else None, device_seed or 0)
        return _Row(row, request, slot, self._prefix_len(request.adapter), limit, tokens, cached,
                    generator=generator, procs=logits_processors(request.params), penalty=penalty, device_seed=device_seed)

    def _take_slot(self, adapter, tokens: list) -> tuple[int, int]:
        """A cache row for a new request: a parked one that began the same way, else a free one, else the
        oldest parked (both among the lowest rows). Returns (row, tokens already cached)."""
        best, keep = None, 0
        for slot, parked in self._parked.items():
            if parked.adapter == adapter:
                n = min(common_prefix_length(parked.cached_ids, tokens), len(tokens) - 1)
                if n > keep:
                    best, keep = slot, n
        if best is not None:
            del self._parked[best]
            return best, keep
        # below the smallest bucket that holds one more row, so that a step never computes more rows than
        # it must: a free row there, else the oldest parked one there (by pigeonhole one of them exists)
        running = {r.slot for r in self._rows.values()} | {r.slot for r in self._pending}
        limit = min(next((b for b in BUCKETS if b >= len(running) + 1), MAX_ROWS), self.max_batch)
        free = [s for s in range(limit) if s not in running and s not in self._parked]
        if free:
            return free[0], 0
        oldest = next(s for s in self._parked if s < limit)
        del self._parked[oldest]
        return oldest, 0

    def _free(self, row: _Row, park: bool) -> None:
        self._host_in[1, row.slot] = -1
        if park:
            self._parked[row.slot] = _Parked(row.request.adapter, row.tokens[: row.cached])

    # -- protocol: stepping -------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RowToken]:
        """The queued decode step's tokens, then the new rows' first ones. The next decode step is queued before
        the queued one is read where it can be fed on the device (``_queue_ahead``), else after; either way the
        GPU runs it while the caller hands these tokens out."""
        if self._queued is None and self._rows:
            self._queue_decode()
        ahead = self._queue_ahead()
        # a graph's replay writes the same logits buffer: once the step ahead is queued, the queued step's logits
        # are gone (its tokens are already on their way to the host), so its rows get none
        out = self._finish_decode(logits_kept=ahead is None or not self.use_graphs) if self._queued is not None else []
        self._queued = ahead
        pending, self._pending = self._pending, []
        if pending:
            out += self._start(pending)
        if self._rows and self._queued is None:
            self._queue_decode()
        return out

    def _start(self, rows: list[_Row]) -> list[RowToken]:
        for row in rows:
            self._load_prefix(row)
        try:
            logits = self._prefill(rows)
        except torch.OutOfMemoryError:
            err = BackendError("the GPU ran out of memory for this prompt; try again when fewer replies run, or shorten it.")
            for row in rows:
                self._free(row, park=False)
                self._failed.append((row.id, err))
            return []
        for row in rows:
            row.cached = len(row.tokens)
        out = self._pick(rows, logits, greedy_pick(logits), list(range(len(rows))), drawn=False)
        for row, token in zip(rows, out):
            if token.finish is None:
                self._rows[row.id] = row
            else:
                self._free(row, park=True)
        return out

    def _load_prefix(self, row: _Row) -> None:
        if self._slot_adapter[row.slot] == row.request.adapter:
            return
        prefix = self.prefix_of(row.request.adapter)
        if prefix:
            P = prefix[0].shape[2]
            for i in range(len(self.layers)):
                self.k_cache[i, row.slot, :, :P].copy_(prefix[2 * i][0])
                self.v_cache[i, row.slot, :, :P].copy_(prefix[2 * i + 1][0])
        self._slot_adapter[row.slot] = row.request.adapter
        row.cached = 0  # another adapter's keys were in this row

    def _queue_decode(self) -> None:
        """Launch one decode step for the running rows (a graph replay: nothing waits for it here)."""
        rows = list(self._rows.values())
        slots = [r.slot for r in rows]
        self._host_in[:3, slots] = torch.tensor([[r.tokens[-1] for r in rows], [len(r.tokens) - 1 for r in rows],
                                                [r.prefix_len for r in rows]])
        self._send_step_inputs()
        top = max(slots) + 1
        self._queued = self._launch(rows, min(next((b for b in BUCKETS if b >= top), MAX_ROWS), self.max_batch))

    def _send_step_inputs(self) -> None:
        """The host's step inputs to the device, the fed flag cleared: the next step runs them as sent. (On the CPU
        the device's inputs are the host's own tensor, which a step feeding itself writes.)"""
        self._host_in[3, 0] = 0
        self._step_in.send()

    def _queue_ahead(self) -> Optional[tuple]:
        """The step after the queued one, fed on the device (the queued step's picks as tokens, each running
        position + 1: the step's first launch does it, ``kernels.step_feed``) and launched before the host reads
        the queued step: then the GPU does not wait for the host between steps. Only while the same rows run, none
        waits to join and every row's token is picked on the device. A row that the queued step ends gets one step
        more, whose token is dropped (its keys land past what the row keeps). None where it cannot."""
        if self._queued is None or self._pending or not self.decode_ahead:
            return None
        rows, _, picks, _ = self._queued
        if len(rows) != len(self._rows) or any(self._rows.get(r.id) is not r or _picked_on_host(r) for r in rows):
            return None
        bucket = picks.shape[0]
        if not self.feed_in_step:
            self.tokens[:bucket].copy_(picks)
            self.positions[:bucket] += self.positions[:bucket] >= 0  # idle rows stay at -1
        return self._launch(rows, bucket)

    def _launch(self, rows: list[_Row], bucket: int) -> tuple:
        """Rows [0, bucket)'s decode step on the inputs in place, then its picks' read-back."""
        self.sampler.upload()
        logits, picks = self._run_step(bucket)
        if any(r.device_seed is not None for r in rows):
            picks = self.sampler.tokens(bucket, logits, picks, self.positions)
        return rows, logits, picks, self._readback.take(picks)

    def _finish_decode(self, logits_kept: bool = True) -> list[RowToken]:
        """The queued step's tokens for its rows that still run (a row dropped meanwhile gets none). Without
        ``logits_kept`` (a step ahead overwrote them) every row's token was picked on the device."""
        rows, logits, picks, taken = self._queued
        self._queued = None
        if not logits_kept:
            logits = None
        rows = [r for r in rows if self._rows.get(r.id) is r]
        out = self._pick(rows, logits, picks, [r.slot for r in rows], drawn=True, taken=taken) if rows else []
        for row, token in zip(rows, out):
            row.cached = len(row.tokens) - 1
            if token.finish is not None:
                self._free(self._rows.pop(row.id), park=True)
        return out

    def _pick(self, rows: list[_Row], logits: torch.Tensor, picks: torch.Tensor, index: list[int], drawn: bool,
              taken=None) -> list[RowToken]:
        """Each row's next token, read back in one transfer: greedy rows from ``picks`` (the argmax of every logits
        row), sampled rows without a repetition penalty from ``picks`` too when ``drawn`` (the step's sampler graph
        drew them), else drawn together here (``BatchSampler.draw``), the others through their own processors and
        generator on the host. Row i's logits are ``logits[index[i]]``; ``taken``: ``picks`` already on its way
        to the host (``ReadBack.take``)."""
        sampled = [(row, i) for row, i in zip(rows, index) if row.device_seed is not None]
        if sampled and not drawn:
            where = torch.tensor([i for _, i in sampled], device=self.device)
            tokens = self.sampler.draw(logits.index_select(0, where), [r.slot for r, _ in sampled],
                                       [len(r.tokens) - 1 for r, _ in sampled])
            picks = picks.index_put((where,), tokens)
        tokens = (taken or picks).tolist() if any(not _picked_on_host(row) for row in rows) else None
        return [self._take(row, None if logits is None else logits[i:i + 1], None if _picked_on_host(row) else tokens[i])
                for row, i in zip(rows, index)]

    def _take(self, row: _Row, logits: Optional[torch.Tensor], token: Optional[int] = None) -> RowToken:
        return next_token(row, logits, self.device, token)

    # -- the decode step ----------------------------------------------------------------------

    def _run_step(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._step_math(bucket, feed=self.feed_in_step)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket)
        graph.replay()
        return self._graph_out[bucket]

    def _capture(self, bucket: int):
        from ..cuda_streams import warm_and_capture

        # the warm-up step (which tunes the kernels' configs for this bucket) writes the same keys/values the replay
        # will; the capture runs nothing. Neither feeds itself (the fed flag cleared before), and the warm-up's pick
        # sets the flag, cleared again after: the replay that follows runs the inputs as they are
        def capture():
            self._fed_flag.zero_()
            return warm_and_capture(lambda: self._step_math(bucket, feed=self.feed_in_step), self.device, self._pool)

        try:
            graph, self._graph_out[bucket] = capture()
        except Exception:
            if not self._step_pdl(bucket):
                raise
            torch.cuda.synchronize(self.device)  # a driver or runtime without PDL in graphs: plain launches, every step
            self.pdl_in_graphs = False
            if self._one_row_step is not None:
                self._one_row_step.pdl = False
            graph, self._graph_out[bucket] = capture()
        self._fed_flag.zero_()
        self._graphs[bucket] = graph
        return graph

    def _step_math(self, bucket: int, feed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for rows [0, bucket): logits [bucket, V] and each row's greedy pick [bucket] (in fed_picks).
        ``feed``: fed from the last step's picks where the fed flag is set (a decode step; not a step replayed for
        timing, which must run the same inputs every time)."""
        if bucket == 1 and self._one_row_step is not None:
            return self._one_row_step(feed=feed)
        ws = self._workspaces.get(bucket)
        if ws is None:
            # the general tile: the one-row step's lost at two rows (compare 668.1 -> 655.7 tok/s, bench/NOTES.md run 54)
            ws = self._workspaces[bucket] = attention_workspace(bucket, self.heads, self.groups, self.head_dim,
                                                                self.device)
        pos, plen = self.positions[:bucket], self.prefix_lens[:bucket]
        x = torch.empty(bucket, self.embedding.shape[1], device=self.device, dtype=self.embedding.dtype)
        if feed:
            feed_and_embed(self._fed_flag, self.fed_picks, self.tokens, self.positions, self.embedding, x)
        else:
            torch.index_select(self.embedding, 0, self.tokens[:bucket], out=x)
        pdl = self._rows_pdl(bucket)
        for i, lw in enumerate(self.layers):
            kc, vc = self.k_cache[i, :bucket], self.v_cache[i, :bucket]
            rope = RopeWrite(kc, vc, pos, plen, self.heads, self.groups, self.inv_freq, self.rope.position_divisor,
                             self.angle_dtype)
            q = lw.qkv(x, norm=lw.ln1, eps=self.eps, pdl=pdl, rope=rope)
            attn = decode_attention(q, kc, vc, pos, plen, workspace=ws, pdl=pdl)
            x = lw.dense(attn, residual=x, pdl=pdl)
            x = lw.down(lw.up(x, norm=lw.ln2, eps=self.eps, swiglu=True, pdl=pdl), residual=x, pdl=pdl)
        logits = self.output(x, norm=self.final_ln, eps=self.eps)
        return logits, greedy_pick(logits, out=self.fed_picks[:bucket], fed_flag=self._fed_flag)

    def _rows_pdl(self, bucket: int) -> bool:
        """Whether the general step's layers launch as programmatic dependents (``rows_pdl``)."""
        return rows_pdl(self.layers, bucket, self.pdl_in_graphs)

    def _step_pdl(self, bucket: int) -> bool:
        """Whether the decode step of ``bucket`` rows launches anything as a programmatic dependent."""
        if bucket == 1 and self._one_row_step is not None:
            return self._one_row_step.pdl
        return self._rows_pdl(bucket)

    # -- prompts --------------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """The new tokens of each row, right-padded into one batch: last-token logits [len(rows), V]. Up to
        GRAPHED_PROMPT_ROWS short prompts replay a graph each (``prompt_graphs``)."""
        new = [row.tokens[row.cached:] for row in rows]
        graphs = self._prompt_graphs
        if graphs is not None and len(rows) <= GRAPHED_PROMPT_ROWS and all(graphs.takes([r], [n]) for r, n in zip(rows, new)):
            if len(rows) == 1:
                return graphs.logits(rows[0], new[0])
            # each row's graph writes one output buffer: a copy of it, queued before the next row's replay
            return torch.cat([graphs.logits(row, n).clone() for row, n in zip(rows, new)])
        T = max(len(n) for n in new)
        width = max(row.prefix_len + len(row.tokens) for row in rows)  # slots any row attends to
        return self._prompt_math(self._prefill_indices(rows, new, T), len(rows), T, width,
                                 one_slot=rows[0].slot if len(rows) == 1 else None)

    def _prompt_math(self, inputs: tuple, B: int, T: int, width: int, one_slot: Optional[int] = None) -> torch.Tensor:
        """Last-token logits [B, V] of B prompts of T tokens (``_prefill_indices``' tensors) over ``width`` slots;
        ``one_slot``: the one row's cache row, known on the host (its keys are then a view, not a gather)."""
        ids, token_pos, token_prefix, token_rows, first_slot, last, slot_rows = inputs
        dev = self.device
        mask = None  # query t of row b sees slots [0, P_b + start_b + t]: one unpadded row needs no mask
        if one_slot is None:
            mask = torch.arange(width, device=dev)[None, None, :] <= first_slot[:, None, None] + torch.arange(T, device=dev)[None, :, None]
        x = self.embedding.index_select(0, ids)
        H, G, D = self.heads, self.groups, self.head_dim
        with decoding_attention():
            for i, lw in enumerate(self.layers):
                qkv = lw.qkv(x, norm=lw.ln1, eps=self.eps, split_k=False)
                # rotary on queries and keys, keys and values into each token's cache row and slot: the decode
                # step's kernel, one launch a layer (a prompt's time is mostly its launches)
                q = rope_cache_write(qkv, self.k_cache[i], self.v_cache[i], token_pos, token_prefix,
                                     num_heads=H, num_groups=G, inv_freq=self.inv_freq, cache_rows=token_rows,
                                     position_divisor=self.rope.position_divisor, angle_dtype=self.angle_dtype)
                attn = self._prompt_attention(q.view(B, T, H, D).transpose(1, 2), i, one_slot, slot_rows, width, mask)
                # the residual stream added in place (out=x: this pass's own tensor), by cuBLAS itself for a long
                # prompt's widened blocks
                x = lw.dense(attn.transpose(1, 2).reshape(B * T, H * D), residual=x, out=x, split_k=False)
                x = lw.down(lw.up(x, norm=lw.ln2, eps=self.eps, swiglu=True), residual=x, out=x, split_k=False)
        return self.output(x.index_select(0, last), norm=self.final_ln, eps=self.eps)

    def _prompt_attention(self, q: torch.Tensor, layer: int, one_slot: Optional[int], slot_rows: torch.Tensor,
                          width: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q [B, H, T, D] against each prompt row's first ``width`` slots (``slot_rows``: the rows' cache rows on
        the device). One unpadded row (``one_slot``, its cache row) ends at slot ``width``, so its queries are
        causal to the end of its slots (``modeling.causal_to_end``: flash attention, no mask); padded rows
        (several prompts, or a graph's bucket) take ``mask`` [B, T, width] over keys spelled out per head."""
        if one_slot is not None:  # a view of the row's slots, no gather
            rows = slice(one_slot, one_slot + 1)
            return causal_to_end(q, self.k_cache[layer, rows, :, :width], self.v_cache[layer, rows, :, :width])
        keys = self.k_cache[layer, :, :, :width].index_select(0, slot_rows)
        values = self.v_cache[layer, :, :, :width].index_select(0, slot_rows)
        return F.scaled_dot_product_attention(q, keys_per_head(keys, self.heads), keys_per_head(values, self.heads),
                                              attn_mask=mask[:, None])  # [B, H, T, D]

    def _prefill_indices(self, rows: list[_Row], new: list[list[int]], T: int) -> tuple:
        """``prompt_graphs.prompt_inputs`` made on the host and sent in one copy (indexing with masks on the device
        would wait for the GPU once a layer), split into its seven tensors."""
        flat = torch.tensor(prompt_inputs(rows, new, T), dtype=torch.long)
        flat = flat.pin_memory() if self.device.type == "cuda" else flat
        return flat.to(self.device, non_blocking=True).split([len(rows) * T] * 4 + [len(rows)] * 3)
