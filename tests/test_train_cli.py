"""glmchat-train: the original command line runs, every bad input is one line on stderr with exit 2,
Ctrl-C saves and exits cleanly, and compare prints base and tuned replies side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_cli
from backend.progress import read_progress
from backend.training import PrefixStep, list_checkpoints
from test_training import ROOT, sharpened_tiny_model_dir, write_data

FAST = ["--pre-seq-len", "4", "--max-source-length", "16", "--max-target-length", "16", "--per-device-train-batch-size", "2",
        "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--device", "cpu", "--quantization", "none"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return sharpened_tiny_model_dir(tmp_path_factory.mktemp("tiny_cli") / "model")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("cli_data") / "train.json", 12)


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = train_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(tiny_dir, train_file, out, *extra):
    return ["train", "--model", tiny_dir, "--train-file", train_file, "--output-dir", out, *FAST, *extra]


def assert_one_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    last = lines[-1]
    for fragment in fragments:
        assert fragment in last, err
    assert last.startswith("glmchat-train: ")
    return last


# ------------------------------------------------------------------------------------ the happy paths


def test_the_original_command_line_runs(tiny_dir, train_file, tmp_path):
    """train.sh's flags, underscores and all, with `train_cli.py train` in front."""
    out = tmp_path / "adgen"
    argv = [sys.executable, str(ROOT / "train_cli.py"), "train", "--do_train", "--train_file", str(train_file),
            "--validation_file", str(train_file), "--preprocessing_num_workers", "10", "--prompt_column", "content",
            "--response_column", "summary", "--overwrite_cache", "--model_name_or_path", str(tiny_dir),
            "--output_dir", str(out), "--overwrite_output_dir", "--max_source_length", "16", "--max_target_length", "16",
            "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--predict_with_generate", "--max_steps", "4", "--logging_steps", "2", "--save_steps", "2",
            "--learning_rate", "2e-2", "--pre_seq_len", "4", "--device", "cpu", "--quantization", "none"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "ignoring --do_train, --overwrite_cache, --predict_with_generate, --preprocessing_num_workers" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "step 2/4  loss" in proc.stderr and "saved" in proc.stderr and "done: 4 steps" in proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [e.event for e in read_progress(out)] == ["start", "log", "save", "log", "save", "done"]


def test_resume_and_overwrite_flags(tiny_dir, train_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "2", "--save-steps", "2"), capsys)
    assert code == 0, err
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "4", "--save-steps", "2"), capsys)
    assert code == 2
    assert_one_line(err, "already holds checkpoints", "checkpoint-2", "--resume", "--overwrite-output-dir")
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "4", "--save-steps", "2", "--resume"), capsys)
    assert code == 0 and "resuming" in err and "checkpoint-2" in err, err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "4", "--save-steps", "2",
                                       "--resume_from_checkpoint", out / "checkpoint-2"), capsys)
    assert code == 0, err
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "1", "--save-steps", "0",
                                       "--overwrite-output-dir"), capsys)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]


def test_resume_with_nothing_to_resume_starts_fresh(tiny_dir, train_file, tmp_path, capsys):
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "new", "--max-steps", "1", "--resume"), capsys)
    assert code == 0 and "starting a new run" in err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_dir, train_file, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "train_cli.py"), "train", "--model", str(tiny_dir), "--train-file", str(train_file),
            "--output-dir", str(out), *FAST, "--max-steps", "100000", "--save-steps", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not [e for e in read_progress(out) if e.event == "log" and e.step >= 2]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "stopping: saving a checkpoint" in stderr and "Continue with --resume" in stderr
    saved = list_checkpoints(out)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= 2
    assert read_progress(out)[-1].event == "stopped"
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["global_step"] == int(saved[0].name.split("-")[1])


# ------------------------------------------------------------------------------------ bad input: one line, exit 2


def test_missing_train_file_as_a_subprocess(tiny_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_cli.py"), "train", "--model", str(tiny_dir), "--train-file",
                           str(tmp_path / "nope.json"), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"glmchat-train: --train-file {tmp_path / 'nope.json'}: no such file; check the path."]


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (['{"content": "a", "summary": "b"}', "not json at all"], [":2: not valid JSON", "--skip-bad-lines"]),
        (['{"content": "a", "summary": "b"}', '{"content": "a", "title": "b"}'], [":2: missing column 'summary'", "--response-column"]),
        (["", "   "], ["no usable examples", "empty"]),
        (['{"content": "", "summary": ""}'], ["no usable examples"]),
    ],
)
def test_bad_data_names_file_and_line(tiny_dir, tmp_path, capsys, lines, fragments):
    data = tmp_path / "train.json"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run_main(train_args(tiny_dir, data, tmp_path / "out", "--max-steps", "1"), capsys)
    assert code == 2
    assert_one_line(err, str(data), *fragments)
    assert not (tmp_path / "out").exists()


