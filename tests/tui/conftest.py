"""Fixtures for the app tests: private data/config dirs, checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_backend import write_checkpoint


@pytest.fixture(autouse=True)
def glmchat_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data and config dir (never the user's)."""
    monkeypatch.setenv("GLMCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GLMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


@pytest.fixture
def checkpoints(tmp_path: Path) -> list[Path]:
    """Two P-Tuning checkpoints of one run, as the fake (and the real engine) expect them."""
    run = tmp_path / "runs" / "adgen"
    return [write_checkpoint(run / "checkpoint-600"), write_checkpoint(run / "checkpoint-1200")]
