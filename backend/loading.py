"""Loading a ChatGLM2 model directory (or hub id) shard by shard, optionally quantized: 8-bit is ChatGLM2's
own weight-only int8 (``int8_layer.Int8Linear``), 4-bit is bitsandbytes' NF4.

The model is built on the meta device and each shard's tensors are moved (and, for 8/4-bit,
quantized) one at a time, so host memory never holds more than one shard: a 6B model loads
in 8-bit on a machine with 13 GB of RAM. Every failure a user can cause becomes a
``BackendError`` with one sentence saying what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .configuration import ChatGLMConfig, read_config_file
from .families import Family, check_supported_config, detect_family
from .local_files import local_model_dir
from .int4_release import is_int4_release, replace_with_int4
from .int8_layer import Int8Linear
from .modeling import ChatGLMForConditionalGeneration
from .json_files import describe, read_json_object
from .registry import register_auto_classes
from .service import BackendError, LoadProgress

log = logging.getLogger(__name__)

QUANTIZATIONS = ("8bit", "4bit", "none")
# Kept in 16-bit when quantizing: the output layer (as the seed's 8-bit setting) and the prefix encoder.
SKIP_QUANTIZATION = ("output_layer", "prefix_encoder")
_IGNORED_KEYS = re.compile(r"rotary_pos_emb\.inv_freq$")


@dataclass
class LoadedModel:
    model: ChatGLMForConditionalGeneration
    tokenizer: object
    directory: Path
    device: torch.device
    dtype: torch.dtype
    quantization: str  # "8bit" | "4bit" (bitsandbytes NF4) | "int4" (the official int4 release) | "none"
    family: Family = Family("chatglm2", "chatglm2-6b")

    @property
    def precision(self) -> str:
        if self.quantization == "int4":
            return "4bit"
        if self.quantization != "none":
            return self.quantization
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]


# ---------------------------------------------------------------- finding the files


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local ChatGLM2 directory, or a hub id resolved through the standard hub cache."""
    path = local_model_dir(name_or_path)
    return _check_model_dir(path if path is not None else _download(str(name_or_path)))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # tokenization_chatglm.py is read as text to tell ChatGLM3 from ChatGLM2, never imported
    patterns = ["*.json", "*.model", "*.safetensors", "*.bin", "tokenization_chatglm.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as online_error:  # offline, unreachable, unknown repo: fall back to the cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise BackendError(
                f"model '{repo_id}' is not in the hub cache and could not be downloaded "
                f"({type(online_error).__name__}); on a connected machine run "
                f"`hf download {repo_id}` (or copy the model directory here and pass its path)."
            ) from None


def _check_model_dir(path: Path) -> Path:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackendError(f"{path} is not a ChatGLM2 model directory: it has no config.json.")
    model_type = read_config_file(config_file, fix="download the model again").get("model_type")
    if model_type != ChatGLMConfig.model_type:
        raise BackendError(f"{path} is not a ChatGLM2 model directory: config.json says model_type {model_type!r}, not 'chatglm'.")
    if not (path / "tokenizer.model").is_file():
        raise BackendError(f"{path} has no tokenizer.model; copy it from the model's release into that directory.")
    return path


def weight_files(path: Path) -> list[Path]:
    """The weight files, safetensors preferred: single or sharded with an index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            shards = _shard_names(index)
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise BackendError(f"{path} lacks {len(missing)} weight shard(s) named in {index_name} (first: {missing[0]}); finish the download.")
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise BackendError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin (single or sharded with an index).")


def _shard_names(index: Path) -> list[str]:
    """The shard files an index's weight_map names: plain file names beside the index, at least one."""
    weight_map = read_json_object(index, fix="download it again").get("weight_map")
    names = list(weight_map.values()) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(s, str) and s not in ("", ".", "..") and Path(s).name == s for s in names):
        raise BackendError(
            f"{index} has no usable weight_map (an object naming, for each tensor, a shard file beside it); "
            "download it again."
        )
    return sorted(set(names))


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read lazily; pickles are loaded weights-only."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise BackendError(f"{file} is corrupt or truncated ({err}); download it again.") from None
        return
    yield from load_pickled_state_dict(file).items()


