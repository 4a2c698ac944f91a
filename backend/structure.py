"""The "model structure" page: the architecture as loaded, for ``glmchat --info`` and the app's panel.

Shapes come from the config, counts and bytes from the tensors actually in memory (so a
quantized part shows its real size), and the rotary settings from ``modeling.rope_settings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .modeling import rope_settings

# (label, test on a parameter's module path); the first match claims a module
COMPONENTS = (
    ("embedding", lambda name: ".embedding." in f".{name}."),
    ("attention", lambda name: ".self_attention." in name),
    ("mlp", lambda name: ".mlp." in name),
    ("norms", lambda name: "layernorm" in name),
    ("output layer", lambda name: "output_layer" in name),
    ("prefix encoder", lambda name: "prefix_encoder" in name),
)


@dataclass
class Component:
    label: str
    parameters: int = 0
    bytes: int = 0
    kinds: set = None  # how its weights are stored: "fp16", "int8 (weight-only, a scale per row)", "nf4", ...


def _kind(module: nn.Module, tensor: torch.Tensor) -> str:
    kind = type(module).__name__
    if kind == "Int8Linear":
        return "int8 (weight-only, a scale per row)"
    if kind == "Linear8bitLt":
        return "int8 (bitsandbytes LLM.int8)"
    if kind == "Linear4bit":
        return "nf4 (bitsandbytes 4-bit)"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(tensor.dtype, str(tensor.dtype).replace("torch.", ""))


def _components(model: nn.Module) -> list[Component]:
    found = {label: Component(label, kinds=set()) for label, _ in COMPONENTS}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        label = next((label for label, match in COMPONENTS if match(name)), None)
        if label is None:
            continue
        part = found[label]
        for _, tensor in own:
            part.bytes += tensor.numel() * tensor.element_size()
        if hasattr(module, "in_features") and hasattr(module, "out_features"):  # packed 4-bit weights miscount
            part.parameters += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        else:
            part.parameters += sum(t.numel() for _, t in module.named_parameters(recurse=False))
        weight = getattr(module, "weight", None)
        if weight is not None:
            part.kinds.add(_kind(module, weight))
    return [c for c in found.values() if c.parameters]


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def describe_model(model, family: str, variant: str, precision: str, adapter: Optional[tuple[str, int, bool]] = None,
                   context_length: Optional[int] = None) -> str:
    """The structure page as text. ``adapter``: (name, pre_seq_len, prefix_projection) of the active one."""
    cfg = model.config
    rope = rope_settings(cfg)
    rotary_dim = cfg.kv_channels // 2
    heads_per_group = cfg.num_attention_heads // cfg.multi_query_group_num
    lines = [
        f"{variant}  ({family}, {precision})",
        "",
        "Architecture",
        f"  layers              {cfg.num_layers} pre-norm blocks (RMSNorm eps {cfg.layernorm_epsilon:g})",
        f"  hidden size         {cfg.hidden_size}; MLP {cfg.ffn_hidden_size} (SwiGLU, up-projection {2 * cfg.ffn_hidden_size})",
        f"  attention heads     {cfg.num_attention_heads} query heads x {cfg.kv_channels} dims",
        f"  key/value groups    {cfg.multi_query_group_num} (multi-query: {heads_per_group} query heads share each)",
        f"  vocabulary          {cfg.padded_vocab_size} rows (padded)",
        f"  context             {cfg.seq_length} tokens (seq_length)" + (f"; this session uses {context_length}" if context_length and context_length != cfg.seq_length else ""),
        "",
        "Rotary position embedding",
        f"  applied to          first {rotary_dim} of {cfg.kv_channels} dims of q and k, interleaved pairs",
        f"  base                {rope.base:g}" + (f" (10000 x rope_ratio {cfg.rope_ratio:g})" if rope.base != 10000 else ""),
        "  positions           " + (f"divided by rope_ratio {cfg.rope_ratio:g}" if rope.position_divisor != 1 else "as is (rope_ratio 1)"),
        "  cache computed in   " + ("float32 (ChatGLM3)" if rope.float32 else "the model dtype (ChatGLM2)"),
        "",
        "Parameters and memory",
    ]
    components = _components(model)
    for c in components:
        per_layer = c.label in ("attention", "mlp")
        note = f"  ({_count(c.parameters // cfg.num_layers)} per layer)" if per_layer else ""
        lines.append(f"  {c.label:<18}  {_count(c.parameters):>9}  {_size(c.bytes):>10}  {', '.join(sorted(c.kinds))}{note}")
    total_p, total_b = sum(c.parameters for c in components), sum(c.bytes for c in components)
    lines += [f"  {'total':<18}  {_count(total_p):>9}  {_size(total_b):>10}", ""]
    lines.append("Active adapter")
    if adapter is None:
        lines.append("  none (base model)")
    else:
        name, pre_seq_len, projection = adapter
        lines += [
            f"  {name}: P-Tuning v2 prefix of {pre_seq_len} tokens" + (" with projection" if projection else ""),
            f"  prefix keys/values  {2 * cfg.num_layers} tensors of [1, {cfg.multi_query_group_num}, {pre_seq_len}, {cfg.kv_channels}]"
            f" (one key and one value per layer; {pre_seq_len} x {cfg.prefix_kv_size} values)",
        ]
    return "\n".join(lines)
