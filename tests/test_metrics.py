"""ROUGE/BLEU as the original ptuning/main.py computes them, and generated_predictions.txt."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from backend.metrics import compute_metrics, score_pair, write_predictions

REPO = Path(__file__).resolve().parents[1]


def test_hand_checked_scores():
    # jieba: 我|爱|北京 vs 我|爱|上海 -> 2 of 3 words shared, 1 of 2 bigrams, LCS 2 words.
    scores = compute_metrics(["我爱北京"], ["我爱上海"])
    assert scores["rouge-1"] == pytest.approx(66.6667, abs=1e-4)
    assert scores["rouge-2"] == pytest.approx(50.0, abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(66.6667, abs=1e-4)
    # Character BLEU-4: precisions 2/4, 1/3, then 0/2 and 0/1, which smoothing method3 turns into
    # 1/(2*2) and 1/(4*1); equal lengths so no brevity penalty.
    bleu = math.exp(sum(math.log(p) for p in (2 / 4, 1 / 3, 1 / 4, 1 / 4)) / 4)
    assert scores["bleu-4"] == pytest.approx(round(bleu * 100, 4), abs=1e-4)
    assert scores["bleu-4"] == pytest.approx(31.9472, abs=1e-4)
    assert set(scores) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


def test_identical_text_scores_100():
    text = "这款连衣裙采用柔软的棉质面料，穿着舒适透气。"
    scores = compute_metrics([text], [text])
    assert scores == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_empty_prediction_scores_zero_instead_of_crashing():
    assert score_pair("", "这条红色连衣裙非常漂亮。") == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0
    }
    assert score_pair("   ", "很漂亮")["rouge-1"] == 0.0  # whitespace only: rouge sees it as empty too
    assert score_pair("很漂亮", "")["rouge-l"] == 0.0  # empty label: "Reference is empty."


def test_scores_are_averaged_over_examples():
    one = score_pair("我爱北京", "我爱上海")
    scores = compute_metrics(["我爱北京", ""], ["我爱上海", "你好"])
    for key in scores:
        assert scores[key] == pytest.approx(round(one[key] / 2, 4), abs=1e-4)
    assert scores["rouge-1"] == pytest.approx(33.3333, abs=1e-4)


def test_no_examples_and_mismatched_lengths():
    assert compute_metrics([], []) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])


def test_jieba_is_quiet():
    code = "from backend.metrics import compute_metrics; print(compute_metrics(['我爱北京'], ['我爱上海']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rouge-1" in done.stdout
    for noise in ("prefix dict", "Loading model", "Dumping model"):  # jieba's DEBUG lines
        assert noise not in done.stderr


def test_write_predictions(tmp_path):
    out = tmp_path / "run" / "generated_predictions.txt"
    out.parent.mkdir()
    out.write_text("old content\n", encoding="utf-8")
    result = write_predictions(out, ["这件衬衫很百搭", 'say "hi"'], ["白色衬衫", "hello"])
    assert result == out
    raw = out.read_text(encoding="utf-8")
    assert "这件衬衫很百搭" in raw  # ensure_ascii=False: Chinese stays readable
    lines = [json.loads(line) for line in raw.splitlines()]
    assert lines == [
        {"labels": "白色衬衫", "predict": "这件衬衫很百搭"},
        {"labels": "hello", "predict": 'say "hi"'},
    ]
    assert raw.startswith('{"labels": "白色衬衫", "predict": ')  # key order and spacing as the original
    assert sorted(p.name for p in out.parent.iterdir()) == ["generated_predictions.txt"]  # no temp left


def test_write_predictions_rejects_mismatch_and_leaves_no_file(tmp_path):
    out = tmp_path / "generated_predictions.txt"
    with pytest.raises(ValueError):
        write_predictions(out, ["a", "b"], ["a"])
    assert list(tmp_path.iterdir()) == []
