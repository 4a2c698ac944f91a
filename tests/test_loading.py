"""Loading model directories in every weight format, quantized, and refusing bad ones with one clear sentence."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.loading import load_model, resolve_model_dir
from backend.service import BackendError
from helpers_tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reference_logits(tiny_dir):
    model = load_model(tiny_dir, quantization="none", device="cpu").model
    return logits_of(model)


def logits_of(model):
    ids = torch.tensor([[5, 17, 33, 48, 60, 71, 90, 101]])
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    return dst


def save_sharded(state, directory, fmt, shards=3):
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        if fmt == "bin":
            name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k].half() for k in group}, directory / name)
        else:
            name = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous() for k in group}, str(directory / name))
        weight_map.update({k: name for k in group})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "bin", "bin-sharded", "safetensors-sharded"])
def test_every_weight_format_loads_the_same_model(tiny_dir, reference_logits, tmp_path, layout):
    state = load_file(str(tiny_dir / "model.safetensors"))
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(8)  # the release has it; it is derivable
    d = copy_without_weights(tiny_dir, tmp_path / layout)
    if layout == "safetensors":
        save_file(state, str(d / "model.safetensors"))
    elif layout == "bin":
        torch.save({k: v.half() for k, v in state.items()}, d / "pytorch_model.bin")  # fp16 like the release
    else:
        save_sharded(state, d, layout.split("-")[0])
    loaded = load_model(d, quantization="none", device="cpu")
    tol = 2e-2 if "bin" in layout else 1e-6  # the .bin copies were stored in fp16
    torch.testing.assert_close(logits_of(loaded.model), reference_logits, atol=tol, rtol=0)


def test_progress_reports_stages_and_shards(tiny_dir, tmp_path):
    d = copy_without_weights(tiny_dir, tmp_path / "sharded")
    save_sharded(load_file(str(tiny_dir / "model.safetensors")), d, "safetensors")
    events = []
    load_model(d, quantization="none", device="cpu", progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "tokenizer" and stages[-1] == "ready"
    shard_events = [e for e in events if e.stage == "weights"]
    assert [(e.current, e.total) for e in shard_events][-1] == (3, 3)
    assert any("shard 2/3" in e.message for e in shard_events)


@pytest.mark.parametrize("quantization,bound", [("8bit", 0.05), ("4bit", 0.35)])
def test_quantized_on_cpu_is_close_to_float32(tiny_dir, reference_logits, quantization, bound):
    from backend.int8_layer import Int8Linear

    if quantization == "4bit":
        bnb = pytest.importorskip("bitsandbytes")
    loaded = load_model(tiny_dir, quantization=quantization, device="cpu")
    layers = loaded.model.transformer.encoder.layers
    expected_type = Int8Linear if quantization == "8bit" else bnb.nn.Linear4bit
    assert isinstance(layers[0].mlp.dense_h_to_4h, expected_type)
    assert isinstance(loaded.model.transformer.output_layer, torch.nn.Linear)  # kept 16-bit, like the seed
    assert not isinstance(loaded.model.transformer.output_layer, expected_type)
    logits = logits_of(loaded.model)
    rel = (logits - reference_logits).norm() / reference_logits.norm()
    assert torch.isfinite(logits).all()
    assert rel < bound, f"{quantization} relative error {rel:.3f}"
    assert loaded.precision == quantization


def test_missing_path_is_one_sentence(tmp_path):
    with pytest.raises(BackendError, match="no model directory at"):
        resolve_model_dir(tmp_path / "nope")


def test_directory_that_is_not_chatglm(tmp_path, tiny_dir):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackendError, match="model_type 'llama'"):
        resolve_model_dir(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    d = copy_without_weights(tiny_dir, tmp_path / "noweights")
    with pytest.raises(BackendError, match="no weights in"):
        load_model(d, quantization="none", device="cpu")


def test_truncated_safetensors_and_bin_are_refused(tiny_dir, tmp_path):
    d = copy_without_weights(tiny_dir, tmp_path / "trunc")
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match="corrupt or truncated"):
        load_model(d, quantization="none", device="cpu")
    (d / "model.safetensors").unlink()
    torch.save(load_file(str(tiny_dir / "model.safetensors")), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match="corrupt or truncated"):
        load_model(d, quantization="none", device="cpu")


def _with_config(tiny_dir, directory, **changes):
    d = copy_without_weights(tiny_dir, directory)
    shutil.copy(tiny_dir / "model.safetensors", d / "model.safetensors")
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("change, expected", [
    (dict(num_layers="two"), '"num_layers" is the string "two" but must be a whole number'),
    (dict(num_layers=True), '"num_layers" is true but must be a whole number'),
    (dict(layernorm_epsilon=[1e-5]), '"layernorm_epsilon" is a list but must be a number'),
    (dict(rmsnorm="yes"), '"rmsnorm" is the string "yes" but must be true or false'),
    (dict(pre_seq_len="128"), '"pre_seq_len" is the string "128" but must be a whole number or null'),
])
def test_config_values_of_the_wrong_type_are_one_sentence(tiny_dir, tmp_path, change, expected):
    d = _with_config(tiny_dir, tmp_path / "typed", **change)
    with pytest.raises(BackendError) as caught:
        load_model(d, quantization="none", device="cpu")
    assert expected in str(caught.value) and "config.json" in str(caught.value)
    assert "download the model again" in str(caught.value)


@pytest.mark.parametrize("content, expected", [
    ([], "holds a list where a JSON object"),
    (7, "holds the number 7 where a JSON object"),
    ("chatglm", 'holds the string "chatglm" where a JSON object'),
])
def test_a_config_that_is_not_an_object_is_one_sentence(tiny_dir, tmp_path, content, expected):
    d = _with_config(tiny_dir, tmp_path / "shape")
    (d / "config.json").write_text(json.dumps(content))
    with pytest.raises(BackendError, match=expected):
        load_model(d, quantization="none", device="cpu")


@pytest.mark.parametrize("index, expected", [
    ([], "holds a list where a JSON object"),
    ({"metadata": {}}, "no usable weight_map"),
    ({"weight_map": []}, "no usable weight_map"),
    ({"weight_map": {}}, "no usable weight_map"),
    ({"weight_map": {"transformer.embedding.word_embeddings.weight": 3}}, "no usable weight_map"),
    ({"weight_map": {"transformer.embedding.word_embeddings.weight": "../model.safetensors"}}, "no usable weight_map"),
])
def test_a_weight_index_of_the_wrong_shape_is_one_sentence(tiny_dir, tmp_path, index, expected):
    d = copy_without_weights(tiny_dir, tmp_path / "index")
    save_sharded(load_file(str(tiny_dir / "model.safetensors")), d, "safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BackendError, match=expected):
        load_model(d, quantization="none", device="cpu")


@pytest.mark.parametrize("content, held", [([torch.zeros(2)], "a list"), (3, "the number 3"),
                                           ({"transformer.output_layer.weight": [1, 2]}, "a dict whose values are not all tensors")])
def test_a_pickle_of_the_wrong_shape_is_one_sentence(tiny_dir, tmp_path, content, held):
    d = copy_without_weights(tiny_dir, tmp_path / "pickled")
    torch.save(content, d / "pytorch_model.bin")
    with pytest.raises(BackendError, match=f"holds {held}, not a state dict of tensors"):
        load_model(d, quantization="none", device="cpu")


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_runs_code_is_refused(tiny_dir, tmp_path, capsys):
    d = copy_without_weights(tiny_dir, tmp_path / "evil")
    torch.save({"transformer.embedding.word_embeddings.weight": _RunsCode()}, d / "pytorch_model.bin")
    with pytest.raises(BackendError, match="refuses to run") as err:
        load_model(d, quantization="none", device="cpu")
    assert "pwned" not in capsys.readouterr().out
    reason = str(err.value).split("refuses to run (", 1)[1].rsplit("); re-save", 1)[0]
    words = reason.removesuffix(" …").split()
    assert words and all(w in str(err.value) for w in words)
    assert reason.endswith(" …") or len(reason) <= 160  # cut at a word boundary, never mid-word


def test_long_reasons_are_cut_at_a_word_boundary():
    from backend.loading import _reason

    text = "Weights only load failed. " + "This file can still be loaded with weights_only=False " * 5
    short = _reason(ValueError(text))
    assert short.endswith(" …") and len(short) <= 162 and text.startswith(short[:-2])
    assert text[len(short) - 2] in " .,;:"  # what follows the kept text ends a word: no word is cut


def test_missing_shard_and_missing_tensor(tiny_dir, tmp_path):
    d = copy_without_weights(tiny_dir, tmp_path / "partial")
    save_sharded(load_file(str(tiny_dir / "model.safetensors")), d, "safetensors")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(BackendError, match="lacks 1 weight shard"):
        load_model(d, quantization="none", device="cpu")
    d2 = copy_without_weights(tiny_dir, tmp_path / "incomplete")
    state = load_file(str(tiny_dir / "model.safetensors"))
    state.pop("transformer.output_layer.weight")
    save_file(state, str(d2 / "model.safetensors"))
    with pytest.raises(BackendError, match="lack 1 tensor"):
        load_model(d2, quantization="none", device="cpu")


def test_weights_of_another_size_are_refused(tiny_dir, tmp_path):
    d = copy_without_weights(tiny_dir, tmp_path / "mismatch")
    config = json.loads((d / "config.json").read_text())
    config["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(BackendError, match="come from different models"):
        load_model(d, quantization="none", device="cpu")


def use_hub_cache(monkeypatch, cache):
    """huggingface_hub reads its environment at import: point its constants at a test cache, offline."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_and_not_cached_names_a_command_that_exists(tmp_path, monkeypatch):
    import re
    import shlex
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(BackendError, match="`hf download THUDM/chatglm2-6b`") as caught:
        resolve_model_dir("THUDM/chatglm2-6b")
    # the advice runs with the installed huggingface_hub (its CLI is `hf`; `huggingface-cli` is gone)
    command = shlex.split(re.search(r"`([^`]+)`", str(caught.value)).group(1))
    program = shutil.which(command[0], path=str(Path(sys.executable).parent)) or shutil.which(command[0])
    if program is None:
        pytest.skip(f"{command[0]} is not on PATH here")
    done = subprocess.run([program, *command[1:-1], "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "download" in done.stdout.lower(), done.stderr


def test_hub_id_resolves_from_the_standard_cache(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--THUDM--chatglm2-6b"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    use_hub_cache(monkeypatch, cache)
    assert resolve_model_dir("THUDM/chatglm2-6b").resolve() == snapshot.resolve()


def test_the_seed_snippet_loads_8bit_through_transformers(tiny_dir):
    """The issue's snippet, as written, on the CPU: AutoModel + BitsAndBytesConfig, then chat()."""
    import bitsandbytes as bnb
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    import backend

    backend.register()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModel.from_pretrained(tiny_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
    assert isinstance(model.transformer.encoder.layers[0].mlp.dense_h_to_4h, bnb.nn.Linear8bitLt)
    assert not isinstance(model.transformer.output_layer, bnb.nn.Linear8bitLt)
    response, history = model.chat(tok, "类型#上衣*材质#牛仔布*颜色#白色", history=[], max_new_tokens=4)
    assert history == [("类型#上衣*材质#牛仔布*颜色#白色", response)]
