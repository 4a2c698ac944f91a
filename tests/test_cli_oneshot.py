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


def glmchat(*args, timeout=120, input=None, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tui", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT, input=input)


def test_prompt_prints_the_reply_and_exits_0(model_dir):
    from backend.engine import ChatEngine
    from backend.service import SamplingParams

    done = glmchat("--model", str(model_dir), "--quantization", "none", "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    expected = ChatEngine.load(str(model_dir), quantization="none", device="cpu").reply("你好", [], SamplingParams(temperature=0, max_new_tokens=8))
    assert done.stdout == expected.text + "\n"
    assert done.stderr == ""  # no CPU notice for a small model, no load bar when stderr is piped


def test_system_prompt_reaches_the_one_shot_reply(model_dir):
    from backend.engine import ChatEngine
    from backend.service import SamplingParams

    done = glmchat("--model", str(model_dir), "--quantization", "none", "--prompt", "你好", "--system", "简短回答。",
                   "--temperature", "0", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    engine = ChatEngine.load(str(model_dir), quantization="none", device="cpu")
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    assert done.stdout == engine.reply("你好", [], greedy, system="简短回答。").text + "\n"
    assert engine.prompt_ids("你好", [], system="简短回答。") != engine.prompt_ids("你好", [])


def test_dtype_reaches_the_loader(model_dir):
    done = glmchat("--model", str(model_dir), "--quantization", "none", "--dtype", "bf16", "--prompt", "你好",
                   "--temperature", "0", "--max-new-tokens", "4", "--info")
    assert done.returncode == 0, done.stderr
    assert "bf16" in done.stdout  # the structure page says the precision the model was loaded in
    bad = glmchat("--model", str(model_dir), "--dtype", "fp8", "--prompt", "你好")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


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
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # the error alone: no CPU notice before it
    assert expected in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


GREEDY_8 = ("--temperature", "0", "--max-new-tokens", "8")


@pytest.mark.parametrize("prompt", ["", "   ", "-"])
def test_an_empty_prompt_exits_2_with_one_line(prompt, model_dir):
    done = glmchat("--model", str(model_dir), "--prompt", prompt, input=" \n\n")  # "-": stdin holds only spaces
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "prompt is empty" in done.stderr, done.stderr


def test_prompt_dash_reads_the_prompt_from_stdin(model_dir):
    given = glmchat("--model", str(model_dir), "--prompt", "你好", *GREEDY_8)
    piped = glmchat("--model", str(model_dir), "--prompt", "-", *GREEDY_8, input="你好\n")
    assert given.returncode == piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and piped.stdout.strip()


def test_version():
    from importlib.metadata import version

    done = glmchat("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"glmchat {version('glmchat')}"


def test_prompt_without_model_uses_the_default_the_help_names(tmp_path):
    """--help says --model defaults to THUDM/chatglm2-6b: a one-shot run looks for it (offline here: the advice)."""
    from backend.cli import DEFAULT_MODEL

    assert f"default: {DEFAULT_MODEL}" in " ".join(glmchat("--help").stdout.split())
    done = glmchat("--prompt", "hi", env={"HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"hf download {DEFAULT_MODEL}" in done.stderr


def test_help_names_the_quantization_default_that_loading_picks():
    import torch

    from backend.loading import pick_quantization

    text = " ".join(glmchat("--help").stdout.split())
    assert f"default: {pick_quantization(None, torch.device('cuda'))} on a GPU; {pick_quantization(None, torch.device('cpu'))}" in text


def _backend_imports_torch() -> bool:
    probe = "import sys, backend.service; print('torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "True"


@pytest.mark.parametrize("flag", ["--model", "--adapter", "--adapters"])
def test_a_missing_path_fails_before_torch_is_imported(flag, model_dir, tmp_path):
    if _backend_imports_torch():
        pytest.skip("import backend still pulls in torch (issue 13 item 22); the check itself runs first regardless")
    args = ["--model", str(model_dir)] if flag != "--model" else []
    probe = ("import sys; from tui.__main__ import main; "
             f"code = main({args + [flag, str(tmp_path / 'nope'), '--prompt', 'hi']!r}); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert len(done.stderr.splitlines()) == 1 and "nope" in done.stderr


def test_a_missing_path_fails_before_the_app_starts(tmp_path):
    done = glmchat("--model", str(tmp_path / "nope"), timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"glmchat: no model directory at {tmp_path / 'nope'}; pass --model with a "
                                        "ChatGLM2 directory or a hub id such as THUDM/chatglm2-6b."]


def test_load_progress_shows_on_a_terminal(model_dir):
    """stderr a terminal: a transient bar with the load's stages; piped, nothing (test above)."""
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "tui", "--model", str(model_dir), "--prompt", "你好", *GREEDY_8],
                            stdout=subprocess.PIPE, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0 and out.strip()
    assert b"loading" in seen and b"ready" in seen, seen[-500:]  # the bar, drawn and then cleared


def test_the_cpu_notice_is_for_a_large_model_only_int8_buffers_counted():
    import torch

    from backend.cli import large_on_cpu
    from backend.int8_layer import Int8Linear

    with torch.device("meta"):  # sizes only: nothing allocated
        dense = torch.nn.Linear(32768, 16384, bias=False)  # 537 M weights
        int8 = Int8Linear(32768, 16384, bias=False, dtype=torch.float16)  # the same, as an 8-bit model holds them
    assert large_on_cpu(dense, "cpu") and large_on_cpu(int8, "cpu")
    assert not large_on_cpu(dense, "cuda:0")
    assert not large_on_cpu(torch.nn.Linear(128, 128), "cpu")  # the demo model's size
