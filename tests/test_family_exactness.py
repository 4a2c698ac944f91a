"""Our ChatGLM2, chatglm2-6b-32k and ChatGLM3 against what the ORIGINAL code of each computed.

The fixtures in tests/fixtures/family_*.json were made by tests/fixtures/make_family_fixtures.py
running each release's own modeling and tokenizer code (transformers 4.30.2) on a tiny seeded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.configuration import ChatGLMConfig
from backend.modeling import ChatGLMForConditionalGeneration, rope_settings, rotary_cos_sin
from backend.tokenization import tokenizer_class
from fixtures.make_family_fixtures import logit_columns, state_checksum, tiny_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("chatglm2", "chatglm2-32k", "chatglm3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fixture(variant: str) -> dict:
    return json.loads((FIXTURES / f"family_{variant}.json").read_text(encoding="utf-8"))


def _our_config(fixture: dict) -> ChatGLMConfig:
    raw = {k: v for k, v in fixture["config"].items() if k not in ("torch_dtype", "original_rope")}
    return ChatGLMConfig(**raw, family=fixture["family"])


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    fixture = _fixture(request.param)
    state = tiny_state_dict(fixture["config"], fixture["seed"])
    assert state_checksum(state) == fixture["weights_sha256"], "torch's seeded generator changed: re-run make_family_fixtures.py"
    model = ChatGLMForConditionalGeneration(_our_config(fixture))
    model.load_state_dict(state, strict=True)
    return fixture, model.float().eval()


@torch.no_grad()
def test_logits_match_the_original_to_fp32_tolerance(variant):
    fixture, model = variant
    for case in fixture["logits"]:  # positions from 0, 3000 and 20000 (rope_ratio matters far out)
        ids = torch.tensor([case["ids"]])
        positions = torch.arange(case["start"], case["start"] + len(case["ids"]))[None]
        logits = model(ids, position_ids=positions).logits[0].float()  # [s, V]
        kept = logits[:, logit_columns(logits.shape[-1])]  # the fixture keeps a seeded subset of columns
        torch.testing.assert_close(kept, torch.tensor(case["columns"]), rtol=1e-4, atol=2e-5)
        assert logits.argmax(-1).tolist() == case["argmax"]


def test_rope_ratio_changes_the_logits_far_out():
    """The 32k fixture is not passed by ignoring rope_ratio: the plain model gives other logits there."""
    plain, long = _fixture("chatglm2"), _fixture("chatglm2-32k")
    far_plain = [c for c in plain["logits"] if c["start"] == 20000][0]["columns"]
    far_long = [c for c in long["logits"] if c["start"] == 20000][0]["columns"]
    assert not torch.allclose(torch.tensor(far_plain), torch.tensor(far_long), atol=1e-3)


@pytest.mark.parametrize("name", VARIANTS)
def test_rotary_cache_in_each_dtype_matches_the_original(name):
    """ChatGLM2 (and its 32k release) build the cache in the model dtype, ChatGLM3 in float32."""
    fixture = _fixture(name)
    rope = rope_settings(_our_config(fixture))
    rotary_dim = fixture["config"]["kv_channels"] // 2
    for dtype_name, case in fixture["rotary"].items():
        cos, sin = rotary_cos_sin(torch.tensor([case["positions"]]), rotary_dim, DTYPES[dtype_name], rope)
        ours = torch.stack((cos[0].float(), sin[0].float()), dim=-1)  # [t, pairs, 2]
        expected = torch.tensor(case["cos_sin"])
        if dtype_name == "float32":
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ours, expected), f"{name} {dtype_name}"


def test_the_families_round_differently_in_half_precision():
    """The fixtures themselves show why the family matters: ChatGLM2's fp16 cache is not ChatGLM3's."""
    two, three = _fixture("chatglm2")["rotary"]["float16"], _fixture("chatglm3")["rotary"]["float16"]
    assert two["cos_sin"] != three["cos_sin"]


# ---------------------------------------------------------------- with the real tokenizer.model (../shared)


@pytest.fixture(scope="module")
def tokenizers(real_tokenizer_file):
    return {family: tokenizer_class(family)(str(real_tokenizer_file)) for family in ("chatglm2", "chatglm3")}


@pytest.mark.parametrize("name", VARIANTS)
def test_tokenizer_ids_match_the_original(name, tokenizers):
    fixture = _fixture(name)
    tok = tokenizers[fixture["family"]]
    cases = fixture["tokenizer"]
    for case in cases["encode"]:  # includes typed "[gMASK]", "sop", "</s>", "<|user|>": text, never control ids
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids_plain"], case["text"]
    for case in cases["decode"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]
    for case in cases.get("prompt", []):
        history = [tuple(turn) for turn in case["history"]]
        assert tok.encode(tok.build_prompt(case["query"], history)) == case["ids"]
    for case in cases.get("chat_input", []):
        ids = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])["input_ids"][0].tolist()
        assert ids == case["ids"], case


def test_typed_special_token_text_never_becomes_a_control_id(tokenizers):
    specials = set(range(64789, 64798)) | {0, 1, 2}
    for tok in tokenizers.values():
        for text in ("</s>", "<s>", "<unk>", "[gMASK]sop", "<|user|><|observation|>", "<|assistant|>eop"):
            assert not specials & set(tok.encode(text, add_special_tokens=False)), (tok.family, text)


def test_greedy_chat_text_matches_the_original(variant, tokenizers):
    fixture, model = variant
    tok = tokenizers[fixture["family"]]
    for case in fixture["chat"]:
        history = case["history"] if fixture["family"] == "chatglm3" else [tuple(t) for t in case["history"]]
        response, _ = model.chat(tok, case["query"], history=history, do_sample=False, max_length=case["max_length"])
        assert response == case["response"], case["query"]
