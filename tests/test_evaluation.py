"""Evaluation as the original --predict_with_generate: batched generation equals one-by-one, the files and
metric keys are the original's, an empty prediction scores 0, and the eval command writes both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_cli
from backend.adapters import AdapterRegistry
from backend.data import read_examples
from backend.evaluation import ORIGINAL_SAMPLING, EvalResult, evaluate, generate_all, merge_shards
from backend.loading import load_model
from backend.training import train_prefix
from test_training import request, sharpened_tiny_model_dir, write_data

METRIC_KEYS = {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return sharpened_tiny_model_dir(tmp_path_factory.mktemp("tiny_eval") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir, quantization="none", device="cpu")


@pytest.fixture(scope="module")
def checkpoint(loaded, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval_ckpt")
    data = write_data(tmp / "train.json", 16)
    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp, data, max_steps=3, save_steps=3, pre_seq_len=6))
    return result.last_checkpoint


@pytest.fixture(scope="module")
def prefix_kv(loaded, checkpoint):
    registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
    return registry.prefix_kv(registry.register(checkpoint).name)


def prompts_of(tokenizer, n=4):
    texts = ["类型#上衣", "类型#裙*颜色#红色*风格#复古*图案#刺绣", "你好", "类型#裤*材质#牛仔布*颜色#黑色"][:n]
    return [tokenizer.encode(tokenizer.build_prompt(t)) for t in texts]


def greedy_without_cache(model, ids, prefix_kv, eos, max_length):
    """The plainest greedy loop: the whole sequence again at every step."""
    out = []
    seq = list(ids)
    while len(seq) < max_length:
        with torch.no_grad():
            logits = model(torch.tensor([seq]), prefix_kv=prefix_kv, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
        seq.append(token)
    return out


@pytest.mark.parametrize("with_prefix", [False, True])
def test_batched_greedy_equals_one_by_one(loaded, prefix_kv, with_prefix):
    tok = loaded.tokenizer
    kv = prefix_kv if with_prefix else None
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is really left-padded
    kw = dict(eos_token_id=tok.eos_token_id, max_length=max(map(len, prompts)) + 12, prefix_kv=kv)
    batched = generate_all(loaded.model, prompts, **kw)
    single = [generate_all(loaded.model, [p], **kw)[0] for p in prompts]
    assert batched == single == generate_all(loaded.model, prompts, batch_size=2, **kw)
    assert all(len(p) + len(out) <= kw["max_length"] for p, out in zip(prompts, batched))
    reference = greedy_without_cache(loaded.model, prompts[1], kv, tok.eos_token_id, kw["max_length"])
    assert single[1] == reference


def test_the_prefix_changes_what_is_generated(loaded, prefix_kv):
    tok = loaded.tokenizer
    prompts = prompts_of(tok)
    kw = dict(eos_token_id=tok.eos_token_id, max_length=40)
    assert generate_all(loaded.model, prompts, **kw) != generate_all(loaded.model, prompts, prefix_kv=prefix_kv, **kw)


def test_sampling_is_reproducible_with_a_seed(loaded, tmp_path):
    examples = list(read_examples(write_data(tmp_path / "dev.json", 3), "content", "summary"))
    kw = dict(max_source_length=24, max_target_length=8, params=ORIGINAL_SAMPLING, seed=3)
    a = evaluate(loaded.model, loaded.tokenizer, examples, **kw)
    b = evaluate(loaded.model, loaded.tokenizer, examples, batch_size=1, **kw)
    assert a.predictions == b.predictions  # the batch size changes no sampled prediction either


def test_evaluate_writes_the_original_files(loaded, prefix_kv, tmp_path):
    examples = list(read_examples(write_data(tmp_path / "dev.json", 5), "content", "summary"))
    result = evaluate(loaded.model, loaded.tokenizer, examples, max_source_length=24, max_target_length=8,
                      prefix_kv=prefix_kv, batch_size=2, output_dir=tmp_path / "out")
    assert set(result.metrics) == METRIC_KEYS and all(0 <= v <= 100 for v in result.metrics.values())
    lines = (tmp_path / "out" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5 and all(set(r) == {"labels", "predict"} for r in rows)
    tok = loaded.tokenizer  # labels: the response cut to max_target_length tokens (as the original), in the data's order
    assert [r["labels"] for r in rows] == [tok.decode(tok.encode(e.response)[:8]).strip() for e in examples]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["num_examples"] == 5


def test_an_empty_prediction_scores_zero(loaded, tmp_path, monkeypatch):
    import backend.evaluation as evaluation

    monkeypatch.setattr(evaluation, "generate_all", lambda model, prompts, **kw: [[] for _ in prompts])
    examples = list(read_examples(write_data(tmp_path / "dev.json", 2), "content", "summary"))
    result = evaluate(loaded.model, loaded.tokenizer, examples, max_source_length=24, max_target_length=8,
                      output_dir=tmp_path)
    assert result.predictions == ["", ""]
    assert result.metrics == {k: 0.0 for k in METRIC_KEYS}


def test_shards_merge_back_in_order():
    shards = [EvalResult({}, ["p0", "p2", "p4"], ["l0", "l2", "l4"]), EvalResult({}, ["p1", "p3"], ["l1", "l3"])]
    merged = merge_shards(shards)
    assert merged.predictions == ["p0", "p1", "p2", "p3", "p4"] and merged.labels == ["l0", "l1", "l2", "l3", "l4"]
    assert set(merged.metrics) == METRIC_KEYS


def test_eval_command_writes_predictions_and_metrics(tiny_dir, checkpoint, tmp_path, capsys):
    dev = write_data(tmp_path / "dev.json", 4, start=50)
    code = train_cli.main(["eval", "--model", str(tiny_dir), "--checkpoint", str(checkpoint), "--validation_file", str(dev),
                           "--max-source-length", "24", "--max-target-length", "8", "--batch-size", "3",
                           "--output-dir", str(tmp_path / "res"), "--device", "cpu", "--quantization", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["checkpoint"] == str(checkpoint) and metrics["decoding"] == "greedy"
    assert len((tmp_path / "res" / "generated_predictions.txt").read_text().splitlines()) == 4
    assert "bleu-4" in captured.out


def test_eval_command_defaults_to_the_checkpoint_directory(tiny_dir, checkpoint, tmp_path, capsys):
    dev = write_data(tmp_path / "dev.json", 2)
    ckpt = tmp_path / "checkpoint-3"
    import shutil

    shutil.copytree(checkpoint, ckpt)
    code = train_cli.main(["eval", "--model_name_or_path", str(tiny_dir), "--ptuning_checkpoint", str(ckpt), "--test_file", str(dev),
                           "--max_source_length", "24", "--max_target_length", "4", "--do_predict", "--pre_seq_len", "6",
                           "--device", "cpu", "--quantization", "none"])
    assert code == 0, capsys.readouterr().err
    assert (ckpt / "metrics.json").is_file() and (ckpt / "generated_predictions.txt").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "/nonexistent/checkpoint-1"], "no adapter checkpoint at /nonexistent/checkpoint-1"),
        (["--pre-seq-len", "99"], "--pre-seq-len 99 but"),
        (["--validation-file", "/nonexistent/dev.json"], "no such file"),
    ],
)
def test_eval_command_bad_input_is_one_line(tiny_dir, checkpoint, tmp_path, capsys, extra, message):
    dev = write_data(tmp_path / "dev.json", 2)
    argv = ["eval", "--model", str(tiny_dir), "--checkpoint", str(checkpoint), "--validation-file", str(dev), *extra]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_large_evaluation_is_scored_in_the_background_with_the_same_metrics(loaded, tmp_path, monkeypatch):
    """From BACKGROUND_SCORING_MIN examples the pairs are scored in worker processes as they are generated:
    the same metrics, to the last digit, as scoring them afterwards."""
    import backend.evaluation as evaluation
    from backend.metrics import BackgroundScorer, compute_metrics

    made = []
    monkeypatch.setattr(evaluation, "BACKGROUND_SCORING_MIN", 4)
    monkeypatch.setattr(evaluation, "BackgroundScorer", lambda: made.append(BackgroundScorer(workers=1, chunk=2)) or made[-1])
    examples = list(read_examples(write_data(tmp_path / "dev.json", 7), "content", "summary"))
    result = evaluate(loaded.model, loaded.tokenizer, examples, max_source_length=24, max_target_length=8, batch_size=3)
    assert len(made) == 1 and len(result.predictions) == 7
    assert result.metrics == compute_metrics(result.predictions, result.labels)
    assert any(v > 0 for v in result.metrics.values())
