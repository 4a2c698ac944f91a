"""ChatGLM2 / chatglm2-6b-32k / ChatGLM3 directories: detection, refusals, chat formats, adapters of both formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from backend.adapters import AdapterRegistry, read_prefix_checkpoint
from backend.chat_format import chatglm3_response, to_messages
from backend.engine import ChatEngine
from backend.loading import load_model
from backend.modeling import PrefixEncoder
from backend.service import BackendError, ChatMessage, ReplyDone, SamplingParams
from backend.tokenization import ChatGLM3Tokenizer, ChatGLMTokenizer
from helpers_tiny import make_tiny_model_dir
from test_adapters import write_checkpoint


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:  # None: the key is absent, as in a release
        del data[key]
    path.write_text(json.dumps(data))


def make_chatglm3_dir(path, **config):
    """A tiny ChatGLM3 directory: the same pieces, ChatGLM3's tokenizer and a config that says so."""
    make_tiny_model_dir(path, **config)
    ChatGLM3Tokenizer(str(path / "tokenizer.model")).save_pretrained(str(path))
    _edit_json(path / "config.json", family="chatglm3", _name_or_path="THUDM/chatglm3-6b")
    return path


@pytest.fixture(scope="module")
def glm2_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("glm2") / "m")


@pytest.fixture(scope="module")
def glm3_dir(tmp_path_factory):
    return make_chatglm3_dir(tmp_path_factory.mktemp("glm3") / "m")


def test_directories_say_their_family(glm2_dir, glm3_dir):
    two, three = load_model(glm2_dir, device="cpu"), load_model(glm3_dir, device="cpu")
    assert (two.family.family, type(two.tokenizer)) == ("chatglm2", ChatGLMTokenizer)
    assert (three.family.family, three.family.variant, type(three.tokenizer)) == ("chatglm3", "chatglm3-6b", ChatGLM3Tokenizer)
    assert three.model.config.family == "chatglm3"


def test_released_tokenizer_code_is_read_as_text_not_run(tmp_path):
    """A release directory ships tokenization_chatglm.py; ChatGLM3's defines the role tokens."""
    path = make_tiny_model_dir(tmp_path / "m")
    (path / "tokenization_chatglm.py").write_text('raise SystemExit("never imported")\nROLES = ["<|observation|>"]\n')
    _edit_json(path / "config.json", family=None, _name_or_path="THUDM/chatglm3-6b")
    assert load_model(path, device="cpu").family.family == "chatglm3"


def test_tokenizer_and_config_that_disagree_are_refused_naming_both(tmp_path, monkeypatch):
    path = make_tiny_model_dir(tmp_path / "m")
    _edit_json(path / "config.json", family="chatglm3")
    import backend.loading as loading

    monkeypatch.setattr(loading, "weight_files", lambda p: pytest.fail("weights read after a refusal"))
    with pytest.raises(BackendError) as err:
        load_model(path, device="cpu")
    message = str(err.value)
    assert "config.json is chatglm3" in message and "tokenizer_config.json is chatglm2" in message and "same release" in message


@pytest.mark.parametrize("changes, named", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_theta": 500000}, "rope_theta=500000"),
    ({"rmsnorm": False}, "rmsnorm=false"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_ratio": "sixteen"}, "rope_ratio"),
    ({"rope_ratio": 0}, "rope_ratio=0"),
])
def test_configs_asking_for_math_we_do_not_run_are_refused(tmp_path, changes, named):
    path = make_tiny_model_dir(tmp_path / "m")
    _edit_json(path / "config.json", **changes)
    with pytest.raises(BackendError, match=named.replace("[", r"\[")):
        load_model(path, device="cpu")


@torch.no_grad()
def test_rope_ratio_is_read_from_config_json_and_used(tmp_path):
    plain = make_tiny_model_dir(tmp_path / "plain", seed=3)
    long = make_tiny_model_dir(tmp_path / "long", seed=3)
    _edit_json(long / "config.json", rope_ratio=16)
    a, b = load_model(plain, device="cpu"), load_model(long, device="cpu")
    assert b.model.config.rope_ratio == 16 and "long context" in b.family.variant
    ids = torch.tensor([[5, 6, 7, 8]])
    near = torch.arange(4)[None]
    # Position p under rope_ratio 16 is position p/16 of the plain model: 0,16,32,48 -> 0,1,2,3.
    torch.testing.assert_close(b.model(ids, position_ids=near * 16).logits, a.model(ids, position_ids=near).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b.model(ids).logits, a.model(ids).logits, atol=1e-4)


