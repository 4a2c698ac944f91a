"""ChatGLMTokenizer: golden ids from the original tokenizer, and a tiny SentencePiece model for the rest."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import sentencepiece as spm

from backend.tokenization import ChatGLMTokenizer

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]

EN_WORDS = (
    "the model reads a prompt and writes an answer in plain words while the user waits for the reply "
    "training adapters on small data keeps the base frozen and only the prefix learns "
    "white cotton shirt with a loose fit and embroidered flowers looks simple and fresh"
).split()
ZH_PHRASES = ["你好", "我是人工智能助手", "很高兴见到你", "类型", "上衣", "材质", "牛仔布", "颜色", "白色",
              "风格", "简约", "图案", "刺绣", "衣样式", "外套", "这件衣服", "非常适合", "夏天穿",
              "设计", "时尚", "舒适", "宽松", "版型", "介绍一下你自己", "谢谢", "今天天气很好"]


def _corpus_lines(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append(" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(5, 14))).capitalize() + ".")
        elif i % 3 == 1:
            lines.append("，".join(rng.choice(ZH_PHRASES) for _ in range(rng.randint(2, 6))) + "。")
        else:
            lines.append(f"[Round {i % 7 + 1}] 问：{rng.choice(ZH_PHRASES)} {rng.choice(EN_WORDS)} {i}？")
    return lines


def _train_sp(directory, vocab_size: int, **extra) -> str:
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    prefix = directory / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
        # like the real model: keep text as typed (no NFKC, spaces and newlines survive a round trip)
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        **extra,
    )
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def tiny_sp_file(tmp_path_factory) -> str:
    """A small SentencePiece BPE model (byte fallback) trained on lines written here: no ../shared needed."""
    return _train_sp(tmp_path_factory.mktemp("tiny_sp"), vocab_size=600)


@pytest.fixture()
def tiny(tiny_sp_file) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(tiny_sp_file)


# ---------------------------------------------------------------- tiny model (no ../shared)


def test_special_ids_follow_the_sentencepiece_vocab(tiny, tiny_sp_file):
    n = spm.SentencePieceProcessor(model_file=tiny_sp_file).vocab_size()
    assert n != 64789
    assert tiny.vocab_size == n + 5 == len(tiny)
    assert tiny.convert_tokens_to_ids(SPECIALS) == list(range(n, n + 5))
    assert [tiny.get_command(s) for s in SPECIALS] == list(range(n, n + 5))
    assert tiny.convert_ids_to_tokens(list(range(n, n + 5))) == SPECIALS
    assert (tiny.pad_token_id, tiny.unk_token_id, tiny.bos_token_id, tiny.eos_token_id) == (0, 0, 1, 2)
    assert (tiny.get_command("<pad>"), tiny.get_command("<eos>"), tiny.get_command("<bos>")) == (0, 2, 1)
    assert tiny.get_vocab()["[gMASK]"] == n + 1 and tiny.get_vocab()["</s>"] == 2


def test_encode_prepends_gmask_sop_and_pairs_end_with_eos(tiny):
    n = tiny.sp_model.vocab_size()
    plain = tiny.encode("你好 world", add_special_tokens=False)
    assert plain == tiny.sp_model.encode("你好 world")
    assert tiny.encode("你好 world") == [n + 1, n + 3] + plain
    assert tiny.encode("") == [n + 1, n + 3]
    answer = tiny.encode("白色", add_special_tokens=False)
    assert tiny.encode("你好 world", "白色") == [n + 1, n + 3] + plain + answer + [2]
    assert tiny.get_special_tokens_mask(plain, answer) == [1, 1] + [0] * (len(plain) + len(answer)) + [1]
    assert tiny.get_special_tokens_mask([n + 1, n + 3, 7, 2], already_has_special_tokens=True) == [1, 1, 0, 1]


def test_special_names_typed_in_text_stay_plain_text(tiny):
    """The original never split specials out of text: '[gMASK]' typed by a user is ordinary pieces."""
    n = tiny.sp_model.vocab_size()
    text = "问：[gMASK] sop eop [MASK]"
    ids = tiny.encode(text, add_special_tokens=False)
    assert ids == tiny.sp_model.encode(text)
    assert all(i < n for i in ids)
    assert tiny.decode(ids) == text


def test_a_real_piece_named_like_a_special_keeps_its_sentencepiece_id(tmp_path):
    sp_file = _train_sp(tmp_path, vocab_size=400, user_defined_symbols=["sop"])
    tok = ChatGLMTokenizer(sp_file)
    sop_piece = tok.sp_model.piece_to_id("sop")
    assert 0 < sop_piece < tok.sp_model.vocab_size()
    ids = tok.encode("xsop", add_special_tokens=False)
    assert sop_piece in ids and tok.get_command("sop") not in ids
    assert tok.decode(ids) == "xsop"
    assert tok.encode("x")[:2] == [tok.sp_model.vocab_size() + 1, tok.sp_model.vocab_size() + 3]


def test_batch_is_left_padded_with_position_ids(tiny):
    batch = tiny(["a", "你好，很高兴见到你"], padding=True, return_tensors="pt")
    assert set(batch.keys()) == {"input_ids", "attention_mask", "position_ids"}
    short = tiny.encode("a")
    long = tiny.encode("你好，很高兴见到你")
    pad = len(long) - len(short)
    assert pad > 0
    assert batch["input_ids"].tolist() == [[0] * pad + short, long]
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]
    assert batch["position_ids"].tolist() == [[0] * pad + list(range(len(short))), list(range(len(long)))]


def test_single_sequence_padding_options(tiny):
    one = tiny("你好")
    n_ids = len(one["input_ids"])
    assert one["position_ids"] == list(range(n_ids)) and one["attention_mask"] == [1] * n_ids
    padded = tiny("你好", padding="max_length", max_length=n_ids + 3)
    assert padded["input_ids"] == [0, 0, 0] + one["input_ids"]
    assert padded["position_ids"] == [0, 0, 0] + list(range(n_ids))
    assert padded["attention_mask"] == [0, 0, 0] + [1] * n_ids
    multiple = tiny(["你好"], padding=True, pad_to_multiple_of=8)
    assert len(multiple["input_ids"][0]) % 8 == 0 and multiple["input_ids"][0][-n_ids:] == one["input_ids"]
    # tokenizer.pad on already-encoded features (what a data collator does) adds position_ids too
    feats = [{"input_ids": tiny.encode("a")}, {"input_ids": tiny.encode("你好 world")}]
    collated = tiny.pad(feats, return_tensors="pt")
    assert collated["position_ids"][0].tolist()[-3:] == [0, 1, 2]
    assert collated["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)
    truncated = tiny("你好 " * 50, truncation=True, max_length=6)
    assert len(truncated["input_ids"]) == 6 and truncated["input_ids"][:2] == tiny.get_prefix_tokens()


def test_right_padding_is_refused(tiny_sp_file):
    tok = ChatGLMTokenizer(tiny_sp_file, padding_side="right")
    with pytest.raises(ValueError, match="left"):
        tok(["a", "bb cc"], padding=True)


def test_build_prompt_rounds(tiny):
    assert tiny.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert tiny.build_prompt("你好", None) == tiny.build_prompt("你好", [])
    history = [("你好", "你好！"), ("1+1=?", "1+1=2")]
    assert tiny.build_prompt("再见", history) == (
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n"
        "[Round 2]\n\n问：1+1=?\n\n答：1+1=2\n\n"
        "[Round 3]\n\n问：再见\n\n答："
    )
    assert tiny.build_prompt("q", [["a", "b"]]).startswith("[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]")


@pytest.mark.parametrize(
    "text", ["你好", "Hello, world!", "  two  spaces  ", "a\nb\n\nc", "tab\there", "emoji 😀🎉", "龘"]
)
def test_decode_round_trips_text(tiny, text):
    ids = tiny.encode(text)
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special_tokens=True) == text
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text


def test_decode_drops_specials_with_and_without_skip(tiny):
    n = tiny.sp_model.vocab_size()
    body = tiny.encode("你好", add_special_tokens=False)
    ids = [n + 1, n + 3] + body + [2, n + 4, 0, 1, n, n + 2]
    assert tiny.decode(ids) == "你好"
    assert tiny.decode(ids, skip_special_tokens=True) == "你好"
    assert tiny.decode(body + [-100, -100]) == "你好"  # label padding in training batches
    assert tiny.decode(n + 1) == ""
    assert tiny.batch_decode([[n + 1, n + 3] + body, body]) == ["你好", "你好"]
    assert tiny.convert_ids_to_tokens([n + 1, 2]) == ["[gMASK]", "</s>"]


def test_decode_of_any_ids_is_the_original_piece_join(tiny):
    """The original decodes ids as pieces joined by SentencePiece (specials and <unk>/<s>/</s> silent); ids of
    byte pieces, spaces, partial characters and the padded vocabulary rows included."""
    sp, n = tiny.sp_model, tiny.sp_model.vocab_size()
    silent = {0, 1, 2, *range(n, n + 5)}
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(-1, n + 8) for _ in range(rng.randrange(1, 10))]
        pieces = [sp.id_to_piece(i) for i in ids if 0 <= i < n and i not in silent]
        assert tiny.decode(ids) == sp.decode_pieces(pieces), ids


def test_save_and_load_round_trip(tiny, tmp_path):
    saved = tiny.save_pretrained(tmp_path / "tok")
    assert str(tmp_path / "tok" / "tokenizer.model") in saved
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and "auto_map" not in config
    assert config["padding_side"] == "left"
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == tiny.sp_model.serialized_model_proto()
    again = ChatGLMTokenizer.from_pretrained(tmp_path / "tok")
    text = tiny.build_prompt("你好", [("a", "b")])
    assert again.encode(text) == tiny.encode(text)
    assert again.vocab_size == tiny.vocab_size and again.padding_side == "left"
    assert again(["a", "bb cc"], padding=True)["position_ids"] == tiny(["a", "bb cc"], padding=True)["position_ids"]


def test_loads_a_release_style_directory_and_drops_its_auto_map(tiny_sp_file, tmp_path):
    release = {"name_or_path": "THUDM/chatglm2-6b", "remove_space": False, "do_lower_case": False,
               "tokenizer_class": "ChatGLMTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    direct = ChatGLMTokenizer(tiny_sp_file, **release)
    assert direct.encode("你好") == ChatGLMTokenizer(tiny_sp_file).encode("你好")
    (tmp_path / "release").mkdir()
    shutil.copy(tiny_sp_file, tmp_path / "release" / "tokenizer.model")
    (tmp_path / "release" / "tokenizer_config.json").write_text(json.dumps(release), encoding="utf-8")
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path / "release")
    loaded.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config and config["tokenizer_class"] == "ChatGLMTokenizer"


# ---------------------------------------------------------------- real tokenizer.model + golden (../shared)


@pytest.fixture(scope="module")
def real(real_tokenizer_file) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(str(real_tokenizer_file))


def test_real_vocab_layout(real):
    assert real.sp_model.vocab_size() == 64789
    assert real.vocab_size == 64794 == len(real)
    assert real.convert_tokens_to_ids(SPECIALS) == [64789, 64790, 64791, 64792, 64793]
    assert (real.pad_token_id, real.eos_token_id, real.bos_token_id) == (0, 2, 1)
    # so the guard in _convert_token_to_id never departs from the original on the real model:
    assert all(real.sp_model.piece_to_id(s) == real.sp_model.unk_id() for s in SPECIALS)


def test_real_matches_documented_example(real):
    ids = real.encode("[Round 1]\n\n问：你好\n\n答：")
    assert ids == [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211]


def test_golden_tokens(real, golden_tokenizer_json):
    golden = json.loads(golden_tokenizer_json.read_text(encoding="utf-8"))
    assert golden["tokens"]
    for case in golden["tokens"]:
        text = case["text"]
        assert real.encode(text) == case["ids"], text
        assert real.encode(text, add_special_tokens=False) == case["ids_no_special"], text
        assert real(text)["input_ids"] == case["ids"], text
        assert real.decode(case["ids"]) == case["decoded"], text
        assert real.decode(case["ids"], skip_special_tokens=True) == case["decoded"], text
        assert real.decode(case["ids_no_special"]) == case["decoded"], text


def test_golden_prompts(real, golden_tokenizer_json):
    golden = json.loads(golden_tokenizer_json.read_text(encoding="utf-8"))
    assert golden["prompts"]
    for case in golden["prompts"]:
        prompt = real.build_prompt(case["query"], case["history"])
        assert prompt == case["prompt"], case["query"]
        assert real.encode(prompt) == case["ids"], case["query"]


def test_real_release_directory_round_trip(real_tokenizer_file, tmp_path):
    release = tmp_path / "chatglm2"
    release.mkdir()
    shutil.copy(real_tokenizer_file, release / "tokenizer.model")
    shutil.copy(real_tokenizer_file.parent / "tokenizer_config.json", release / "tokenizer_config.json")
    config = json.loads((release / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" in config  # the release's file, which we must load without its remote code
    direct = ChatGLMTokenizer(str(release / "tokenizer.model"), **config)
    loaded = ChatGLMTokenizer.from_pretrained(release)
    assert loaded.encode("你好") == direct.encode("你好") == [64790, 64792, 36474, 54591]
    loaded.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved["tokenizer_class"] == "ChatGLMTokenizer" and "auto_map" not in saved
    again = ChatGLMTokenizer.from_pretrained(tmp_path / "saved")
    batch = again(["你好", "Hello, world!"], padding=True)
    assert batch["input_ids"][0] == [0, 0, 64790, 64792, 36474, 54591]
    assert batch["position_ids"][0] == [0, 0, 0, 1, 2, 3]
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]
