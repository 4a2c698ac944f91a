"""ChatGLM2-6B, written from its published math, with the release's state-dict key names.

Tensors are batch-first here ([batch, seq, ...]); the original is seq-first, which changes
no arithmetic. Shapes in comments use b=batch, s=new tokens, t=keys (prefix + past + new),
h=attention heads, g=key/value groups, d=kv_channels, P=pre_seq_len.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .chat import ChatMixin
from .configuration import ChatGLMConfig
from .kv_cache import KVCache
from .lean_autograd import causal_lm_loss, rms_norm

# transformers 5.17 names the cache ``past_key_values``; newer 5.x releases name it ``cache``.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_arg(kwargs: dict):
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rope(NamedTuple):
    """How a family turns positions into rotary angles (see ``rope_settings``)."""

    position_divisor: float = 1.0  # chatglm2-6b-32k: positions / rope_ratio (positional interpolation)
    base: float = 10000.0  # chatglm3-6b-32k: 10000 * rope_ratio
    float32: bool = False  # ChatGLM3 builds its cache in float32; ChatGLM2 in the model dtype


def rope_settings(config) -> Rope:
    """The rotary settings of a loaded config: ``rope_ratio`` means a position divisor in ChatGLM2's
    32k release and a base multiplier in ChatGLM3's (each family's own modeling code)."""
    ratio = float(getattr(config, "rope_ratio", 1.0) or 1.0)
    if getattr(config, "family", "chatglm2") == "chatglm3":
        return Rope(base=10000.0 * ratio, float32=True)
    return Rope(position_divisor=ratio)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype, rope: Rope = Rope()):
    """cos/sin [b, s, rotary_dim/2] for the interleaved rotary on the first rotary_dim dims.

    As the originals: ChatGLM2 computes theta, the positions (over rope_ratio) and their product in
    the model dtype (so fp16 rounds positions above 2048, bf16 above 256) before cos/sin in float32;
    ChatGLM3 computes all of it in float32. Either casts cos/sin to a 16-bit model dtype."""
    half = dtype in (torch.float16, torch.bfloat16)
    work = dtype if half and not rope.float32 else torch.float32
    theta = 1.0 / (rope.base ** (torch.arange(0, rotary_dim, 2, dtype=work, device=position_ids.device) / rotary_dim))
    positions = position_ids.to(work)  # as the original's CUDA arange in that dtype (no host sync here)
    if rope.position_divisor != 1.0:
        positions = positions / rope.position_divisor
    angles = (positions[..., None] * theta).float()  # [b, s, rotary_dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if half:  # the original casts its cache to the model dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


# Attention kernels for decoding. torch 2.11 sends masked attention on Hopper to cuDNN, which builds an execution
# plan for every new shape: 50 ms to 2 s a shape on the H200, and a decoder's shapes change with every prompt (and
# every eager step). Flash and memory-efficient attention take any shape at once and ran as fast there
# (bench/NOTES.md, run 10). Training keeps torch's choice: its shapes are fixed for a run.
DECODING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decoding_attention():
    """A context in which F.scaled_dot_product_attention picks among DECODING_ATTENTION's kernels."""
    return sdpa_kernel(DECODING_ATTENTION)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              causal: bool = False, gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention; without gradients on CUDA (decoding), through DECODING_ATTENTION's kernels."""
    if not q.is_cuda or torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    with decoding_attention():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def causal_to_end(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], the last T of W slots, against grouped keys and values [B, G, W, D]: query t sees slots
    [0, W - T + t] (the prefix, earlier turns and its prompt up to itself), with no mask tensor. A mask sends SDPA
    to its masked kernels: 11.3 ms of a cold 1600-token prompt's GPU time on the H100, where causal flash attention
    takes 4.0 (bench/NOTES.md, run 23). Flash attention (Ampere and later, 16-bit) reads the grouped keys as they are;
    the memory-efficient kernel (older cards) takes the causal offset but not groups, so they are spelled out."""
    T, W, heads = q.shape[2], keys.shape[2], q.shape[1]
    if q.is_cuda and not (q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device) >= (8, 0)):
        keys, values = keys_per_head(keys, heads), keys_per_head(values, heads)
    gqa = keys.shape[1] != heads
    if T == W:
        return attention(q, keys, values, causal=True, gqa=gqa)
    return attention(q, keys, values, causal_lower_right(T, W), gqa=gqa)


def keys_per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped keys or values [B, G, W, D] -> [B, heads, W, D], each group's once for each of its query heads (one
    copy). With a mask, SDPA's memory-efficient kernel takes no grouped keys (enable_gqa), and its math fallback
    writes every [T, W] score to memory."""
    B, G, W, D = x.shape
    return x[:, :, None].expand(B, G, heads // G, W, D).reshape(B, heads, W, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, d]: rotate interleaved pairs (x[2i], x[2i+1]) of the first 2*cos.size(-1) dims."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.multi_query_group_num
        self.head_dim = config.kv_channels
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_out, bias=config.add_bias_linear or config.add_qkv_bias, device=device
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, x, cos, sin, mask, cache, prefix_k, prefix_v):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [b, s, (h + 2g) * d]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(b, s, self.num_heads, self.head_dim), cos, sin).transpose(1, 2)  # [b, h, s, d]
        k = apply_rotary(k.view(b, s, self.num_groups, self.head_dim), cos, sin).transpose(1, 2)  # [b, g, s, d]
        v = v.view(b, s, self.num_groups, self.head_dim).transpose(1, 2)  # [b, g, s, d]
        if cache is not None:  # the prefix, when any, is already the cache's first P slots
            k, v = cache.update(k, v, self.layer_idx)  # [b, g, t, d]
        elif prefix_k is not None:
            k, v = torch.cat((prefix_k.to(k.dtype), k), dim=2), torch.cat((prefix_v.to(v.dtype), v), dim=2)
        out = attention(q, k, v, mask, causal=mask is None and s == k.shape[2] and s > 1, gqa=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, q_size))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear, device=device)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, device=device)

    def activation(self, x):
        """SwiGLU of the up-projection: [.., ffn_hidden_size]."""
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return F.silu(a) * b

    def forward(self, x):
        return self.dense_4h_to_h(self.activation(x))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.self_attention = SelfAttention(config, layer_idx, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.mlp = MLP(config, device=device)

    def forward(self, x, cos, sin, mask, cache=None, prefix_k=None, prefix_v=None, recompute_mlp=False):
        h = x + self.self_attention(self.input_layernorm(x), cos, sin, mask, cache, prefix_k, prefix_v)
        if recompute_mlp:  # keep only h for the backward; the norm, up-projection and SwiGLU run again there
            act = checkpoint(self._mlp_activation, h, use_reentrant=False, preserve_rng_state=False)
        else:
            act = self._mlp_activation(h)
        return h + self.mlp.dense_4h_to_h(act)

    def _mlp_activation(self, h):
        return self.mlp.activation(self.post_attention_layernorm(h))


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i, device=device) for i in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()
        # Under autograd, recompute each MLP's up-projection in the backward instead of keeping its
        # 2 x ffn_hidden_size output (10.5 MB a layer at 192 tokens): P-Tuning turns this on.
        self.recompute_mlp = False

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None):
        grad = torch.is_grad_enabled()  # the frozen base may stay in eval mode while a prefix trains
        for i, layer in enumerate(self.layers):
            pk, pv = (prefix_kv[2 * i], prefix_kv[2 * i + 1]) if prefix_kv is not None else (None, None)
            if self.gradient_checkpointing and grad:
                x = checkpoint(layer, x, cos, sin, mask, cache, pk, pv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, pk, pv, recompute_mlp=self.recompute_mlp and grad)
        return self.final_layernorm(x)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: P trainable tokens, each encoded to a key and a value for every layer."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        kv_size = config.prefix_kv_size
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size, device=device)
        if config.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_size, device=device),
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)  # [b, P, kv_size]
        return self.trans(embedded) if self.prefix_projection else embedded


