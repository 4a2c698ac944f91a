"""ChatGLM3's fine-tuning data (``conversations``) beside prompt/response columns, and training on a ChatGLM3 base."""

from __future__ import annotations

import json

import pytest

from backend.adapters import AdapterRegistry, read_prefix_checkpoint
from backend.data import DataError, Example, preprocess_eval, preprocess_train, read_examples
from backend.loading import load_model
from backend.service import BackendError, ChatMessage, TrainRequest
from backend.tokenization import ChatGLM3Tokenizer, ChatGLMTokenizer
from backend.training import train_prefix
from helpers_tiny import make_tiny_model_dir
from test_families import make_chatglm3_dir

CONVERSATION = {"conversations": [
    {"role": "system", "content": "你是广告文案助手。"},
    {"role": "user", "content": "类型#裙*颜色#红色"},
    {"role": "assistant", "content": "红色的裙子很好看。"},
    {"role": "user", "content": "再短一点"},
    {"role": "assistant", "content": "红裙好看。"},
]}


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def glm3(tmp_path_factory):
    return load_model(make_chatglm3_dir(tmp_path_factory.mktemp("g3") / "m"), device="cpu")


@pytest.fixture(scope="module")
def glm2(tmp_path_factory):
    return load_model(make_tiny_model_dir(tmp_path_factory.mktemp("g2") / "m"), device="cpu")


def test_conversations_are_read_beside_prompt_response_lines(tmp_path):
    data = _write(tmp_path / "mixed.json", [CONVERSATION, {"content": "a", "summary": "b"}])
    examples = read_examples(data, "content", "summary")
    assert [m.role for m in examples[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert (examples[1].prompt, examples[1].response, examples[1].messages) == ("a", "b", ())


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "bad.json:2: turn 0 has role 'tool'"),
    ({"conversations": [{"role": "user", "content": 3}]}, "bad.json:2: turn 0 of 'conversations' must be an object with a text 'content'"),
    ({"conversations": [{"role": "user", "content": "only a question"}]}, "bad.json:2: the conversation has no assistant turn"),
])
def test_bad_conversations_name_file_and_line(tmp_path, record, message):
    data = _write(tmp_path / "bad.json", [CONVERSATION, record])
    with pytest.raises(DataError) as err:
        read_examples(data, "content", "summary")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert len(read_examples(data, "content", "summary", skip_bad_lines=True)) == 1


def test_chatglm3_loss_is_on_what_follows_assistant_tokens_only(glm3, tmp_path):
    """As the demo's process_batch: a token is learnt when the token before it is in an assistant turn."""
    tok = glm3.tokenizer
    example = read_examples(_write(tmp_path / "c.json", [CONVERSATION]), "content", "summary")[0]
    (feature,) = preprocess_train([example], tok, 64, 64)
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels) == 129
    role_at = [i for i, t in enumerate(ids) if t in tok.special_names] + [ids.index(tok.eos_token_id)]
    assistant_turns = [i for i in role_at if ids[i] == tok.special_ids["<|assistant|>"]]
    expected = set()
    for start in assistant_turns:  # the turn's text and the token after it (next role token or eos), not the role token
        end = min(i for i in role_at if i > start)
        expected |= set(range(start + 1, end + 1))
    assert len(assistant_turns) == 2
    assert {i for i, label in enumerate(labels) if label != -100} == expected
    assert all(labels[i] == ids[i] for i in expected)


def test_prompt_response_lines_train_chatglm3_in_its_chat_format(glm3):
    tok = glm3.tokenizer
    (feature,) = preprocess_train([Example("类型#裙", "红裙", (("hi", "yo"),))], tok, 32, 32)
    roles = [tok.special_names[t] for t in feature["input_ids"] if t in tok.special_names]
    assert roles == ["[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|user|>", "<|assistant|>"]
    (evaluated,) = preprocess_eval([Example("类型#裙", "红裙")], tok, 32, 32)
    assert evaluated["input_ids"][-1] == tok.special_ids["<|assistant|>"]
    assert tok.decode(evaluated["labels"]).strip() == "红裙"


def test_a_conversation_trains_chatglm2_as_its_last_round(glm2):
    tok = glm2.tokenizer
    conversation = Example("", "", (), "c.json:1", tuple(ChatMessage(t["role"], t["content"]) for t in CONVERSATION["conversations"]))
    as_round = Example("你是广告文案助手。再短一点", "红裙好看。", (("类型#裙*颜色#红色", "红色的裙子很好看。"),))
    assert preprocess_train([conversation], tok, 64, 64) == preprocess_train([as_round], tok, 64, 64)
    observed = Example("", "", (), "c.json:3", (ChatMessage("observation", "x"), ChatMessage("assistant", "y")))
    with pytest.raises(DataError, match="c.json:3"):
        preprocess_train([observed], tok, 64, 64)


def test_training_on_chatglm3_writes_a_chatglm3_adapter(glm3, glm2, tmp_path):
    data = _write(tmp_path / "train.json", [CONVERSATION] * 4)
    request = TrainRequest(train_file=data, output_dir=tmp_path / "out", pre_seq_len=4, max_source_length=24,
                           max_target_length=24, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           max_steps=2, save_steps=2, logging_steps=1)
    result = train_prefix(glm3.model, glm3.tokenizer, request)
    ckpt = read_prefix_checkpoint(result.last_checkpoint)
    assert ckpt.family == "chatglm3"
    AdapterRegistry(glm3.model.config, glm3.device, glm3.dtype).register(result.last_checkpoint)
    with pytest.raises(BackendError, match="trained on chatglm3 but the loaded model is chatglm2"):
        AdapterRegistry(glm2.model.config, glm2.device, glm2.dtype).register(result.last_checkpoint)
    assert isinstance(glm3.tokenizer, ChatGLM3Tokenizer) and isinstance(glm2.tokenizer, ChatGLMTokenizer)