def test_skip_bad_lines_goes_on_and_says_so(tiny_dir, train_file, tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_text(train_file.read_text(encoding="utf-8") + "oops\n{\"content\": 1}\n", encoding="utf-8")
    code, _, err = run_main(train_args(tiny_dir, data, tmp_path / "out", "--max-steps", "1", "--skip_bad_lines"), capsys)
    assert code == 0, err
    assert "skipped 2 bad line(s)" in err and f"{data}:13" in err


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--pre-seq-len", "0"], ["--pre-seq-len must be at least 1"]),
        (["--pre_seq_len", "-3"], ["--pre-seq-len must be at least 1"]),
        (["--learning-rate", "0"], ["--learning-rate must be a positive number"]),
        (["--bogus-flag", "1"], ["unrecognized arguments: --bogus-flag", "--help"]),
        (["--quantization", "4bit", "--quantization_bit", "8"], ["disagree"]),
        (["--do-eval"], ["--do-eval needs --validation-file"]),
        (["--resume", "/nonexistent/checkpoint-7"], ["no checkpoint directory"]),
        (["--max-steps", "nine"], ["invalid int value: 'nine'"]),
    ],
)
def test_bad_flags_are_one_line(tiny_dir, train_file, tmp_path, capsys, extra, fragments):
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", *extra), capsys)
    assert code == 2
    assert_one_line(err, *fragments)
    assert len(err.strip().splitlines()) == 1


def test_missing_model_is_one_line(train_file, tmp_path, capsys):
    code, _, err = run_main(train_args(tmp_path / "no-model", train_file, tmp_path / "out", "--max-steps", "1"), capsys)
    assert code == 2
    assert_one_line(err, "no model directory")


def test_output_dir_that_is_a_file(tiny_dir, train_file, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", "--max-steps", "1"), capsys)
    assert code == 2
    assert_one_line(err, "is a file")


def test_out_of_memory_names_the_flags_that_help(tiny_dir, train_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_main(train_args(tiny_dir, train_file, out, "--max-steps", "2", "--save-steps", "2"), capsys)[0] == 0

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(PrefixStep, "backward", oom)
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "4", "--save-steps", "2", "--resume"), capsys)
    assert code == 2
    assert_one_line(err, "out of memory", "--quantization 4bit", "--max-source-length", "--gradient-checkpointing")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def test_no_command_prints_help(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2 and "train" in err and "compare" in err


def test_underscore_spellings_are_normalized():
    assert train_cli.normalize_flags(["--pre_seq_len", "128", "--train_file=a_b.json", "x_y", "--", "--keep_me"]) == [
        "--pre-seq-len", "128", "--train-file=a_b.json", "x_y", "--", "--keep_me"]
    args = train_cli.build_parser().parse_args(train_cli.normalize_flags(
        ["train", "--model_name_or_path", "m", "--train_file", "t", "--output_dir", "o", "--quantization_bit", "4",
         "--max_steps", "600", "--gradient_accumulation_steps", "6", "--fp16", "--num_train_epochs", "2"]))
    assert (args.model, args.train_file, args.output_dir, args.quantization_bit, args.max_steps) == ("m", ["t"], "o", 4, 600)
    assert args.gradient_accumulation_steps == 6 and args.dtype == "fp16" and train_cli._quantization(args) == "4bit"
    request = train_cli.request_from_args(args)
    assert request.max_steps == 600 and request.num_train_epochs == 2 and request.pre_seq_len == 128
    assert request.recompute_mlp is None and not request.gradient_checkpointing  # auto: only when memory needs it
    args = train_cli.build_parser().parse_args(["train", "--model", "m", "--train-file", "t", "--output-dir", "o",
                                                "--no-recompute-mlp", "--gradient-checkpointing"])
    request = train_cli.request_from_args(args)
    assert not request.recompute_mlp and request.gradient_checkpointing


def test_epochs_without_max_steps(tiny_dir, train_file, tmp_path, capsys):
    # 12 examples, batch 2, accumulation 1: 6 steps an epoch.
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", "--num-train-epochs", "1", "--save-steps", "0"), capsys)
    assert code == 0, err
    assert "done: 6 steps" in err


# ------------------------------------------------------------------------------------ compare


def test_compare_prints_base_and_tuned_side_by_side(tiny_dir, train_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal width (80 when captured)
    out = tmp_path / "out"
    assert run_main(train_args(tiny_dir, train_file, out, "--max-steps", "2", "--save-steps", "2"), capsys)[0] == 0
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"content": "类型#裙*颜色#红色"}\n你好\n', encoding="utf-8")
    code, stdout, err = run_main(["compare", "--model", tiny_dir, "--checkpoint", out / "checkpoint-2", "--prompt", "类型#上衣",
                                  "--file", prompts, "--max-new-tokens", "6", "--device", "cpu", "--quantization", "none"], capsys)
    assert code == 0, err
    assert "base" in stdout and "out/checkpoint-2" in stdout
    for prompt in ("类型#上衣", "类型#裙*颜色#红色", "你好"):
        assert prompt in stdout


def test_compare_decodes_both_replies_of_several_prompts_together_as_separate_replies_give_them(tiny_dir, tmp_path):
    """`compare` runs each prompt's base and tuned replies as one batch of two, several prompts at once: the texts are
    those of separate replies with the same seed, greedy and sampled."""
    from backend.configuration import ChatGLMConfig
    from backend.engine import ChatEngine
    from backend.service import SamplingParams
    from test_adapters import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ad" / "checkpoint-1", config=ChatGLMConfig.from_pretrained(str(tiny_dir)))
    engine = ChatEngine.load(model=str(tiny_dir), quantization="none", adapters=[str(ckpt)], device="cpu", max_batch=6)
    tuned = engine.adapters()[0].name
    prompts = ["类型#上衣", "你好", "类型#裙*颜色#红色"]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=6), SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=6)):
        together = train_cli.compare_replies(engine, prompts, params, tuned, seed=7)
        alone = [tuple(engine.reply(p, [], params, adapter=a, seed=7).text for a in (None, tuned)) for p in prompts]
        assert together == alone
    engine.close()


