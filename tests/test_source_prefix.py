"""An adapter trained with --source-prefix keeps it in its checkpoint, and chat puts it in front of the
prompt exactly as training did (only for that adapter)."""

from __future__ import annotations

import json

import pytest

from backend.engine import ChatEngine
from backend.service import BackendError, SamplingParams, TrainRequest
from helpers_tiny import make_tiny_model_dir

PREFIX = "写一段广告："


def write_data(path, n: int):
    rows = [{"content": f"类型#裙*颜色#红色*编号#{i}", "summary": "红色的复古长裙，非常优雅。"} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    engine = ChatEngine.load(str(make_tiny_model_dir(root / "model")), quantization="none", engine="eager", device="cpu")
    request = TrainRequest(
        train_file=write_data(root / "train.json", 8), output_dir=root / "out", pre_seq_len=4, max_source_length=24,
        max_target_length=24, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=2,
        logging_steps=1, save_steps=2, seed=7, source_prefix=PREFIX,
    )
    result = engine.train(request, progress=lambda _event: None)
    return engine, result.last_checkpoint


def test_the_checkpoint_stores_the_prefix_and_the_registry_reads_it(trained):
    engine, checkpoint = trained
    assert json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["source_prefix"] == PREFIX
    info = engine.register_adapter(checkpoint)
    assert info.source_prefix == PREFIX


def test_chat_prompt_of_that_adapter_starts_with_the_prefix(trained):
    engine, checkpoint = trained
    name = engine.register_adapter(checkpoint).name
    history = [("你好", "你好")]
    built = engine.tokenizer.build_prompt("类型#裙", history)
    assert engine.prompt_ids("类型#裙", history, name) == engine.tokenizer.encode(PREFIX + built)
    assert engine.prompt_ids("类型#裙", history, None) == engine.tokenizer.encode(built)
    reply = engine.reply("类型#裙", [], SamplingParams(temperature=0, max_new_tokens=2), adapter=name)
    assert reply.adapter == name


def test_a_prefix_that_is_not_text_is_refused_in_one_sentence(trained, tmp_path):
    engine, checkpoint = trained
    copy = tmp_path / "checkpoint-2"
    copy.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    (copy / "config.json").write_text(json.dumps({**config, "source_prefix": 3}), encoding="utf-8")
    with pytest.raises(BackendError, match="source_prefix must be text"):
        engine.register_adapter(copy)
