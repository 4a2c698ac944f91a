"""``glmchat --prompt``: the reply on stdout, exit 0; bad input: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_tiny import make_tiny_model_dir
from test_adapters import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("cli") / "model")


def glmchat(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tui", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_prompt_prints_the_reply_and_exits_0(model_dir):
    from backend.engine import ChatEngine
    from backend.service import SamplingParams

    done = glmchat("--model", str(model_dir), "--quantization", "none", "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    expected = ChatEngine.load(str(model_dir), quantization="none", device="cpu").reply("你好", [], SamplingParams(temperature=0, max_new_tokens=8))
    assert done.stdout == expected.text + "\n"
    assert "Traceback" not in done.stderr


def test_prompt_with_adapter_uses_it(model_dir, tmp_path):
    from backend.configuration import ChatGLMConfig

    ckpt = write_checkpoint(tmp_path / "checkpoint-3", 4, config=ChatGLMConfig.from_pretrained(model_dir), seed=3)
    base = glmchat("--model", str(model_dir), "--quantization", "none", "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "8")
    tuned = glmchat("--model", str(model_dir), "--quantization", "none", "--adapter", str(ckpt), "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "8")
    assert base.returncode == tuned.returncode == 0, tuned.stderr
    assert base.stdout != tuned.stdout


def corrupt_copy(model_dir, tmp_path):
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(model_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    return d


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "no model directory at"),
        ("not-chatglm", "no config.json"),
        ("corrupt", "corrupt or truncated"),
        ("bad-adapter", "trained for another model"),
        ("config-list", "config.json holds a list where a JSON object"),
        ("config-typed", '"num_layers" is the string "two" but must be a whole number'),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, case, expected):
    from backend.configuration import ChatGLMConfig

    args = ["--quantization", "none", "--prompt", "hi"]
    if case == "missing":
        args += ["--model", str(tmp_path / "missing")]
    elif case == "not-chatglm":
        (tmp_path / "empty").mkdir()
        args += ["--model", str(tmp_path / "empty")]
    elif case == "corrupt":
        args += ["--model", str(corrupt_copy(model_dir, tmp_path))]
    elif case.startswith("config-"):
        d = corrupt_copy(model_dir, tmp_path)  # the weights are never reached
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps([config] if case == "config-list" else {**config, "num_layers": "two"}))
        args += ["--model", str(d)]
    else:
        other = ChatGLMConfig(**{**ChatGLMConfig.from_pretrained(model_dir).to_dict(), "num_layers": 3})
        args += ["--model", str(model_dir), "--adapter", str(write_checkpoint(tmp_path / "checkpoint-1", 4, config=other, with_config=False))]
    done = glmchat(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and "no GPU found" not in line]
    assert len(lines) == 1, done.stderr
    assert expected in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""