def split_prefix(kv: torch.Tensor, config: ChatGLMConfig) -> list[torch.Tensor]:
    """Prefix encoder output [b, P, kv_size] as 2*layers tensors [b, g, P, d]: for layer i, 2i is the key, 2i+1 the value."""
    b, P, _ = kv.shape
    kv = kv.view(b, P, 2 * config.num_layers, config.multi_query_group_num, config.kv_channels)
    return list(kv.permute(2, 0, 3, 1, 4).unbind(0))


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keep_in_fp32_modules = ["prefix_encoder"]
    # Derivable buffer in the release; prefix weights come from P-Tuning checkpoints, not the base.
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _keys_to_ignore_on_load_missing = [r"prefix_encoder\."]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None, empty_init=None):
        super().__init__(config)
        self.num_layers = config.num_layers
        self.num_groups = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.rotary_dim = config.kv_channels // 2
        self.embedding = Embedding(config, device=device)
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.prefix_encoder = PrefixEncoder(config, device=device) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(0.1)
        self.post_init()

    @property
    def pre_seq_len(self) -> int:
        return self.prefix_encoder.pre_seq_len if self.prefix_encoder is not None else 0

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """This model's own prefix encoder output, as ``split_prefix`` lays it out."""
        enc = self.prefix_encoder
        tokens = torch.arange(enc.pre_seq_len, device=enc.embedding.weight.device).expand(batch_size, -1)
        return split_prefix(self.prefix_dropout(enc(tokens).to(dtype)), self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        prefix_kv: Optional[list[torch.Tensor]] = None,
        **kwargs,
    ):
        """``cache=`` (or ``past_key_values=``): a KVCache or transformers Cache to extend in place.
        ``prefix_kv``: a prefix from outside (``split_prefix`` layout), e.g. one being trained; no cache then."""
        b, s = input_ids.shape
        x = self.embedding(input_ids)  # [b, s, hidden]
        dtype = x.dtype
        P = prefix_kv[0].shape[2] if prefix_kv is not None else self.pre_seq_len
        use_cache = use_cache if use_cache is not None else (not self.training and self.config.use_cache)
        cache = _cache_arg(kwargs)
        if use_cache and cache is None:
            cache = KVCache()
        if prefix_kv is not None:
            cache = None
        if cache is not None:
            if P and cache.get_seq_length() == 0:  # the prefix takes the cache's first P slots
                prefix = self.prefix_key_values(b, dtype)
                for i in range(self.num_layers):
                    cache.update(prefix[2 * i], prefix[2 * i + 1], i)
                cache.prefix_len = P
            P = getattr(cache, "prefix_len", 0)  # a cache may carry a prefix put there by its owner
            past = cache.get_seq_length()  # key slots before the new tokens
        else:
            if prefix_kv is None and P:
                prefix_kv = self.prefix_key_values(b, dtype)
            past = P
        past_tokens = past - P  # real tokens already in the cache

        full_mask = attention_mask  # [b, past_tokens + s], padding of every real token so far
        if full_mask is not None and full_mask.shape[1] == s and past_tokens:
            full_mask = torch.cat((full_mask.new_ones(b, past_tokens), full_mask), dim=1)
        if position_ids is None:
            if full_mask is not None:  # pads get position 0, real tokens 0..n-1 (the tokenizer's left padding)
                position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past_tokens, past_tokens + s, device=input_ids.device).expand(b, -1)
        cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, dtype, rope_settings(self.config))
        mask = self._attention_mask(full_mask, b, s, past, P, x.device)
        h = self.encoder(x, cos, sin, mask, cache=cache, prefix_kv=prefix_kv)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _attention_mask(padding_mask, b: int, s: int, past: int, P: int, device) -> Optional[torch.Tensor]:
        """Boolean [b, 1, s, past + s] (True = attend), or None when plain causal attention is exact."""
        if padding_mask is None or bool(padding_mask.all()):
            if past == 0 or s == 1:
                return None  # SDPA's is_causal (or no mask for one new token) is the same mask
            padding_mask = None
        t = past + s
        rows = torch.arange(s, device=device)[:, None] + past
        allowed = torch.arange(t, device=device)[None, :] <= rows  # [s, t] causal, prefix and past visible
        allowed = allowed[None].expand(b, s, t)
        if padding_mask is not None:
            keys = padding_mask.bool()
            if P:
                keys = torch.cat((keys.new_ones(b, P), keys), dim=1)
            allowed = allowed & keys[:, None, -t:]
            if past == 0:  # the original lets pad query rows see every key (no empty softmax rows)
                allowed = allowed | ~padding_mask.bool()[:, -s:, None]
        return allowed[:, None]


class ChatGLMForConditionalGeneration(ChatMixin, ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys: list = []

    def __init__(self, config: ChatGLMConfig, device=None, empty_init=None):
        super().__init__(config)
        self.transformer = ChatGLMModel(config, device=device)
        self.post_init()

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        prefix_kv: Optional[list[torch.Tensor]] = None,
        **kwargs,
    ):
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_arg(kwargs),
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            prefix_kv=prefix_kv,
        )
        logits = self.transformer.output_layer(out.last_hidden_state)  # [b, s, vocab]
        loss = None
        if labels is not None:  # cross_entropy(logits.float()[:, :-1], labels[:, 1:]), keeping less for the backward
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen; positions come from the attention mask."""
        cache = _cache_arg(kwargs)
        if cache is not None:
            seen = cache.get_seq_length() - getattr(cache, "prefix_len", 0)
            if seen > 0:
                input_ids = input_ids[:, seen:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            CACHE_FIELD: cache,
            "use_cache": use_cache,
            "logits_to_keep": 1,
        }