def test_compare_bad_input(tiny_dir, tmp_path, capsys):
    code, _, err = run_main(["compare", "--model", tiny_dir, "--checkpoint", tmp_path / "none", "--prompt", "x"], capsys)
    assert code == 2
    assert_one_line(err, "no adapter checkpoint")
    code, _, err = run_main(["compare", "--model", tiny_dir, "--checkpoint", tmp_path / "none"], capsys)
    assert code == 2
    assert_one_line(err, "no prompt given")


def test_training_starts_from_a_ptuning_checkpoint(tiny_dir, train_file, tmp_path, capsys):
    """--ptuning_checkpoint (the original's flag) seeds the prefix with a checkpoint's weights; a new optimizer."""
    import torch

    first, second, fresh = tmp_path / "first", tmp_path / "second", tmp_path / "fresh"
    code, _, err = run_main(train_args(tiny_dir, train_file, first, "--max-steps", "2", "--save-steps", "2"), capsys)
    assert code == 0, err
    start = first / "checkpoint-2"
    tiny_step = ["--max-steps", "1", "--save-steps", "1", "--learning-rate", "1e-12"]  # one step that barely moves
    code, _, err = run_main(train_args(tiny_dir, train_file, second, *tiny_step, "--ptuning_checkpoint", start), capsys)
    assert code == 0, err
    assert f"starting from the prefix in {start}" in err
    code, _, err = run_main(train_args(tiny_dir, train_file, fresh, *tiny_step), capsys)
    assert code == 0, err

    def weights(ckpt):
        return torch.load(ckpt / "pytorch_model.bin", weights_only=True)["transformer.prefix_encoder.embedding.weight"]

    torch.testing.assert_close(weights(second / "checkpoint-1"), weights(start), rtol=0, atol=1e-6)
    assert not torch.allclose(weights(fresh / "checkpoint-1"), weights(start), atol=1e-3)

    pre_seq_len = FAST[FAST.index("--pre-seq-len") + 1]
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "other", *tiny_step,
                                       "--ptuning-checkpoint", start, "--pre-seq-len", str(int(pre_seq_len) + 1)), capsys)
    assert code == 2
    assert_one_line(err, "--ptuning-checkpoint", f"pre_seq_len {pre_seq_len}", f"--pre-seq-len {pre_seq_len}")
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "other", *tiny_step,
                                       "--ptuning-checkpoint", tmp_path / "nowhere"), capsys)
    assert code == 2
    assert_one_line(err, "no adapter checkpoint at")


# ------------------------------------------------------------------------------------ micro-batches, blends, trackers


def test_skipped_lines_are_reported_once_each(tiny_dir, train_file, tmp_path, capsys):
    """Issue 13, item 6c: each skipped line was reported three times."""
    data = tmp_path / "train.json"
    data.write_text(train_file.read_text(encoding="utf-8") + "oops\n{\"content\": 1}\n", encoding="utf-8")
    code, _, err = run_main(train_args(tiny_dir, data, tmp_path / "out", "--max-steps", "1", "--skip-bad-lines"), capsys)
    assert code == 0, err
    assert err.count(f"{data}:13") == 1 and err.count(f"{data}:14") == 1