def test_fast_engine_refuses_a_rope_it_does_not_compute(tmp_path):
    from backend.fast_decode import make_decoder

    path = make_tiny_model_dir(tmp_path / "m")
    _edit_json(path / "config.json", rope_ratio=16)
    model = load_model(path, device="cpu").model
    with pytest.raises(BackendError, match="rope_ratio=16"):
        make_decoder(model, "fast")
    assert type(make_decoder(model, "auto")).__name__ == "EagerDecoder"


# ---------------------------------------------------------------- chat formats


def test_chatglm2_system_text_goes_in_front_of_the_current_query(glm2_dir):
    tok = ChatGLMTokenizer.from_pretrained(str(glm2_dir))
    messages = to_messages("你好", [("hi", "yo")], system="Be brief. ")
    assert tok.build_chat_ids(messages) == tok.encode(tok.build_prompt("Be brief. 你好", [("hi", "yo")]))
    with pytest.raises(BackendError, match="user/assistant pairs"):
        tok.build_chat_ids([ChatMessage("user", "a"), ChatMessage("user", "b")])


def test_chatglm3_chat_ids_frame_each_role(glm3_dir):
    tok = ChatGLM3Tokenizer.from_pretrained(str(glm3_dir))
    role = {name: tok.special_ids[f"<|{name}|>"] for name in ("system", "user", "assistant", "observation")}
    ids = tok.build_chat_ids(to_messages("你好", [("hi", "yo")], system="Be brief."))
    assert ids[:3] == [tok.special_ids["[gMASK]"], tok.special_ids["sop"], role["system"]]
    assert [i for i in ids if i in role.values()] == [role[r] for r in ("system", "user", "assistant", "user", "assistant")]
    assert ids[-1] == role["assistant"]
    assert tok.chat_stop_ids() == [tok.eos_token_id, role["user"], role["observation"]]
    # The original chat() drops the last generated token (the stop id, or a real one at the length limit).
    reply = tok.encode("好的", add_special_tokens=False)
    assert tok.chat_response(reply + [role["user"]]) == "好的"


def test_tool_calls_are_parsed_as_literals_never_evaluated():
    reply = chatglm3_response("weather\n```python\ntool_call(city='北京', days=[1, 2])\n```", tools_offered=True)
    assert (reply.tool, reply.parameters) == ("weather", {"city": "北京", "days": [1, 2]})
    assert chatglm3_response(" \n 你好 [[训练时间]] ").text == "你好 2023年"
    with pytest.raises(BackendError, match="literal"):
        chatglm3_response("x\n```\ntool_call(a=__import__('os').system('echo owned'))\n```", tools_offered=True)


def test_engine_system_prompt_reaches_the_chatglm3_prompt(glm3_dir):
    engine = ChatEngine(load_model(glm3_dir, device="cpu"), engine="eager")
    assert (engine.info.family, engine.info.variant) == ("chatglm3", "chatglm3-6b")
    with_system = engine.prompt_ids("hi", [], system="Be brief.")
    assert engine.tokenizer.special_ids["<|system|>"] in with_system
    assert engine.tokenizer.special_ids["<|system|>"] not in engine.prompt_ids("hi", [])
    events = list(engine.stream_reply("hi", [], SamplingParams(temperature=0, max_new_tokens=4), system="Be brief."))
    assert isinstance(events[-1], ReplyDone) and events[-1].reply.new_tokens >= 1


# ---------------------------------------------------------------- adapters: PEFT prefix tuning and families


def _peft_dir(path, encoder: PrefixEncoder, base_name="THUDM/chatglm2-6b", as_embeddings=True):
    path.mkdir(parents=True)
    if as_embeddings:  # what PEFT saves: the encoder's output for every virtual token
        with torch.no_grad():
            tensors = {"prompt_embeddings": encoder(torch.arange(encoder.pre_seq_len)).contiguous()}
    else:
        tensors = {f"base_model.prompt_encoder.default.{k.replace('trans.', 'transform.')}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": encoder.pre_seq_len,
        "prefix_projection": encoder.prefix_projection and not as_embeddings, "base_model_name_or_path": base_name,
    }))
    return path


