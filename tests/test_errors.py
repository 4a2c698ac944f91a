"""The one error mapper of the three commands (backend/errors.py): one sentence with its fix, None for a bug."""

from __future__ import annotations

import errno
import json

import pytest

from backend.errors import Problem, explain, is_out_of_memory
from backend.service import BackendError


class OutOfMemoryError(RuntimeError):
    """Stands in by name for torch.OutOfMemoryError, which the mapper recognises without importing torch."""


def _json_error() -> json.JSONDecodeError:
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads('{"num_layers": 2,,}')
    return caught.value


@pytest.mark.parametrize("err, fragments", [
    (BackendError("no model directory at /nope; pass --model a directory."), ["no model directory at /nope"]),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ["The GPU ran out of memory", "--quantization"]),
    (RuntimeError("CUDA error: out of memory"), ["The GPU ran out of memory"]),
    (ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes"), ["4-bit (NF4) loading needs bitsandbytes", "--quantization 8bit or none"]),
    (ImportError("Using `bitsandbytes` 8-bit quantization requires bitsandbytes"), ["pip install bitsandbytes"]),
    (ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece"), ["'sentencepiece' is not installed"]),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/adgen/checkpoint-30"),
     ["disk holding /runs/adgen/checkpoint-30 is full", "free some space"]),
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: No space left on device"),
     ["disk is full"]),
    (PermissionError(errno.EACCES, "Permission denied", "/etc/glmchat"), ["Permission denied: /etc/glmchat", "permissions"]),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/train.json"), ["File not found: /data/train.json"]),
    (_json_error(), ["not valid", "line 1, column 18"]),
    (MemoryError(), ["ran out of memory (RAM)"]),
])
def test_user_errors_become_one_sentence_with_the_fix(err, fragments):
    problem = explain(err)
    assert isinstance(problem, Problem)
    sentence = str(problem)
    assert "\n" not in sentence and sentence.count(". ") == 0, sentence
    for fragment in fragments:
        assert fragment in sentence


@pytest.mark.parametrize("err", [ValueError("shard 3 is truncated"), KeyError("weight"), TypeError("bad operand"),
                                 ImportError("cannot import name 'x' from partially initialized module 'y'")])
def test_bugs_are_not_dressed_up(err):
    assert explain(err) is None


def test_each_command_names_its_own_fix_for_out_of_memory():
    err = OutOfMemoryError("CUDA out of memory")
    assert is_out_of_memory(err) and not is_out_of_memory(RuntimeError("shape mismatch"))
    problem = explain(err, oom_fix="try --quantization 4bit or fewer --max-new-tokens")
    assert problem.fix == "Try --quantization 4bit or fewer --max-new-tokens."
    assert problem.line() == "the GPU ran out of memory; try --quantization 4bit or fewer --max-new-tokens."


def test_the_command_line_form_keeps_backend_sentences_and_acronyms():
    assert explain(BackendError("no weights in /m; finish the download.")).line() == "no weights in /m; finish the download."
    assert Problem("GPU 0 is busy.").line() == "GPU 0 is busy."
    assert Problem("/m is not a directory.", "Pass the model directory.").line() == "/m is not a directory; pass the model directory."