def load_pickled_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only: a pickle that would run code is refused, not executed."""
    if not zipfile.is_zipfile(file):
        raise BackendError(f"{file} is corrupt or truncated (not a complete torch.save archive); save or download it again.")
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise BackendError(
            f"{file} contains pickled code, which glmchat refuses to run ({_reason(err)}); "
            "re-save it with torch.save(state_dict) or as safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise BackendError(f"{file} is corrupt or truncated ({_reason(err)}); save or download it again.") from None
    return _checked_state_dict(state, file)


def _reason(err: BaseException, limit: int = 160) -> str:
    """The first line of ``err``, shortened at a word boundary (never mid-word) when longer than ``limit``."""
    line = (str(err).splitlines() or [type(err).__name__])[0].strip()
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",.;:") + " …"


def _checked_state_dict(state: object, file: Path) -> dict[str, torch.Tensor]:
    """weights_only still lets a pickle hold a list or a number: only {name: tensor} is weights."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        held = "a dict whose values are not all tensors" if isinstance(state, dict) else describe(state)
        raise BackendError(f"{file} holds {held}, not a state dict of tensors; save it with torch.save(model.state_dict()).")
    return state


# ---------------------------------------------------------------- devices and precision


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    warnings.warn("no GPU found: running on the CPU in float32, which is slow for a 6B model.", stacklevel=3)
    return torch.device("cpu")


def pick_dtype(device: torch.device, quantization: str, dtype: Optional[str | torch.dtype] = None) -> torch.dtype:
    """bf16 on a GPU that has it; fp16 under 8-bit, as the original runs its int8 weights (``.half().quantize(8)``);
    float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() and quantization != "8bit" else torch.float16
    return torch.float32


def pick_quantization(quantization: Optional[str], device: torch.device) -> str:
    if quantization in (None, "auto"):
        return "8bit" if device.type == "cuda" else "none"
    if quantization not in QUANTIZATIONS:
        raise BackendError(f"unknown quantization {quantization!r}; use one of 8bit, 4bit, none.")
    return quantization


# ---------------------------------------------------------------- building the model


def _quantized_linear(linear: nn.Linear, quantization: str, dtype: torch.dtype) -> nn.Module:
    if quantization == "8bit":
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device="meta")
    import bitsandbytes as bnb

    kw = dict(bias=linear.bias is not None, device="meta")
    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=dtype, quant_type="nf4", **kw)


def replace_linears(model: nn.Module, quantization: str, dtype: torch.dtype) -> None:
    """Swap every nn.Linear outside SKIP_QUANTIZATION for its quantized version (still empty)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in SKIP_QUANTIZATION):
                setattr(module, child_name, _quantized_linear(child, quantization, dtype))


