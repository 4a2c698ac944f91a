"""Loading a full-size ChatGLM2-6B (random weights) shard by shard: host RSS, GPU peak, time.

    python bench/bench_load.py make DIR          # write 7 fp16 .bin shards + index, like the release
    python bench/bench_load.py make-int4 DIR SRC # the official int4 release's layout, packed from SRC's fp16 shards
    python bench/bench_load.py load DIR 8bit     # one measurement, in a fresh process; prints one JSON line

The weights are random (the real ones are not reachable from the benchmark machine); the
architecture comes from the release's config.json facts in ../shared/docs/chatglm2.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONFIG_6B = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": 13696, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32,
    "num_layers": 28, "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768,
    "use_cache": True, "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}


def make(directory: Path, tokenizer_model: Path | None = None) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG_6B, indent=2))
    c = CONFIG_6B
    h, f, L = c["hidden_size"], c["ffn_hidden_size"], c["num_layers"]
    qkv = (c["num_attention_heads"] + 2 * c["multi_query_group_num"]) * c["kv_channels"]
    shapes = {"transformer.embedding.word_embeddings.weight": (c["padded_vocab_size"], h)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "self_attention.query_key_value.weight": (qkv, h),
            p + "self_attention.query_key_value.bias": (qkv,), p + "self_attention.dense.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,), p + "mlp.dense_h_to_4h.weight": (2 * f, h),
            p + "mlp.dense_4h_to_h.weight": (h, f),
        })
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (c["padded_vocab_size"], h)
    keys = list(shapes)
    shards = [keys[i * len(keys) // 7:(i + 1) * len(keys) // 7] for i in range(7)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for n, names in enumerate(shards, 1):
        name = f"pytorch_model-{n:05d}-of-00007.bin"
        state = {}
        for k in names:
            if k.endswith("layernorm.weight"):
                state[k] = torch.ones(shapes[k], dtype=torch.float16)
            else:
                std = 0.02 if not k.endswith("bias") else 0.0
                state[k] = (torch.randn(shapes[k], generator=g, device=device) * std).half().cpu()
            total += state[k].numel() * 2
            weight_map[k] = name
        torch.save(state, directory / name)
        del state
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if tokenizer_model is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    else:  # any SentencePiece model serves: loading time and memory are the weights'
        import sentencepiece as spm

        corpus = directory / "corpus.txt"
        corpus.write_text("\n".join(["类型#上衣*材质#牛仔布*颜色#白色", "Hello, world!", "问：你好\n\n答：你好"] * 50))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=300,
                                       model_type="bpe", byte_fallback=True, minloglevel=2)
        corpus.unlink()
    print(json.dumps({"made": str(directory), "bytes": total, "tensors": len(keys)}))


INT4_LINEARS = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")


def pack_int4_rows(weight):
    """The int4 release's storage of one linear: (int8 [out, in/2], fp16 scale [out]).

    scale = the row's max |w| / 7; q = round(w / scale) in [-8, 7]; each byte holds two columns,
    the even one in the high nibble, both signed (../shared/docs/chatglm-family.md)."""
    import torch

    w = weight.float()
    scale = (w.abs().amax(dim=1) / 7).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-8, 7).to(torch.int16)
    packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8).view(torch.int8)
    return packed.contiguous(), scale


def make_int4(directory: Path, source: Path) -> None:
    """One pytorch_model.bin as the chatglm2-6b-int4 release ships it, from a ``make`` directory's shards."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}, indent=2))
    state = {}
    for shard in sorted(source.glob("pytorch_model-*.bin")):
        for key, tensor in torch.load(shard, weights_only=True).items():
            if key.endswith(INT4_LINEARS) and ".encoder.layers." in key:
                state[key], state[key + "_scale"] = pack_int4_rows(tensor)
            else:
                state[key] = tensor
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
    print(json.dumps({"made": str(directory), "tensors": len(state)}))


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GB, from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0]) / 1e6
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def load(directory: Path, quantization: str) -> dict:
    import torch

    import backend

    backend.register()  # everything (torch, transformers, our model) imported before the baseline is read
    from backend.loading import load_model

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    base_rss, _ = rss_gb()
    reset_peak_rss()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loaded = load_model(directory, quantization=quantization)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, peak_rss = rss_gb()
    ids = torch.tensor([[64790, 64792] + list(range(100, 162))], device="cuda")
    with torch.no_grad():
        logits = loaded.model(ids, use_cache=False).logits
    return {
        "quantization": quantization,
        "load_s": round(seconds, 1),
        "host_rss_peak_above_baseline_gb": round(peak_rss - base_rss, 2),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "gpu_after_load_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
        "finite_logits": bool(torch.isfinite(logits).all()),
        "device": torch.cuda.get_device_name(),
    }


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif sys.argv[1] == "make-int4":
        make_int4(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(json.dumps(load(Path(sys.argv[2]), sys.argv[3])))
