"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_PATH = REPO_ROOT / "models" / "smollm2-135m-instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny generated model (fixed seed), built once and reused across runs."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(REPO_ROOT / ".pytest_cache" / "tiny-model")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not (SMOLLM2_PATH / "config.json").exists():
        pytest.fail(f"{SMOLLM2_PATH} is missing: run `make setup` first")
    return SMOLLM2_PATH
