"""Shared fixtures: where the reference material is, and tiny ChatGLM2 models."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
GOLDEN_TINY = REFERENCE / "golden" / "tiny"
REAL_TOKENIZER = REFERENCE / "chatglm2" / "tokenizer.model"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference material not found at {path} (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def golden_tiny_dir() -> Path:
    """The original implementation's tiny model and outputs (../shared/reference/golden/tiny)."""
    return _need(GOLDEN_TINY)


@pytest.fixture(scope="session")
def real_tokenizer_file() -> Path:
    """The real chatglm2-6b tokenizer.model."""
    return _need(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def golden_tokenizer_json() -> Path:
    return _need(REFERENCE / "golden" / "tokenizer_shared.json")
