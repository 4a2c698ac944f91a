"""Reading P-Tuning data files and preprocessing them exactly like ChatGLM2-6B's ptuning/main.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    build_prompt,
    collate_eval,
    collate_train,
    preprocess_eval,
    preprocess_train,
    read_examples,
)
from backend.service import BackendError

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample"

# The golden example: decoding expected.json's train_input_ids with the real tokenizer gives
# "[Round 1]\n\n问：类型#裙*颜色#红色\n\n答：" (23 ids with [gMASK] sop) + "这条红色连衣裙非常漂亮。" (7 ids) + eos.
# 31 ids with no padding means max_source_length + max_target_length + 1 == 31 with neither part
# truncated, so the lengths are exactly 23 and 7.
GOLDEN_CONTENT = "类型#裙*颜色#红色"
GOLDEN_SUMMARY = "这条红色连衣裙非常漂亮。"
GOLDEN_MAX_SOURCE, GOLDEN_MAX_TARGET = 23, 7


class CharTokenizer:
    """One id per character; '¤' stands for a genuine token whose id equals the pad id (0)."""

    eos_token_id = 2
    pad_token_id = 0
    prefix = [900, 901]  # like [gMASK] sop

    def build_prompt(self, query, history=None):
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def encode(self, text, add_special_tokens=True):
        ids = [0 if c == "¤" else 1000 + ord(c) for c in text]
        return (self.prefix + ids) if add_special_tokens else ids


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ reading


def test_reads_json_lines_and_ignores_blank_lines(tmp_path):
    f = write(tmp_path / "train.json", [{"content": "a", "summary": "b"}, "", "   ", {"content": "c", "summary": "d"}])
    examples = read_examples(f, "content", "summary")
    assert [(e.prompt, e.response) for e in examples] == [("a", "b"), ("c", "d")]
    assert examples[1].where == f"{f}:4"
    assert examples.skipped == [] and examples.empty == 0


def test_reads_a_json_list_file_with_bom(tmp_path):
    f = tmp_path / "train.json"
    f.write_text("\ufeff" + json.dumps([{"q": "你好", "a": "您好"}, {"q": "x", "a": "y"}], ensure_ascii=False),
                 encoding="utf-8")
    examples = read_examples(f, "q", "a")
    assert [(e.prompt, e.response) for e in examples] == [("你好", "您好"), ("x", "y")]


def test_bad_json_line_names_file_line_and_fix(tmp_path):
    f = write(tmp_path / "data.json", [{"content": "a", "summary": "b"}, "{not json", {"content": "c", "summary": "d"}])
    with pytest.raises(DataError) as err:
        read_examples(f, "content", "summary")
    assert isinstance(err.value, BackendError)
    assert f"{f}:2: not valid JSON" in str(err.value)
    assert "--skip-bad-lines" in str(err.value)


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    f = write(tmp_path / "data.json", [{"content": "a", "title": "b"}])
    with pytest.raises(DataError) as err:
        read_examples(f, "content", "summary")
    assert str(err.value) == (
        f"{f}:1: missing column 'summary'; the columns here are content, title — pass --response-column"
    )
    with pytest.raises(DataError, match="pass --prompt-column"):
        read_examples(f, "query", "title")
    with pytest.raises(DataError, match="missing column 'history'.*--history-column"):
        read_examples(f, "content", "title", history_column="history")


def test_skip_bad_lines_counts_them(tmp_path):
    f = write(tmp_path / "data.json", [
        {"content": "a", "summary": "b"},
        "oops",
        {"content": "c"},
        [1, 2],
        {"content": "e", "summary": 5},
        {"content": "f", "summary": "g"},
    ])
    examples = read_examples(f, "content", "summary", skip_bad_lines=True)
    assert [e.prompt for e in examples] == ["a", "f"]
    assert len(examples.skipped) == 4
    assert examples.skipped[0].startswith(f"{f}:2:") and examples.skipped[1].startswith(f"{f}:3:")


def test_empty_prompt_or_response_dropped_like_the_original(tmp_path):
    f = write(tmp_path / "data.json", [{"content": "", "summary": "b"}, {"content": "a", "summary": None},
                                       {"content": "c", "summary": "d"}])
    examples = read_examples(f, "content", "summary")
    assert [e.prompt for e in examples] == ["c"]
    assert examples.empty == 2


@pytest.mark.parametrize("lines,skip,needle", [
    ([], False, "the file is empty"),
    (["", "  "], False, "the file is empty"),
    (["nope", "{"], True, "all 2 lines were bad"),
    ([{"content": "", "summary": ""}], False, "empty 'content' or 'summary'"),
])
def test_no_usable_lines_is_an_error(tmp_path, lines, skip, needle):
    f = tmp_path / "data.json"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines), encoding="utf-8")
    with pytest.raises(DataError, match="no usable examples") as err:
        read_examples(f, "content", "summary", skip_bad_lines=skip)
    assert needle in str(err.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.json", "content", "summary")


def test_history_column(tmp_path):
    f = write(tmp_path / "chat.json", [
        {"prompt": "再说一次", "response": "好的", "history": [["你好", "你好！"], ["天气", "晴"]]},
        {"prompt": "hi", "response": "hello", "history": None},
        {"prompt": "hi", "response": "hello", "history": [["only one"]]},
    ])
    with pytest.raises(DataError, match=r":3: column 'history' must be a list of \[query, response\] pairs"):
        read_examples(f, "prompt", "response", history_column="history")
    examples = read_examples(f, "prompt", "response", history_column="history", skip_bad_lines=True)
    assert examples[0].history == (("你好", "你好！"), ("天气", "晴"))
    assert examples[1].history == ()
    prompt = build_prompt(CharTokenizer(), examples[0].prompt, examples[0].history)
    assert prompt == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：天气\n\n答：晴\n\n[Round 3]\n\n问：再说一次\n\n答："


# ------------------------------------------------------------------------------------ preprocessing


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text, add_special_tokens=False)


def test_train_features_layout():
    tok = CharTokenizer()
    [feat] = preprocess_train([Example("ab", "xyz")], tok, max_source_length=32, max_target_length=5)
    prompt = tok.encode("[Round 1]\n\n问：ab\n\n答：")
    assert len(feat["input_ids"]) == len(feat["labels"]) == 32 + 5 + 1
    n = len(prompt)
    assert feat["input_ids"] == prompt + ids("xyz") + [2] + [0] * (38 - n - 4)
    assert feat["labels"] == [IGNORE_INDEX] * n + ids("xyz") + [2] + [IGNORE_INDEX] * (38 - n - 4)


def test_train_truncates_source_and_target_keeping_special_prefix():
    tok = CharTokenizer()
    [feat] = preprocess_train([Example("a" * 50, "b" * 50)], tok, max_source_length=10, max_target_length=4)
    assert feat["input_ids"] == tok.encode("[Round 1]\n\n问：a")[:10] + ids("bbbb") + [2]
    assert feat["input_ids"][:2] == tok.prefix
    assert feat["labels"] == [IGNORE_INDEX] * 10 + ids("bbbb") + [2]


def test_train_maps_genuine_pad_id_tokens_to_ignore_like_the_original():
    [feat] = preprocess_train([Example("q", "a¤b")], CharTokenizer(), max_source_length=30, max_target_length=8)
    answer = [t for t in feat["labels"] if t != IGNORE_INDEX]
    assert answer == [ids("a")[0], ids("b")[0], 2]  # the id-0 token is ignored by the loss, as in ptuning/main.py
    assert 0 in feat["input_ids"][: feat["input_ids"].index(2)]  # but still fed to the model


def test_source_prefix_goes_before_the_whole_prompt_like_the_original():
    tok = CharTokenizer()
    [feat] = preprocess_train([Example("ab", "c")], tok, 40, 4, source_prefix="P:")
    assert feat["input_ids"][:2 + 2 + 9] == tok.encode("P:[Round 1]")
    [ev] = preprocess_eval([Example("ab", "c")], tok, 40, 4, source_prefix="P:")
    assert ev["input_ids"] == tok.encode("P:[Round 1]\n\n问：ab\n\n答：")


def test_empty_examples_are_skipped_by_preprocessing():
    tok = CharTokenizer()
    exs = [Example("", "x"), Example("a", ""), Example("a", "b")]
    assert len(preprocess_train(exs, tok, 30, 5)) == 1
    assert len(preprocess_eval(exs, tok, 30, 5)) == 1


def test_bad_lengths_raise():
    with pytest.raises(DataError):
        preprocess_train([Example("a", "b")], CharTokenizer(), 0, 5)


def test_eval_features_and_left_padded_batch():
    tok = CharTokenizer()
    feats = preprocess_eval([Example("a", "xy"), Example("abcd", "z¤")], tok, max_source_length=64, max_target_length=3)
    short, long_ = tok.encode("[Round 1]\n\n问：a\n\n答："), tok.encode("[Round 1]\n\n问：abcd\n\n答：")
    assert feats[0]["input_ids"] == short and feats[1]["input_ids"] == long_
    # labels as tokenizer(text_target=...): special tokens included, cut to max_target_length, pad id -> -100
    assert feats[0]["labels"] == tok.prefix + ids("x")
    assert feats[1]["labels"] == tok.prefix + ids("z")
    feats2 = preprocess_eval([Example("a", "¤y")], tok, 64, 4)
    assert feats2[0]["labels"] == tok.prefix + [IGNORE_INDEX] + ids("y")

    batch = collate_eval(feats, pad_token_id=tok.pad_token_id)
    gap = len(long_) - len(short)
    assert batch["input_ids"].shape == (2, len(long_))
    assert batch["input_ids"][0].tolist() == [0] * gap + short
    assert batch["input_ids"][1].tolist() == long_
    assert batch["attention_mask"][0].tolist() == [0] * gap + [1] * len(short)
    assert batch["position_ids"][0].tolist() == [0] * gap + list(range(len(short)))
    assert batch["position_ids"][1].tolist() == list(range(len(long_)))
    assert batch["labels"].shape == (2, 3)


def test_collate_train_stacks():
    feats = preprocess_train([Example("a", "b"), Example("cc", "dd")], CharTokenizer(), 30, 5)
    batch = collate_train(feats)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 36)
    assert str(batch["input_ids"].dtype) == "torch.int64"
    assert batch["labels"][1].tolist() == feats[1]["labels"]


# ------------------------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def real_tokenizer(real_tokenizer_file):
    try:
        from backend.tokenization import ChatGLMTokenizer
    except ImportError:
        pytest.skip("backend.tokenization is not there yet")
    return ChatGLMTokenizer(vocab_file=str(real_tokenizer_file))


def test_golden_train_example(golden_tiny_dir, real_tokenizer):
    expected = json.loads((golden_tiny_dir / "expected.json").read_text())
    prompt_ids, answer = expected["train_input_ids"], expected["train_labels"]
    assert real_tokenizer.decode(prompt_ids[:GOLDEN_MAX_SOURCE]).endswith(f"问：{GOLDEN_CONTENT}\n\n答：")

    [feat] = preprocess_train([Example(GOLDEN_CONTENT, GOLDEN_SUMMARY)], real_tokenizer,
                              GOLDEN_MAX_SOURCE, GOLDEN_MAX_TARGET)
    assert feat["input_ids"] == expected["train_input_ids"]
    assert feat["labels"] == expected["train_labels"]

    # With train.sh's lengths the same ids come first, then padding the loss ignores.
    [full] = preprocess_train([Example(GOLDEN_CONTENT, GOLDEN_SUMMARY)], real_tokenizer, 64, 128)
    n = len(expected["train_input_ids"])
    assert full["input_ids"] == expected["train_input_ids"] + [real_tokenizer.pad_token_id] * (193 - n)
    assert full["labels"] == expected["train_labels"] + [IGNORE_INDEX] * (193 - n)


def test_matches_the_real_tokenizers_truncation_and_left_padding(real_tokenizer):
    # Our slicing must equal HF encode(truncation=True, max_length=n), and collate_eval the tokenizer's own padding.
    tok = real_tokenizer
    exs = [Example("类型#裙*颜色#红色*风格#简约*图案#刺绣", "这条红色连衣裙非常漂亮。", (("你好", "你好！"),)),
           Example("短", "好的")]
    feats = preprocess_eval(exs, tok, max_source_length=12, max_target_length=5)
    for ex, feat in zip(exs, feats):
        prompt = tok.build_prompt(ex.prompt, list(ex.history))
        assert feat["input_ids"] == tok.encode(prompt, add_special_tokens=True, truncation=True, max_length=12)
        assert feat["labels"] == tok(text_target=ex.response, max_length=5, truncation=True)["input_ids"]
    prompts = [tok.build_prompt(ex.prompt, list(ex.history)) for ex in exs]
    full = preprocess_eval(exs, tok, 64, 64)
    padded = tok(prompts, max_length=64, truncation=True, padding=True)
    batch = collate_eval(full, pad_token_id=tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert batch[key].tolist() == padded[key]


# ---------------------------------------------------------------------------------------- sample data


@pytest.mark.parametrize("name,least", [("train.json", 100), ("dev.json", 15)])
def test_sample_data_is_valid(name, least):
    examples = read_examples(SAMPLE / name, "content", "summary")
    assert len(examples) >= least and examples.skipped == [] and examples.empty == 0
    for ex in examples:
        assert 30 <= len(ex.response) <= 80, ex
        keys = [pair.split("#")[0] for pair in ex.prompt.split("*")]
        assert keys[0] == "类型" and all("#" in pair for pair in ex.prompt.split("*")), ex
        assert len(keys) == len(set(keys)), ex


def test_sample_train_and_dev_do_not_overlap():
    train = {e.prompt for e in read_examples(SAMPLE / "train.json", "content", "summary")}
    dev = {e.prompt for e in read_examples(SAMPLE / "dev.json", "content", "summary")}
    assert not train & dev


def test_sample_data_is_our_own(golden_tiny_dir):
    ref = golden_tiny_dir.parents[1] / "advertisegen" / "dev.json"
    if not ref.exists():
        pytest.skip("reference AdvertiseGen split not present")
    theirs = {json.loads(line)["summary"] for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()}
    for name in ("train.json", "dev.json"):
        ours = {e.response for e in read_examples(SAMPLE / name, "content", "summary")}
        assert not ours & theirs


# ------------------------------------------------------------------------------------------ sources through datasets


def test_csv_parquet_and_a_directory_of_them(tmp_path):
    import pandas as pd

    rows = [{"content": "a", "summary": "b"}, {"content": "c", "summary": "d"}]
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "one.csv", index=False)
    pd.DataFrame(rows[::-1]).to_parquet(folder / "two.parquet")
    write(folder / "three.jsonl", rows[:1])
    (folder / "notes.txt").write_text("not data")
    assert [(e.prompt, e.response) for e in read_examples(folder / "one.csv", "content", "summary")] == [("a", "b"), ("c", "d")]
    assert [e.prompt for e in read_examples(folder / "two.parquet", "content", "summary")] == ["c", "a"]
    both = read_examples(folder, "content", "summary")
    assert [e.prompt for e in both] == ["a", "c", "a", "c", "a"]  # one.csv, three.jsonl, two.parquet, by name
    assert both[0].where == f"{folder / 'one.csv'}: row 1"
    with pytest.raises(DataError, match=r"one.csv: missing column 'summary'; the columns here are content, title — pass --response-column"):
        pd.DataFrame([{"content": "a", "title": "b"}]).to_csv(folder / "one.csv", index=False)
        read_examples(folder / "one.csv", "content", "summary")


def test_a_second_read_comes_from_the_arrow_cache(tmp_path, monkeypatch):
    import backend.datasource as datasource

    f = write(tmp_path / "big.json", [{"content": f"q{i}", "summary": f"a{i}"} for i in range(50)])
    calls = []
    real = datasource._records
    monkeypatch.setattr(datasource, "_records", lambda *a: calls.append(1) or real(*a))
    cache = str(tmp_path / "cache")
    first = read_examples(f, "content", "summary", cache_dir=cache)
    second = read_examples(f, "content", "summary", cache_dir=cache)
    assert first == second and len(first) == 50 and len(calls) == 1  # parsed once
    assert any(p.suffix == ".arrow" for p in Path(cache).rglob("*"))
    write(f, [{"content": "changed", "summary": "x"}])  # a new size and time: parsed again
    assert [e.prompt for e in read_examples(f, "content", "summary", cache_dir=cache)] == ["changed"]
    assert len(calls) == 2


def test_a_dataset_id_not_in_the_cache_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        read_examples("someone/not-cached-here", "content", "summary", cache_dir=str(tmp_path))
    assert "hf download --repo-type dataset someone/not-cached-here" in str(err.value)
    assert "\n" not in str(err.value)
