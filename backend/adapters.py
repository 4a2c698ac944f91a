"""P-Tuning v2 prefix checkpoints: reading them in the original trainer's layout, and a registry
of several, switched live over one loaded base model.

A checkpoint directory holds ``pytorch_model.bin`` or ``model.safetensors`` with
``transformer.prefix_encoder.*`` tensors (safetensors preferred when both exist) and usually a
``config.json`` giving ``pre_seq_len`` and ``prefix_projection``; without it both are inferred
from the tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .configuration import ChatGLMConfig, read_config_file
from .families import FAMILIES, family_in_name
from .loading import load_pickled_state_dict
from .modeling import PrefixEncoder, split_prefix
from .service import AdapterInfo, BackendError
from .training.checkpoints import (CHECKPOINT_PREFIX, PREFIX_KEY, WEIGHTS_NAME, checkpoint_step,  # noqa: F401 - PREFIX_KEY re-exported
                                   prefix_config, strip_prefix_key)

CHECKPOINT_FILES = ("model.safetensors", WEIGHTS_NAME)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class PrefixCheckpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]  # keys without the "transformer.prefix_encoder." prefix
    pre_seq_len: int
    prefix_projection: bool
    config: dict  # the checkpoint's config.json, or {}
    family: Optional[str] = None  # "chatglm2" | "chatglm3" when the checkpoint says; None for old ones
    format: str = "ptuning-v2"  # or "peft"


def read_prefix_checkpoint(path: Union[str, Path]) -> PrefixCheckpoint:
    """Read a checkpoint directory (or its weight file): the original P-Tuning v2 trainer's layout,
    or PEFT's prefix-tuning layout (``adapter_config.json`` + ``adapter_model.*``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BackendError(f"no adapter checkpoint at {path}; pass a checkpoint-N directory written by P-Tuning v2 training.")
    directory = path if path.is_dir() else path.parent
    if (directory / PEFT_CONFIG).is_file():
        return _read_peft_checkpoint(directory)
    if path.is_dir():
        files = [path / name for name in CHECKPOINT_FILES if (path / name).is_file()]
        if not files:
            raise BackendError(f"{path} holds neither model.safetensors nor pytorch_model.bin: not a P-Tuning v2 checkpoint.")
        weights = files[0]
    else:
        weights = path
    raw = _read_weights(weights)
    state = strip_prefix_key(raw)
    if "embedding.weight" not in state:
        raise BackendError(f"{weights} has no transformer.prefix_encoder.* tensors: it is not a P-Tuning v2 checkpoint.")
    config = _read_json_object(directory / "config.json", "fix or delete it (the shapes tell pre_seq_len)")
    pre_seq_len, projection = _check_shapes(directory, "config.json", state, config.get("pre_seq_len"), config.get("prefix_projection"))
    return PrefixCheckpoint(directory, state, pre_seq_len, projection, config, family_of_checkpoint(config))


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise BackendError(f"{weights} is corrupt or truncated ({err}); save the checkpoint again.") from None
    return load_pickled_state_dict(weights)


def _read_json_object(file: Path, fix: str) -> dict:
    """The file's JSON object, {} when there is no such file (the tensor shapes then tell the settings)."""
    return read_config_file(file, fix) if file.is_file() else {}


def _check_shapes(directory: Path, source: str, state: dict, pre_seq_len, projection) -> tuple[int, bool]:
    """The prefix length and projection the tensors imply, refused when ``source`` says otherwise."""
    inferred_len = state["embedding.weight"].shape[0]
    inferred_projection = "trans.0.weight" in state
    pre_seq_len = pre_seq_len or inferred_len
    projection = bool(inferred_projection if projection is None else projection)
    if pre_seq_len != inferred_len:
        raise BackendError(f"{directory}: {source} says pre_seq_len {pre_seq_len} but the prefix tensor has {inferred_len} rows; the files come from different runs.")
    if projection != inferred_projection:
        raise BackendError(f"{directory}: {source} says prefix_projection {projection} but the tensors say {inferred_projection}; the files come from different runs.")
    return pre_seq_len, projection


