"""P-Tuning v2 prefix checkpoints: both file kinds, inferred configs, mismatches named with both values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from backend.adapters import AdapterRegistry, check_fits, find_checkpoints, read_prefix_checkpoint
from backend.modeling import ChatGLMForConditionalGeneration, PrefixEncoder
from backend.service import BackendError
from helpers_tiny import tiny_config

CONFIG = tiny_config(512)


def write_checkpoint(directory, pre_seq_len=4, projection=False, config=CONFIG, fmt="bin", with_config=True, seed=0):
    """A checkpoint as the original trainer writes it: only transformer.prefix_encoder.* tensors + config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = type(config)(**{**config.to_dict(), "pre_seq_len": pre_seq_len, "prefix_projection": projection})
    state = {f"transformer.prefix_encoder.{k}": v for k, v in PrefixEncoder(cfg).state_dict().items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))
    if with_config:
        (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    return directory


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("projection", [False, True])
def test_reads_both_kinds(tmp_path, fmt, projection):
    ckpt = read_prefix_checkpoint(write_checkpoint(tmp_path / "checkpoint-10", 6, projection, fmt=fmt))
    assert (ckpt.pre_seq_len, ckpt.prefix_projection) == (6, projection)
    assert ckpt.state_dict["embedding.weight"].shape == (6, CONFIG.prefix_kv_size)
    check_fits(ckpt, CONFIG)


def test_infers_config_from_shapes_when_config_json_is_missing(tmp_path):
    ckpt = read_prefix_checkpoint(write_checkpoint(tmp_path / "c", 5, True, with_config=False))
    assert (ckpt.pre_seq_len, ckpt.prefix_projection) == (5, True)


def test_safetensors_preferred_when_both_exist(tmp_path):
    d = write_checkpoint(tmp_path / "c", 4, fmt="bin")
    write_checkpoint(d, 4, fmt="safetensors", seed=1)
    ckpt = read_prefix_checkpoint(d)
    torch.manual_seed(1)
    expected = PrefixEncoder(type(CONFIG)(**{**CONFIG.to_dict(), "pre_seq_len": 4})).embedding.weight
    torch.testing.assert_close(ckpt.state_dict["embedding.weight"], expected)


def test_mismatches_name_both_values(tmp_path):
    other = tiny_config(512, num_layers=3)
    ckpt = read_prefix_checkpoint(write_checkpoint(tmp_path / "layers", config=other))
    with pytest.raises(BackendError, match="num_layers=3 but the model has num_layers=2"):
        check_fits(ckpt, CONFIG)
    ckpt = read_prefix_checkpoint(write_checkpoint(tmp_path / "groups", config=tiny_config(512, multi_query_group_num=1), with_config=False))
    with pytest.raises(BackendError, match=f"needs {CONFIG.prefix_kv_size}"):
        check_fits(ckpt, CONFIG)
    ckpt = read_prefix_checkpoint(write_checkpoint(tmp_path / "proj", projection=True, config=tiny_config(512, hidden_size=32, num_attention_heads=2), with_config=False))
    with pytest.raises(BackendError, match="hidden size 32 but the model has hidden_size 64"):
        check_fits(ckpt, CONFIG)


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(BackendError, match="no adapter checkpoint"):
        read_prefix_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="neither model.safetensors nor pytorch_model.bin"):
        read_prefix_checkpoint(tmp_path / "empty")
    (tmp_path / "base").mkdir()
    torch.save({"transformer.output_layer.weight": torch.zeros(2, 2)}, tmp_path / "base" / "pytorch_model.bin")
    with pytest.raises(BackendError, match="not a P-Tuning v2 checkpoint"):
        read_prefix_checkpoint(tmp_path / "base")
    d = write_checkpoint(tmp_path / "wrong-len", 4)
    (d / "config.json").write_text(json.dumps({"pre_seq_len": 8}))
    with pytest.raises(BackendError, match="pre_seq_len 8 but the prefix tensor has 4 rows"):
        read_prefix_checkpoint(d)
    d = write_checkpoint(tmp_path / "truncated", 4)
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[:100])
    with pytest.raises(BackendError, match="corrupt or truncated"):
        read_prefix_checkpoint(d)


@pytest.mark.parametrize("config, expected", [
    ([4, False], "holds a list where a JSON object"),
    (4, "holds the number 4 where a JSON object"),
    ({"pre_seq_len": "4"}, '"pre_seq_len" is the string "4" but must be a whole number or null'),
    ({"prefix_projection": "no"}, '"prefix_projection" is the string "no" but must be true or false'),
    ({"num_layers": [2]}, '"num_layers" is a list but must be a whole number'),
])
def test_an_adapter_config_of_the_wrong_shape_is_one_sentence(tmp_path, config, expected):
    d = write_checkpoint(tmp_path / "checkpoint-1", 4)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match=expected) as caught:
        read_prefix_checkpoint(d)
    assert "fix or delete it" in str(caught.value)


@pytest.mark.parametrize("content, held", [([1, 2], "a list"), (7, "the number 7"),
                                           ({"transformer.prefix_encoder.embedding.weight": 7}, "a dict whose values")])
def test_an_adapter_file_holding_no_tensors_is_one_sentence(tmp_path, content, held):
    d = tmp_path / "checkpoint-1"
    d.mkdir()
    torch.save(content, d / "pytorch_model.bin")
    with pytest.raises(BackendError, match=f"holds {held}"):
        read_prefix_checkpoint(d)


def test_scan_finds_checkpoints_in_runs_by_step(tmp_path):
    for step in (100, 20, 3):
        write_checkpoint(tmp_path / "run-a" / f"checkpoint-{step}")
    write_checkpoint(tmp_path / "checkpoint-7")
    found = find_checkpoints(tmp_path)
    assert [p.name for p in found if p.parent.name == "run-a"] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert tmp_path / "checkpoint-7" in found


def test_registry_with_different_prefix_lengths_changes_logits(tmp_path):
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(CONFIG).eval()
    registry = AdapterRegistry(CONFIG, torch.device("cpu"), torch.float32)
    a = registry.register(write_checkpoint(tmp_path / "a" / "checkpoint-1", 4, seed=1))
    b = registry.register(write_checkpoint(tmp_path / "b" / "checkpoint-1", 9, True, seed=2))
    assert (a.name, b.name) == ("a/checkpoint-1", "b/checkpoint-1")
    assert registry.register(tmp_path / "a" / "checkpoint-1") == a  # same directory, same adapter
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        outs = [model(ids, prefix_kv=registry.prefix_kv(n), use_cache=False).logits for n in (None, a.name, b.name)]
    assert registry.prefix_kv(b.name)[0].shape == (1, CONFIG.multi_query_group_num, 9, CONFIG.kv_channels)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    with pytest.raises(BackendError, match="no adapter named 'zzz'"):
        registry.prefix_kv("zzz")
