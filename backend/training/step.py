"""The P-Tuning v2 step: one owned float32 prefix encoder, its optimizer and schedule, over a frozen base
it never modifies (the encoder's output reaches the model as ``prefix_kv=``).

Dropout (0.1) on the encoder's output, after the cast to the base's dtype, as the original; each
example's mask is keyed by (seed, its slot in the run), so how examples are cut into micro-batches, a
resume or data parallelism change no mask. The loss of a micro-batch is a weighted sum of its token
losses (weights from :mod:`backend.training.batches`), so micro-batches of any size add up to the
original per-step loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional, Sequence

import torch

from ..cuda_streams import warmup_stream
from ..int8_layer import use_weight_only_int8
from ..lean_autograd import causal_lm_loss
from ..modeling import PrefixEncoder, split_prefix
from .checkpoints import prefix_config
from .dist import Dist
from .optim import MAX_GRAD_NORM, make_optimizer, make_scheduler

log = logging.getLogger(__name__)

PREFIX_DROPOUT = 0.1


def compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def new_prefix_encoder(base, pre_seq_len: int, prefix_projection: bool, device, seed: int) -> PrefixEncoder:
    """A float32 encoder initialized as the original leaves it (torch's default init: embedding N(0, 1),
    linears Kaiming-uniform), drawn from its own generator: the global RNG, which a chat running on
    another thread may be sampling from, is not touched."""
    with torch.device("meta"):
        encoder = PrefixEncoder(prefix_config(base, pre_seq_len, prefix_projection))
    encoder = encoder.to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=g)
                bound = 1 / math.sqrt(module.in_features)
                module.bias.uniform_(-bound, bound, generator=g)
    return encoder.to(device)


def _dropout_seed(seed: int, slot: int) -> int:
    return (seed * 6_364_136_223_846_793_005 + slot * 1_442_695_040_888_963_407 + 1) % (2**63)


class PrefixStep:
    """Forward/backward of micro-batches into the encoder's grads, then one clipped optimizer step."""

    def __init__(self, model, encoder: PrefixEncoder, learning_rate: float, total_steps: int,
                 dropout: float = PREFIX_DROPOUT, seed: int = 0, dist: Dist = Dist(), weight_only_int8: bool = True,
                 cuda_graphs: bool = True, capture_lock=None, recompute_mlp: bool = True, optim: str = "adamw_hf",
                 lr_scheduler_type: str = "linear", warmup_steps: int = 0):
        if weight_only_int8 and model_device(model).type == "cuda":
            use_weight_only_int8(model)  # several times faster than bitsandbytes' LLM.int8 here (BENCHMARKS.md)
        self.model, self.encoder, self.dist = model, encoder, dist
        self.config = model.config
        self.device, self.dtype = model_device(model), compute_dtype(model)
        self.dropout, self.seed = dropout, seed
        # Recompute each MLP's up-projection in the backward: 0.42 GB less at 6B x 192 tokens, +6 ms (BENCHMARKS.md).
        self.recompute_mlp = recompute_mlp
        self.params = list(encoder.parameters())
        self.optimizer = make_optimizer(optim, self.params, learning_rate, self.device)
        self.scheduler = make_scheduler(lr_scheduler_type, self.optimizer, total_steps, warmup_steps)
        self._tokens = torch.arange(encoder.pre_seq_len, device=self.device)
        # The base's forward and backward as CUDA graphs, one pair per batch shape: at batch 1 a step is
        # thousands of small kernels, and launching them from Python costs more than running them.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphed: dict = {}
        self._pool = None
        self._capture_lock = capture_lock if capture_lock is not None else contextlib.nullcontext()

    def prefix_flat(self, batch_size: int, slots: Optional[Sequence[int]]) -> torch.Tensor:
        """``dropout(encoder(tokens).to(dtype))`` [b, P, kv_size]; row i's mask is keyed by ``slots[i]``
        (None: no dropout, as in evaluation)."""
        kv = self.encoder(self._tokens.expand(batch_size, -1)).to(self.dtype)  # [b, P, kv_size]
        if self.dropout and slots is not None:
            keep = torch.empty(kv.shape, dtype=torch.bool, device=self.device)
            for row, slot in enumerate(slots):
                g = torch.Generator(device=self.device)
                g.manual_seed(_dropout_seed(self.seed, slot))
                keep[row] = torch.rand(kv.shape[1:], generator=g, device=self.device) >= self.dropout
            kv = kv * keep.to(kv.dtype) * (1.0 / (1.0 - self.dropout))
        return kv

    def prefix_kv(self, batch_size: int, slots: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        return split_prefix(self.prefix_flat(batch_size, slots), self.config)

    def _base_loss(self, kv, input_ids, labels, row_weights=None) -> torch.Tensor:
        encoder = self.model.transformer.encoder
        restore, encoder.recompute_mlp = encoder.recompute_mlp, self.recompute_mlp
        try:
            logits = self.model(input_ids, prefix_kv=split_prefix(kv, self.config), use_cache=False).logits
            return causal_lm_loss(logits, labels, row_weights)
        finally:
            encoder.recompute_mlp = restore

    def _capture(self, *args):
        """Warm up once with gradient checkpointing (a lower memory peak than a plain eager step), then
        capture the base's forward and backward; no other thread may launch work meanwhile."""
        encoder = self.model.transformer.encoder
        sample = (args[0].detach().requires_grad_(), *args[1:])
        with self._capture_lock:
            checkpointing, encoder.gradient_checkpointing = encoder.gradient_checkpointing, True
            side = warmup_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):
                    torch.autograd.grad(self._base_loss(*sample), sample[0])
            finally:
                encoder.gradient_checkpointing = checkpointing
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # One pool for every shape's graphs: a shape's forward and backward always replay back to back, so
            # graphs of other shapes may reuse its activations' memory; the pool is then the largest shape's.
            return torch.cuda.make_graphed_callables(self._base_loss, sample, num_warmup_iters=0, pool=self._pool)

    def drop_graphs(self) -> None:
        """Give the captured graphs' memory back (before another batch shape, or whatever runs next)."""
        self._graphed.clear()
        self._pool = None

    def loss(self, batch: dict, slots: Optional[Sequence[int]] = None, row_weights=None) -> torch.Tensor:
        """The token-mean loss of ``batch`` (``row_weights`` None), else the weighted sum of its token losses."""
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        kv = self.prefix_flat(input_ids.shape[0], slots)
        if row_weights is None or not (self.cuda_graphs and torch.is_grad_enabled()):
            return self._base_loss(kv, input_ids, labels, row_weights)
        args = (kv, input_ids, labels, row_weights.to(self.device, torch.float32))
        key = (tuple(input_ids.shape), self.model.transformer.encoder.gradient_checkpointing)
        if key not in self._graphed:
            try:
                self._graphed[key] = self._capture(*args)
            except RuntimeError as err:
                if is_oom(err):
                    raise
                log.warning("CUDA graph capture failed (%s); training continues without graphs", str(err).splitlines()[0])
                self.cuda_graphs = False
                return self._base_loss(*args)
        return self._graphed[key](*args)

    def backward(self, batch: dict, slots: Sequence[int], row_weights: torch.Tensor) -> float:
        """Add d(weighted loss)/d(encoder) to the encoder's grads (autograd.grad touches no base parameter);
        returns the weighted loss."""
        loss = self.loss(batch, slots, row_weights)
        grads = torch.autograd.grad(loss, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)
        return float(loss.detach())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Sum grads over ranks (each rank's weights are already shares of the global step), clip to
        MAX_GRAD_NORM, optimizer step, schedule step; returns the grad norm."""
        if self.dist.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.sum_(p.grad)
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()
        return float(norm)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]