def _read_peft_checkpoint(directory: Path) -> PrefixCheckpoint:
    """PEFT's PREFIX_TUNING save: ``prompt_embeddings`` [P, layers*2*groups*kv_channels] (the encoder's
    output, already projected) or the encoder's own tensors; its key/value layout is ChatGLM's."""
    config = _read_json_object(directory / PEFT_CONFIG, "save the adapter again")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise BackendError(f"{directory} is a PEFT {config.get('peft_type')} adapter; glmchat loads prefix adapters (P-Tuning v2, PEFT PREFIX_TUNING) only.")
    files = [directory / name for name in PEFT_WEIGHTS if (directory / name).is_file()]
    if not files:
        raise BackendError(f"{directory} has {PEFT_CONFIG} but neither {' nor '.join(PEFT_WEIGHTS)}; copy the weights next to it.")
    raw = _read_weights(files[0])
    if "prompt_embeddings" in raw:
        state, projection = {"embedding.weight": raw["prompt_embeddings"]}, False
    else:
        state = {}
        for key, tensor in raw.items():
            for marker in ("prefix_encoder.", "prompt_encoder.default.", "prompt_encoder."):
                if marker in key:
                    state[key.split(marker, 1)[1].replace("transform.", "trans.")] = tensor
                    break
        projection = config.get("prefix_projection")
    if "embedding.weight" not in state:
        raise BackendError(f"{files[0]} has neither prompt_embeddings nor prefix encoder tensors: it is not a prefix-tuning adapter.")
    pre_seq_len, projection = _check_shapes(directory, PEFT_CONFIG, state, config.get("num_virtual_tokens"), projection)
    return PrefixCheckpoint(directory, state, pre_seq_len, projection, {}, family_of_checkpoint(config), "peft")


def family_of_checkpoint(config: dict) -> Optional[str]:
    """The family a checkpoint was trained on: our saves say it; PEFT names its base model."""
    if config.get("family") in FAMILIES:
        return config["family"]
    return family_in_name(config.get("base_model_name_or_path") or config.get("_name_or_path"))


def check_family(ckpt: PrefixCheckpoint, base: ChatGLMConfig) -> None:
    """A prefix trained on one family is refused on the other (same shapes, other prompt format and rotary)."""
    base_family = getattr(base, "family", "chatglm2")
    if ckpt.family and ckpt.family != base_family:
        raise BackendError(
            f"adapter {ckpt.path} was trained on {ckpt.family} but the loaded model is {base_family}; "
            f"load a {ckpt.family} model to use it, or train an adapter on this {base_family} model."
        )


def refuse_other_family(paths, family: str) -> None:
    """Before a model loads: an adapter named on the command line that belongs to the other family
    is refused now, so nothing is loaded half-way."""
    for path in paths:
        ckpt = read_prefix_checkpoint(path)
        check_family(ckpt, ChatGLMConfig(family=family))


def check_fits(ckpt: PrefixCheckpoint, base: ChatGLMConfig) -> None:
    """Refuse a checkpoint trained for another architecture, naming both values."""
    for key in ("num_layers", "multi_query_group_num", "kv_channels", "hidden_size"):
        if key in ckpt.config and ckpt.config[key] != getattr(base, key):
            raise BackendError(f"adapter {ckpt.path} was trained for {key}={ckpt.config[key]} but the model has {key}={getattr(base, key)}.")
    width = ckpt.state_dict["embedding.weight"].shape[1]
    if width != base.prefix_kv_size:
        raise BackendError(
            f"adapter {ckpt.path} encodes {width} values per prefix token but the model needs {base.prefix_kv_size} "
            f"(num_layers {base.num_layers} x kv_channels {base.kv_channels} x groups {base.multi_query_group_num} x 2): it was trained for another model."
        )
    if ckpt.prefix_projection and ckpt.state_dict["trans.0.weight"].shape[0] != base.hidden_size:
        raise BackendError(f"adapter {ckpt.path} projects through hidden size {ckpt.state_dict['trans.0.weight'].shape[0]} but the model has hidden_size {base.hidden_size}.")