def _place(model: nn.Module, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Put one checkpoint tensor into the meta model; quantized layers quantize their weight as it moves."""
    module_name, param_name = key.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if param_name == "weight" and isinstance(module, Int8Linear):
        module.quantize_from(tensor.to(device))
        return
    if param_name == "weight" and type(module).__module__.startswith("bitsandbytes"):
        import bitsandbytes as bnb

        module.weight = bnb.nn.Params4bit(tensor.to(dtype), requires_grad=False, quant_type="nf4").to(device)
        return
    set_module_tensor_to_device(model, key, device, value=tensor, dtype=dtype)


def load_model(
    name_or_path: str | os.PathLike,
    quantization: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str | torch.dtype] = None,
    pre_seq_len: Optional[int] = None,
    prefix_projection: bool = False,
    progress: Optional[Callable[[LoadProgress], None]] = None,
) -> LoadedModel:
    """Load tokenizer and weights; 8bit is the default on a GPU, float32 on the CPU."""
    report = progress or (lambda p: None)
    register_auto_classes()  # a loaded model's generate/save_pretrained find our classes by model_type
    path = resolve_model_dir(name_or_path)
    device_ = pick_device(device)
    quant = pick_quantization(quantization, device_)
    dtype_ = pick_dtype(device_, quant, dtype)

    # Family and config checks come first: a refused directory loads nothing.
    raw_config = read_config_file(path / "config.json", fix="download the model again")
    check_supported_config(raw_config, path / "config.json")
    family = detect_family(path, raw_config)

    report(LoadProgress("tokenizer", 0, 1, "reading tokenizer.model"))
    from .tokenization import tokenizer_class

    try:
        tokenizer = tokenizer_class(family.family).from_pretrained(str(path))
    except Exception as err:
        raise BackendError(f"{path}/tokenizer.model could not be read ({err}); copy it again from the release.") from None
    report(LoadProgress("tokenizer", 1, 1, "tokenizer ready"))

    try:
        config = ChatGLMConfig.from_pretrained(str(path))
    except Exception as err:
        raise BackendError(f"{path}/config.json could not be read as a ChatGLM2 config ({err}).") from None
    if pre_seq_len is not None:
        config.pre_seq_len, config.prefix_projection = pre_seq_len or None, prefix_projection
    config.dtype = dtype_
    config.family = family.family

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    if is_int4_release(config):  # the official int4 release: its packed weights stay packed
        if quantization not in (None, "auto", "4bit"):
            raise BackendError(f"{path} is the int4 release (its weights are already 4-bit); drop --quantization {quantization} or pass 4bit.")
        quant = "int4"
        replace_with_int4(model, dtype_)
    elif quant != "none":
        replace_linears(model, quant, dtype_)
    _read_weights(model, path, quant, is_int4_release(config), device_, dtype_, report)

    if model.transformer.prefix_encoder is not None:  # the base has none: start it like the original (random)
        with torch.device(device_):
            from .modeling import PrefixEncoder

            model.transformer.prefix_encoder = PrefixEncoder(config).float()
    model.eval().requires_grad_(False)
    model.quantization = quant
    report(LoadProgress("ready", 1, 1, f"{path.name} loaded ({quant if quant != 'none' else str(dtype_).replace('torch.', '')}) on {device_}"))
    return LoadedModel(model, tokenizer, path, device_, dtype_, quant, family)


def _read_weights(model: nn.Module, path: Path, quant: str, int4_release: bool, device_, dtype_, report) -> None:
    """Every shard's tensors into ``model`` (on the meta device until placed), each checked against the config:
    a tensor ChatGLM2 lacks, a shape from another model or missing tensors are one sentence each."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    pending = {k for k in expected if ".prefix_encoder." not in k}
    files = weight_files(path)
    verb = {"8bit": "quantizing to 8-bit", "4bit": "quantizing to 4-bit", "int4": "loading 4-bit", "none": "loading"}[quant]
    stage = "quantizing" if quant != "none" else "weights"
    for i, file in enumerate(files, 1):
        report(LoadProgress(stage, i - 1, len(files), f"shard {i}/{len(files)}: {verb} {file.name}"))
        for key, tensor in read_tensors(file):
            if _IGNORED_KEYS.search(key) or ".prefix_encoder." in key:
                continue
            if (key.endswith(".weight_scale") or tensor.dtype == torch.int8) and not int4_release:
                raise BackendError(f"{file} holds the int4 release's packed weights but {path}/config.json lacks \"quantization_bit\": 4; use the release's config.json.")
            if key not in expected:
                raise BackendError(f"{file} holds tensor '{key}', which ChatGLM2 does not have: this is not a ChatGLM2 checkpoint.")
            if tuple(tensor.shape) != expected[key] and key in pending and not _is_quantized_shape(model, key):
                raise BackendError(
                    f"{file}: tensor '{key}' has shape {tuple(tensor.shape)} but config.json implies {expected[key]}; "
                    "the weights and config.json come from different models."
                )
            _place(model, key, tensor, device_, dtype_)
            pending.discard(key)
        report(LoadProgress(stage, i, len(files), f"shard {i}/{len(files)} done"))
    if pending:
        first = sorted(pending)[0]
        raise BackendError(f"the weights in {path} lack {len(pending)} tensor(s) (first: '{first}'); the download is incomplete.")


def _is_quantized_shape(model: nn.Module, key: str) -> bool:
    """4-bit weights are stored packed, so their meta shape differs from the checkpoint's."""
    module_name, param_name = key.rsplit(".", 1)
    return param_name == "weight" and type(model.get_submodule(module_name)).__name__ == "Linear4bit"
