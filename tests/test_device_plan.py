"""The device plan (bench/run_device.sh, bench/prepare_carry.sh) checked here, where mistakes cost nothing: device
time is 30 minutes a session, and a typo found there wastes a call. The scripts parse; every bench script a
section runs exists; every flag it passes is one that script reads; every section the usage line names exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "bench" / "run_device.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", ["run_device.sh", "prepare_carry.sh"])
def test_the_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, flags) of each ``python3 bench/X.py ...`` and each ``engine NAME ...`` (bench_engine.py) call,
    backslash-continued lines joined."""
    text = text.replace("\\\n", " ")
    calls = [(m.group(1), m.group(2)) for m in re.finditer(r"python3 (bench/[\w/]+\.py|train_cli\.py)([^\n;|>]*)", text)]
    calls += [("bench/bench_engine.py", m.group(1)) for m in re.finditer(r"\bengine \w+ ([^\n;|>]*)", text)]
    calls += [("bench/bench_small_cards.py", m.group(1)) for m in re.finditer(r"\bsmall_card [\w-]+ ([^\n;|>]*)", text)]
    return [(script, re.findall(r"(?<![\w-])--[a-z][\w-]*", args)) for script, args in calls]


def test_every_bench_call_names_a_script_and_flags_it_reads():
    calls = _commands(PLAN.read_text())
    assert len(calls) > 20
    for script, flags in calls:
        source = ROOT / script
        assert source.is_file(), script
        text = source.read_text()
        if script == "train_cli.py":  # its subcommands' flags live in backend/cli modules too
            text += "".join(p.read_text() for p in (ROOT / "backend").rglob("*.py"))
        for flag in flags:
            assert f'"{flag}"' in text or f"'{flag}'" in text, f"{script} does not read {flag}"


def test_every_section_in_the_usage_line_exists():
    text = PLAN.read_text()
    usage = re.search(r"usage: bash bench/run_device.sh ([\w|-]+)", text).group(1).split("|")
    sections = {name for case in re.findall(r"^([\w|-]+)\)$", text, flags=re.M) for name in case.split("|")}
    assert set(usage) == sections
    for name in usage:  # and the header documents each
        assert f"bash bench/run_device.sh {name}" in text, name
