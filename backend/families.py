"""Which ChatGLM a model directory holds (family and variant), and whether its config asks for math we run.

ChatGLM2 and ChatGLM3 share the architecture, the config keys and even ``tokenizer.model``; they
differ in the tokenizer code (ChatGLM3 adds role tokens), the chat format and the rotary details.
A directory says which it is through its names (``_name_or_path`` in config.json,
``name_or_path`` in tokenizer_config.json), the tokenizer code it ships (read as text, never
run) or the ``family`` our own saves write. Torch-free: the command line checks a directory
before importing torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .service import BackendError

FAMILIES = ("chatglm2", "chatglm3")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# The releases' names, longest first so "chatglm3-6b-32k" is not read as "chatglm3-6b".
KNOWN_VARIANTS = (
    "chatglm2-6b-32k-int4", "chatglm2-6b-32k", "chatglm2-6b-int4", "chatglm2-6b",
    "chatglm3-6b-base", "chatglm3-6b-32k", "chatglm3-6b-128k", "chatglm3-6b",
)

# Config keys whose values change the math; each maps to the only value this code implements.
_FIXED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "multi_query_attention": True,
}
# Keys the releases carry that we read or that do not change inference (the originals ignore them
# under torch 2's attention, or they only matter to dropout in training).
_ROPE_KEYS_WE_READ = {"rope_ratio", "original_rope"}
_LOOKS_POSITIONAL = re.compile(r"rope|rotary|theta|alibi|sliding|window|position_embedding|max_position")


@dataclass(frozen=True)
class Family:
    family: str  # "chatglm2" | "chatglm3"
    variant: str  # e.g. "chatglm2-6b-32k"; for a model of another size, "chatglm2 (custom)"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackendError(f"{path} is not valid JSON; download it again.") from None
    if not isinstance(data, dict):
        raise BackendError(f"{path} holds a {type(data).__name__}, not a JSON object; download it again.")
    return data


def family_in_name(name: object) -> Optional[str]:
    text = str(name or "").lower()
    for family in FAMILIES:
        if family in text:
            return family
    return None


def _variant_in_name(name: object) -> Optional[str]:
    text = str(name or "").lower()
    return next((v for v in KNOWN_VARIANTS if v in text), None)


def tokenizer_family(directory: Path) -> tuple[Optional[str], str]:
    """The family the tokenizer files say, and which file said it ("" when none does)."""
    code = directory / "tokenization_chatglm.py"
    if code.is_file():  # read, never imported: ChatGLM3's code defines the role tokens
        text = code.read_text(encoding="utf-8", errors="replace")
        return ("chatglm3" if "<|observation|>" in text else "chatglm2"), code.name
    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file)
    if config.get("family") in FAMILIES:
        return config["family"], config_file.name
    added = json.dumps(config.get("added_tokens_decoder", {})) + str(config.get("chat_template", ""))
    if any(token in added for token in ROLE_TOKENS):
        return "chatglm3", config_file.name
    family = family_in_name(config.get("name_or_path"))
    return family, (config_file.name if family else "")


def config_family(config: dict) -> Optional[str]:
    if config.get("family") in FAMILIES:
        return config["family"]
    return family_in_name(config.get("_name_or_path"))


def detect_family(directory: Path, config: Optional[dict] = None) -> Family:
    """ChatGLM2 unless the directory says ChatGLM3; a tokenizer and config that disagree are refused."""
    config = _read_json(directory / "config.json") if config is None else config
    from_config = config_family(config)
    from_tokenizer, source = tokenizer_family(directory)
    if from_config and from_tokenizer and from_config != from_tokenizer:
        raise BackendError(
            f"{directory} mixes families: config.json is {from_config} but {source} is {from_tokenizer}; "
            f"copy the tokenizer files and config.json from the same release."
        )
    family = from_config or from_tokenizer or "chatglm2"
    variant = _variant_in_name(config.get("_name_or_path"))
    if variant is None or not variant.startswith(family):
        variant = _describe_custom(family, config)
    return Family(family, variant)


def _describe_custom(family: str, config: dict) -> str:
    """A name for a model not named after a release: the 6B shape gets its release name."""
    six_b = config.get("num_layers", 28) == 28 and config.get("hidden_size", 4096) == 4096
    long = float(config.get("rope_ratio", 1) or 1) != 1
    if six_b:
        return f"{family}-6b" + ("-32k" if long else "")
    return f"{family} (custom{', long context' if long else ''})"


def check_supported_config(config: dict, where: Path) -> None:
    """Refuse a config asking for rotary or attention math this code does not implement."""
    for key, value in config.items():
        if key in _FIXED and value != _FIXED[key]:
            raise BackendError(f"{where} sets {key}={json.dumps(value)}, which glmchat does not implement (only {json.dumps(_FIXED[key])}); use a ChatGLM2/ChatGLM3 release config.")
        if key == "rope_scaling" and value:
            raise BackendError(f"{where} sets rope_scaling={json.dumps(value)}, which ChatGLM's code has no such setting for and glmchat does not implement; remove it or use the release's config.json.")
        if key == "rope_theta" and value not in (None, 10000, 10000.0):
            raise BackendError(f"{where} changes the rotary base (rope_theta={value}), which glmchat does not implement; use the release's rope_ratio instead.")
        if key in _ROPE_KEYS_WE_READ or key in ("rope_theta", "rope_scaling"):
            continue
        if _LOOKS_POSITIONAL.search(key) and value not in (None, False):
            raise BackendError(f"{where} sets {key}={json.dumps(value)}, a position setting glmchat does not implement; remove it or use the release's config.json.")
    ratio = config.get("rope_ratio", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise BackendError(f"{where} sets rope_ratio={json.dumps(ratio)}; it must be a positive number (16 in chatglm2-6b-32k).")