def build_prefix_encoder(ckpt: PrefixCheckpoint, base: ChatGLMConfig, device: torch.device) -> PrefixEncoder:
    """A float32 prefix encoder holding the checkpoint's weights."""
    check_family(ckpt, base)
    check_fits(ckpt, base)
    config = prefix_config(base, ckpt.pre_seq_len, ckpt.prefix_projection)
    encoder = PrefixEncoder(config, device=device).float()
    try:
        encoder.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()})
    except RuntimeError as err:
        raise BackendError(f"adapter {ckpt.path} does not fit the model: {str(err).splitlines()[-1].strip()}") from None
    return encoder.eval().requires_grad_(False)


def find_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """``checkpoint-*`` directories in ``directory``, one level of run directories deep, by step."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise BackendError(f"no directory at {directory} to scan for checkpoint-* adapters.")
    found = [p for pattern in (f"{CHECKPOINT_PREFIX}*", f"*/{CHECKPOINT_PREFIX}*") for p in directory.glob(pattern) if p.is_dir()]
    if directory.name.startswith(CHECKPOINT_PREFIX):
        found.append(directory)

    def step(p: Path):
        return (str(p.parent), checkpoint_step(p) or 0)

    return sorted(set(found), key=step)


class AdapterRegistry:
    """Named prefix encoders over one base; the prefix keys/values of each are computed once."""

    def __init__(self, base: ChatGLMConfig, device: torch.device, dtype: torch.dtype):
        self.base, self.device, self.dtype = base, device, dtype
        self._infos: dict[str, AdapterInfo] = {}
        self._encoders: dict[str, PrefixEncoder] = {}
        self._prefix_kv: dict[str, list[torch.Tensor]] = {}

    def list(self) -> list[AdapterInfo]:
        return list(self._infos.values())

    def __contains__(self, name: Optional[str]) -> bool:
        return name is None or name in self._infos

    def register(self, path: Union[str, Path], name: Optional[str] = None) -> AdapterInfo:
        ckpt = read_prefix_checkpoint(path)
        for info in self._infos.values():  # the same directory twice is one adapter
            if info.path.resolve() == ckpt.path.resolve():
                return info
        encoder = build_prefix_encoder(ckpt, self.base, self.device)
        name = self._unique(name or self._default_name(ckpt.path))
        prefix = ckpt.config.get("source_prefix") or ""
        if not isinstance(prefix, str):
            raise BackendError(f"{ckpt.path}/config.json: source_prefix must be text, not {type(prefix).__name__}; fix or delete that key.")
        info = AdapterInfo(name, ckpt.path, ckpt.pre_seq_len, ckpt.prefix_projection, prefix)
        self._infos[name], self._encoders[name] = info, encoder
        return info

    def scan(self, directory: Union[str, Path]) -> list[AdapterInfo]:
        return [self.register(p) for p in find_checkpoints(directory)]

    def source_prefix(self, name: Optional[str]) -> str:
        """The text the adapter was trained to see before each prompt ("" for the base model)."""
        info = self._infos.get(name) if name is not None else None
        return info.source_prefix if info is not None else ""

    def prefix_kv(self, name: Optional[str]) -> Optional[list[torch.Tensor]]:
        """2*layers tensors [1, g, P, d] for adapter ``name``; None for the base model."""
        if name is None:
            return None
        if name not in self._infos:
            raise BackendError(f"no adapter named {name!r}; registered: {', '.join(self._infos) or 'none'}.")
        if name not in self._prefix_kv:
            self._prefix_kv[name] = prefix_key_values(self._encoders[name], self.base, self.dtype)
        return self._prefix_kv[name]

    def encoder(self, name: str) -> PrefixEncoder:
        return self._encoders[name]

    @staticmethod
    def _default_name(path: Path) -> str:
        return f"{path.parent.name}/{path.name}" if path.name.startswith(CHECKPOINT_PREFIX) else path.name

    def _unique(self, name: str) -> str:
        candidate, n = name, 2
        while candidate in self._infos:
            candidate, n = f"{name} ({n})", n + 1
        return candidate


@torch.no_grad()
def prefix_key_values(encoder: PrefixEncoder, base: ChatGLMConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    """The encoder's output as the model consumes it (``split_prefix`` layout, batch 1)."""
    tokens = torch.arange(encoder.pre_seq_len, device=encoder.embedding.weight.device)[None]
    return [t.contiguous() for t in split_prefix(encoder(tokens).to(dtype), base)]