@pytest.mark.parametrize("projection, as_embeddings", [(False, True), (True, True), (True, False)])
def test_peft_prefix_checkpoints_register_beside_ptuning_ones(tmp_path, glm2_dir, projection, as_embeddings):
    loaded = load_model(glm2_dir, device="cpu")
    original = write_checkpoint(tmp_path / "run" / "checkpoint-5", pre_seq_len=3, projection=projection, config=loaded.model.config)
    ckpt = read_prefix_checkpoint(original)
    encoder = PrefixEncoder(type(loaded.model.config)(**{**loaded.model.config.to_dict(), "pre_seq_len": 3, "prefix_projection": projection}))
    encoder.load_state_dict(ckpt.state_dict)
    peft = _peft_dir(tmp_path / "peft", encoder, as_embeddings=as_embeddings)
    registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
    a, b = registry.register(original), registry.register(peft)
    assert (b.pre_seq_len, read_prefix_checkpoint(peft).format) == (3, "peft")
    for x, y in zip(registry.prefix_kv(a.name), registry.prefix_kv(b.name)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_an_adapter_of_the_other_family_is_refused_naming_both(tmp_path, glm2_dir, glm3_dir):
    two, three = load_model(glm2_dir, device="cpu"), load_model(glm3_dir, device="cpu")
    ours = write_checkpoint(tmp_path / "a" / "checkpoint-1", config=two.model.config)  # config.json says chatglm2
    with pytest.raises(BackendError) as err:
        AdapterRegistry(three.model.config, three.device, three.dtype).register(ours)
    assert "trained on chatglm2" in str(err.value) and "loaded model is chatglm3" in str(err.value)
    encoder = PrefixEncoder(type(two.model.config)(**{**two.model.config.to_dict(), "pre_seq_len": 2}))
    peft = _peft_dir(tmp_path / "p", encoder, base_name="THUDM/chatglm3-6b")
    with pytest.raises(BackendError, match="trained on chatglm3 but the loaded model is chatglm2"):
        AdapterRegistry(two.model.config, two.device, two.dtype).register(peft)


def test_peft_adapters_of_other_kinds_are_refused(tmp_path):
    path = tmp_path / "lora"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(BackendError, match="PEFT LORA adapter"):
        read_prefix_checkpoint(path)


# ---------------------------------------------------------------- glmchat --info


def test_info_prints_the_structure_page_with_the_adapter_prefix(glm2_dir, tmp_path, capsys):
    from backend.configuration import ChatGLMConfig
    from tui.__main__ import main

    ckpt = write_checkpoint(tmp_path / "run" / "checkpoint-2", pre_seq_len=6, config=ChatGLMConfig.from_pretrained(glm2_dir))
    assert main(["--model", str(glm2_dir), "--quantization", "none", "--adapter", str(ckpt), "--info"]) == 0
    page = capsys.readouterr().out
    for expected in ("chatglm2", "layers              2", "key/value groups    2", "positions           as is (rope_ratio 1)",
                     "cache computed in   the model dtype (ChatGLM2)", "output layer", "total",
                     "run/checkpoint-2: P-Tuning v2 prefix of 6 tokens", "4 tensors of [1, 2, 6, 16]"):
        assert expected in page, expected


def test_info_on_a_mixed_directory_exits_2_with_one_line(tmp_path, capsys):
    from tui.__main__ import main

    path = make_tiny_model_dir(tmp_path / "m")
    _edit_json(path / "config.json", family="chatglm3")
    assert main(["--model", str(path), "--info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("glmchat: ") and "mixes families" in err[-1]


def test_stream_chat_speaks_chatglm3(glm3_dir):
    loaded = load_model(glm3_dir, device="cpu")
    *_, (response, history) = loaded.model.stream_chat(loaded.tokenizer, "你好", [], do_sample=False, max_new_tokens=3)
    assert history[-2:] == [{"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": response}]
    expected = loaded.tokenizer.build_chat_input("你好")["input_ids"]
    assert loaded.model.build_inputs(loaded.tokenizer, "你好")["input_ids"].tolist() == expected.tolist()


def test_the_fast_cache_follows_seq_length(glm2_dir):
    from backend.fast_decode import cache_slots, make_decoder

    model = load_model(glm2_dir, device="cpu").model
    assert cache_slots(model) == model.config.seq_length == 512
    assert make_decoder(model, "fast").max_seq_len == 512


def test_a_cross_family_adapter_is_refused_before_the_weights_load(glm2_dir, tmp_path, monkeypatch):
    import backend.engine as engine_module

    ckpt = write_checkpoint(tmp_path / "r" / "checkpoint-1", config=load_model(glm2_dir, device="cpu").model.config)
    _edit_json(ckpt / "config.json", family="chatglm3")
    monkeypatch.setattr(engine_module, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(BackendError, match="trained on chatglm3 but the loaded model is chatglm2"):
        ChatEngine.load(str(glm2_dir), quantization="none", adapters=[str(ckpt)])
