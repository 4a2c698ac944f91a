"""Our ChatGLM2 against the ORIGINAL implementation's outputs (../shared/reference/golden/tiny)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import backend
from transformers import AutoConfig, AutoModel, AutoTokenizer

from conftest import REAL_TOKENIZER

backend.register()  # our classes for model_type chatglm, as the README tells Python users

ATOL = 1e-4  # float32 rounding; the logits are O(1)


@pytest.fixture(scope="module")
def golden(golden_tiny_dir):
    return json.loads((golden_tiny_dir / "expected.json").read_text()), load_file(str(golden_tiny_dir / "expected.safetensors"))


@pytest.fixture(scope="module")
def model_dir(golden_tiny_dir, real_tokenizer_file, tmp_path_factory):
    """The golden tiny model beside the real tokenizer, as a user's model directory looks."""
    d = tmp_path_factory.mktemp("tiny")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_tiny_dir / name, d / name)
    shutil.copy(real_tokenizer_file, d / "tokenizer.model")
    shutil.copy(REAL_TOKENIZER.parent / "tokenizer_config.json", d / "tokenizer_config.json")
    return d


@pytest.fixture(scope="module")
def base(model_dir):
    return AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prefixed(model_dir, golden_tiny_dir):
    """The seed's snippet, as written: AutoConfig(pre_seq_len) + load_state_dict of the stripped keys."""
    config = AutoConfig.from_pretrained(model_dir, pre_seq_len=4)
    model = AutoModel.from_pretrained(model_dir, config=config, dtype=torch.float32)
    sd = torch.load(golden_tiny_dir / "prefix" / "pytorch_model.bin")
    model.transformer.prefix_encoder.load_state_dict(
        {k[len("transformer.prefix_encoder."):]: v for k, v in sd.items() if k.startswith("transformer.prefix_encoder.")}
    )
    return model.eval()


def assert_logits_match(logits, expected, name):
    probe = expected["probe_ids"]
    torch.testing.assert_close(logits[..., probe], expected[f"{name}_probe"], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.logsumexp(logits, -1), expected[f"{name}_lse"], atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), expected[f"{name}_argmax"])


def test_auto_classes_are_ours(model_dir, base):
    assert type(base).__name__ == "ChatGLMForConditionalGeneration"
    assert type(base).__module__ == "backend.modeling"
    assert type(AutoTokenizer.from_pretrained(model_dir)).__module__ == "backend.tokenization"


def test_auto_map_python_files_are_never_imported(model_dir, tmp_path):
    """A release directory carries auto_map and its own python files: ours are used, theirs never run."""
    d = tmp_path / "release"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (d / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert "auto_map" in tok_config
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (d / name).write_text("raise SystemExit('remote code was imported')\n")
    model = AutoModel.from_pretrained(d, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert type(model).__module__ == "backend.modeling"
    assert type(tokenizer).__module__ == "backend.tokenization"


@pytest.mark.parametrize("i", [0, 1, 2])
def test_logits_match_original(base, golden, i):
    expected_json, expected = golden
    with torch.no_grad():
        logits = base(torch.tensor([expected_json["sequences"][i]]), use_cache=False).logits[0]
    assert_logits_match(logits, expected, f"logits_{i}")


@pytest.mark.parametrize("i", [0, 1, 2])
def test_prefix_logits_match_original(prefixed, golden, i):
    expected_json, expected = golden
    with torch.no_grad():
        logits = prefixed(torch.tensor([expected_json["sequences"][i]])).logits[0]
    assert_logits_match(logits, expected, f"prefix_logits_{i}")


def test_left_padded_batch_matches_original(base, golden):
    expected_json, expected = golden
    with torch.no_grad():
        logits = base(
            torch.tensor(expected_json["batch_input_ids"]),
            attention_mask=torch.tensor(expected_json["batch_attention_mask"]),
            use_cache=False,
        ).logits
    assert_logits_match(logits, expected, "batch_logits")


def test_training_loss_matches_original(base, prefixed, golden):
    expected_json, _ = golden
    ids = torch.tensor([expected_json["train_input_ids"]])
    labels = torch.tensor([expected_json["train_labels"]])
    with torch.no_grad():
        assert base(ids, labels=labels).loss.item() == pytest.approx(expected_json["train_loss_base"], abs=1e-5)
        assert prefixed(ids, labels=labels).loss.item() == pytest.approx(expected_json["train_loss_prefix"], abs=1e-5)


def test_greedy_chat_generate_and_stream_match_original(model_dir, base, prefixed, golden):
    expected_json, _ = golden
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for chat in expected_json["chats"]:
        model = base if chat["model"] == "base" else prefixed
        history = [tuple(h) for h in chat["history"]]
        assert tokenizer.build_prompt(chat["query"], history) == chat["prompt"]
        response, new_history = model.chat(tokenizer, chat["query"], history, do_sample=False, max_new_tokens=12)
        assert response == chat["response"]
        assert new_history == history + [(chat["query"], chat["response"])]
        ids = torch.tensor([chat["generated_ids"][:-12]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
        assert out[0].tolist() == chat["generated_ids"]
        streamed = list(model.stream_chat(tokenizer, chat["query"], history, do_sample=False, max_new_tokens=12))
        assert streamed[-1][0] == chat["response"]
        assert all(chat["response"].startswith(r) or r.strip() for r, _ in streamed)