def test_micro_batch_blend_schedule_and_optimizer_flags(tiny_dir, train_file, tmp_path, capsys):
    other = write_data(tmp_path / "chat.json", 6, start=40)
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", "--train-file", other, "--mix", "0.7,0.3",
                                       "--micro-batch-size", "auto", "--max-steps", "2", "--save-steps", "2",
                                       "--lr-scheduler-type", "cosine", "--warmup-steps", "1", "--optim", "adamw_torch"), capsys)
    assert code == 0, err
    args = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["args"]
    assert args["mix"] == [0.7, 0.3] and args["optim"] == "adamw_torch" and args["lr_scheduler_type"] == "cosine"
    assert args["micro_batch_size"] is None and len(args["train_file"]) == 2


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--mix", "1", "0"], ["--mix weights must be positive"]),
        (["--mix", "1"], ["--mix gives 1 weights for 2 --train-files"]),
        (["--mix", "a", "b"], ["--mix takes numbers"]),
        (["--micro-batch-size", "0"], ["--micro-batch-size must be at least 1 or auto"]),
        (["--micro-batch-size", "many"], ["expected a number or auto"]),
        (["--lr-scheduler-type", "wobbly"], ["--lr-scheduler-type 'wobbly' is not a schedule"]),
    ],
)
def test_bad_blend_and_micro_batch_flags_are_one_line(tiny_dir, train_file, tmp_path, capsys, extra, fragments):
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", "--train-file", train_file, *extra), capsys)
    assert code == 2
    assert_one_line(err, *fragments)
    assert not (tmp_path / "out").exists()


def test_report_to_a_tracker_that_is_not_installed(tiny_dir, train_file, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code, _, err = run_main(train_args(tiny_dir, train_file, tmp_path / "out", "--report-to", "wandb"), capsys)
    assert code == 2
    assert_one_line(err, "--report-to wandb needs the wandb package: pip install wandb")


def test_a_crash_between_renames_names_the_checkpoint_it_resumes(tiny_dir, train_file, tmp_path, capsys):
    """Issue 13, item 6a: --resume named checkpoint-2 while resuming checkpoint-4."""
    out = tmp_path / "out"
    assert run_main(train_args(tiny_dir, train_file, out, "--max-steps", "4", "--save-steps", "2"), capsys)[0] == 0
    os.replace(out / "checkpoint-4", out / ".old-checkpoint-4-777")
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "5", "--save-steps", "2", "--resume"), capsys)
    assert code == 0, err
    assert f"resuming {out / 'checkpoint-4'}" in err
    assert read_progress(out)[-1].step == 5


def test_eval_scores_several_files_side_by_side(tiny_dir, train_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(train_args(tiny_dir, train_file, out, "--max-steps", "1", "--save-steps", "1"), capsys)[0] == 0
    task, chat = write_data(tmp_path / "task.json", 2, start=50), write_data(tmp_path / "chat.json", 3, start=60)
    code, stdout, err = run_main(["eval", "--model", tiny_dir, "--checkpoint", out / "checkpoint-1", "--validation-file", task,
                                  "--validation-file", chat, "--max-source-length", "16", "--max-target-length", "4",
                                  "--device", "cpu", "--quantization", "none", "--output-dir", tmp_path / "res"], capsys)
    assert code == 0, err
    rows = [line for line in stdout.splitlines() if line.strip().startswith(("│ task", "│ chat", "┃ data"))]
    assert len(rows) == 3 and "bleu-4" in rows[0]  # a header and one row per file
    for name, n in (("task", 2), ("chat", 3)):
        assert len((tmp_path / "res" / name / "generated_predictions.txt").read_text().splitlines()) == n
        assert json.loads((tmp_path / "res" / name / "metrics.json").read_text())["data"] == name


def test_a_full_disk_is_one_line_and_exit_2(tiny_dir, train_file, tmp_path, capsys, monkeypatch):
    """Issue 13, item 3: torch.save's RuntimeError on a full disk ended in a traceback."""
    out = tmp_path / "out"
    assert run_main(train_args(tiny_dir, train_file, out, "--max-steps", "1", "--save-steps", "1"), capsys)[0] == 0
    real = torch.save

    def full(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_main(train_args(tiny_dir, train_file, out, "--max-steps", "2", "--save-steps", "1", "--resume"), capsys)
    assert code == 2
    assert_one_line(err, f"{out} is full", "free at least", "checkpoint-1 is intact")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
